"""`xldm reproduce NAME`: the SDXL paper's claims at small scale, one command each (a report.md with the table in the
paper's form and its figures, and results.json).  Each reproduction is a module with `run(out, scale, seed, data)`:

* size_conditioning: Table 2 (discard small images / no size conditioning / size conditioning), FID;
* crop_conditioning: Sec. 2.2, Figs. 4-5 (subjects cut by the frame with and without crop conditioning);
* refiner: base alone / base + refiner (hand-off 0.8) / base + refiner as SDEdit, prompt following and sharpness;
* cascade_cost: FLOPs and wall time of a pixel cascade against direct sampling at the final size and a latent model.

Runs are seeded (`--seed`) and resumable: training runs finished in the output folder are reused, unfinished ones
resume from their checkpoints (the training loop's resume)."""

from __future__ import annotations

import importlib
from pathlib import Path

REPRODUCTIONS = {"size-conditioning": "size_conditioning", "crop-conditioning": "crop_conditioning",
                 "refiner": "refiner", "cascade-cost": "cascade_cost"}


def reproduce(name: str, out: str | Path, *, scale: str = "smoke", seed: int = 0, data: str | None = None,
              progress: bool = False) -> dict:
    """Run reproduction `name` into `out`; returns its results (also written to out/results.json)."""
    from xldm.reproduce.common import scale_settings

    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; expected one of {list(REPRODUCTIONS)}")
    settings = scale_settings(scale)
    module = importlib.import_module(f"xldm.reproduce.{REPRODUCTIONS[name]}")
    return module.run(Path(out), settings, seed=seed, data=data, progress=progress)
