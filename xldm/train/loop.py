"""The training loop for SDXL-family models: base and refiner UNets here, the autoencoder via `vae_loop`.

`train(config)` reads top to bottom (nanoGPT-style):

    set up processes -> build the model -> optimizer, EMA -> data -> resume -> for each step:
        batch -> loss -> backward -> (skip if non-finite) -> clip -> AdamW -> EMA -> metrics -> checkpoint
    -> export final/model.safetensors (EMA weights + the frozen VAE and text encoders)

Exactness (RELIABILITY 6): all randomness of a step comes from per-sample generators seeded by (seed, step,
global sample index) (`objective.sample_generators`); the learning rate is a pure function of the step; the
checkpoint holds weights, EMA (with its update counter), AdamW moments, every global RNG and the data position.
So N steps straight and N/2 + kill + resume + N/2 give bit-identical weights on CPU with deterministic
algorithms on.

Non-finite steps (RELIABILITY 9): a step whose loss or gradient norm is NaN/inf (on any rank) leaves weights,
AdamW state and EMA untouched; `max_nonfinite_steps` of them in a row stop the run with `NonFiniteLossError`.

Distributed: under `torchrun` (WORLD_SIZE > 1) each process trains on its rows of the global batch (the data
contract: rank r gets rows r*B:(r+1)*B of the batch one process with W*B would get), the trained network is
wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA), which averages gradients, so W processes x B
equal 1 process x W*B up to float summation order.  Rank 0 writes checkpoints, metrics and the export.

FSDP (`parallel="fsdp"`, full-size SDXL on GPUs without room for fp32 weights + AdamW + EMA per GPU): the UNet
is sharded with FSDP2 instead of wrapped in DDP; weights, AdamW moments and EMA shadows are then DTensor shards.
Checkpoints gather them on rank 0 into the same file format, and are cut back into shards on resume.  The
details and the 8-GPU command line are in `xldm.train.parallel`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from xldm.errors import NonFiniteError
from xldm.models.components import Components
from xldm.train import checkpoint as ckpt
from xldm.train import parallel
from xldm.train.config import TrainConfig
from xldm.train.ema import EMA
from xldm.conditioning import training_conditioning
from xldm.diffusion.denoiser import Denoiser
from xldm.train.objective import draw_noise, sample_generators


class NonFiniteLossError(NonFiniteError):
    """Too many training steps in a row had a NaN/inf loss or gradient."""


# --- processes ------------------------------------------------------------------------------------------

@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_here: bool = False  # this call initialised the process group (and will destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_processes(config: TrainConfig) -> Processes:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        device = torch.device(config.device if config.device.startswith("cuda:") else f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if config.device == "auto" else config.device)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return Processes(rank=rank, world_size=world, local_rank=local, device=device, started_here=started)


# --- the run: model, optimizer, EMA ----------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training step needs."""

    config: TrainConfig
    model: Components  # every network, trained and frozen
    trainable: dict[str, nn.Module]  # name -> network being trained (unwrapped)
    forward: dict[str, nn.Module]  # name -> what to call in the step (DDP wrapper or the network itself)
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    procs: Processes
    denoiser: Denoiser | None = None
    tokenizers: tuple = ()
    # Extra (network, optimizer) pairs trained alongside, checkpointed but not exported (the VAE's discriminator).
    extras: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = field(default_factory=dict)
    cache: Any = None  # xldm.train.cache.EmbeddingCache when config.cache_dir is set

    @property
    def device(self) -> torch.device:
        return self.procs.device

    def named_trainable_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, module in self.trainable.items():
            for pname, p in module.named_parameters():
                if p.requires_grad:
                    yield f"{name}.{pname}", p

    def autocast(self):
        if self.config.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def build_model(config: TrainConfig) -> Components:
    """The networks: `config.init` where it has them, random (seeded by `config.seed`) for the rest."""
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.models.vae import AutoencoderKL

    model_config = config.model_config
    loaded = None
    if config.init:
        from xldm.weights.load import load_model

        loaded = load_model(config.init, components=list(config.init_components) or None, dtype=torch.float32)
        if loaded.config.kind != model_config.kind:
            raise ValueError(f"--init {config.init} holds a {loaded.config.kind} model, but the preset trains "
                             f"a {model_config.kind}")
        model_config = loaded.config
    torch.manual_seed(config.seed)  # the same random init in every process (DDP also broadcasts rank 0's)
    need_diffusion = config.task == "diffusion"
    unet = loaded.unet if loaded and loaded.unet is not None else None
    if need_diffusion and unet is None:
        unet = UNet(model_config.unet)
    vae = loaded.vae if loaded and loaded.vae is not None else AutoencoderKL(model_config.vae)
    encoders: tuple = ()
    if need_diffusion:
        encoders = loaded.text_encoders if loaded and loaded.text_encoders else tuple(
            CLIPTextModel(te) for te in model_config.text_encoders)
    model = Components(config=model_config, unet=unet, vae=vae, text_encoders=tuple(encoders))
    for module in model.modules().values():
        module.float().requires_grad_(False).eval()
    return model


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of (1-based) `step`: linear warm-up to `lr`, then constant or cosine to min_lr_ratio x lr."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
    scale = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * scale


