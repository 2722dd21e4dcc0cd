"""What a cascade costs: pixels and measured FLOPs per stage, against one model generating the final size directly
(moved here from benchmarks/cascade_cost.py, which prints these tables; `xldm reproduce cascade-cost` reports them).

The argument for cascades (Ho et al. 2021, Sec. 1; Imagen, Sec. 2.4): a 64^2 -> 256^2 -> 1024^2 cascade denoises
64^2 + 256^2 + 1024^2 pixels per step, but only the small base model has to decide the composition, and the SR
models can be lighter.  The FLOPs of one UNet evaluation are *measured* with `torch.utils.flop_counter.FlopCounterMode`
(matmuls and convolutions: 2 per multiply-add), running each UNet on the meta device so nothing is computed or
allocated.  A stage costs FLOPs(one evaluation at its size) x steps x (2 with classifier-free guidance).  The text
encoders run once per prompt and are left out.  "Direct" is the base stage's UNet run at the final size with the
base's steps and guidance."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from xldm.cascade import DEFAULT_CFG, DEFAULT_STEPS, cascade_files, check_stage_order, describe, is_sr, per_stage, \
    read_stage_header
from xldm.config import ModelConfig, UNetConfig

CONTEXT_LENGTH = 77  # one 77-token chunk of text


def unet_flops(unet: UNetConfig, size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of one forward pass of `UNet(unet)` on a (batch, in_channels, height, width) input, measured with
    FlopCounterMode on the meta device (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from xldm.models.unet import UNet

    width, height = size
    with torch.device("meta"):
        model = UNet(unet)
        x = torch.empty(batch, unet.in_channels, height, width)
        t = torch.zeros(batch)
        context = torch.empty(batch, CONTEXT_LENGTH, unet.context_dim)
        y = torch.empty(batch, unet.adm_in_channels) if unet.adm_in_channels > 0 else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, context, y)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class StageCost:
    name: str
    size: tuple[int, int]
    steps: int
    guidance: bool
    flops_per_eval: int  # one UNet evaluation on one image

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def evals(self) -> int:
        return self.steps * (2 if self.guidance else 1)

    @property
    def pixel_steps(self) -> int:
        return self.pixels * self.steps

    @property
    def total_flops(self) -> int:
        return self.flops_per_eval * self.evals


@dataclass(frozen=True)
class CascadeCost:
    stages: tuple[StageCost, ...]
    direct: StageCost

    @property
    def total_flops(self) -> int:
        return sum(s.total_flops for s in self.stages)

    @property
    def total_pixels(self) -> int:
        return sum(s.pixels for s in self.stages)

    @property
    def ratio(self) -> float:
        """Cascade FLOPs / direct FLOPs (< 1: the cascade is cheaper)."""
        return self.total_flops / self.direct.total_flops


def _kind(config: ModelConfig) -> str:
    return "sr" if is_sr(config) else "base"


def cascade_cost(configs: Sequence[ModelConfig], steps: Sequence[int] | int | None = None,
                 cfg: Sequence[float] | float | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None) -> CascadeCost:
    """Cost of a cascade (stage outputs of `sizes`, default each stage's resolution) and of the first stage's
    network generating the last size directly.  Defaults: 30 steps / cfg 5 for a base stage, 20 / 4 for SR."""
    configs = list(configs)
    n = len(configs)
    if sizes is not None:
        configs = rescaled(configs, sizes)
    check_stage_order(configs)
    steps = per_stage(steps, n, "steps", lambda i: DEFAULT_STEPS[_kind(configs[i])])
    cfg = per_stage(cfg, n, "cfg", lambda i: DEFAULT_CFG[_kind(configs[i])])
    sides = [(c.default_size, c.default_size) for c in configs]
    stages = tuple(StageCost(name=describe(c), size=side, steps=int(s), guidance=float(g) > 1,
                             flops_per_eval=unet_flops(c.unet, side))
                   for c, side, s, g in zip(configs, sides, steps, cfg))
    first = configs[0]
    final = sides[-1]
    direct = StageCost(name=f"direct: {_kind(first)} UNet at {final[0]}x{final[1]}", size=final, steps=int(steps[0]),
                       guidance=float(cfg[0]) > 1, flops_per_eval=unet_flops(first.unet, final))
    return CascadeCost(stages=stages, direct=direct)


def rescaled(configs: Sequence[ModelConfig], sizes: Sequence[tuple[int, int]]) -> list[ModelConfig]:
    """The same networks at other (square) output sizes, e.g. Imagen's 64, 256, 1024; SR scales follow the sizes."""
    if len(sizes) != len(configs):
        raise ValueError(f"expected {len(configs)} sizes (one per stage), found {len(sizes)}")
    out = []
    for i, (c, (w, h)) in enumerate(zip(configs, sizes)):
        if w != h:
            raise ValueError(f"stage {i}: {w}x{h} is not square; cascade stages are")
        if i == 0:  # a base stage, or an SR stage keeping its scale
            out.append(replace(c, default_size=w))
            continue
        prev = sizes[i - 1][0]
        if w % prev:
            raise ValueError(f"stage {i}: {prev}x{prev} -> {w}x{h} is not an integer upscaling")
        out.append(replace(c, default_size=w, sr_scale=w // prev))
    return out


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def format_cost_table(cost: CascadeCost, title: str = "") -> str:
    """A plain-text table: per stage size, pixels, steps, evaluations, FLOPs per evaluation and in total."""
    header = f"{'stage':34} {'size':>9} {'pixels':>9} {'steps':>5} {'evals':>5} {'FLOPs/eval':>13} {'FLOPs':>13}"
    lines = [title] if title else []
    lines += [header, "-" * len(header)]

    def row(s: StageCost) -> str:
        size = f"{s.size[0]}x{s.size[1]}"
        return (f"{s.name:34} {size:>9} {s.pixels:>9} {s.steps:>5} {s.evals:>5} {_flops(s.flops_per_eval):>13} "
                f"{_flops(s.total_flops):>13}")

    lines += [row(s) for s in cost.stages]
    lines.append(f"{'cascade total':34} {'':>9} {cost.total_pixels:>9} {'':>5} "
                 f"{sum(s.evals for s in cost.stages):>5} {'':>13} {_flops(cost.total_flops):>13}")
    lines.append(row(cost.direct))
    lines.append(f"cascade / direct = {cost.ratio:.3f}")
    return "\n".join(lines)


def files_cost(spec, steps=None, cfg=None) -> CascadeCost:
    """The cost of the cascade in stage files (`xldm.cascade.cascade_files`), from their headers only."""
    return cascade_cost([read_stage_header(path)[0] for path in cascade_files(spec)], steps, cfg)


IMAGEN_SIZES = ((64, 64), (256, 256), (1024, 1024))  # Saharia et al. 2022, Sec. 2.4


def vae_decode_flops(vae, size: tuple[int, int]) -> int:
    """FLOPs of decoding one latent of an image of `size` (width, height), measured like `unet_flops`."""
    from torch.utils.flop_counter import FlopCounterMode

    from xldm.models.vae import AutoencoderKL

    width, height = size
    with torch.device("meta"):
        model = AutoencoderKL(vae)
        z = torch.empty(1, vae.z_channels, height // 8, width // 8)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.decode(z)
    return int(counter.get_total_flops())


def latent_model_cost(base, refiner=None, size: tuple[int, int] = (128, 128), steps: int = 30, cfg: float = 5.0,
                      refiner_start: float = 0.8, sampler: str = "euler") -> list[StageCost]:
    """The latent pipeline's cost at `size`, in the same units as a cascade's: the base UNet (and the refiner
    after the hand-off, `xldm.diffusion.schedules.split_for_refiner`) on the latent, then one VAE decode."""
    from xldm.diffusion.schedules import split_for_refiner

    latent = (size[0] // 8, size[1] // 8)
    base_steps = split_for_refiner(steps, refiner_start, sampler) if refiner is not None else steps
    parts = [StageCost(name=f"latent base UNet at {latent[0]}x{latent[1]}", size=latent, steps=base_steps,
                       guidance=cfg > 1, flops_per_eval=unet_flops(base.unet, latent))]
    if refiner is not None:
        parts.append(StageCost(name=f"latent refiner UNet at {latent[0]}x{latent[1]}", size=latent,
                               steps=steps - base_steps, guidance=cfg > 1,
                               flops_per_eval=unet_flops(refiner.unet, latent)))
    parts.append(StageCost(name=f"VAE decode to {size[0]}x{size[1]}", size=size, steps=1, guidance=False,
                           flops_per_eval=vae_decode_flops(base.vae, size)))
    return parts


def format_side_by_side(cascade: CascadeCost, latent: list[StageCost]) -> str:
    """The default cascade next to the default latent model (same final size), FLOPs per image."""
    lines = [f"{'part':34} {'size':>9} {'steps':>5} {'evals':>5} {'FLOPs':>13}"]
    lines.append("-" * len(lines[0]))
    for title, parts in (("pixel cascade", cascade.stages), ("latent model", latent)):
        for s in parts:
            lines.append(f"{s.name:34} {s.size[0]:>4}x{s.size[1]:<4} {s.steps:>5} {s.evals:>5} "
                         f"{_flops(s.total_flops):>13}")
        lines.append(f"{title + ' total':34} {'':>9} {'':>5} {sum(s.evals for s in parts):>5} "
                     f"{_flops(sum(s.total_flops for s in parts)):>13}")
    return "\n".join(lines)


__all__ = ["unet_flops", "StageCost", "CascadeCost", "cascade_cost", "rescaled", "format_cost_table", "files_cost",
           "IMAGEN_SIZES", "vae_decode_flops", "latent_model_cost", "format_side_by_side"]
