"""TensorBoard event files of a training run (`TrainConfig.tensorboard`): RUN/tensorboard/, one scalar per metric
and step, written with tensorboardX (the optional extra `xldm[tensorboard]`: pure Python on protobuf, without
TensorFlow or the tensorboard server).  View them with `tensorboard --logdir RUN/tensorboard`.

The scalars are the numeric fields of each metrics.jsonl record under `train/` (`train/loss`, `train/lr`,
`train/grad_norm`, `train/it_per_s`, `train/skipped_step` as 0/1, and a task's own extras).  A resumed run opens a new
event file with `purge_step` = its first step, so TensorBoard drops what an interrupted run wrote past its last
checkpoint (tensorboardX `SummaryWriter(purge_step=...)`)."""

from __future__ import annotations

from pathlib import Path

EXTRA = "tensorboard"  # pyproject.toml [project.optional-dependencies]


class MissingExtraError(ImportError):
    """An optional package of an xldm extra is not installed; the message names the extra to install."""

    def __init__(self, feature: str, package: str, extra: str, cause: ImportError) -> None:
        super().__init__(f"{feature} needs the {package} package, which is not installed: "
                         f"pip install 'xldm[{extra}]' ({cause})")


def require_tensorboard() -> None:
    """ImportError naming the extra when tensorboardX is missing."""
    _writer_class()


def _writer_class():
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise MissingExtraError("--tensorboard", "tensorboardX", EXTRA, e) from None
    return SummaryWriter


class TrainingEvents:
    """Scalars of each step into `folder`; `close()` flushes them."""

    def __init__(self, folder: str | Path, first_step: int = 1) -> None:
        writer_class = _writer_class()
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder = Path(folder)
        # (the suffix keeps a resumed run's file apart from the last one even within the same second)
        self._writer = writer_class(str(folder), purge_step=first_step if first_step > 1 else None,
                                    filename_suffix=f".step{first_step}")

    def add(self, step: int, record: dict) -> None:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):  # (a bool as 0/1; NaN kept: TensorBoard shows it)
                self._writer.add_scalar(f"train/{name}", float(value), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
