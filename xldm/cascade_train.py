"""Training one stage of a pixel-space cascade (`xldm.cascade`): the base model or a super-resolution model.

The objective is xldm's (`xldm.train.objective`: SDXL's 1000-step discrete schedule, epsilon or v targets,
optional min-SNR weights, caption dropout for classifier-free guidance), applied to pixels in [-1, 1] instead of
latents.  An SR stage trains on (low-res, high-res) pairs made on the fly from the same images (Imagen Sec. 2.4;
CDM Sec. 3): high = the batch at the stage's resolution, low = its box-filtered downsample by `scale`, then
corrupted by noise conditioning augmentation at a level s ~ U[0, aug_level_max] drawn per image, s handed to
the model in the vector.

Randomness follows `xldm.train.loop`: every sample of every step draws from its own generator seeded by
(seed, step, sample index) (`objective.sample_generators`), in a fixed order: `draw_noise`'s draws (timestep,
dropout uniforms, noise, offset), then, for SR stages, the augmentation level and the augmentation noise.  The
checkpoint (one safetensors file, `xldm.train.checkpoint`) holds the UNet, AdamW moments, the EMA with its
counter, the global RNGs and the data position, so a resumed run continues exactly.  The text encoders are frozen:
taken from `text_encoders_from` (a stage file or an xldm model, e.g. the default model's pretrained encoders) or
initialised from the seed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from xldm.cascade import augment, downsample_for_sr, encoders_from, random_stage, save_stage, upsample_low_res
from xldm.conditioning import concat_channels, training_conditioning
from xldm.config import PRESETS, ModelConfig
from xldm.diffusion.denoiser import Denoiser
from xldm.errors import NonFiniteError
from xldm.models.components import Components
from xldm.train import checkpoint as ckpt
from xldm.train.ema import EMA
from xldm.train.objective import draw_noise, sample_generators

CASCADE_STAGE_PRESETS = {k: v for k, v in PRESETS.items() if v.vae is None}
CascadeStageConfig = ModelConfig


@dataclass(frozen=True)
class CascadeTrainConfig:
    """One stage's training run (a cascade is trained stage by stage, each on the same data)."""

    stage: str = "tiny-cascade-base-16"  # a name in xldm.cascade.CASCADE_STAGE_PRESETS
    data: str = ""  # image folder or WebDataset shards (xldm.train.data.open_source)
    out: str = ""  # run directory: checkpoints/, metrics.jsonl, final/stage.safetensors
    init: str | None = None  # a stage file to start from (its UNet and text encoders)
    text_encoders_from: str | None = None  # frozen encoders from a stage file or an xldm model; None = seeded init
    steps: int = 1000
    batch_size: int = 4
    seed: int = 0
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    timestep_min: int = 0
    timestep_max: int = 999
    min_snr_gamma: float = 0.0  # 0 = off (Hang et al. 2023 recommend 5)
    text_dropout: float = 0.1  # caption dropout for CFG (SD 1.x model card: 10%)
    micro_dropout: float = 0.0  # drop the size/crop scalars' embedding (never the augmentation level)
    aug_level_max: float = 1.0  # SR: s ~ U[0, aug_level_max]
    train_crop: int = 0  # SR: train on random crops of this side of the stage-resolution images; 0 = whole images
    ema_decay: float = 0.999  # 0 = no EMA
    ema_warmup: bool = True
    max_nonfinite_steps: int = 5
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    center_crop: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"CascadeTrainConfig: {message}")

        check(self.stage in CASCADE_STAGE_PRESETS,
              f"unknown stage {self.stage!r}; expected one of {sorted(CASCADE_STAGE_PRESETS)}")
        check(self.steps >= 1 and self.batch_size >= 1, f"steps and batch_size must be >= 1, got {self.steps}, "
                                                         f"{self.batch_size}")
        check(0 <= self.timestep_min <= self.timestep_max < 1000,
              f"need 0 <= timestep_min <= timestep_max < 1000, got [{self.timestep_min}, {self.timestep_max}]")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0.0 <= self.text_dropout <= 1.0 and 0.0 <= self.micro_dropout <= 1.0, "dropout rates must lie in [0, 1]")
        check(0.0 <= self.aug_level_max <= 1.0, f"aug_level_max must lie in [0, 1], got {self.aug_level_max}")
        sc = CASCADE_STAGE_PRESETS.get(self.stage)
        if self.train_crop:
            check(sc is not None and sc.sr_scale > 0, "train_crop applies to super-resolution stages only")
            check(self.train_crop % sc.sr_scale == 0 and self.train_crop <= sc.default_size,
                  f"train_crop must be a multiple of the scale {sc.sr_scale} and at most {sc.default_size}, "
                  f"got {self.train_crop}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        check(self.checkpoint_every >= 1 and self.keep_checkpoints >= 1, "checkpoint_every and keep_checkpoints "
                                                                         "must be >= 1")

    @property
    def stage_config(self) -> CascadeStageConfig:
        return CASCADE_STAGE_PRESETS[self.stage]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Tiny stages learn in seconds on a CPU (tests); the default cascade's rates, steps and batches are our choice for
