"""The training loop, one for every task; `train(config)` reads top to bottom (nanoGPT's train.py in spirit):

    set up processes -> task.build (networks, optimizer, EMA) -> task.batches -> resume -> for each step:
        batch -> task.step (loss -> backward -> skip if non-finite -> clip -> AdamW -> EMA) -> metrics -> checkpoint
    -> task.export (final/)

A task is a module with `build`, `batches`, `step` and `export`, chosen by `TrainConfig.task` (TASKS): `diffusion`
(latent models and cascade stages), `vae`, `contrastive`, `distill`, `controlnet`.  Randomness comes from per-sample
generators of (seed, step, sample index) or from (seed, step), the learning rate is a function of the step (`lr_at`),
and a checkpoint holds weights, EMA (with its counter), AdamW moments, every global RNG and the data position: N steps
straight and N/2 + kill + resume + N/2 give bit-identical weights on CPU with deterministic algorithms on.  A step
whose loss or gradient norm is not finite (on any rank) changes nothing; `max_nonfinite_steps` in a row stop the run
(`NonFiniteLossError`).
Under torchrun each process trains on its rows of the global batch (rank r: rows r*B:(r+1)*B), the trained network
wrapped in DDP or sharded with FSDP2 (xldm.train.parallel), so W processes x B equal 1 process x W*B up to float
summation order; rank 0 writes checkpoints, metrics and the export.  A step of `grad_accum_steps` = N takes N batches
(micro-batches, the gradients summed; under DDP all but the last run inside `no_sync`, so one all-reduce per step;
FSDP syncs each one); checkpoints and the schedule count steps (updates).  `sample_every` renders
`sample_prompts` on rank 0 into RUN/samples/ (xldm.train.samples).
Before step 1 rank 0 prints a summary of the data (images found, used, skipped by reason, captions, buckets,
kohya repeats) and writes it to RUN/dataset.json, with every skipped file and its reason in RUN/skipped.txt; both are
rewritten at each checkpoint with the files that failed to decode since (rank 0's reads).  `tensorboard` also writes
each step's metrics as TensorBoard events into RUN/tensorboard/ (xldm.train.events)."""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from xldm.errors import NonFiniteError
from xldm.train import checkpoint as ckpt
from xldm.train import contrastive, controlnet, diffusion, distill, parallel, samples, vae
from xldm.train import events as events_module
from xldm.train.config import TrainConfig, lr_at
from xldm.train.data import format_summary, open_source, skipped_files, source_summary
from xldm.train.parallel import Processes, setup_processes
from xldm.train.run import Run, StepResult

TASKS = {"diffusion": diffusion, "vae": vae, "clip": contrastive, "add": distill, "controlnet": controlnet}


class NonFiniteLossError(NonFiniteError):
    """Too many training steps in a row had a NaN/inf loss or gradient."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT arrived: the step under way was finished and checkpointed; `--resume` continues there."""

    def __init__(self, step: int, signum: int, checkpoint: Path) -> None:
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
                         f"(run again with --resume to continue)")


class StopSignals:
    """While active (in the main thread): the first SIGTERM or SIGINT is only noted, so that the loop can end at a
    step boundary with a checkpoint (a time-limited job, `timeout`, a logout); a second one acts as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        self.received = signum
        for other, previous in self._previous.items():  # a second signal is not deferred
            signal.signal(other, previous)
        print(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def stop_requested(self, procs: Processes) -> int | None:
        """The signal number when this process or (distributed) any process got one, else None."""
        if not procs.distributed:
            return self.received
        flag = torch.tensor([self.received or 0], device=procs.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every process stops at the same step
        return int(flag.item()) or None


def build_run(config: TrainConfig, procs: Processes | None = None, model=None) -> Run:
    """Networks, optimizer and EMA of `config`'s task (`model`: networks built already)."""
    return TASKS[config.task].build(config, procs or Processes(), model)


def training_step(run: Run, batch: dict, step: int) -> StepResult:
    """One optimisation step of whichever task the run trains."""
    return TASKS[run.config.task].step(run, batch, step)


