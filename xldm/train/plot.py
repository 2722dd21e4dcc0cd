"""`xldm plot RUN [--out PNG]`: a training run's curves from RUN/metrics.jsonl (one JSON object per step, written by
xldm.train.loop) as one PNG: the loss (raw, and an exponential moving average), validation losses if the records hold
any (`val*` fields), the learning rate, and the gradient norm.  matplotlib draws it, through its Agg canvas (no
display, no pyplot state): the optional extra `xldm[plot]`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from xldm.train.events import MissingExtraError

EXTRA = "plot"  # pyproject.toml [project.optional-dependencies]
SMOOTHING = 0.9  # EMA weight of the smoothed loss (ours; TensorBoard's slider offers 0-0.999)
FIGURE_INCHES, DPI = (10.0, 9.0), 100  # -> 1000 x 900 pixels


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order.  A missing or empty file is a FileNotFoundError / ValueError;
    a bad last line (cut short: the run is writing it) is left out, a bad line elsewhere is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (a training run writes RUN/metrics.jsonl from its first "
                                "step)")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("expected an object with an integer 'step'")
        except ValueError as e:
            if number == len(lines):
                break  # being written (the rule of xldm.train.checkpoint.trim_metrics)
            raise ValueError(f"{path}:{number}: not a metrics record ({e}): {line[:80]!r}") from None
        records.append(record)
    if not records:
        raise ValueError(f"{path}: holds no metrics records (no step has finished yet)")
    return records


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased by 1 - weight^n as Adam's moments (Kingma & Ba 2015, Sec. 3), so the
    first points are not pulled towards 0; non-finite values are passed over (NaN in the output)."""
    average, count, out = 0.0, 0, []
    for value in values:
        if math.isfinite(value):
            average, count = weight * average + (1 - weight) * value, count + 1
        out.append(average / (1 - weight**count) if count else math.nan)
    return out


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[name])) for r in records
             if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_metrics(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG of RUN/metrics.jsonl to `out` (default RUN/metrics.png); returns its path."""
    run = Path(run)
    records = read_metrics(run / "metrics.jsonl" if run.is_dir() else run)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingExtraError("xldm plot", "matplotlib", EXTRA, e) from None
    out = Path(out) if out is not None else (run if run.is_dir() else run.parent) / "metrics.png"
    validation = sorted({k for r in records for k in r if k.startswith("val")})
    has_grad = any(math.isfinite(v) for v in _series(records, "grad_norm")[1])
    panels = 2 + has_grad
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True, height_ratios=[2] + [1] * (panels - 1))
    steps, losses = _series(records, "loss")
    loss_axes = axes[0]
    loss_axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    loss_axes.plot(steps, smoothed(losses), color="tab:blue", linewidth=1.5, label=f"loss, EMA {SMOOTHING}")
    for name, colour in zip(validation, ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan") * 4):
        loss_axes.plot(*_series(records, name), color=colour, marker="o", markersize=3, label=name)
    skipped = [r["step"] for r in records if r.get("skipped_step")]
    for step in skipped:
        loss_axes.axvline(step, color="tab:red", alpha=0.3, linewidth=0.8)
    loss_axes.set_ylabel("loss")
    loss_axes.set_title(f"{run.name}: {len(records)} steps (last {records[-1]['step']})"
                        + (f", {len(skipped)} skipped (red)" if skipped else ""))
    loss_axes.legend(loc="upper right")
    axes[1].plot(*_series(records, "lr"), color="tab:green")
    axes[1].set_ylabel("learning rate")
    if has_grad:
        axes[2].plot(*_series(records, "grad_norm"), color="tab:orange", linewidth=0.8)
        axes[2].set_ylabel("gradient norm")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=DPI)
    return out
