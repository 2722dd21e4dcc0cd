"""`TrainConfig`: every setting of a training run in one frozen dataclass, and the named presets.

A run is `train(TrainConfig)`; the command line and TOML files only fill this dataclass (ARCHITECTURE rule 1: data,
never class names).  Numbers a preset takes from a paper cite it; numbers the papers do not give are marked as
our choice.  `batch_size` is per process: the global batch is `batch_size x world size`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

from xldm.config import PRESETS, ModelConfig

TASKS = ("diffusion", "vae", "clip")  # "clip": xldm.train.clip_pretrain (the default model's text encoders)
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("no", "bf16")
RECONSTRUCTION_LOSSES = ("l1", "l2")
PARALLEL_MODES = ("ddp", "fsdp")
NUM_TRAIN_TIMESTEPS = 1000  # SDXL paper Sec. 2.5: "a discrete-time diffusion schedule with 1000 steps"


@dataclass(frozen=True)
class TrainConfig:
    """One training run.  Defaults are a small, safe fine-tuning setup; the presets below set the rest."""

    # --- what is trained --------------------------------------------------------------------------------
    model: str = "tiny-sdxl-base"  # architecture: a name in xldm.config.PRESETS
    task: str = "diffusion"  # "diffusion" (base or refiner UNet, by `model`) or "vae" (the autoencoder)
    init: str | None = None  # starting weights: single file or diffusers folder; None = random init
    init_components: tuple[str, ...] = ()  # subset of ("unet", "vae", "text_encoders"); () = all the file has
    train_text_encoders: bool = False  # SDXL keeps both text encoders frozen

    # --- data and run ----------------------------------------------------------------------------------
    data: str = ""  # image folder or WebDataset shards (xldm.train.data.open_source)
    out: str = ""  # run directory: checkpoints/, metrics.jsonl, final/
    steps: int = 1000
    batch_size: int = 4  # per process
    seed: int = 0
    resolution: int = 1024  # bucket base size: buckets of ~resolution^2 pixels (SDXL paper App. I)
    bucket_step: int = 64  # bucket sides are multiples of this (App. I: 64)
    center_crop: bool = False  # SDXL: random crops, with the crop handed to the model (Sec. 2.2)
    # On-disk cache of VAE posteriors and text embeddings (xldm.train.cache); "" = off.  When set, each sample
    # keeps one crop for the whole run (centre, or random seeded by the sample key).
    cache_dir: str = ""
    # Augmentation (ours, xldm.train.data.Augment) for data that lacks what the micro-conditioning describes:
    # this share of the images shrunk to a long side in `downscale_sides` first (c_size), and this share of the
    # crops taken from the image resized up to `zoom_max` x beyond the cover, so a crop can cut into the subject
    # on any side (c_crop).  SDXL's web data has both by nature (paper Sec. 2.2); square, centred, full-size
    # emoji have neither.
    downscale: float = 0.0
    downscale_sides: tuple[int, int] = (8, 24)
    zoom_crops: float = 0.0
    zoom_max: float = 1.5

    # --- diffusion objective ---------------------------------------------------------------------------
    prediction_type: str = "epsilon"  # or "v" (Salimans & Ho 2022)
    timestep_min: int = 0
    timestep_max: int = NUM_TRAIN_TIMESTEPS - 1
    offset_noise: float = 0.0  # Guttenberg 2023; SDXL uses 0.05 in its multi-aspect stage (paper Sec. 2.5)
    min_snr_gamma: float = 0.0  # 0 = off; Hang et al. 2023 recommend gamma = 5
    text_dropout: float = 0.0  # probability of dropping the caption (zero context and pooled) for CFG
    micro_dropout: float = 0.0  # probability of dropping the micro-conditioning embedding (sgm ucg_rate)

    # --- VAE objective (ldm LPIPSWithDiscriminator without LPIPS, see vae_loop) --------------------------
    reconstruction_loss: str = "l1"
    kl_weight: float = 1e-6  # ldm configs/autoencoder/autoencoder_kl_32x32x4.yaml
    disc_start: int = 50001  # same file: the patch discriminator joins after this many steps
    disc_weight: float = 0.5  # same file
    disc_lr: float = 0.0  # 0 = same as lr
    disc_channels: int = 64  # width of the first patch-discriminator layer (pix2pix / taming: 64)

    # --- optimisation ----------------------------------------------------------------------------------
    lr: float = 1e-5
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    lr_schedule: str = "constant"  # after warm-up: "constant" or "cosine" (down to min_lr_ratio x lr)
    min_lr_ratio: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2  # torch AdamW default
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    mixed_precision: str = "no"  # "bf16": autocast on the trained network (weights and optimizer stay fp32)
    gradient_checkpointing: bool = False

    # --- EMA (SDXL paper Sec. 2.4 tracks the autoencoder with an EMA) ------------------------------------
    ema_decay: float = 0.9999  # 0 = no EMA (the final export then uses the raw weights)
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n)) after n updates

    # --- robustness, checkpoints, logging ---------------------------------------------------------------
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) (exact resume on CPU)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    parallel: str = "ddp"  # under torchrun: "ddp", or "fsdp" to shard the UNet (xldm.train.parallel)

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

        check(self.model in PRESETS, f"unknown model {self.model!r}; expected one of {sorted(PRESETS)}")
        check(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        check(self.prediction_type in ("epsilon", "v"), f"prediction_type must be 'epsilon' or 'v', "
                                                        f"got {self.prediction_type!r}")
        check(0 <= self.timestep_min <= self.timestep_max < NUM_TRAIN_TIMESTEPS,
              f"need 0 <= timestep_min <= timestep_max < {NUM_TRAIN_TIMESTEPS}, "
              f"got [{self.timestep_min}, {self.timestep_max}]")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(0.0 <= self.text_dropout <= 1.0 and 0.0 <= self.micro_dropout <= 1.0,
              f"dropout rates must lie in [0, 1], got text {self.text_dropout}, micro {self.micro_dropout}")
        check(len(self.downscale_sides) == 2, f"downscale_sides must be (min, max), got {self.downscale_sides}")
        try:
            self.augment  # the bounds are Augment's own
        except ValueError as e:
            check(False, str(e))
        check(self.offset_noise >= 0.0, f"offset_noise must be >= 0, got {self.offset_noise}")
        check(self.min_snr_gamma >= 0.0, f"min_snr_gamma must be >= 0 (0 = off), got {self.min_snr_gamma}")
        check(self.lr > 0.0, f"lr must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        check(self.mixed_precision in MIXED_PRECISION,
              f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        check(self.reconstruction_loss in RECONSTRUCTION_LOSSES,
              f"reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, got {self.reconstruction_loss!r}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        check(self.max_nonfinite_steps >= 1, f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        check(self.parallel in PARALLEL_MODES, f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        unknown = set(self.init_components) - {"unet", "vae", "text_encoders"}
        check(not unknown, f"unknown init_components {sorted(unknown)}")

    @property
    def model_config(self) -> ModelConfig:
        return PRESETS[self.model]

    @property
    def is_refiner(self) -> bool:
        return self.task == "diffusion" and "aesthetic_score" in self.model_config.micro_conditioning

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists); `from_dict(to_dict())` round-trips."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from plain data (TOML, JSON); unknown keys are an error that lists the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(names)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)

    @property
    def augment(self):
        """The data augmentation these fields describe (xldm.train.data.Augment)."""
        from xldm.train.data import Augment

        return Augment(self.downscale, tuple(self.downscale_sides), self.zoom_crops, self.zoom_max)

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


# --- presets ---------------------------------------------------------------------------------------------
# Tiny presets train in seconds on a CPU (tests, demos); their rates are ours, chosen to learn fast.
_TINY = dict(resolution=64, bucket_step=64, lr=1e-3, warmup_steps=0, weight_decay=0.0, ema_decay=0.999,
             checkpoint_every=50, keep_checkpoints=2, batch_size=4)

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny-sdxl-base": TrainConfig(model="tiny-sdxl-base", text_dropout=0.1, **_TINY),
    # The refiner specialises on the first 200 (low-noise) discrete noise scales (SDXL paper Sec. 2.5).
    "tiny-sdxl-refiner": TrainConfig(model="tiny-sdxl-refiner", timestep_max=199, text_dropout=0.1, **_TINY),
    "tiny-vae": TrainConfig(model="tiny-sdxl-base", task="vae", disc_start=100, disc_channels=16, **_TINY),
    # Full SDXL.  Paper Sec. 2.5: 1000-step discrete schedule; the base's final (multi-aspect, ~1024^2) stage uses
    # offset noise 0.05 and the App. I buckets; its global batch was 2048 (pretraining at 256^2; set with
    # --batch-size per process x processes).  The paper gives no learning rate: 1e-5 with 500 warm-up steps is
    # our fine-tuning choice.  Text dropout 0.1: the SD 1.x model card's "10% dropping of the text-conditioning
    # to improve classifier-free guidance sampling" (the SDXL paper does not state its rate).
    "sdxl-base": TrainConfig(model="sdxl-base", resolution=1024, bucket_step=64, offset_noise=0.05,
                             text_dropout=0.1, lr=1e-5, warmup_steps=500, mixed_precision="bf16",
                             gradient_checkpointing=True, batch_size=1),
    # Sec. 2.5: the refiner is a separate LDM in the same latent space, specialised on the first 200 noise scales
    # (t in [0, 199]) of high-quality data; conditioned on the aesthetic score (sgm sd_xl_refiner.yaml).
    "sdxl-refiner": TrainConfig(model="sdxl-refiner", resolution=1024, bucket_step=64, timestep_max=199,
                                text_dropout=0.1, lr=1e-5, warmup_steps=500, mixed_precision="bf16",
                                gradient_checkpointing=True, batch_size=1),
    # Sec. 2.4: the SD autoencoder architecture trained at batch 256 (vs 9) with an EMA of its weights.  Loss
    # weights from ldm's autoencoder_kl_32x32x4.yaml (kl 1e-6, discriminator from step 50001, weight 0.5,
    # base lr 4.5e-6 x batch); 256^2 crops as ldm.  The EMA decay is not given; 0.9999 is ours.
    "sdxl-vae": TrainConfig(model="sdxl-base", task="vae", resolution=256, bucket_step=64, lr=4.5e-6 * 256,
                            kl_weight=1e-6, disc_start=50001, disc_weight=0.5, ema_decay=0.9999,
                            weight_decay=0.0, adam_beta1=0.5, adam_beta2=0.9, grad_clip=0.0, batch_size=8),
}
# ldm's autoencoder trains with Adam(betas=(0.5, 0.9)) (ldm/models/autoencoder.py configure_optimizers).
# The bundled default model's four stages (xldm.default_model; it also registers its model presets).
from xldm.default_model import default_train_presets  # noqa: E402  (needs TrainConfig above)

TRAIN_PRESETS.update(default_train_presets())

PRESET_NOTES = {
    name: ("random init of every network unless --init is given (a tiny preset is meant for tests; a full "
           "one from scratch needs pretrained text encoders and VAE: pass --init with a single file or "
           "diffusers folder)")
    for name in TRAIN_PRESETS
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; expected one of {sorted(TRAIN_PRESETS)}")
    return replace(TRAIN_PRESETS[name], **overrides) if overrides else TRAIN_PRESETS[name]


__all__ = ["TrainConfig", "TRAIN_PRESETS", "preset", "PRESET_NOTES"]
