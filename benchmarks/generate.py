"""End-to-end generation: wall time and peak memory (RSS) of `xldm.load(...)(prompt)`, random weights.

    python benchmarks/generate.py --config tiny --steps 20
    python benchmarks/generate.py --config sdxl --refiner --size 1024 --steps 2 --low-memory --dtype bf16

Writes random-weight single-file checkpoints of the chosen size once (into --workdir, reused by later
runs), then measures loading + generation in a fresh subprocess (so the peak RSS is the generation's
alone): total wall time, time per denoising step, peak RSS, and the files' sizes.
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

CONFIGS = {"tiny": ("tiny-sdxl-base", "tiny-sdxl-refiner"), "sdxl": ("sdxl-base", "sdxl-refiner")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_model(preset: str, dtype: torch.dtype):
    """`Components` of a preset with every tensor random (N(0, 0.02), seed 0), built directly in `dtype`."""
    from xldm.config import PRESETS
    from xldm.models.clip import CLIPTextModel
    from xldm.models.components import Components
    from xldm.models.unet import UNet
    from xldm.models.vae import AutoencoderKL

    config = PRESETS[preset]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Components(config=config, unet=UNet(config.unet), vae=AutoencoderKL(config.vae),
                           text_encoders=tuple(CLIPTextModel(te) for te in config.text_encoders))
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for module in model.modules().values():
            for p in module.parameters():
                p.normal_(0, 0.02)
    return model


def write_random_checkpoint(preset: str, path: Path, dtype: torch.dtype) -> None:
    """A single-file checkpoint of `random_model(preset, dtype)`."""
    from xldm.weights.save import save_single_file

    save_single_file(random_model(preset, dtype), path)


def run(args: argparse.Namespace) -> dict:
    """The measured part (runs in its own process)."""
    import xldm

    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    pipe = xldm.load(args.model, refiner=args.refiner_path, dtype=dtype, device=args.device,
                     low_memory=args.low_memory)
    loaded = time.perf_counter()
    result = pipe("a red apple on a wooden table", steps=args.steps, width=args.size, height=args.size, seed=0,
                  **({"refiner_start": args.refiner_start} if args.refiner_path else {}))
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available() and args.device != "cpu":
        gpu_peak = torch.cuda.max_memory_allocated()
    else:
        gpu_peak = None
    return {
        "load_s": loaded - start if not args.low_memory else None,
        "total_s": end - start,
        "peak_rss_gib": peak / 2**30,
        "peak_gpu_gib": gpu_peak / 2**30 if gpu_peak else None,
        "image": list(result.images[0].size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--refiner", action="store_true", help="base -> refiner hand-off")
    parser.add_argument("--refiner-start", type=float, default=0.8)
    parser.add_argument("--size", type=int, default=None, help="default: 64 (tiny) / 1024 (sdxl)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the random checkpoints are kept (default: a temp dir)")
    # internal: the measured subprocess
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--refiner-path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(run(args)))
        return

    args.size = args.size or (64 if args.config == "tiny" else 1024)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="xldm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base_preset, refiner_preset = CONFIGS[args.config]
    files = {}
    # full-size files are written once in bf16 (half the disk and time) and cast on load when needed
    file_dtype = "fp32" if args.config == "tiny" else "bf16"
    for preset in [base_preset] + ([refiner_preset] if args.refiner else []):
        path = workdir / f"{preset}-{file_dtype}.safetensors"
        if not path.exists():
            t = time.perf_counter()
            write_random_checkpoint(preset, path, DTYPES[file_dtype])
            print(f"wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s")
        files[preset] = path
    cmd = [sys.executable, __file__, "--measure", "--model", str(files[base_preset]), "--steps", str(args.steps),
           "--size", str(args.size), "--dtype", args.dtype, "--device", args.device,
           "--refiner-start", str(args.refiner_start)]
    if args.refiner:
        cmd += ["--refiner-path", str(files[refiner_preset])]
    if args.low_memory:
        cmd.append("--low-memory")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    sizes = sum(p.stat().st_size for p in files.values()) / 2**30
    print(f"{args.config}{' + refiner' if args.refiner else ''}, {args.size}x{args.size}, {args.steps} steps, "
          f"{args.dtype}, {args.device}{', low-memory' if args.low_memory else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"checkpoints {sizes:.2f} GiB;  total {measured['total_s']:.1f} s"
          + (f" (load {measured['load_s']:.1f} s)" if measured["load_s"] is not None else "")
          + f";  peak RSS {measured['peak_rss_gib']:.2f} GiB"
          + (f";  peak GPU {measured['peak_gpu_gib']:.2f} GiB" if measured["peak_gpu_gib"] else ""))


if __name__ == "__main__":
    main()
