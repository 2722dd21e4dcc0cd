"""The work behind the API: a bounded FIFO queue, one worker thread, progress, interrupt, the models it may load.

* **Queue**: at most `max_waiting` jobs wait behind the running one; one more is refused at once (`QueueFull`,
  503 with Retry-After).  One worker thread runs the jobs one at a time, in the order they were accepted.
* **Progress**: the step callback records the step and the denoised estimate x0, previewed through the linear
  latent -> RGB map fitted to the model's own VAE (`xldm.speedups.model_preview_map`, as `xldm generate --preview`):
  no network runs per preview.
* **Interrupt**: a flag the step callback checks after every sampler step, raising `xldm.request.Interrupted`;
  the job ends within one step and returns the images of the iterations already done.
* **Out of memory** (`torch.cuda.OutOfMemoryError`, `MemoryError`) fails that job only: its tensors are dropped,
  the CUDA cache emptied, and the worker goes on.
* **Models**: only the checkpoints registered at start (`ModelStore`) load, by name, never by path; at most the
  current model and refiner stay loaded."""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from xldm.pipeline import Pipeline
from xldm.request import Interrupted
from xldm.serve.networks import stays_inside

log = logging.getLogger("xldm.serve")


class QueueFull(Exception):
    """The queue holds its maximum; `retry_after` estimates the seconds until a place frees up."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({waiting} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class OutOfMemory(Exception):
    """A job ran out of memory; the server has freed what the job held and goes on."""


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Job:
    """One request's work.  `run(job)` executes on the worker thread; its return value resolves `future`."""

    id: int
    run: Callable[["Job"], Any]
    n_iter: int = 1
    description: str = ""
    preview_map: torch.Tensor | None = None  # the model's fitted latent -> RGB map (set by the run, on the worker)
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    # progress, written by the worker, read by progress()
    iteration: int = 0
    stage: str = ""
    stage_share: tuple[float, float] = (0.0, 1.0)  # (start, width) of the current stage within one iteration
    step: int = 0  # steps done in the current stage
    stage_steps: int = 0
    steps_done: int = 0  # all steps of this job so far
    x0: torch.Tensor | None = None
    interrupted: bool = False
    skipped: bool = False  # the current image batch is dropped and the job goes on with the next (the webui's skip)
    interrupt_steps_done: int | None = None  # steps_done when the interrupt came (for the "within one step" check)
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage -> (start, width) in an iteration

    @property
    def progress(self) -> float:
        if self.started_at is None:
            return 0.0
        start, width = self.stage_share
        within = start + width * (self.step / self.stage_steps if self.stage_steps else 0.0)
        return min(1.0, (self.iteration + within) / max(self.n_iter, 1))

    def step_callback(self, stage: str, i: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        """The pipeline's callback(stage, i, total, x, x0): record, then stop if interrupted."""
        if stage != self.stage:
            self.stage, self.stage_share = stage, self.stages.get(stage, (0.0, 1.0))
        self.step, self.stage_steps = i + 1, total
        self.steps_done += 1
        self.x0 = x0[:1].detach()
        if self.interrupted or self.skipped:
            raise Interrupted

    def begin_iteration(self, iteration: int, stages: dict[str, tuple[float, float]]) -> None:
        """Start image batch `iteration`; `stages` maps "base"/"refiner" to its (start, width) in [0, 1]."""
        self.iteration, self.stages, self.stage, self.stage_share = iteration, stages, "", (0.0, 0.0)
        self.step = self.stage_steps = 0
        self.skipped = False


def _cpu_out_of_memory(error: BaseException) -> bool:
    """A RuntimeError from torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory: ...")."""
    if not isinstance(error, RuntimeError):
        return False
    message = str(error).lower()
    return "can't allocate memory" in message or "not enough memory" in message


class JobQueue:
    """A bounded FIFO of jobs run by one worker thread."""

    def __init__(self, max_waiting: int = 8) -> None:
        if max_waiting < 0:
            raise ValueError(f"queue size must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._waiting: deque[Job] = deque()
        self.running: Job | None = None  # written under the lock, by the worker
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._durations: deque[float] = deque(maxlen=20)
        self._stopped = False
        self._preview_cache: tuple[int, int, str] | None = None  # (job id, steps_done, base64 PNG)
        self._worker = threading.Thread(target=self._work, name="xldm-serve-worker", daemon=True)
        self._worker.start()

    def submit(self, run: Callable[[Job], Any], *, n_iter: int = 1, description: str = "") -> Job:
        """Queue `run`; raises QueueFull at once when `max_waiting` jobs already wait."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            if (full := self.full()) is not None:
                raise full
            job = Job(id=next(self._ids), run=run, n_iter=n_iter, description=description)
            self._waiting.append(job)
            self._lock.notify()
            return job

    def full(self) -> QueueFull | None:
        """The QueueFull a submit now would raise, or None; retry after one job's typical time.  An idle worker
        takes the next job at once, so that job counts as the running one, not as waiting."""
        if len(self._waiting) + (self.running is not None) <= self.max_waiting:
            return None
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 5.0
        return QueueFull(len(self._waiting), max(1, round(typical)))

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
                job = self.running = self._waiting.popleft()
                job.started_at = time.time()
            try:
                result, failure = job.run(job), None
            except BaseException as error:  # noqa: BLE001 - every failure ends this job only
                result, failure = None, self._describe(job, error)
            job.x0 = None
            if isinstance(failure, OutOfMemory):
                free_memory()  # outside the except block: the failed frames (and their tensors) are gone
            job.finished_at = time.time()
            with self._lock:
                self.running, self._preview_cache = None, None
                self._durations.append(job.finished_at - job.started_at)
            if failure is not None:
                job.future.set_exception(failure)
            else:
                job.future.set_result(result)

    @staticmethod
    def _describe(job: Job, error: BaseException) -> BaseException:
        """The exception to hand to the waiting request, holding no frames (so no tensors) of the job."""
        if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or _cpu_out_of_memory(error):
            log.warning("job %d ran out of memory: %s", job.id, str(error))  # str: a record keeps no frames
            return OutOfMemory(f"out of memory during job {job.id} ({type(error).__name__}); "
                               f"try a smaller size or batch")
        if not isinstance(error, (ValueError, KeyError, Interrupted)):
            log.error("job %d failed", job.id, exc_info=error)
        return error.with_traceback(None)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            waiting, self._waiting = list(self._waiting), deque()
            if self.running is not None:
                self.running.interrupted = True
            self._lock.notify_all()
        for job in waiting:
            job.future.set_exception(RuntimeError("the server shut down before this job ran"))
        self._worker.join(timeout=30)

    def interrupt(self) -> Job | None:
        """Stop the running job after its current step (the webui interrupts the running job only)."""
        with self._lock:
            job = self.running
            if job is not None and not job.interrupted:
                job.interrupt_steps_done, job.interrupted = job.steps_done, True
            return job

    def skip(self) -> Job | None:
        """Drop the running job's current image batch after its current step; it goes on with the next batch
        (the webui's `/sdapi/v1/skip`: `state.skipped`)."""
        with self._lock:
            job = self.running
            if job is not None:
                job.skipped = True
            return job

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def preview_png(self, job: Job) -> str | None:
        """The running job's preview as base64 PNG, computed at most once per step."""
        from xldm.serve.schemas import png_base64
        from xldm.speedups import preview_image

        x0, weights, steps, cached = job.x0, job.preview_map, job.steps_done, self._preview_cache
        if x0 is None or weights is None:
            return None
        if cached is None or cached[:2] != (job.id, steps):
            cached = self._preview_cache = (job.id, steps, png_base64(preview_image(x0, weights)))
        return cached[2]


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the file or folder name; what requests use
    path: Path
    kind: str  # ModelConfig.kind: "sdxl-base", "sdxl-refiner", "sd15", ...
    default_size: int
    config: Any = field(default=None, compare=False, repr=False)  # the ModelConfig (LoRA files are checked on it)
    unet: Path | None = None  # a UNet file that replaces the checkpoint's (the bundled default-turbo student)

    @property
    def is_refiner(self) -> bool:
        return self.kind == "sdxl-refiner"


def find_models(folder: str | Path) -> list[Path]:
    """Checkpoints directly inside `folder`: *.safetensors files and diffusers folders (model_index.json).
    Links that lead outside the folder are skipped."""
    root = Path(folder).resolve()
    found = []
    for path in sorted(root.iterdir()):
        real = stays_inside(path, root)
        if real is None:
            continue
        single_file = real.is_file() and real.suffix == ".safetensors"
        if single_file or (real.is_dir() and (real / "model_index.json").is_file()):
            found.append(path)
    return found


class ModelStore:
    """The checkpoints the server may use, by name; loads them on the worker thread when a job needs them."""

    def __init__(self, paths: list[str | Path], *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, students: dict[str, tuple[Path, Path]] | None = None
                 ) -> None:
        """`paths`: checkpoints, served by file name; `students`: name -> (checkpoint, UNet file)."""
        from xldm.devices import default_device
        from xldm.weights.info import model_info

        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype  # None: each pipeline's own default (`dtype_for`: the device and its main UNet's size)
        self.entries: dict[str, ModelEntry] = {}
        for p in paths:
            self.register(Path(p), warn_duplicate=True)
        for name, (path, unet) in (students or {}).items():
            config = model_info(path).config
            self.entries[name] = ModelEntry(name, Path(path), config.kind, config.default_size, config, Path(unet))
        if not self.entries:
            raise ValueError("no models: give --model PATH or a --models-dir with checkpoints in it")
        self._loaded: dict[str, tuple[torch.dtype, Any]] = {}  # name -> (dtype, Components)
        self._pipeline: tuple[tuple, Pipeline] | None = None  # the last pipeline, kept while its settings hold

    def register(self, path: Path, *, warn_duplicate: bool = False) -> ModelEntry | None:
        """Offer the checkpoint at `path` under its file name (kept if a model of that name is there already);
        None, with a warning, when it cannot be read."""
        from xldm.weights.info import model_info

        if path.name in self.entries:
            if warn_duplicate:
                log.warning("skipping %s: a model named %s is already registered", path, path.name)
            return self.entries[path.name]
        try:
            config = model_info(path).config
        except Exception as e:  # one unreadable file does not stop the others from being served
            log.warning("skipping %s: it cannot be read: %s", path, str(e)[:300] or type(e).__name__)
            return None
        self.entries[path.name] = ModelEntry(path.name, path, config.kind, config.default_size, config)
        return self.entries[path.name]

    def dtype_for(self, name: str) -> torch.dtype:
        """The dtype a pipeline over model `name` runs in: the server's --dtype, else `default_dtype` for the device
        and the size of the model's UNet (read from the file header), as `xldm generate` chooses it."""
        from xldm.devices import default_dtype, unet_parameters

        if self.dtype is not None:
            return self.dtype
        entry = self.entries[name]
        return default_dtype(self.device, unet_parameters(entry.unet or entry.path) if self.device.type == "cpu"
                             else None)

    def lookup(self, name: str) -> ModelEntry:
        """By name, by name without its extension, or by the webui's title "name [hash]"."""
        if name in self.entries:
            return self.entries[name]
        bare = name.split(" [", 1)[0]
        for entry in self.entries.values():
            if bare in (entry.name, Path(entry.name).stem):
                return entry
        raise KeyError(name)

    def pipeline(self, model: str, refiner: str | None, *, vae: Path | None = None,
                 lora_dir: Path | None = None) -> Pipeline:
        """A pipeline over the named models (worker thread only), with `vae` replacing the model's and `<lora:...>`
        tags resolved in `lora_dir`; other loaded models are freed first.  The same settings reuse the last one
        (its VAE and the LoRA files it read stay loaded, at most `LoraSet.KEEP_FILES` of them)."""
        from xldm.weights.load import load_model

        key = (model, refiner, vae, lora_dir)
        if self._pipeline is not None and self._pipeline[0] == key:
            return self._pipeline[1]
        self._pipeline = None
        wanted = [model] + ([refiner] if refiner else [])
        dtype = self.dtype_for(model)
        for name in [n for n, (loaded_dtype, _) in self._loaded.items() if n not in wanted or loaded_dtype != dtype]:
            del self._loaded[name]
            free_memory()
        for name in wanted:
            if name not in self._loaded:
                log.info("loading %s (%s)", name, str(dtype).removeprefix("torch."))
                entry = self.entries[name]
                components = load_model(entry.path, dtype=dtype, device=self.device)
                if entry.unet is not None:
                    components.unet = load_model(entry.unet, components=["unet"], dtype=dtype,
                                                 device=self.device).unet
                self._loaded[name] = (dtype, components)
        pipe = Pipeline(self._loaded[model][1], self._loaded[refiner][1] if refiner else None,
                        dtype=dtype, device=self.device, vae=vae, lora_dir=lora_dir,
                        model_file=self.entries[model].unet or self.entries[model].path,
                        refiner_file=self.entries[refiner].path if refiner else None)
        self._pipeline = (key, pipe)
        return pipe