def make_optimizer(config: TrainConfig, params, lr: float | None = None) -> torch.optim.Optimizer:
    # foreach=False: the single-tensor AdamW path, whose arithmetic does not depend on how tensors are grouped.
    return torch.optim.AdamW(list(params), lr=lr or config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, weight_decay=config.weight_decay, foreach=False)


_wrap = parallel.wrap_ddp  # (vae_loop uses this name)


def build_run(config: TrainConfig, procs: Processes | None = None, model: Components | None = None) -> Run:
    """Model, trainable parts, optimizer and EMA for `config` (diffusion or VAE)."""
    procs = procs or Processes()
    model = model or build_model(config)
    model.to(device=procs.device)
    if config.task == "vae":
        from xldm.train.vae_loop import build_vae_run

        if parallel.uses_fsdp(config, procs):
            raise NotImplementedError("parallel='fsdp' shards the diffusion UNet; train the VAE with parallel='ddp'")

        return build_vae_run(config, procs, model)
    unet = model.unet
    unet.requires_grad_(True).train()
    unet.gradient_checkpointing = config.gradient_checkpointing
    trainable: dict[str, nn.Module] = {"unet": unet}
    if config.train_text_encoders:
        names = list(model.modules())
        for name in names:
            if name.startswith("text_encoder"):
                trainable[name] = model.modules()[name].requires_grad_(True).train()
    if parallel.uses_fsdp(config, procs):  # in place: its parameters become DTensor shards
        forward = {"unet": parallel.shard_unet(unet, procs, config.mixed_precision)}
    else:
        forward = {"unet": _wrap(unet, procs)}
    params = [p for m in trainable.values() for p in m.parameters()]
    run = Run(config=config, model=model, trainable=trainable, forward=forward,
              optimizer=make_optimizer(config, params), ema=None, procs=procs,
              denoiser=Denoiser(config.prediction_type), tokenizers=model.tokenizers())
    if config.ema_decay > 0:
        run.ema = EMA(run.named_trainable_parameters(), config.ema_decay, warmup=config.ema_warmup)
    from xldm.train.cache import open_cache

    run.cache = open_cache(config, model, procs.device)
    return run


# --- one step ---------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float  # mean over the global batch (all ranks); NaN/inf if the step was skipped for that reason
    applied: bool  # False: non-finite loss or gradient, nothing was updated
    grad_norm: float
    extra: dict[str, float] = field(default_factory=dict)


