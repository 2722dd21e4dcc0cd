"""Peak memory and time of SDXL base + refiner, two images in a row: resident, `--low-memory`, and with int8 weights.

    python benchmarks/memory.py                                   # the full measurement: 1024x1024, 4 steps
    python benchmarks/memory.py --size 256 --steps 1              # a quick run (same files, small images)
    python benchmarks/memory.py --config tiny --size 64 --steps 2 # the tiny models (seconds; no SDXL files)

Full-size random-weight single files of SDXL base and refiner (bf16, benchmarks/generate.py's writer) are written
once into `--cache` and reused.  Each mode runs in a fresh process (so its peak is its own): it builds the pipeline,
generates image 1 (seed 0) and image 2 (seed 1) with the refiner taking over at 0.8, and reports the peak resident
memory (VmHWM of /proc/self/status: anonymous memory and the mapped file's pages both count), the seconds of each
image (the first includes reading the files: resident mode reads them before it, into its load time), and on CUDA the
peak device memory.  Modes: `resident` (everything in memory, bf16), `low-memory` (one network at a time, kept near
the device: xldm.weights.offload), `low-memory int8` (and the UNets' Linear / 1x1 conv weights in int8:
xldm.models.quantize).

The quality line compares int8 with the float weights on the bundled model (`xldm.config.DEFAULT_MODEL_PATH`, fp32,
CPU, `--quality-steps` steps, the same seeds and prompts): the PSNR of the decoded 8-bit images and the largest
latent difference; `--no-quality` skips it.

Measured so far (2-core CPU shared with a training job, load average 5-6): `--config tiny --dtype fp32 --size 64
--steps 2`: resident 0.38 GiB, image 1 / 2 1.4 / 0.6 s; low-memory 0.32 GiB, 5.5 / 0.8 s; low-memory int8 0.32 GiB,
7.1 / 1.1 s.  int8 quality on the bundled model (fp32, 20 steps, 4 images): PSNR 39.7 dB (lowest 34.3 dB), max
latent diff 0.21.  Full-size SDXL at 256x256, 1 step: the resident mode reached 12.5 GiB RSS (both models
resident in bf16, all of it anonymous memory) and had not finished image 1 after 30 minutes on that machine; the
full table is still to be measured on an unloaded one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = {"resident": {}, "low-memory": {"low_memory": True}, "low-memory-int8": {"low_memory": True,
                                                                                  "quantize": "int8"}}
CONFIGS = {"tiny": ("tiny-sdxl-base", "tiny-sdxl-refiner"), "sdxl": ("sdxl-base", "sdxl-refiner")}
PROMPT = "a red apple on a wooden table"
QUALITY_PROMPTS = ("a red heart", "a smiling sun", "a blue fish", "a green tree")


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM), or ru_maxrss where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure(mode: str, base: str, refiner: str, size: int, steps: int, device: str, dtype: str) -> dict:
    """One mode in this process: build, two images, peak memory."""
    import xldm.pipeline as pipeline

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    start = time.perf_counter()
    pipe = pipeline.load(base, refiner=refiner, dtype=dt, device=device, **MODES[mode])
    seconds = {"load": time.perf_counter() - start}
    latents = []
    for i in (1, 2):
        t0 = time.perf_counter()
        result = pipe(PROMPT, steps=steps, width=size, height=size, seed=i - 1, refiner_start=0.8)
        seconds[f"image{i}"] = time.perf_counter() - t0
        latents.append(result.latents)
    out = {"mode": mode, "peak_rss": peak_rss_bytes(), "seconds": seconds,
           "finite": all(bool(torch.isfinite(z).all()) for z in latents)}
    if device.startswith("cuda"):
        out["peak_gpu"] = torch.cuda.max_memory_allocated()
    return out


def quality(steps: int) -> dict:
    """int8 against the float weights on the bundled model: PSNR of the images, max latent difference."""
    from speedups import image_psnr
    from xldm.config import DEFAULT_MODEL_PATH
    from xldm.pipeline import Pipeline

    plain = Pipeline(DEFAULT_MODEL_PATH, device="cpu", dtype=torch.float32)
    int8 = Pipeline(DEFAULT_MODEL_PATH, device="cpu", dtype=torch.float32, quantize="int8")
    psnrs, diffs = [], []
    for seed, prompt in enumerate(QUALITY_PROMPTS):
        a, b = (p(prompt, steps=steps, seed=seed) for p in (plain, int8))
        psnrs.append(image_psnr(np.asarray(a.images[0]), np.asarray(b.images[0])))
        diffs.append(float((a.latents.float() - b.latents.float()).abs().max()))
    return {"psnr_db": float(np.mean(psnrs)), "min_psnr_db": float(min(psnrs)), "max_latent_diff": max(diffs),
            "images": len(psnrs), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "fp16"))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XLDM_BENCH_CACHE", "~/.cache/xldm-bench")),
                        help="where the random-weight files are written once (default ~/.cache/xldm-bench)")
    parser.add_argument("--quality-steps", type=int, default=20)
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, *args.files, args.size, args.steps, args.device, args.dtype)))
        return 0
    from generate import write_random_checkpoint

    cache = args.cache.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    file_dtype = "fp32" if args.config == "tiny" else "bf16"
    files = []
    for preset in CONFIGS[args.config]:
        path = cache / f"{preset}-{file_dtype}.safetensors"
        if not path.exists():
            t0 = time.perf_counter()
            write_random_checkpoint(preset, path, {"fp32": torch.float32, "bf16": torch.bfloat16}[file_dtype])
            print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
        files.append(str(path))
    gib = 2**30
    size = sum(Path(f).stat().st_size for f in files) / gib
    print(f"{args.config} base + refiner, {args.size}x{args.size}, {args.steps} steps, {args.dtype}, {args.device}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; files {size:.2f} GiB")
    print("| mode | peak RSS | load | image 1 | image 2 |" + (" peak GPU |" if args.device.startswith("cuda") else ""))
    print("|---|---|---|---|---|" + ("---|" if args.device.startswith("cuda") else ""))
    for mode in args.modes:
        command = [sys.executable, __file__, "--measure", mode, "--files", *files, "--size", str(args.size),
                   "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype]
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            print(f"| {mode} | failed: {why} | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        s = r["seconds"]
        print(f"| {mode} | {r['peak_rss'] / gib:.2f} GiB | {s['load']:.1f} s | {s['image1']:.1f} s | "
              f"{s['image2']:.1f} s |" + (f" {r['peak_gpu'] / gib:.2f} GiB |" if "peak_gpu" in r else ""), flush=True)
    if not args.no_quality:
        q = quality(args.quality_steps)
        print(f"int8 quality (bundled model, fp32, {q['steps']} steps, {q['images']} images): PSNR {q['psnr_db']:.1f}"
              f" dB (lowest {q['min_psnr_db']:.1f} dB) vs float weights, max latent diff {q['max_latent_diff']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
