"""Which text conditioning retrieves held-out captions better: the CLIP text encoders or a bag of words?

    python scripts/text_model_comparison.py RUN_DIR [--markdown]

RUN_DIR is a scripts/train_default.sh run (its `data/emoji` and its finished `clip` stage).  This trains the
same contrastive stage (preset default-clip: data, image tower, steps, batch, seed) with `text_model`
"bag-of-words" (xldm.train.contrastive.BagOfWords: mean of token embeddings, no attention, no word order) into
RUN_DIR/clip-bag-of-words, resuming if it was stopped, then prints both runs' retrieval accuracy (1 caption among
16) on the held-out emoji names and on a sample of the training captions, per encoder and with both summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from xldm.train.config import TRAIN_PRESETS
from xldm.train.loop import train

ROWS = (("heldout", "held-out names"), ("train_sample", "training sample"))
COLUMNS = (("encoder_0", "CLIP-L-like"), ("encoder_1", "bigG-like"), ("both", "both"))


def bag_of_words_run(run_dir: Path) -> Path:
    """RUN_DIR/clip-bag-of-words/final/metrics.json, trained (or resumed) when missing."""
    out = run_dir / "clip-bag-of-words"
    metrics = out / "final" / "metrics.json"
    if not metrics.exists():
        config = replace(TRAIN_PRESETS["default-clip"], data=str(run_dir / "data" / "emoji"), out=str(out),
                         text_model="bag-of-words")
        train(config, resume=True, progress=False)
    return metrics


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| text model | captions | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for model, metrics in results.items():
        for key, name in ROWS:
            part = metrics[key]
            cells = " | ".join(f"{100 * part[column]:.1f} %" for column, _ in COLUMNS)
            lines.append(f"| {model} | {name} ({int(part['images'])} images) | {cells} |")
    chance = results[next(iter(results))]["heldout"]["chance"]
    lines.append(f"\nChance: {100 * chance:.1f} %.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a scripts/train_default.sh output folder")
    args = parser.parse_args(argv)
    transformer = args.run_dir / "clip" / "final" / "metrics.json"
    if not transformer.exists():
        print(f"{sys.argv[0]}: {transformer} is missing: run the text-encoder stage first "
              f"(scripts/train_default.sh)", file=sys.stderr)
        return 2
    results = {"CLIP transformer": json.loads(transformer.read_text()),
               "bag of words": json.loads(bag_of_words_run(args.run_dir).read_text())}
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