def _batch_rows(run: Run, batch: dict) -> list[int]:
    """Global indices of this process's rows (rank r holds rows r*B:(r+1)*B of the global batch)."""
    b = len(batch["captions"]) if "captions" in batch else batch["pixels"].shape[0]
    return [run.procs.rank * b + i for i in range(b)]


def diffusion_loss_for_batch(run: Run, batch: dict, step: int) -> torch.Tensor:
    """The (weighted) noise-prediction loss of this process's rows at `step`."""
    config, model = run.config, run.model
    gens = sample_generators(config.seed, step, _batch_rows(run, batch))
    pixels = batch["pixels"].to(device=run.device, dtype=torch.float32)
    with torch.no_grad():  # the VAE is frozen: latents = posterior sample x scaling factor
        if run.cache is not None:
            latents = run.cache.latents(model.vae, pixels, batch, gens)
        else:
            latents = model.vae.encode_latents(pixels, generator=gens)
    draw = draw_noise(gens, latents.shape[1:], t_min=config.timestep_min, t_max=config.timestep_max,
                      offset_noise=config.offset_noise, text_dropout=config.text_dropout,
                      micro_dropout=config.micro_dropout)
    timesteps = draw.timesteps.to(run.device)
    noise = draw.noise.to(run.device)
    cached_text = None
    if run.cache is not None and run.cache.text_dir is not None:
        cached_text = run.cache.text_embeddings(model.text_encoders, run.tokenizers, model.config,
                                                list(batch["captions"]))
    context, vector = training_conditioning(
        model.config, model.text_encoders, run.tokenizers, batch, draw.keep_text, draw.keep_micro,
        device=run.device, train_text_encoders=config.train_text_encoders, embeddings=cached_text)
    noisy = run.denoiser.noised(latents, noise, timesteps)
    with run.autocast():
        prediction = run.forward["unet"](noisy, timesteps, context, vector)
    return run.denoiser.loss(prediction, latents, noise, timesteps, config.min_snr_gamma)


def _all_reduce_grads(modules: list[nn.Module], procs: Processes) -> None:
    """Average gradients of networks that are trained but not wrapped in DDP (e.g. text encoders)."""
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(procs.world_size)


def apply_update(run: Run, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                 lr: float, *, unwrapped: list[nn.Module] = ()) -> tuple[bool, float, float]:
    """backward, then (only if loss and gradient norm are finite on every rank) clip and step.

    Returns (applied, global mean loss, gradient norm).  Backward always runs, so DDP ranks stay in lockstep;
    a skipped step zeroes the gradients and changes nothing else.
    """
    procs = run.procs
    loss.backward()
    if procs.distributed and unwrapped:
        _all_reduce_grads(list(unwrapped), procs)
    value = loss.detach().float().reshape(1).clone()
    finite = torch.isfinite(value).float()
    if procs.distributed:
        dist.all_reduce(value)
        value /= procs.world_size
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    max_norm = run.config.grad_clip if run.config.grad_clip > 0 else float("inf")
    grad_norm = parallel.clip_grad_norm(params, max_norm)  # over all shards under FSDP
    applied = bool(finite.item() == 1.0) and bool(torch.isfinite(grad_norm).item())
    if applied:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied, float(value.item()), float(grad_norm)


def diffusion_step(run: Run, batch: dict, step: int) -> StepResult:
    # Taken before the forward: FSDP2 swaps the root's unsharded parameters in for the forward.
    params = [p for _, p in run.named_trainable_parameters()]
    loss = diffusion_loss_for_batch(run, batch, step)
    others = [m for name, m in run.trainable.items() if name != "unet"]
    applied, value, norm = apply_update(run, loss, run.optimizer, params, lr_at(run.config, step),
                                        unwrapped=others)
    if applied and run.ema is not None:
        run.ema.update(run.named_trainable_parameters())
    return StepResult(loss=value, applied=applied, grad_norm=norm)


