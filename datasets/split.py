"""The bundled model's dataset split: an image folder without its held-out emoji names, for every training stage.

    python datasets/split.py SRC DST

DST gets the training records of SRC's `metadata.jsonl` (images hard-linked, or copied across file systems) and
`heldout.jsonl` with the held-out records: all captions of ~3 % of the emoji names (`xldm.train.data.is_heldout`,
by the name before the first comma), so a held-out caption's words were never paired with its picture.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from xldm.train.data import caption_group, is_heldout
from xldm.weights.io import atomic_write


def split_dataset(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, int]:
    """`dst`: the training part of the image folder `src` (held-out names removed), images hard-linked (copied
    across file systems), plus `heldout.jsonl` with the held-out records.  Returns counts."""
    src, dst = Path(src), Path(dst)
    records = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if not is_heldout(r["text"])]
    heldout = [r for r in records if is_heldout(r["text"])]
    dst.mkdir(parents=True, exist_ok=True)
    for record in train:
        target = dst / record["file_name"]
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / record["file_name"], target)
        except OSError:
            shutil.copyfile(src / record["file_name"], target)
    with atomic_write(dst / "metadata.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    (dst / "heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in heldout))
    return {"train": len(train), "heldout": len(heldout),
            "heldout_names": len({caption_group(r["text"]) for r in heldout})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="datasets/split.py", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="image folder with a metadata.jsonl (e.g. a datasets/emoji.py build)")
    parser.add_argument("dst", help="the training folder to write (created)")
    args = parser.parse_args(argv)
    print(json.dumps(split_dataset(args.src, args.dst)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