# a run of about 1.5 h on one CPU core (scripts/train_default_cascade.sh), EMA horizon ~200 steps to match.  SR
# stages draw s from [0, 0.5] (our choice: sampling uses s <= 0.3; past s = 0.5 the cosine schedule keeps under half
# the signal); the 128^2 stage trains on 64^2 crops (a quarter of the cost; its UNet is fully convolutional).
_TINY = dict(lr=1e-3, batch_size=4, checkpoint_every=50, keep_checkpoints=2, ema_decay=0.99)
_SMALL = dict(lr=5e-4, warmup_steps=100, checkpoint_every=100, keep_checkpoints=2, ema_decay=0.995,
              min_snr_gamma=5.0)
CASCADE_TRAIN_PRESETS: dict[str, CascadeTrainConfig] = {
    "tiny-cascade-base-16": CascadeTrainConfig(stage="tiny-cascade-base-16", **_TINY),
    "tiny-cascade-sr-32": CascadeTrainConfig(stage="tiny-cascade-sr-32", aug_level_max=0.5, **_TINY),
    "tiny-cascade-sr-64": CascadeTrainConfig(stage="tiny-cascade-sr-64", aug_level_max=0.5, **_TINY),
    "cascade-base-32": CascadeTrainConfig(stage="cascade-base-32", steps=1500, batch_size=32, **_SMALL),
    "cascade-sr-64": CascadeTrainConfig(stage="cascade-sr-64", steps=1200, batch_size=16, aug_level_max=0.5,
                                        **_SMALL),
    "cascade-sr-128": CascadeTrainConfig(stage="cascade-sr-128", steps=1000, batch_size=16, aug_level_max=0.5,
                                         train_crop=64, **_SMALL),
}


def cascade_train_preset(name: str, **overrides: Any) -> CascadeTrainConfig:
    if name not in CASCADE_TRAIN_PRESETS:
        raise ValueError(f"unknown cascade training preset {name!r}; expected one of {sorted(CASCADE_TRAIN_PRESETS)}")
    return replace(CASCADE_TRAIN_PRESETS[name], **overrides)


# --- the run ----------------------------------------------------------------------------------------------------

@dataclass
class StageRun:
    config: CascadeTrainConfig
    stage: Components
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    denoiser: Denoiser
    tokenizers: tuple
    device: torch.device

    def named_parameters(self) -> Iterable[tuple[str, Tensor]]:
        return ((f"unet.{k}", p) for k, p in self.stage.unet.named_parameters())