def training_step(run: Run, batch: dict, step: int) -> StepResult:
    """One optimisation step of whichever task the run trains."""
    if run.config.task == "vae":
        from xldm.train.vae_loop import vae_step

        return vae_step(run, batch, step)
    return diffusion_step(run, batch, step)


# --- checkpoints ----------------------------------------------------------------------------------------

def _gather_data_states(data, procs: Processes) -> list[dict]:
    state = data.state_dict()
    if not procs.distributed:
        return [state]
    states: list[Any] = [None] * procs.world_size
    dist.all_gather_object(states, state)
    return states


def checkpoint_contents(run: Run, step: int, data_states: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in run.trainable.items():
        tensors.update({f"model.{name}.{k}": v for k, v in module.state_dict().items()})
    optim_tensors, optim_meta = ckpt.optimizer_state(run.optimizer, "optim")
    tensors.update(optim_tensors)
    extras_meta = {}
    for name, (module, optimizer) in run.extras.items():
        tensors.update({f"extra.{name}.{k}": v for k, v in module.state_dict().items()})
        t, m = ckpt.optimizer_state(optimizer, f"extra_optim.{name}")
        tensors.update(t)
        extras_meta[name] = m
    ema_tensors, ema_meta = ckpt.ema_state(run.ema)
    tensors.update(ema_tensors)
    rng_tensors, rng_meta = ckpt.rng_state()
    tensors.update(rng_tensors)
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
        head = f"model.{name}."
        module.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}, strict=True)
    ckpt.load_optimizer_state(run.optimizer, "optim", tensors, state["optimizer"])
    for name, (module, optimizer) in run.extras.items():
        head = f"extra.{name}."
        module.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}, strict=True)
        ckpt.load_optimizer_state(optimizer, f"extra_optim.{name}", tensors, state["extras"][name])
    ckpt.load_ema_state(run.ema, tensors, state["ema"])
    ckpt.restore_rng_state(tensors, state["rng"])
    states = state["data"]
    if len(states) != run.procs.world_size:
        warnings.warn(f"resuming with {run.procs.world_size} processes; the checkpoint was written by "
                      f"{len(states)}", RuntimeWarning, stacklevel=2)
    data.load_state_dict(states[run.procs.rank] if len(states) == run.procs.world_size else states[0])
    return int(state["step"])


# --- export ------------------------------------------------------------------------------------------------

def export_final(run: Run, path: Path, gathered: dict[str, nn.Module] | None = None) -> Path:
    """`final/model.safetensors`: the EMA weights of the trained networks (raw weights if no EMA) with the frozen
    ones, in the original single-file layout that `xldm generate --model` loads.  A trained VAE alone is written
    in the bare VAE layout (`encoder.*`, `decoder.*`, as the released sdxl_vae.safetensors).  `gathered`: the
    sharded networks, already unsharded with EMA applied (`parallel.gather_for_export`)."""
    from xldm.weights.io import save_file
    from xldm.weights.save import save_single_file

    exported = {}
    for name, module in run.trainable.items():
        if gathered and name in gathered:
            exported[name] = gathered[name]
            continue
        module = copy.deepcopy(module).cpu().eval()
        if run.ema is not None:
            run.ema.copy_to(module, prefix=f"{name}.")
        exported[name] = module
    path.parent.mkdir(parents=True, exist_ok=True)
    if run.config.task == "vae":
        save_file(exported["vae"].state_dict(), path, metadata={"format": "pt"})
        return path
    model = run.model
    encoders = tuple(exported.get(name, te) for name, te in zip(
        [n for n in model.modules() if n.startswith("text_encoder")], model.text_encoders))
    final = Components(config=model.config, unet=exported["unet"], vae=model.vae, text_encoders=encoders)
    return save_single_file(final, path)


# --- the loop ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    lr: float
    final_path: Path | None
    losses: list[float]
    skipped_steps: int


