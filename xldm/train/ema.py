"""Exponential moving average of weights, with a decay warm-up and its update counter (kept in checkpoints).

After n updates the next one uses decay_n = min(decay, (1 + n) / (10 + n)) with warm-up (diffusers `EMAModel`,
use_ema_warmup=False), else decay, and sets shadow <- decay_n * shadow + (1 - decay_n) * param.  Resuming
without n would restart the warm-up.  Shadows are fp32 whatever the model's dtype."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]], decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow: dict[str, Tensor] = {name: p.detach().to(dtype=torch.float32, copy=True)
                                          for name, p in named_parameters}

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        decay = self.current_decay()
        for name, p in named_parameters:
            shadow = self.shadow[name]
            shadow.mul_(decay).add_(p.detach().to(shadow.dtype), alpha=1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module, prefix: str = "") -> None:
        """Write the averaged weights into `module` (parameters named `prefix + name`)."""
        params = dict(module.named_parameters())
        for name, shadow in self.shadow.items():
            if name.startswith(prefix):
                target = params[name[len(prefix):]]
                target.copy_(shadow.to(target.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]} ({len(missing)}), "
                             f"unexpected {unexpected[:5]} ({len(unexpected)})")
        for name, value in state["shadow"].items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name}: shape {tuple(value.shape)}, expected "
                                 f"{tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        self.num_updates, self.decay = int(state["num_updates"]), float(state["decay"])
        self.warmup = bool(state["warmup"])
