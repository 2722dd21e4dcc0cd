"""The sampling speed-ups of `xldm.speedups` on the bundled default model: time and quality cost, one table.

    python benchmarks/speedups.py --evaluator runs/default/clip/final/clip_evaluator.safetensors \
        --data runs/default/data/emoji [--count 16] [--steps 20]

Every setting generates the same images (fp32, CPU, euler, cfg 5, `--steps` steps, seed i for caption i; `--count`
held-out and `--count` training captions of the emoji set, as scripts/prompt_following.py picks them) and is
compared with the reference (no speed-up) on the same seeds: the PSNR of the decoded 8-bit image (mean over the
images), the largest latent difference, and the prompt-following score of scripts/prompt_following.py (the
evaluator picks each image's caption among 16 of its set; chance 6 %).  Time per image is the wall time of the
whole generation (text encoders, sampling, decode), models loaded: the fastest of `--repeats` runs of one image.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from prompt_following import caption_sets  # noqa: E402

from xldm.config import DEFAULT_MODEL_PATH  # noqa: E402
from xldm.pipeline import Pipeline
from xldm.request import GenerationRequest  # noqa: E402
from xldm.reproduce.metrics import score  # noqa: E402
from xldm.train.contrastive import load_evaluator  # noqa: E402

SETTINGS = [
    ("reference (fp32, no speed-up)", {}),
    ("deep-cache 2", {"cache_interval": 2}),
    ("deep-cache 3", {"cache_interval": 3}),
    ("deep-cache 5", {"cache_interval": 5}),
    ("deep-cache 3, branch 1", {"cache_interval": 3, "cache_branch": 1}),
    ("deep-cache 3, branch 3", {"cache_interval": 3, "cache_branch": 3}),
    ("cfg-end 0.8", {"cfg_end": 0.8}),
    ("cfg-end 0.5", {"cfg_end": 0.5}),
    ("deep-cache 3 + cfg-end 0.8", {"cache_interval": 3, "cfg_end": 0.8}),
]


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluator", required=True, help="clip_evaluator.safetensors of the default model's run")
    parser.add_argument("--data", required=True, help="the `xldm data emoji` folder (metadata.jsonl)")
    parser.add_argument("--count", type=int, default=16, help="captions per set (held out, training)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per setting (the fastest counts)")
    args = parser.parse_args(argv)
    evaluator = load_evaluator(args.evaluator)
    sets = caption_sets(args.data, count=args.count)
    captions = {name: [r["text"] for r in records] for name, records in sets.items()}
    pipe = Pipeline(DEFAULT_MODEL_PATH, device="cpu", dtype=torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.steps} steps, cfg {args.cfg}, "
          f"euler; {sum(map(len, captions.values()))} images per setting", file=sys.stderr)
    pipe.generate(GenerationRequest(prompt="warm-up", steps=2, seed=0))  # first-call costs out of the timings
    reference: dict[str, list] = {}
    rows = []
    for label, settings in SETTINGS:
        images, latents, seconds = {}, {}, 0.0
        for name, texts in captions.items():
            images[name], latents[name] = [], []
            for i, caption in enumerate(texts):
                t0 = time.perf_counter()
                result = pipe.generate(GenerationRequest(prompt=caption, steps=args.steps, cfg=args.cfg, seed=i,
                                                         **settings))
                seconds += time.perf_counter() - t0
                images[name].append(result.images[0])
                latents[name].append(result.latents[0].float())
        count = sum(map(len, images.values()))
        if not reference:
            reference = {name: (images[name], latents[name]) for name in images}
        psnrs = [image_psnr(np.asarray(im), np.asarray(ref)) for name in images
                 for im, ref in zip(images[name], reference[name][0])]
        latent_diff = max(float((z - ref).abs().max()) for name in latents
                          for z, ref in zip(latents[name], reference[name][1]))
        follows = {name: score(evaluator, images[name], captions[name])["both"] for name in images}
        # the time: the fastest of `--repeats` generations of the first caption (other jobs on a shared machine
        # only ever slow one down); the mean over all images is printed too
        first = captions["heldout"][0]
        best = math.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe.generate(GenerationRequest(prompt=first, steps=args.steps, cfg=args.cfg, seed=0, **settings))
            best = min(best, time.perf_counter() - t0)
        rows.append((label, best, psnrs, latent_diff, follows))
        print(f"{label}: best {best:.3f} s/image, mean {seconds / count:.3f}", file=sys.stderr)
    base_time = rows[0][1]
    print("| setting | time per image | speed-up | PSNR vs reference | max latent diff | prompt following "
          "(held out / training) |")
    print("|---|---|---|---|---|---|")
    for label, per_image, psnrs, latent_diff, follows in rows:
        finite = [p for p in psnrs if math.isfinite(p)]
        mean_psnr = "identical" if not finite else f"{sum(finite) / len(psnrs):.1f} dB" if len(finite) == len(
            psnrs) else f"{sum(finite) / len(finite):.1f} dB ({len(psnrs) - len(finite)} identical)"
        print(f"| {label} | {per_image:.2f} s | {base_time / per_image:.2f}x | {mean_psnr} | {latent_diff:.3f} | "
              f"{follows['heldout']:.0%} / {follows['train']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
