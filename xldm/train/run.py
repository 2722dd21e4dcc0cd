"""What a training step works on (`Run`) and the update every task shares.

An update: backward; then, only if the loss and the gradient norm are finite on every rank, clip to `grad_clip`
(global norm over all shards), AdamW at `lr_at(step)`, the task's `after` hook, EMA.  A skipped step zeroes the
gradients and changes nothing else; backward always runs, so DDP ranks stay in lockstep.  With gradient accumulation
(`grad_accum_steps` = N, kohya sd-scripts' `--gradient_accumulation_steps`) the loop sets `micro_batch` = (i, N)
before each of N task steps: each loss is divided by N and backpropagated, and only the last one clips and steps,
finite only if every micro-batch's loss was (mean of the N losses reported)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from xldm.train import parallel
from xldm.train.config import TrainConfig, lr_at
from xldm.train.ema import EMA
from xldm.train.parallel import Processes


@dataclass
class Run:
    """Everything a training step needs; built by a task's `build` (the EMA here, from the trained networks)."""

    config: TrainConfig
    procs: Processes
    model: Any  # xldm.models.components.Components, or the contrastive task's ContrastiveModel
    trainable: dict[str, nn.Module]  # name -> network being trained (unwrapped)
    forward: dict[str, nn.Module]  # name -> what to call in the step (DDP/FSDP wrapper or the network itself)
    optimizer: torch.optim.Optimizer
    ema: EMA | None = None
    # Extra (network, optimizer) pairs trained alongside, checkpointed but not exported (the VAE's discriminator).
    extras: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = field(default_factory=dict)
    denoiser: Any = None  # xldm.diffusion.denoiser.Denoiser of a diffusion run
    tokenizers: tuple = ()
    cache: Any = None  # xldm.train.cache.EmbeddingCache when config.cache_dir is set
    frozen: dict[str, nn.Module] = field(default_factory=dict)  # used, never trained nor checkpointed (a teacher)
    micro_batch: tuple[int, int] = (0, 1)  # (index, count) of the micro-batch being accumulated
    micro_losses: list[torch.Tensor] = field(default_factory=list)  # this step's losses so far

    def __post_init__(self) -> None:
        if self.ema is None and self.config.ema_decay > 0:
            self.ema = EMA(self.named_trainable_parameters(), self.config.ema_decay, warmup=self.config.ema_warmup)

    @property
    def device(self) -> torch.device:
        return self.procs.device

    def named_trainable_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, module in self.trainable.items():
            for pname, p in module.named_parameters():
                if p.requires_grad:
                    yield f"{name}.{pname}", p

    def rows(self, batch: dict) -> list[int]:
        """Global indices of this process's rows (rank r holds rows r*B:(r+1)*B of the global batch; micro-batch i
        of a step continues after the i before it, so N micro-batches of B rows draw what one batch of N*B would)."""
        b = len(batch["captions"]) if "captions" in batch else batch["pixels"].shape[0]
        first = (self.micro_batch[0] * self.procs.world_size + self.procs.rank) * b
        return [first + i for i in range(b)]

    def autocast(self):
        return (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                if self.config.mixed_precision == "bf16" else nullcontext())

    def averaged(self, name: str, device: torch.device | str = "cpu") -> nn.Module:
        """A copy of trained network `name` holding its EMA weights (raw weights without EMA), in eval mode."""
        module = copy.deepcopy(self.trainable[name]).to(device).eval()
        if self.ema is not None:
            self.ema.copy_to(module, prefix=f"{name}.")
        return module


@dataclass
class StepResult:
    loss: float  # mean over the global batch (all ranks); NaN/inf if the step was skipped for that reason
    applied: bool  # False: non-finite loss or gradient, nothing was updated
    grad_norm: float
    extra: dict[str, Any] = field(default_factory=dict)


def make_optimizer(config: TrainConfig, params, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with the config's betas, eps and weight decay; `params` may be parameter groups."""
    # foreach=False: the single-tensor AdamW path, whose arithmetic does not depend on how tensors are grouped.
    return torch.optim.AdamW(list(params), lr=lr or config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, weight_decay=config.weight_decay, foreach=False)


def apply_update(run: Run, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                 lr: float, *, unwrapped: list[nn.Module] = ()) -> tuple[bool, float, float] | None:
    """backward, then clip and step if finite everywhere: (applied, global mean loss, gradient norm).
    `unwrapped`: trained networks outside DDP (their gradients are averaged over the processes here).
    None before the last micro-batch of an accumulated step (gradients kept, nothing else done)."""
    procs = run.procs
    index, count = run.micro_batch
    (loss / count if count > 1 else loss).backward()
    if count > 1:
        run.micro_losses.append(loss.detach().float().reshape(1))
        if index < count - 1:
            return None
        loss = torch.cat(run.micro_losses).mean()
        run.micro_losses.clear()
    if procs.distributed:
        for p in (p for m in unwrapped for p in m.parameters() if p.grad is not None):
            dist.all_reduce(p.grad)
            p.grad.div_(procs.world_size)
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


def update(run: Run, loss: torch.Tensor, step: int, params: list[torch.Tensor], *, extra: dict | None = None,
           after: Callable[[], None] | None = None) -> StepResult:
    """One update of the run's optimizer from `loss` at (1-based) `step`, then `after()` and the EMA.  `params`:
    the trained parameters, taken before the forward (FSDP2 swaps the root's unsharded ones in for it)."""
    outcome = apply_update(run, loss, run.optimizer, params, lr_at(run.config, step),
                           unwrapped=[m for name, m in run.trainable.items() if name not in run.forward])
    if outcome is None:  # an accumulated step's earlier micro-batch
        return StepResult(loss=float(loss.detach()), applied=False, grad_norm=float("nan"), extra=extra or {})
    applied, value, norm = outcome
    if applied and after is not None:
        after()
    if applied and run.ema is not None:
        run.ema.update(run.named_trainable_parameters())
    return StepResult(loss=value, applied=applied, grad_norm=norm, extra=extra or {})
