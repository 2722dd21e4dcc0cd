"""How well generated images follow their prompts: the project's own measure for the default model and cascade.

The contrastive model pre-trained with the default model's text encoders (`xldm.train.contrastive`, saved as
`clip/final/clip_evaluator.safetensors` by scripts/train_default.sh) scores each image against its caption and 15
distractor captions of the same set (chance 1/16).  The same figure on the real emoji images of those captions is
the ceiling to compare with.  Two caption sets, native emoji only (one canonical image per caption):

- held out: the emoji names that no training stage ever saw (`xldm.train.data.is_heldout`), so the prompt's
  words were never paired with its picture;
- train: a seeded sample of the training captions.

    python scripts/prompt_following.py --evaluator clip_evaluator.safetensors --data EMOJI_DIR [--model BASE
        [--refiner REFINER] | --cascade default] [--count 256] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from xldm.reproduce.metrics import Generate, latent_generator, score, to_evaluator_pixels  # noqa: F401  (package)
from xldm.train.contrastive import load_evaluator
from xldm.train.data import is_heldout


def caption_sets(data: str | Path, *, count: int = 256, seed: int = 0) -> dict[str, list[dict]]:
    """{"heldout": records, "train": records}: native images of an `xldm data emoji` folder, one per caption,
    at most `count` per set (a seeded sample)."""
    records = [json.loads(line) for line in (Path(data) / "metadata.jsonl").read_text().splitlines() if line.strip()]
    sets: dict[str, list[dict]] = {"heldout": [], "train": []}
    seen: set[str] = set()
    for r in records:
        if r.get("kind", "native") != "native" or r["text"] in seen:
            continue
        seen.add(r["text"])
        sets["heldout" if is_heldout(r["text"]) else "train"].append(r)
    generator = torch.Generator().manual_seed(seed)
    for name, part in sets.items():
        if len(part) > count:
            keep = torch.randperm(len(part), generator=generator)[:count].sort().values.tolist()
            sets[name] = [part[i] for i in keep]
    return sets


def real_images(data: str | Path, records: list[dict]) -> list[Image.Image]:
    out = []
    for r in records:
        with Image.open(Path(data) / r["file_name"]) as img:
            out.append(img.copy())
    return out


def measure(evaluator, data: str | Path, generate: Generate | None, *, count: int = 256, seed: int = 0,
            progress: bool = True) -> dict[str, dict]:
    """{"heldout": {"real": ..., "generated": ...}, "train": {...}}; `generate=None` scores the real images only.
    Image i of a set is generated with seed `seed + i`."""
    from tqdm import tqdm

    results: dict[str, dict] = {}
    for name, records in caption_sets(data, count=count, seed=seed).items():
        captions = [r["text"] for r in records]
        part = {"captions": len(captions), "chance": 1.0 / 16,
                "real": score(evaluator, real_images(data, records), captions, seed=seed)["both"]}
        if generate is not None:
            t0 = time.perf_counter()
            images = [generate(c, seed + i) for i, c in enumerate(tqdm(captions, desc=name, disable=not progress,
                                                                         file=sys.stderr))]
            part["generated"] = score(evaluator, images, captions, seed=seed)["both"]
            part["seconds_per_image"] = (time.perf_counter() - t0) / max(len(captions), 1)
        results[name] = part
    return results


def cascade_generator(spec: str) -> Generate:
    from xldm.cascade import CascadePipeline, load_cascade

    pipe = CascadePipeline(load_cascade(spec))

    def generate(caption: str, seed: int) -> Image.Image:
        return pipe(caption, seed=seed).images[0]

    return generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/prompt_following.py", description=__doc__.split("\n")[0])
    parser.add_argument("--evaluator", required=True, help="clip_evaluator.safetensors of the default model's run")
    parser.add_argument("--data", required=True, help="the `xldm data emoji` folder (metadata.jsonl)")
    parser.add_argument("--model", default=None, help="a latent model (default: none, real images only)")
    parser.add_argument("--refiner", default=None)
    parser.add_argument("--cascade", default=None, help="a cascade instead of --model ('default' or a folder)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--unet", default=None, help="another UNet for --model (e.g. the bundled turbo student)")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--timestep-spacing", default=None, choices=["leading", "trailing", "linspace"])
    parser.add_argument("--count", type=int, default=256, help="captions per set at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    if args.model and args.cascade:
        parser.error("--model and --cascade exclude each other")
    generate = None
    if args.model:
        extra = {k: v for k, v in (("sampler", args.sampler), ("timestep_spacing", args.timestep_spacing)) if v}
        generate = latent_generator(args.model, args.refiner, steps=args.steps, cfg=args.cfg, unet=args.unet, **extra)
    elif args.cascade:
        generate = cascade_generator(args.cascade)
    results = measure(load_evaluator(args.evaluator), args.data, generate, count=args.count, seed=args.seed)
    results["settings"] = {k: getattr(args, k) for k in ("model", "refiner", "cascade", "unet", "steps", "cfg",
                                                          "sampler", "timestep_spacing", "count", "seed")}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["caption_sets", "to_evaluator_pixels", "score", "measure", "latent_generator", "cascade_generator"]
