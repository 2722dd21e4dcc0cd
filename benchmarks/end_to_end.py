"""End to end, each side with its default settings: xldm vs diffusers `StableDiffusionXLPipeline`, same weights.

    python benchmarks/end_to_end.py                          # full-size SDXL base, 1024x1024, 2 steps per side
    python benchmarks/end_to_end.py --size 256 --steps 1     # a quick look (full-size weights)
    python benchmarks/end_to_end.py --config tiny --size 64  # the plumbing, in seconds

One random SDXL base (`generate.random_model`, N(0, 0.02), seed 0) is written once as a diffusers folder (bf16 for
the full-size model, fp32 for the tiny one) into --workdir and reused by later runs.  Each side then runs in a fresh
process of its own (so that its peak RSS is its own): it loads the folder, as a user would, and generates one
base-only image of --size x --size from the same prompt and seed with its defaults:

* xldm: `xldm.load(folder)` (the dtype of `xldm.devices.default_dtype` for the device and the UNet's size) and
  `GenerationRequest`'s defaults (Euler, CFG 5, "leading" timesteps, the VAE decode of `decode_checked`);
* diffusers: `StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)` -- what
  `from_pretrained` gives for an fp32 checkpoint, named here because the shared files are bf16 -- and the
  pipeline's call defaults (the folder's Euler scheduler, guidance 5.0, its VAE upcast rule).

Timed: the generation call (text encoding, --steps denoising steps, VAE decode), models loaded; the load is
reported apart.  A step callback timestamps every step, so that the run splits into prompt encoding + first step,
later steps and decode.  "30 steps" is extrapolated: the measured run plus (30 - steps) more steps, each taking
the median of the steps after the first (with --steps 1, the first step with the prompt encoding, which
overestimates it).  The ratio is xldm / diffusers (< 1: xldm is faster).  When both sides compute in fp32 the max
pixel difference of their images is printed as the check that they ran the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from generate import random_model  # the random-weight model of the generation benchmark (this folder)
from unet_step import DTYPES, check_size, device_arg  # the UNet benchmark's (this folder)

PRESETS = {"sdxl": "sdxl-base", "tiny": "tiny-sdxl-base"}
PROMPT = "a red apple on a wooden table, studio light"
SEED = 0
EXTRAPOLATE_TO = 30  # steps (xldm's and A1111's default count)


def write_model(preset: str, folder: Path, dtype: torch.dtype) -> None:
    """The random model as a diffusers folder (run in a process of its own: the full-size model is 7 GB)."""
    from xldm.weights.save import save_diffusers

    save_diffusers(random_model(preset, dtype), folder)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_xldm(folder: Path, size: int, steps: int, device: torch.device, dtype: str | None):
    import xldm
    from xldm.devices import DTYPE_NAMES, dtype_reason
    from xldm.request import GenerationRequest

    start = time.perf_counter()
    pipe = xldm.load(folder, device=device, dtype=DTYPES[dtype] if dtype else None)
    loaded = time.perf_counter() - start
    stamps: list[float] = []

    def callback(stage, i, total, x, x0):
        _sync(device)
        stamps.append(time.perf_counter())

    def generate():
        request = GenerationRequest(prompt=PROMPT, width=size, height=size, steps=steps, seed=SEED)
        return pipe.generate(request, callback=callback).images[0]

    return generate, stamps, loaded, DTYPE_NAMES[pipe.dtype], dtype_reason(pipe.device, pipe.dtype,
                                                                             pipe.dtype_chosen)


def run_diffusers(folder: Path, size: int, steps: int, device: torch.device, dtype: str | None):
    from diffusers import StableDiffusionXLPipeline

    torch_dtype = DTYPES[dtype or "fp32"]
    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter() - start
    stamps: list[float] = []

    def callback(pipeline, i, t, kwargs):
        _sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    def generate():
        generator = torch.Generator("cpu").manual_seed(SEED)
        return pipe(PROMPT, num_inference_steps=steps, width=size, height=size, generator=generator,
                    callback_on_step_end=callback).images[0]

    name = dtype or "fp32"
    return generate, stamps, loaded, name, f"dtype: {name} ({'as asked' if dtype else 'from_pretrained default'})"


def measure(side: str, folder: Path, size: int, steps: int, device: torch.device, dtype: str | None,
            image_path: Path) -> dict:
    """One side, in its own process: load, generate once, split the time by the step timestamps."""
    build = run_xldm if side == "xldm" else run_diffusers
    generate, stamps, loaded, dtype_name, reason = build(folder, size, steps, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        image = generate()
        _sync(device)
        end = time.perf_counter()
    if len(stamps) != steps:
        raise RuntimeError(f"{side}: expected {steps} step callbacks, heard {len(stamps)}")
    image.save(image_path)
    later = [b - a for a, b in zip(stamps, stamps[1:])]
    per_step = statistics.median(later) if later else stamps[0] - start
    total = end - start
    return {
        "side": side, "dtype": dtype_name, "reason": reason, "load_s": loaded, "total_s": total,
        "first_s": stamps[0] - start, "per_step_s": per_step, "decode_s": end - stamps[-1],
        "extrapolated_s": total + (EXTRAPOLATE_TO - steps) * per_step,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "image": str(image_path),
    }


def pixel_difference(a: str, b: str) -> int:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    return int(np.abs(x - y).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sdxl", choices=sorted(PRESETS), help="full-size SDXL base or tiny")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: 1024 / tiny 64)")
    parser.add_argument("--steps", type=int, default=2, help=f"denoising steps run per side (then extrapolated to "
                                                             f"{EXTRAPOLATE_TO})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--xldm-dtype", default=None, choices=sorted(DTYPES),
                        help="default: xldm's own choice (default_dtype)")
    parser.add_argument("--diffusers-dtype", default=None, choices=sorted(DTYPES),
                        help="default: fp32 (diffusers' default)")
    parser.add_argument("--workdir", default=None, help="where the random model is kept (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="also print the measurements as one JSON line")
    parser.add_argument("--measure", choices=("xldm", "diffusers"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size or (64 if args.config == "tiny" else 1024)
    check_size(parser, size)
    if args.steps < 1 or args.steps > EXTRAPOLATE_TO:
        parser.error(f"--steps must be in [1, {EXTRAPOLATE_TO}], got {args.steps}")
    device = device_arg(parser, args.device)

    if args.write:
        write_model(PRESETS[args.config], Path(args.write), DTYPES["fp32" if args.config == "tiny" else "bf16"])
        return
    if args.measure:
        dtype = args.xldm_dtype if args.measure == "xldm" else args.diffusers_dtype
        folder = Path(args.model)
        print(json.dumps(measure(args.measure, folder, size, args.steps, device, dtype,
                                 folder.parent / f"{args.measure}-{size}.png")))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="xldm-bench-"))
    folder = workdir / f"{PRESETS[args.config]}-random-diffusers"
    here = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--size", str(size),
            "--steps", str(args.steps), "--device", args.device]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    if not (folder / "model_index.json").exists():
        t = time.perf_counter()
        subprocess.run(here + ["--write", str(folder)], check=True, env=env)
        print(f"wrote the random model to {folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = {}
    for side in ("xldm", "diffusers"):
        cmd = here + ["--measure", side, "--model", str(folder)]
        for flag, value in (("--xldm-dtype", args.xldm_dtype), ("--diffusers-dtype", args.diffusers_dtype)):
            if value:
                cmd += [flag, value]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"the {side} run failed:\n{done.stderr[-4000:]}")
        rows[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{side}: {rows[side]['reason']}; {rows[side]['total_s']:.1f} s", file=sys.stderr)

    ours, theirs = rows["xldm"], rows["diffusers"]
    print(f"end to end, SDXL base ({args.config}), {size}x{size}, base only, {args.steps} step(s) run per side, "
          f"extrapolated to {EXTRAPOLATE_TO}; {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    gpu = device.type == "cuda"
    print(f"| side | dtype | load | prompt + step 1 | per step | decode | {args.steps} step(s) | "
          f"{EXTRAPOLATE_TO} steps (extrap.) | peak RSS |" + (" peak GPU |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for r in (ours, theirs):
        print(f"| {r['side']} | {r['dtype']} | {r['load_s']:.1f} s | {r['first_s']:.2f} s | {r['per_step_s']:.2f} s "
              f"| {r['decode_s']:.2f} s | {r['total_s']:.1f} s | {r['extrapolated_s']:.1f} s | "
              f"{r['peak_rss_gib']:.2f} GiB |" + (f" {r['peak_gpu_gib']:.2f} GiB |" if gpu else ""))
    ratio = ours["extrapolated_s"] / theirs["extrapolated_s"]
    print(f"| ratio xldm/diffusers | | | {ours['first_s'] / theirs['first_s']:.3f} | "
          f"{ours['per_step_s'] / theirs['per_step_s']:.3f} | {ours['decode_s'] / theirs['decode_s']:.3f} | "
          f"{ours['total_s'] / theirs['total_s']:.3f} | {ratio:.3f} ({1 / ratio:.2f}x faster) | "
          f"{ours['peak_rss_gib'] / theirs['peak_rss_gib']:.3f} |" + (" |" if gpu else ""))
    if ours["dtype"] == theirs["dtype"] == "fp32":
        print(f"max pixel difference of the two images (same weights, fp32): "
              f"{pixel_difference(ours['image'], theirs['image'])}/255")
    if args.json:
        print(json.dumps({"size": size, "steps": args.steps, "device": str(device), "xldm": ours,
                          "diffusers": theirs, "ratio": ratio}))


if __name__ == "__main__":
    main()