@dataclass
class StageStep:
    loss: float
    applied: bool  # False: non-finite loss or gradient, nothing updated
    grad_norm: float


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_stage_run(config: CascadeTrainConfig, stage: Components | None = None,
                    device: torch.device | str | None = None) -> StageRun:
    """UNet (trainable), frozen text encoders, AdamW, EMA and the discrete schedule for `config`."""
    device = torch.device(device) if device is not None else _device(config.device)
    if stage is None:
        if config.init:
            from xldm.cascade import load_stage

            stage = load_stage(config.init, dtype=torch.float32)
            if stage.config != config.stage_config:
                from xldm.cascade import describe

                raise ValueError(f"--init {config.init} holds {describe(stage.config)}, but the preset trains "
                                 f"{describe(config.stage_config)} (configs differ)")
        else:
            encoders = encoders_from(config.text_encoders_from, config.stage_config.text_encoders) \
                if config.text_encoders_from else None
            stage = random_stage(config.stage_config, seed=config.seed, text_encoders=encoders)
    stage.to(device=device, dtype=torch.float32)
    for te in stage.text_encoders:
        te.eval().requires_grad_(False)
    stage.unet.train().requires_grad_(True)
    # foreach=False: the single-tensor AdamW path (as xldm.train.loop), independent of tensor grouping.
    optimizer = torch.optim.AdamW(stage.unet.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  foreach=False)
    run = StageRun(config=config, stage=stage, optimizer=optimizer, ema=None,
                   denoiser=Denoiser(stage.config.prediction_type),
                   tokenizers=stage.tokenizers(), device=device)
    if config.ema_decay > 0:
        run.ema = EMA(run.named_parameters(), config.ema_decay, warmup=config.ema_warmup)
    return run


