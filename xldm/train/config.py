"""`TrainConfig`: every setting of a training run in one frozen dataclass, the named presets, and `lr_at`.

A run is `train(TrainConfig)`; the command line and TOML files only fill this dataclass.  Numbers a preset takes
from a paper cite it; numbers the papers do not give are marked as our choice.  `batch_size` is per process: the
global batch is `batch_size x world size`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import Any

from xldm.config import PREDICTION_TYPES, PRESETS, ModelConfig

# "clip": contrastive pre-training of the text encoders (xldm.train.contrastive); "add": adversarial diffusion
# distillation of a few-step student from a teacher (xldm.train.distill)
TASKS = ("diffusion", "vae", "clip", "add", "controlnet")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("no", "bf16")
RECONSTRUCTION_LOSSES = ("l1", "l2")
TEXT_MODELS = ("transformer", "bag-of-words")  # their classes: xldm.train.contrastive.TEXT_MODEL_CLASSES
PARALLEL_MODES = ("ddp", "fsdp")
NUM_TRAIN_TIMESTEPS = 1000  # SDXL paper Sec. 2.5: "a discrete-time diffusion schedule with 1000 steps"
# a default's type -> the types its field accepts (bool before int: a bool is an int to isinstance)
_KINDS = ((bool, (bool,)), (int, (int,)), (float, (int, float)), (tuple, (tuple, list)), (str, (str,)),
          (type(None), (str, type(None))))


@dataclass(frozen=True)
class TrainConfig:
    """One training run.  Defaults are a small, safe fine-tuning setup; the presets below set the rest."""

    model: str = "tiny-sdxl-base"  # architecture: a name in xldm.config.PRESETS (pixel-space cascade stages too)
    task: str = "diffusion"  # "diffusion" (UNet of `model`), "vae" (the autoencoder) or "clip" (text encoders)
    init: str | None = None  # starting weights: single file or diffusers folder (a stage file for a cascade stage)
    init_components: tuple[str, ...] = ()  # subset of ("unet", "vae", "text_encoders"); () = all the file has
    text_encoders_from: str | None = None  # cascade stage: frozen encoders of a stage file or xldm model, or "default"
    train_text_encoders: bool = False  # SDXL keeps both text encoders frozen
    # LoRA (Hu et al. 2022): train only rank-`lora_rank` adapters (0 = train the weights), the base frozen, exported
    # as RUN/final/lora.safetensors in kohya's format; alpha 0 = rank (scale 1); LoCon convs, text encoders optional
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_conv: bool = False
    lora_text_encoders: bool = False
    # Adversarial diffusion distillation (task "add", Sauer et al. 2023): the student starts as the teacher's UNet
    # (or --init) and learns to denoise from the student timesteps in one step each; loss = adversarial hinge +
    # distill_weight x distillation towards the teacher's x0 (with teacher_cfg guidance) of the re-noised output
    teacher: str = ""
    student_timesteps: tuple[int, ...] = (999, 749, 499, 249)  # ADD Sec. 4: SDXL-Turbo's four steps
    distill_weight: float = 2.5  # ADD Sec. 3.2: lambda = 2.5
    teacher_cfg: float = 5.0  # the teacher's guidance in the distillation target (the bundled model's default)
    r1_weight: float = 1e-5  # R1 penalty on the discriminator's real inputs (Mescheder et al. 2018; ADD App. uses R1)
    # ControlNet (task "controlnet", Zhang et al. 2023): a ControlNet trained on the frozen `--init` model, its
    # control images made from each training crop by this preprocessor ("canny" or "canny:LOW,HIGH",
    # xldm.controlnet.parse_preprocess), or "dir:FOLDER": read from files (xldm.train.data.control_files)
    control: str = ""

    data: str = ""  # image folder or WebDataset shards (xldm.train.data.open_source)
    out: str = ""  # run directory: checkpoints/, metrics.jsonl, final/
    steps: int = 1000
    batch_size: int = 4  # per process
    seed: int = 0
    resolution: int = 1024  # bucket base size: buckets of ~resolution^2 pixels (SDXL paper App. I); stages: theirs
    bucket_step: int = 64  # bucket sides are multiples of this (App. I: 64)
    center_crop: bool = False  # SDXL: random crops, with the crop handed to the model (Sec. 2.2)
    cache_dir: str = ""  # VAE posterior / text embedding cache (xldm.train.cache), "" = off; when set, each sample
    # keeps one crop for the whole run (centre, or random seeded by the sample key)
    # Augmentation (ours, xldm.train.data.Augment) for data lacking what the micro-conditioning describes: this share
    # of the images shrunk to a long side in `downscale_sides` first (c_size), and this share of the crops taken from
    # the image resized up to `zoom_max` x beyond the cover, so a crop can cut into the subject on any side (c_crop).
    # SDXL's web data has both by nature (paper Sec. 2.2); emoji have neither.
    downscale: float = 0.0
    downscale_sides: tuple[int, int] = (8, 24)
    zoom_crops: float = 0.0
    zoom_max: float = 1.5
    # Ablations of the micro-conditioning (SDXL paper Table 2, Sec. 2.2; xldm.reproduce): off, the UNet is told the
    # training size as c_size (original = target) and (0, 0) as c_crop, whatever the preprocessing did.
    size_conditioning: bool = True
    crop_conditioning: bool = True

    prediction_type: str = ""  # "" = the model's (ModelConfig.prediction_type); else trained and exported so
    timestep_min: int = 0  # training timesteps are drawn uniformly from [timestep_min, timestep_max]
    timestep_max: int = NUM_TRAIN_TIMESTEPS - 1  # (the refiner's presets: 199, SDXL Sec. 2.5)
    offset_noise: float = 0.0  # Guttenberg 2023; SDXL uses 0.05 in its multi-aspect stage (paper Sec. 2.5)
    min_snr_gamma: float = 0.0  # 0 = off; Hang et al. 2023 recommend gamma = 5
    text_dropout: float = 0.0  # probability of dropping the caption (zero context and pooled) for CFG
    micro_dropout: float = 0.0  # probability of dropping the micro-conditioning embedding (sgm ucg_rate)
    aug_level_max: float = 1.0  # cascade SR stage: noise augmentation level s ~ U[0, aug_level_max] (Imagen 2.4)
    train_crop: int = 0  # cascade SR stage: random crops of this side of the stage's images; 0 = whole images

    # VAE objective (ldm LPIPSWithDiscriminator without LPIPS, see xldm.train.vae)
    reconstruction_loss: str = "l1"
    # Contrastive task: "transformer" (the CLIP text encoders of `model`) or "bag-of-words" (a static-embedding
    # encoder of the same widths, xldm.train.contrastive.BagOfWords: the comparison it is measured against)
    text_model: str = "transformer"
    kl_weight: float = 1e-6  # ldm configs/autoencoder/autoencoder_kl_32x32x4.yaml
    disc_start: int = 50001  # same file: the patch discriminator joins after this many steps
    disc_weight: float = 0.5  # same file
    disc_lr: float = 0.0  # 0 = same as lr
    disc_channels: int = 64  # width of the first patch-discriminator layer (pix2pix / taming: 64)

    lr: float = 1e-5
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    lr_schedule: str = "constant"  # after warm-up: "constant" or "cosine" (down to min_lr_ratio x lr)
    min_lr_ratio: float = 0.0  # the cosine schedule ends at this share of lr
    adam_beta1: float = 0.9  # AdamW's first-moment decay (torch default)
    adam_beta2: float = 0.999  # AdamW's second-moment decay (torch default)
    adam_eps: float = 1e-8  # AdamW's denominator epsilon (torch default)
    weight_decay: float = 1e-2  # torch AdamW default
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    mixed_precision: str = "no"  # "bf16": autocast on the trained network (weights and optimizer stay fp32)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower

    # EMA (SDXL paper Sec. 2.4 tracks the autoencoder with an EMA)
    ema_decay: float = 0.9999  # 0 = no EMA (the final export then uses the raw weights)
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n)) after n updates

    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) (exact resume on CPU)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    parallel: str = "ddp"  # under torchrun: "ddp", or "fsdp" to shard the UNet (xldm.train.parallel)

    # kohya sd-scripts conventions (train_network.py): gradient accumulation (one step = one AdamW update over
    # this many micro-batches of `batch_size`) and sample images every `sample_every` steps (0 = off) of the
    # prompts in `sample_prompts` (one per line, kohya's `--n --s --l --d --w --h` options) into RUN/samples/
    grad_accum_steps: int = 1
    sample_every: int = 0
    sample_prompts: str = ""
    tensorboard: bool = False  # also write the metrics as TensorBoard events into RUN/tensorboard/ (xldm[tensorboard])

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

        for f in dataclasses.fields(self):  # each field takes the type of its default (TOML, --set, JSON)
            value, default = getattr(self, f.name), f.default
            kinds = next(k for t, k in _KINDS if isinstance(default, t))
            items = value if isinstance(value, (tuple, list)) and tuple in kinds else ()
            item_kinds = next(k for t, k in _KINDS if isinstance(default[0] if default else "", t)) if items else ()
            check(all(isinstance(v, k) and (bool in k or not isinstance(v, bool))
                      and not (isinstance(v, float) and not math.isfinite(v))
                      for v, k in ((value, kinds), *((item, item_kinds) for item in items))),
                  f"{f.name} must be {' or '.join(k.__name__.replace('NoneType', 'None') for k in kinds)}"
                  f"{f' of {item_kinds[-1].__name__}' if items else ''}{' (finite)' * (float in kinds)}, "
                  f"got {value!r}")
        check(self.model in PRESETS, f"unknown model {self.model!r}; expected one of {sorted(PRESETS)}")
        for name, allowed in (("task", TASKS), ("prediction_type", ("", *PREDICTION_TYPES)),
                              ("lr_schedule", LR_SCHEDULES), ("mixed_precision", MIXED_PRECISION),
                              ("reconstruction_loss", RECONSTRUCTION_LOSSES), ("parallel", PARALLEL_MODES),
                              ("text_model", TEXT_MODELS)):
            check(getattr(self, name) in allowed, f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check(0 <= self.timestep_min <= self.timestep_max < NUM_TRAIN_TIMESTEPS,
              f"need 0 <= timestep_min <= timestep_max < {NUM_TRAIN_TIMESTEPS}, "
              f"got [{self.timestep_min}, {self.timestep_max}]")
        for name in ("steps", "batch_size", "max_nonfinite_steps", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("text_dropout", "micro_dropout", "aug_level_max"):
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must lie in [0, 1], got {getattr(self, name)}")
        check(self.lora_rank >= 0 and self.lora_alpha >= 0, "lora_rank and lora_alpha must be >= 0")
        lora_only = ("lora_alpha", "lora_conv", "lora_text_encoders")
        check(self.lora_rank > 0 or all(getattr(self, n) == TrainConfig.__dataclass_fields__[n].default
                                        for n in lora_only), "--lora-alpha/--lora-conv/--lora-text-encoders need "
                                                             "--lora-rank")
        check(not self.lora_rank or (self.task == "diffusion" and self.model_config.vae is not None
                                     and not self.train_text_encoders and self.parallel == "ddp"),
              "a LoRA trains a latent model's diffusion task, with ddp, and instead of train_text_encoders")
        check(self.task != "add" or self.model_config.vae is not None, "task 'add' distils a latent model")
        if self.task == "controlnet":
            from xldm.controlnet import parse_preprocess

            check(self.model_config.vae is not None, "task 'controlnet' trains on a latent model")
            check(bool(self.control), "task 'controlnet' needs --control canny (or canny:LOW,HIGH): how the control "
                                      "images are made from the training images (or dir:FOLDER: read from files)")
            if self.control.startswith("dir:"):  # xldm.train.controlnet.control_folder
                check(len(self.control) > len("dir:"), "control dir:FOLDER needs a folder, got 'dir:'")
            else:
                try:
                    chosen = parse_preprocess(self.control)
                except ValueError as e:
                    check(False, f"control: {e}")
                check(chosen is not None, f"control must name a preprocessor (canny), got {self.control!r}")
        check(self.text_model == "transformer" or self.task == "clip",
              f"text_model {self.text_model!r} applies to task 'clip' only, got task {self.task!r}")
        check(not self.control or self.task == "controlnet",
              f"control applies to task 'controlnet' only, got task {self.task!r}")
        check(all(0 <= t < NUM_TRAIN_TIMESTEPS for t in self.student_timesteps) and self.student_timesteps,
              f"student_timesteps must lie in [0, {NUM_TRAIN_TIMESTEPS}), got {self.student_timesteps}")
        check(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        check(self.grad_accum_steps == 1 or self.task == "diffusion",
              f"grad_accum_steps applies to the diffusion task only, got task {self.task!r}")
        check(self.sample_every == 0 or (self.task == "diffusion" and self.model_config.vae is not None),
              f"sample_every needs the diffusion task of a latent model (with a VAE), got task {self.task!r} "
              f"of {self.model}")
        check(self.sample_every == 0 or bool(self.sample_prompts), "sample_every needs sample_prompts (a file)")
        for name in ("offset_noise", "min_snr_gamma", "warmup_steps", "sample_every"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        check(self.lr > 0.0, f"lr must be > 0, got {self.lr}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        check(len(self.downscale_sides) == 2, f"downscale_sides must be (min, max), got {self.downscale_sides}")
        try:
            self.augment  # the bounds are Augment's own
        except ValueError as e:
            check(False, str(e))
        unknown = set(self.init_components) - {"unet", "vae", "text_encoders"}
        check(not unknown, f"unknown init_components {sorted(unknown)}")
        mc = self.model_config
        check(not self.train_crop or mc.sr_scale > 0, "train_crop applies to super-resolution stages only")
        check(not self.train_crop or (self.train_crop % mc.sr_scale == 0 and self.train_crop <= mc.default_size),
              f"train_crop must be a multiple of the scale {mc.sr_scale} and at most {mc.default_size}, "
              f"got {self.train_crop}")
        if mc.vae is not None:
            check(not self.text_encoders_from, "--text-encoders-from applies to cascade presets only; use --init "
                                               "and --init-components")
            return
        # a pixel-space cascade stage (xldm.cascade): diffusion on the pixels, in fp32, its own --init stage file
        check(self.task == "diffusion", f"task {self.task!r} needs a latent model; {self.model} is a cascade stage")
        for flag, name in (("--mixed-precision", "mixed_precision"), ("--init-components", "init_components"),
                           ("--set cache_dir", "cache_dir")):
            check(getattr(self, name) == TrainConfig.__dataclass_fields__[name].default,
                  f"{flag} does not apply to a cascade stage ({self.model})")

    @property
    def model_config(self) -> ModelConfig:
        return PRESETS[self.model]

    @property
    def is_refiner(self) -> bool:
        return self.task == "diffusion" and "aesthetic_score" in self.model_config.micro_conditioning

    @property
    def augment(self):
        """The data augmentation these fields describe (xldm.train.data.Augment)."""
        from xldm.train.data import Augment

        return Augment(self.downscale, tuple(self.downscale_sides), self.zoom_crops, self.zoom_max)

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
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of (1-based) `step`: linear warm-up to `lr`, then constant or cosine to min_lr_ratio x lr."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# Tiny presets train in seconds on a CPU (tests, demos); their rates are ours, chosen to learn fast.
_TINY = dict(resolution=64, bucket_step=64, lr=1e-3, warmup_steps=0, weight_decay=0.0, ema_decay=0.999,
             checkpoint_every=50, keep_checkpoints=2, batch_size=4)
# The bundled default model's stages (scripts/train_default.sh): rates, steps and batch sizes are ours for a small
# model trained from scratch on a 2-core CPU in a few hours; 10 % caption dropout (SD 1.x model card).
_SMALL = dict(weight_decay=0.0, lr_schedule="cosine", min_lr_ratio=0.1, keep_checkpoints=2, checkpoint_every=250)
_DEFAULT = dict(resolution=128, batch_size=16, ema_decay=0.999, text_dropout=0.1, **_SMALL)
_SECOND_STAGE = dict(downscale=0.15, downscale_sides=(8, 24), zoom_crops=0.3, zoom_max=1.6)  # see default-base-ft
# Cascade stages (scripts/train_default_cascade.sh): constant rate after warm-up, no weight decay, 10 % caption
# dropout; rates, steps and batches ours for ~1.5 h on one CPU core, EMA horizon ~200 steps to match; SR stages draw
# s from [0, 0.5] (ours: sampling uses s <= 0.3; past 0.5 the cosine schedule keeps under half the signal); the
# 128^2 stage trains on 64^2 crops (a quarter of the cost; its UNet is convolutional).
_STAGE = dict(weight_decay=0.0, text_dropout=0.1, lr=1e-4, ema_decay=0.999)
_TINY_STAGE = dict(_STAGE, lr=1e-3, batch_size=4, checkpoint_every=50, keep_checkpoints=2, ema_decay=0.99)
_SMALL_STAGE = dict(_STAGE, lr=5e-4, warmup_steps=100, checkpoint_every=100, keep_checkpoints=2, ema_decay=0.995,
                    min_snr_gamma=5.0)

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny-sdxl-base": TrainConfig(model="tiny-sdxl-base", text_dropout=0.1, **_TINY),
    # The refiner specialises on the first 200 (low-noise) discrete noise scales (SDXL paper Sec. 2.5).
    "tiny-sdxl-refiner": TrainConfig(model="tiny-sdxl-refiner", timestep_max=199, text_dropout=0.1, **_TINY),
    "tiny-vae": TrainConfig(model="tiny-sdxl-base", task="vae", disc_start=100, disc_channels=16, **_TINY),
    # Full SDXL (paper Sec. 2.5): the base's final multi-aspect ~1024^2 stage: offset noise 0.05, App. I buckets,
    # global batch 2048 (--batch-size per process x processes).  No lr given: 1e-5, 500 warm-up steps is our
    # fine-tuning choice.  Text dropout 0.1: the SD 1.x model card's "10% dropping of the text-conditioning" (SDXL
    # gives no rate).  The refiner: t in [0, 199], the aesthetic score (sgm sd_xl_refiner.yaml).
    "sdxl-base": TrainConfig(model="sdxl-base", resolution=1024, bucket_step=64, offset_noise=0.05,
                             text_dropout=0.1, lr=1e-5, warmup_steps=500, mixed_precision="bf16",
                             gradient_checkpointing=True, batch_size=1),
    "sdxl-refiner": TrainConfig(model="sdxl-refiner", resolution=1024, bucket_step=64, timestep_max=199,
                                text_dropout=0.1, lr=1e-5, warmup_steps=500, mixed_precision="bf16",
                                gradient_checkpointing=True, batch_size=1),
    # Sec. 2.4: the SD autoencoder trained at batch 256 (vs 9) with an EMA (decay ours).  ldm's
    # autoencoder_kl_32x32x4.yaml: kl 1e-6, discriminator from step 50001, weight 0.5, base lr 4.5e-6 x batch,
    # 256^2 crops; Adam betas (0.5, 0.9) as ldm/models/autoencoder.py configure_optimizers.
    "sdxl-vae": TrainConfig(model="sdxl-base", task="vae", resolution=256, bucket_step=64, lr=4.5e-6 * 256,
                            kl_weight=1e-6, disc_start=50001, disc_weight=0.5, ema_decay=0.9999,
                            weight_decay=0.0, adam_beta1=0.5, adam_beta2=0.9, grad_clip=0.0, batch_size=8),
    # Both text encoders against a throw-away image tower (xldm.train.contrastive): 64 px images (the tower only
    # needs colours, shapes, layout); CLIP's weight decay 0.2 (Radford et al. 2021, App. F); batch 128 (ours).
    "default-clip": TrainConfig(model="default-base", task="clip", resolution=64, batch_size=128, steps=3000,
                                lr=1e-3, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.05,
                                weight_decay=0.2, adam_beta2=0.98, adam_eps=1e-6, ema_decay=0.0,
                                checkpoint_every=250, keep_checkpoints=2),
    # The autoencoder, with an EMA (SDXL Sec. 2.4), ldm's kl weight and Adam betas; the discriminator stays off
    # (disc_start beyond the run): it costs a third of the step time; L1 on flat emoji colours is what the base needs.
    "default-vae": TrainConfig(model="default-base", task="vae", resolution=128, bucket_step=32, batch_size=8,
                               steps=2500, lr=5e-4, warmup_steps=100, adam_beta1=0.5, adam_beta2=0.9,
                               kl_weight=1e-6, disc_start=10**9, ema_decay=0.999, grad_clip=0.0, **_SMALL),
    # The base UNet on ~128^2 buckets (sides in multiples of 32 = 8 x 2^(3 - 1): three UNet levels), the frozen
    # text encoders and VAE of the stages before (--init), offset noise 0.05 (SDXL Sec. 2.5).
    "default-base": TrainConfig(model="default-base", bucket_step=32, steps=7000, lr=5e-4, warmup_steps=200,
                                offset_noise=0.05, init_components=("vae", "text_encoders"), **_DEFAULT),
    # The base's second stage, from the first one's weights (SDXL trains its base in stages too, Sec. 2.5), with the
    # latent and text cache (`--set cache_dir=...`: 3x the samples per hour on the CPU) and augmentation so that the
    # micro-conditioning carries what the 16x16 latent can see: 15 % of the images shrunk to 8-24 px first, 30 % of
    # the crops zoomed in by up to 1.6x.  Min-SNR weighting, gamma 5 (Hang et al. 2023), spends the steps on the
    # high-noise end, where the shapes are decided (the refiner covers the low-noise end).
    "default-base-ft": TrainConfig(model="default-base", bucket_step=32, steps=18000, lr=2e-4, warmup_steps=100,
                                   offset_noise=0.05, min_snr_gamma=5.0, **_SECOND_STAGE, **_DEFAULT),
    # The refiner on t in [0, 199] (SDXL Sec. 2.5); sides in multiples of 64 = 8 x 2^(4 - 1) for its four levels.
    # Its second stage as default-base-ft's (the refiner is conditioned on size and crop too).
    "default-refiner": TrainConfig(model="default-refiner", bucket_step=64, steps=1000, lr=5e-4, warmup_steps=200,
                                   timestep_max=199, init_components=("vae", "text_encoders"), **_DEFAULT),
    "default-refiner-ft": TrainConfig(model="default-refiner", bucket_step=64, steps=3000, lr=2e-4,
                                      warmup_steps=100, timestep_max=199, **_SECOND_STAGE, **_DEFAULT),
    # The second generation (xldm.config.DEFAULT_BASE_V2, scripts/train_default_v2.sh): the same recipe on the larger
    # UNets, twice the steps (ours: a run that resumes across days or time-limited GPU jobs); the init files carry
    # the pruned vocabulary, which the trained files keep.
    "default-base-v2": TrainConfig(model="default-base-v2", bucket_step=32, steps=14000, lr=5e-4, warmup_steps=200,
                                   offset_noise=0.05, init_components=("vae", "text_encoders"), **_DEFAULT),
    "default-base-v2-ft": TrainConfig(model="default-base-v2", bucket_step=32, steps=36000, lr=2e-4,
                                      warmup_steps=100, offset_noise=0.05, min_snr_gamma=5.0, **_SECOND_STAGE,
                                      **_DEFAULT),
    "default-refiner-v2": TrainConfig(model="default-refiner-v2", bucket_step=64, steps=2000, lr=5e-4,
                                      warmup_steps=200, timestep_max=199, init_components=("vae", "text_encoders"),
                                      **_DEFAULT),
    "default-refiner-v2-ft": TrainConfig(model="default-refiner-v2", bucket_step=64, steps=6000, lr=2e-4,
                                         warmup_steps=100, timestep_max=199, **_SECOND_STAGE, **_DEFAULT),
    # The bundled base distilled into a 4-step student (ADD, task "add"; scripts/train_default_turbo.sh): the
    # teacher's own 30-step images are the data (the adversarial term's real images), no text dropout (the student
    # is not guided), no EMA; lr, batch and steps ours.
    "default-turbo": TrainConfig(model="default-base", task="add", resolution=128, bucket_step=32, batch_size=4,
                                 steps=1500, lr=1e-4, ema_decay=0.0, text_dropout=0.0, checkpoint_every=100,
                                 keep_checkpoints=2, disc_channels=64),
    "tiny-sdxl-base-turbo": TrainConfig(model="tiny-sdxl-base", task="add", lr=1e-4, ema_decay=0.0,
                                        **{k: v for k, v in _TINY.items() if k not in ("lr", "ema_decay")}),
    # ControlNets (task "controlnet") on a frozen --init model: half the captions dropped (ControlNet paper Sec. 3.3:
    # "randomly replace 50% text prompts with empty strings"), canny control images by default (--control).
    # Full SDXL: the paper's AdamW rate 1e-5 (Sec. 4.1 / App.), bf16 and checkpointing to fit one GPU.
    "sdxl-base-controlnet": TrainConfig(model="sdxl-base", task="controlnet", control="canny", resolution=1024,
                                        bucket_step=64, text_dropout=0.5, lr=1e-5, mixed_precision="bf16",
                                        gradient_checkpointing=True, batch_size=1, ema_decay=0.0),
    # The bundled base's canny ControlNet (scripts/train_default_controlnet.sh): rate, batch, steps ours for a short
    # CPU run; no EMA (the run is too short for one to settle).
    "default-controlnet": TrainConfig(model="default-base", task="controlnet", control="canny", resolution=128,
                                      bucket_step=32, batch_size=8, steps=9000, lr=2e-4, warmup_steps=50,
                                      text_dropout=0.5, ema_decay=0.0, weight_decay=0.0, checkpoint_every=100,
                                      keep_checkpoints=2),
    "tiny-sdxl-base-controlnet": TrainConfig(model="tiny-sdxl-base", task="controlnet", control="canny",
                                             text_dropout=0.5, **_TINY),
    "tiny-cascade-base-16": TrainConfig(model="tiny-cascade-base-16", **_TINY_STAGE),
    "tiny-cascade-sr-32": TrainConfig(model="tiny-cascade-sr-32", aug_level_max=0.5, **_TINY_STAGE),
    "tiny-cascade-sr-64": TrainConfig(model="tiny-cascade-sr-64", aug_level_max=0.5, **_TINY_STAGE),
    "cascade-base-32": TrainConfig(model="cascade-base-32", steps=1500, batch_size=32, **_SMALL_STAGE),
    "cascade-sr-64": TrainConfig(model="cascade-sr-64", steps=1200, batch_size=16, aug_level_max=0.5,
                                 **_SMALL_STAGE),
    "cascade-sr-128": TrainConfig(model="cascade-sr-128", steps=1000, batch_size=16, aug_level_max=0.5,
                                  train_crop=64, **_SMALL_STAGE),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; expected one of {sorted(TRAIN_PRESETS)}")
    return replace(TRAIN_PRESETS[name], **overrides) if overrides else TRAIN_PRESETS[name]