def make_batches(config: TrainConfig, procs: Processes):
    from xldm.train.buckets import training_buckets
    from xldm.train.data import TrainingBatches, open_source

    if not config.data:
        raise ValueError("no training data: set --data DIR_OR_SHARDS (or `data` in the TOML file)")
    return TrainingBatches(open_source(config.data), buckets=training_buckets(config.resolution, config.bucket_step),
                           batch_size=config.batch_size, seed=config.seed, rank=procs.rank,
                           world_size=procs.world_size, center_crop=config.center_crop,
                           fixed_crops=bool(config.cache_dir),  # one crop per sample for the cache
                           augment=config.augment)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, data=None,
          on_step: Callable[[int, Run], None] | None = None) -> TrainResult:
    """Train for `config.steps` steps (in total, counting resumed ones) and export the final weights.

    `resume=True` continues from the newest loadable checkpoint in `config.out`/checkpoints (a corrupt newest one
    is skipped with a warning); without it, a run directory that already holds checkpoints is an error.
    `data` replaces the batches built from `config.data` (any iterable with the TrainingBatches interface).
    `on_step(step, run)` is called after every step (tests use it).
    """
    if not config.out:
        raise ValueError("no run directory: set --out RUN_DIR")
    if config.task == "clip":  # contrastive text-encoder pre-training has its own loop
        from xldm.train.clip_pretrain import train_clip

        return train_clip(config, resume=resume, progress=progress)
    procs = setup_processes(config)
    try:
        return _train(config, procs, resume=resume, progress=progress, data=data, on_step=on_step)
    finally:
        if procs.started_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, procs: Processes, *, resume: bool, progress: bool, data,
           on_step: Callable[[int, Run], None] | None) -> TrainResult:
    from tqdm import tqdm

    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(config.out)
    checkpoints = ckpt.checkpoints_dir(out, resume)
    metrics_path = out / "metrics.jsonl"

    run = build_run(config, procs)
    data = data if data is not None else make_batches(config, procs)
    _seed_everything(config.seed + procs.rank)
    start = 0
    if resume:
        found = ckpt.load_latest(checkpoints)
        if found is not None:
            path, tensors, state = found
            start = restore(run, data, tensors, state)
            if procs.is_main:
                print(f"resuming from {path} (step {start})", file=sys.stderr)
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.trim_metrics(metrics_path, start)
    if procs.distributed:
        dist.barrier()

    bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not (progress and procs.is_main))
    batches = iter(data)
    losses: list[float] = []
    streak = skipped = 0
    step = start
    for step in range(start + 1, config.steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()
        result = training_step(run, batch, step)
        seconds = time.perf_counter() - t0
        losses.append(result.loss)
        if result.applied:
            streak = 0
        else:
            streak += 1
            skipped += 1
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
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{record['lr']:.2e}")
            bar.update(1)
        if step % config.checkpoint_every == 0 or step == config.steps:
            data_states = _gather_data_states(data, procs)
            if procs.is_main or parallel.uses_fsdp(config, procs):  # FSDP: every process joins the gathers
                tensors, state = checkpoint_contents(run, step, data_states)
            if procs.is_main:
                ckpt.save_checkpoint(checkpoints, step, tensors, state, keep=config.keep_checkpoints)
            if procs.distributed:
                dist.barrier()
        if on_step is not None:
            on_step(step, run)
    bar.close()

    final_path = None
    gathered = parallel.gather_for_export(run) if parallel.uses_fsdp(config, procs) else None
    if procs.is_main:
        final_path = export_final(run, out / "final" / "model.safetensors", gathered)
    if procs.distributed:
        dist.barrier()
    return TrainResult(step=step, lr=lr_at(config, step), final_path=final_path, losses=losses,
                       skipped_steps=skipped)


__all__ = ["train", "build_run", "build_model", "training_step", "diffusion_step", "lr_at", "Run", "StepResult",
           "TrainResult", "NonFiniteLossError", "export_final", "setup_processes", "Processes"]