def lr_at(config: CascadeTrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps` (1-based steps), then constant."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    return config.lr


# --- one step ----------------------------------------------------------------------------------------------------

def training_pair(config: ModelConfig, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
    """(high-res target, low-res input or None for a base stage) from a batch of images in [-1, 1]."""
    high = pixels.float()
    if config.sr_scale == 0:
        return high, None
    return high, downsample_for_sr(high, config.sr_scale)


def random_crops(pixels: Tensor, side: int, generators: Sequence[torch.Generator]) -> Tensor:
    """One side x side crop per image, its top-left drawn from the image's generator (offsets in multiples of 8,
    so the crop keeps the box filter's grid and the UNet's)."""
    _, _, h, w = pixels.shape
    crops = []
    for image, g in zip(pixels, generators):
        top = int(torch.randint(0, (h - side) // 8 + 1, (1,), generator=g)) * 8
        left = int(torch.randint(0, (w - side) // 8 + 1, (1,), generator=g)) * 8
        crops.append(image[:, top:top + side, left:left + side])
    return torch.stack(crops)


def stage_loss(run: StageRun, batch: dict, step: int) -> Tensor:
    """The (weighted) diffusion loss of one batch at `step` (draws depend only on seed, step and row)."""
    config, stage = run.config, run.stage
    sc = stage.config
    pixels = batch["pixels"].to(run.device)
    b = pixels.shape[0]
    gens = sample_generators(config.seed, step, range(b))
    if config.train_crop:  # as Imagen's SR models train on crops (Saharia et al. 2022); offsets drawn first
        pixels = random_crops(pixels, config.train_crop, gens)
    x0, low = training_pair(sc, pixels)
    _, _, h, w = x0.shape
    draw = draw_noise(gens, x0.shape[1:], t_min=config.timestep_min, t_max=config.timestep_max,
                      text_dropout=config.text_dropout, micro_dropout=config.micro_dropout)
    timesteps, noise = draw.timesteps.to(run.device), draw.noise.to(run.device)
    values: dict[str, Any] = {
        "original_size": batch.get("original_size", (h, w)), "crop_top_left": batch.get("crop_top_left", (0, 0)),
        "target_size": batch.get("target_size", (h, w)), "captions": batch["captions"],
    }
    up = None
    if low is not None:  # after draw_noise, per sample: the augmentation level, then its noise
        levels = torch.cat([torch.rand(1, generator=g) for g in gens]) * config.aug_level_max
        aug_noise = torch.stack([torch.randn(tuple(low.shape[1:]), generator=g) for g in gens]).to(run.device)
        up = upsample_low_res(augment(low, levels.to(run.device), noise=aug_noise), (w, h))
        values["aug_level"] = levels

    with torch.no_grad():
        context, vector = training_conditioning(sc, stage.text_encoders, run.tokenizers, values, draw.keep_text,
                                                draw.keep_micro, device=run.device)
    noisy = run.denoiser.noised(x0, noise, timesteps)
    model_input = noisy if up is None else concat_channels(noisy, up)
    prediction = stage.unet(model_input, timesteps, context, vector)
    return run.denoiser.loss(prediction, x0, noise, timesteps, config.min_snr_gamma)


def stage_step(run: StageRun, batch: dict, step: int) -> StageStep:
    """loss -> backward -> (skip if non-finite) -> clip -> AdamW -> EMA."""
    loss = stage_loss(run, batch, step)
    loss.backward()
    params = [p for p in run.stage.unet.parameters() if p.grad is not None]
    max_norm = run.config.grad_clip if run.config.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    value = float(loss.detach())
    applied = math.isfinite(value) and bool(torch.isfinite(grad_norm))
    if applied:
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(run.config, step)
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update(run.named_parameters())
    run.optimizer.zero_grad(set_to_none=True)
    return StageStep(loss=value, applied=applied, grad_norm=float(grad_norm))


# --- checkpoints and export ------------------------------------------------------------------------------------------

def _checkpoint_contents(run: StageRun, step: int, data_state: dict | None) -> tuple[dict[str, Tensor], dict]:
    tensors = {f"model.unet.{k}": v for k, v in run.stage.unet.state_dict().items()}
    optim_tensors, optim_meta = ckpt.optimizer_state(run.optimizer, "optim")
    tensors.update(optim_tensors)
    ema_tensors, ema_meta = ckpt.ema_state(run.ema)
    tensors.update(ema_tensors)
    rng_tensors, rng_meta = ckpt.rng_state()
    tensors.update(rng_tensors)
    state = {"step": step, "kind": "cascade-stage", "config": run.config.to_dict(), "optimizer": optim_meta,
             "ema": ema_meta, "rng": rng_meta, "data": data_state}
    return tensors, state


def _restore(run: StageRun, data, tensors: dict[str, Tensor], state: dict) -> int:
    if state.get("kind") != "cascade-stage":
        raise ValueError(f"the checkpoint is not a cascade stage's (kind {state.get('kind')!r})")
    head = "model.unet."
    run.stage.unet.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}, strict=True)
    ckpt.load_optimizer_state(run.optimizer, "optim", tensors, state["optimizer"])
    ckpt.load_ema_state(run.ema, tensors, state["ema"])
    ckpt.restore_rng_state(tensors, state["rng"])
    if state.get("data") is not None and hasattr(data, "load_state_dict"):
        data.load_state_dict(state["data"])
    return int(state["step"])


def export_stage(run: StageRun, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """The stage file `xldm generate --cascade` loads: EMA weights (raw ones without EMA) and the text encoders."""
    unet = copy.deepcopy(run.stage.unet).cpu().eval()
    if run.ema is not None:
        run.ema.copy_to(unet, prefix="unet.")
    stage = Components(config=run.stage.config, unet=unet, text_encoders=run.stage.text_encoders)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_stage(stage, path, dtype=dtype)


# --- the loop ------------------------------------------------------------------------------------------------------

@dataclass
class StageTrainResult:
    step: int
    final_path: Path
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0


def make_stage_batches(config: CascadeTrainConfig):
    """Batches at the stage's resolution: one bucket, cover-resized and cropped (xldm.train.data)."""
    from xldm.train.data import TrainingBatches, open_source

    if not config.data:
        raise ValueError("no training data: set data (an image folder or WebDataset shards)")
    return TrainingBatches(open_source(config.data), buckets=[(config.stage_config.default_size,) * 2],
                           batch_size=config.batch_size, seed=config.seed, center_crop=config.center_crop)


def train_stage(config: CascadeTrainConfig, *, resume: bool = False, data=None, progress: bool = True,
                on_step: Callable[[int, StageRun], None] | None = None) -> StageTrainResult:
    """Train one stage for `config.steps` steps in total and export `out/final/stage.safetensors`."""
    from tqdm import tqdm

    if not config.out:
        raise ValueError("no run directory: set out")
    out = Path(config.out)
    checkpoints = ckpt.checkpoints_dir(out, resume)
    run = build_stage_run(config)
    data = data if data is not None else make_stage_batches(config)
    torch.manual_seed(config.seed)
    start = 0
    if resume:
        found = ckpt.load_latest(checkpoints)
        if found is not None:
            path, tensors, state = found
            start = _restore(run, data, tensors, state)
            print(f"resuming from {path} (step {start})", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    ckpt.trim_metrics(metrics, start)

    bar = tqdm(total=config.steps, initial=start, unit="step", file=sys.stderr, disable=not progress)
    batches = iter(data)
    losses: list[float] = []
    streak = skipped = 0
    for step in range(start + 1, config.steps + 1):
        t0 = time.perf_counter()
        result = stage_step(run, next(batches), step)
        losses.append(result.loss)
        if result.applied:
            streak = 0
        else:
            streak += 1
            skipped += 1
            warnings.warn(f"step {step}: non-finite loss or gradient ({result.loss}); step skipped", RuntimeWarning,
                          stacklevel=2)
            if streak >= config.max_nonfinite_steps:
                raise NonFiniteError(f"training stopped at step {step}: {streak} non-finite steps in a row; check "
                                     f"the data and lower the learning rate")
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": step, "loss": result.loss, "lr": lr_at(config, step),
                                "grad_norm": result.grad_norm, "seconds": time.perf_counter() - t0,
                                "skipped_step": not result.applied}) + "\n")
        bar.set_postfix(loss=f"{result.loss:.4f}")
        bar.update(1)
        if step % config.checkpoint_every == 0 or step == config.steps:
            data_state = data.state_dict() if hasattr(data, "state_dict") else None
            tensors, state = _checkpoint_contents(run, step, data_state)
            ckpt.save_checkpoint(checkpoints, step, tensors, state, keep=config.keep_checkpoints)
        if on_step is not None:
            on_step(step, run)
    bar.close()
    final = export_stage(run, out / "final" / "stage.safetensors")
    return StageTrainResult(step=config.steps, final_path=final, losses=losses, skipped_steps=skipped)


def export_cascade(stage_files: Sequence[str | Path], out: str | Path, *,
                   with_text_encoders: bool = False) -> list[Path]:
    """Trained stage files (`train_stage`'s final/stage.safetensors, in cascade order) -> `out/stage_N.safetensors`
    in fp16, the shipped form.  Without text encoders by default: a cascade whose encoder is the default model's
    takes it from there when loaded (`xldm.cascade.load_cascade`); `with_text_encoders` stores them once, in
    stage_0 (the stages' encoders must be the same, as `train_stage` with one `text_encoders_from` gives)."""
    from xldm.cascade import load_cascade, save_cascade

    stages = load_cascade([Path(p) for p in stage_files], dtype=torch.float32)
    return save_cascade(stages, out, dtype=torch.float16, text_encoders="shared" if with_text_encoders else "none")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m xldm.cascade_train",
                                     description="cascade training glue (training itself: xldm train --preset "
                                                 "cascade-...)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="fp16 stage_N.safetensors files from trained stages, in cascade order")
    p.add_argument("out")
    p.add_argument("stages", nargs="+")
    p.add_argument("--with-text-encoders", action="store_true",
                   help="store the encoders in stage_0 (default: leave them to the default model)")
    args = parser.parse_args(argv)
    paths = export_cascade(args.stages, args.out, with_text_encoders=args.with_text_encoders)
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


__all__ = ["CascadeTrainConfig", "CASCADE_TRAIN_PRESETS", "cascade_train_preset", "StageRun", "StageStep",
           "build_stage_run", "training_pair", "stage_loss", "stage_step", "export_stage", "train_stage",
           "make_stage_batches", "StageTrainResult", "lr_at", "random_crops",
           "export_cascade"]

if __name__ == "__main__":
    sys.exit(main())