def checkpoint_contents(run: Run, step: int, data_states: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in run.trainable.items():
        tensors.update({f"model.{name}.{k}": v for k, v in module.state_dict().items()})
    optim_tensors, optim_meta = ckpt.optimizer_state(run.optimizer, "optim")
    tensors.update(optim_tensors)
    extras_meta = {}
    for name, (module, optimizer) in run.extras.items():
        tensors.update({f"extra.{name}.{k}": v for k, v in module.state_dict().items()})
        t, extras_meta[name] = ckpt.optimizer_state(optimizer, f"extra_optim.{name}")
        tensors.update(t)
    ema_tensors, ema_meta = ckpt.ema_state(run.ema)
    rng_tensors, rng_meta = ckpt.rng_state()
    tensors.update({**ema_tensors, **rng_tensors})
    state = {"step": step, "lr": lr_at(run.config, step), "config": run.config.to_dict(),
             "world_size": run.procs.world_size, "data": data_states, "optimizer": optim_meta,
             "extras": extras_meta, "ema": ema_meta, "rng": rng_meta}
    if parallel.uses_fsdp(run.config, run.procs):  # collective: full tensors on rank 0, {} elsewhere
        tensors = parallel.gather_full(tensors, run.procs)
    return tensors, state


def restore(run: Run, data, tensors: dict[str, torch.Tensor], state: dict) -> int:
    """Load a checkpoint into the run and the data; returns its step."""
    if parallel.uses_fsdp(run.config, run.procs):  # keep this process's shard of each sharded tensor
        tensors = parallel.shard_checkpoint(run, tensors)
    for name, module in run.trainable.items():
        ckpt.load_module_state(module, tensors, f"model.{name}.")
    ckpt.load_optimizer_state(run.optimizer, "optim", tensors, state["optimizer"])
    for name, (module, optimizer) in run.extras.items():
        ckpt.load_module_state(module, tensors, f"extra.{name}.")
        ckpt.load_optimizer_state(optimizer, f"extra_optim.{name}", tensors, state["extras"][name])
    ckpt.load_ema_state(run.ema, tensors, state["ema"])
    ckpt.restore_rng_state(tensors, state["rng"])
    states = state["data"] if isinstance(state["data"], list) else [state["data"]]  # (one-process cascade runs)
    if len(states) != run.procs.world_size:
        warnings.warn(f"resuming with {run.procs.world_size} processes; the checkpoint was written by "
                      f"{len(states)}", RuntimeWarning, stacklevel=2)
    data.load_state_dict(states[run.procs.rank] if len(states) == run.procs.world_size else states[0])
    return int(state["step"])


def write_dataset_report(config: TrainConfig, data, out: Path) -> dict:
    """RUN/dataset.json (the data's `summary()`: xldm.train.data.TrainingBatches.summary) and RUN/skipped.txt (one
    `path<TAB>reason` line per skipped or ignored file); returns the summary.  Data without a `summary` (the
    contrastive task's, a test's) is described by indexing `config.data` when it is a folder or shards."""
    if hasattr(data, "summary"):
        summary, skipped = data.summary(), data.skipped_files()
    else:
        try:
            source = open_source(config.data) if config.data else None
        except ValueError:  # (not a data path: the data was handed in)
            source = None
        summary = source_summary(source) if source is not None else {"source": type(data).__name__}
        skipped = sorted(skipped_files(source)) if source is not None else []
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "skipped.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped))
    return summary


def _no_sync(run: Run):
    """Every DDP wrapper's `no_sync()` (gradients kept locally, reduced with the last micro-batch's backward)."""
    from contextlib import ExitStack

    from torch.nn.parallel import DistributedDataParallel

    stack = ExitStack()
    for module in run.forward.values():
        if isinstance(module, DistributedDataParallel):
            stack.enter_context(module.no_sync())
    return stack


@dataclass
class TrainResult:
    step: int
    lr: float
    final_path: Path | None
    losses: list[float]
    skipped_steps: int


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, data=None,
          on_step: Callable[[int, Run], None] | None = None) -> TrainResult:
    """Train for `config.steps` steps (in total, counting resumed ones) and export the final weights.  `resume=True`
    continues from the newest loadable checkpoint in `config.out`/checkpoints (a corrupt newest one is skipped with a
    warning); without it, a run directory that already holds checkpoints is an error.  `data` replaces the task's
    batches (any iterable with the TrainingBatches interface: state_dict, load_state_dict).  `on_step(step, run)` is
    called after every step (tests use it)."""
    if not config.out:
        raise ValueError("no run directory: set --out RUN_DIR")
    checkpoints = ckpt.checkpoints_dir(Path(config.out), resume)  # refuses a used directory before anything
    procs = setup_processes(config)
    try:
        with StopSignals() as stop:
            return _train(config, procs, checkpoints, resume=resume, progress=progress, data=data, on_step=on_step,
                          stop=stop)
    finally:
        if procs.started_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, procs: Processes, checkpoints: Path, *, resume: bool, progress: bool, data,
           on_step: Callable[[int, Run], None] | None, stop: StopSignals) -> TrainResult:
    from tqdm import tqdm

    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(config.out)
    metrics_path = out / "metrics.jsonl"
    task = TASKS[config.task]
    prompts = samples.read_prompts(config.sample_prompts) if config.sample_every else []
    if prompts and parallel.uses_fsdp(config, procs):
        raise ValueError("sample_every is not supported with --parallel fsdp (the UNet is sharded)")
    if config.tensorboard:
        events_module.require_tensorboard()  # before anything is built
    run = task.build(config, procs, None)
    data = data if data is not None else task.batches(config, procs)
    random.seed(config.seed + procs.rank)
    np.random.seed((config.seed + procs.rank) % 2**32)
    torch.manual_seed(config.seed + procs.rank)
    start = 0
    if resume and (found := ckpt.load_latest(checkpoints, lambda t, s: restore(run, data, t, s))) is not None:
        path, _, state = found
        start = int(state["step"])
        if procs.is_main:
            print(f"resuming from {path} (step {start})", file=sys.stderr)
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.trim_metrics(metrics_path, start)
        summary = write_dataset_report(config, data, out)
        print(format_summary(summary, str(out / "skipped.txt")), file=sys.stderr)
    parallel.barrier(procs)
    events = events_module.TrainingEvents(out / "tensorboard", start + 1) if config.tensorboard and procs.is_main \
        else None

    bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not (progress and procs.is_main))
    batches = iter(data)
    losses: list[float] = []
    streak = skipped = 0
    step = start
    accumulate = config.grad_accum_steps
    for step in range(start + 1, config.steps + 1):
        seconds = 0.0  # in the task's steps (data loading excluded)
        for micro in range(accumulate):
            batch = next(batches)
            run.micro_batch = (micro, accumulate)
            t0 = time.perf_counter()
            with nullcontext() if micro == accumulate - 1 else _no_sync(run):
                result = task.step(run, batch, step)
            seconds += time.perf_counter() - t0
        losses.append(result.loss)
        if result.applied:
            streak = 0
        else:
            streak, skipped = streak + 1, skipped + 1
            warnings.warn(f"step {step}: non-finite loss or gradient ({result.loss}); step skipped, weights "
                          f"unchanged", RuntimeWarning, stacklevel=2)
            if streak >= config.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"training stopped at step {step}: {streak} steps in a row had a non-finite loss or gradient "
                    f"(last loss {result.loss}); check the data and lower the learning rate "
                    f"(max_nonfinite_steps={config.max_nonfinite_steps})")
        if procs.is_main:
            stats = getattr(data, "stats", {}) or {}
            record = {"step": step, "loss": result.loss, "lr": lr_at(config, step), "it_per_s": 1.0 / seconds,
                      "grad_norm": result.grad_norm, "skipped_step": not result.applied,
                      "skipped_images": int(stats.get("skipped_total", 0)), **result.extra}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if events is not None:
                events.add(step, record)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{record['lr']:.2e}")
            bar.update(1)
        stopping = stop.stop_requested(procs) if step < config.steps else None
        if step % config.checkpoint_every == 0 or step == config.steps or stopping:
            states: list[Any] = [data.state_dict()]
            if procs.distributed:
                states = [None] * procs.world_size
                dist.all_gather_object(states, data.state_dict())
            if procs.is_main or parallel.uses_fsdp(config, procs):  # FSDP: every process joins the gathers
                tensors, state = checkpoint_contents(run, step, states)
                if procs.is_main:
                    ckpt.save_checkpoint(checkpoints, step, tensors, state, keep=config.keep_checkpoints)
                    if hasattr(data, "summary"):  # with the skips met while reading since
                        write_dataset_report(config, data, out)
                    if events is not None:
                        events.flush()
            parallel.barrier(procs)
        if prompts and step % config.sample_every == 0:
            if procs.is_main:
                samples.write_samples(run, prompts, out / "samples", step)
            parallel.barrier(procs)
        if on_step is not None:
            on_step(step, run)
        if stopping:
            bar.close()
            if events is not None:
                events.close()
            raise TrainingStopped(step, stopping, checkpoints / ckpt.checkpoint_name(step))
    bar.close()
    if events is not None:
        events.close()

    final_path = None
    gathered = parallel.gather_for_export(run) if parallel.uses_fsdp(config, procs) else None
    if procs.is_main:
        exported = {name: gathered[name] if gathered and name in gathered else run.averaged(name)
                    for name in run.trainable}  # what the export writes: refuse NaN/inf before anything
        bad = [f"{name}.{key}" for name, module in exported.items() for key, value in module.state_dict().items()
               if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise NonFiniteError(f"not exporting step {step}: {len(bad)} weight tensors hold NaN/inf, first "
                                 f"{', '.join(bad[:5])}; nothing written to {out / 'final'}")
        final_path = task.export(run, data, out / "final", gathered)
    parallel.barrier(procs)
    return TrainResult(step=step, lr=lr_at(config, step), final_path=final_path, losses=losses,
                       skipped_steps=skipped)
