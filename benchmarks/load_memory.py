"""Peak memory of loading a full-size SDXL base checkpoint in bf16 through xldm's weight I/O.

Writes a random bf16 single-file safetensors with the shapes of SDXL base (UNet + VAE + both text
encoders, ~3.47 B parameters, ~6.9 GB) to a temporary folder, then, in a fresh process, builds the
xldm modules on the meta device and fills them with `open_checkpoint(...).tensors(prefix)` +
`load_strict` (tensors assigned in place).  Prints the file size, the loader's peak RSS
(`resource.getrusage(...).ru_maxrss`) and their ratio; the target is ratio <= 1.3.

    python benchmarks/load_memory.py                         # full SDXL base (needs ~7 GB disk, ~9 GB RAM)
    python benchmarks/load_memory.py --model synthetic --params 5e8   # ~1 GB file, any machine

If the xldm model classes cannot be imported, `--model sdxl` falls back to a synthetic module tree
with the same parameter count.  `--json` prints one JSON line (used by tests/test_weights_io.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

SDXL_BASE_PARAMS = 3_468_599_871  # UNet 2.567 B + VAE 0.084 B + CLIP-L 0.123 B + bigG 0.695 B


def _synthetic_tree(params: int) -> dict[str, nn.Module]:
    """Stacks of 4096x4096 Linear layers (16.8 M parameters each) with about `params` parameters."""
    width = 4096
    blocks = max(1, round(params / (width * width + width)))
    return {"model.": nn.Sequential(*(nn.Linear(width, width) for _ in range(blocks)))}


def build_modules(model: str, params: int) -> dict[str, nn.Module]:
    """Prefix -> module, built on the meta device (no memory)."""
    with torch.device("meta"):
        if model == "synthetic":
            return _synthetic_tree(params)
        try:
            from xldm.config import SDXL_BASE
            from xldm.models.clip import CLIPTextModel
            from xldm.models.unet import UNet
            from xldm.models.vae import AutoencoderKL
        except ImportError as e:
            print(f"xldm models not importable ({e}); using a synthetic tree", file=sys.stderr)
            return _synthetic_tree(SDXL_BASE_PARAMS)
        te1, te2 = SDXL_BASE.text_encoders
        return {
            "unet.": UNet(SDXL_BASE.unet),
            "vae.": AutoencoderKL(SDXL_BASE.vae),
            "text_encoder.": CLIPTextModel(te1),
            "text_encoder_2.": CLIPTextModel(te2),
        }


def write_random_checkpoint(path: Path, modules: dict[str, nn.Module], dtype: torch.dtype = torch.bfloat16) -> int:
    """Stream a safetensors file of random values with the modules' keys and shapes; returns its size.

    Written tensor by tensor (the format: 8-byte little-endian header length, JSON header, data), so
    the writer never holds more than one tensor.
    """
    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    layout, offset = [], 0
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            nbytes = value.numel() * dtype.itemsize
            layout.append((prefix + key, tuple(value.shape), offset, offset + nbytes))
            offset += nbytes
    header = {k: {"dtype": names[dtype], "shape": list(s), "data_offsets": [b, e]} for k, s, b, e in layout}
    header["__metadata__"] = {"format": "pt", "note": "random weights for benchmarks/load_memory.py"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # align the data area to 8 bytes, as the safetensors writer does
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, shape, _, _ in layout:
            t = torch.empty(shape, dtype=torch.float32).normal_(generator=generator).mul_(0.02).to(dtype)
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return path.stat().st_size


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def measure_load(path: Path, model: str, params: int) -> dict:
    """Run in a fresh process: build meta modules, load the file into them, report peak RSS."""
    from xldm.weights.io import load_strict, open_checkpoint

    modules = build_modules(model, params)
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    checkpoint = open_checkpoint(path)
    for prefix, module in modules.items():
        load_strict(module, checkpoint.tensors(prefix, dtype=torch.bfloat16), component=prefix.rstrip("."))
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    # Everything is materialised (no meta tensor left) and holds the file's values.
    leftover = [f"{p}{k}" for p, m in modules.items() for k, v in m.state_dict().items() if v.is_meta]
    if leftover:
        raise RuntimeError(f"{len(leftover)} tensors still on the meta device: {leftover[:5]}")
    prefix, module = next(iter(modules.items()))
    key, value = next(iter(module.state_dict().items()))
    if not torch.equal(value, checkpoint.tensor(prefix + key)):
        raise RuntimeError(f"{prefix + key} differs from the file after loading")
    size = path.stat().st_size
    params_loaded = sum(v.numel() for m in modules.values() for v in m.state_dict().values())
    return {
        "file_bytes": size,
        "params": params_loaded,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "ratio": peak / size,
        "ratio_above_baseline": (peak - baseline) / size,
        "load_seconds": seconds,
    }


def run(model: str, params: int, folder: Path | None = None, keep: bool = False) -> dict:
    """Write the file, then measure loading it in a fresh interpreter; returns the measurement."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "random_weights.safetensors"
        start = time.perf_counter()
        write_random_checkpoint(path, build_modules(model, params))
        write_seconds = time.perf_counter() - start
        command = [sys.executable, __file__, "--measure", str(path), "--model", model, "--params", str(params)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"loader process failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["write_seconds"] = write_seconds
        if keep:
            kept = Path(folder or ".") / path.name
            os.replace(path, kept)
            result["kept"] = str(kept)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sdxl", "synthetic"), default="sdxl")
    parser.add_argument("--params", type=float, default=SDXL_BASE_PARAMS, help="synthetic model size")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the temporary file")
    parser.add_argument("--keep", action="store_true", help="keep the written file in --dir")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = int(args.params)
    if args.measure is not None:  # the fresh loader process
        print(json.dumps(measure_load(args.measure, args.model, params)))
        return
    r = run(args.model, params, args.dir, args.keep)
    if args.json:
        print(json.dumps(r))
        return
    gb = 1e9
    print(f"parameters          {r['params'] / 1e9:.3f} B")
    print(f"file size (bf16)    {r['file_bytes'] / gb:.2f} GB   (written in {r['write_seconds']:.0f} s)")
    print(f"loader baseline RSS {r['baseline_rss_bytes'] / gb:.2f} GB   (python + torch + meta modules)")
    print(f"loader peak RSS     {r['peak_rss_bytes'] / gb:.2f} GB   (load took {r['load_seconds']:.1f} s)")
    print(f"peak RSS / file     {r['ratio']:.3f}   (target <= 1.3)")
    print(f"(peak - baseline) / file {r['ratio_above_baseline']:.3f}")


if __name__ == "__main__":
    main()
