"""The bundled turbo student against its teacher: wall time end to end and a grid of the same prompts and seeds.

    python benchmarks/turbo.py [--out docs/turbo.png] [--repeats 3]

Rows of the grid: the teacher (the bundled base) at 30 steps with cfg 5 (euler, leading: `xldm generate`'s
defaults), then the student (`--model default-turbo`: euler_a, trailing, cfg 1) at 1, 2 and 4 steps.  Times are the
median over `--repeats` runs of one 128x128 image, models already loaded (the CLI adds ~1 s of loading to both).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from xldm.config import DEFAULT_MODEL_PATH, DEFAULT_TURBO_UNET_PATH, GENERATE_DEFAULTS, TURBO_DEFAULTS
from xldm.pipeline import Pipeline

PROMPTS = ["red heart", "smiling face", "pizza", "ghost", "thumbs up", "banana", "rocket", "unicorn"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the grid here (PNG)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    teacher = Pipeline(DEFAULT_MODEL_PATH, device="cpu", dtype=torch.float32)
    student = Pipeline(DEFAULT_MODEL_PATH, device="cpu", dtype=torch.float32, unet=DEFAULT_TURBO_UNET_PATH)
    rows = [("teacher, 30 steps, cfg 5", teacher, GENERATE_DEFAULTS)]
    rows += [(f"student, {n} step{'s' * (n > 1)}", student, dict(TURBO_DEFAULTS, steps=n)) for n in (1, 2, 4)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'setting':<28}{'s / image':>10}")
    images = []
    for label, pipe, settings in rows:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe(PROMPTS[0], seed=0, **settings)
            times.append(time.perf_counter() - t0)
        print(f"{label:<28}{statistics.median(times):>10.3f}", flush=True)
        images.append([pipe(p, seed=i, **settings).images[0] for i, p in enumerate(PROMPTS)])
    if args.out:
        side = images[0][0].size[0]
        grid = np.concatenate([np.concatenate([np.asarray(im) for im in row], axis=1) for row in images], axis=0)
        Image.fromarray(grid).resize((len(PROMPTS) * side, len(rows) * side)).save(args.out)
        print(f"wrote {args.out} (rows: {', '.join(label for label, _, _ in rows)}; columns: {', '.join(PROMPTS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
