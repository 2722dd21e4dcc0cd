"""Imagen-style cascaded pixel diffusion: a small base model at low resolution, then super-resolution stages.

A cascade (Ho et al. 2021, "Cascaded Diffusion Models"; Saharia et al. 2022, "Imagen", Sec. 2.4) is a list of
pixel-space models (`ModelConfig` without a VAE, `xldm.config`), conditioned by `xldm.conditioning` and sampled by
`xldm.pipeline.denoise` like the latent models: a base stage (UNet in 3 / out 3 on the noisy RGB image) and
super-resolution (SR) stages (UNet in 6 / out 3 on cat([noisy target, bilinear upsample(low-res)]), the low-res
image's noise-augmentation level s one more Fourier-embedded scalar in the vector, as SDXL's micro-conditioning).

Noise conditioning augmentation (Imagen Sec. 2.4; CDM Sec. 4.1): in training the low-res image is corrupted as
    z = sqrt(alpha_s) x + sqrt(1 - alpha_s) eps,  alpha_s = cos^2(pi s / 2),  s ~ U[0, s_max]
(the continuous cosine variance-preserving schedule, Nichol & Dhariwal 2021 eq. 17 without the offset), and s
is given to the model; at sampling s is a user setting (`DEFAULT_SR_AUG_LEVEL`).  s = 0 leaves x unchanged.

Every stage runs on SDXL's discrete schedule and samplers, so all samplers work here too."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xldm.conditioning import sampling_conditioning
from xldm.config import DEFAULT_CASCADE_DIR, DEFAULT_MODEL_PATH, ModelConfig, TextEncoderConfig, UNetConfig
from xldm.diffusion import make_schedule, randn
from xldm.models.components import Components
from xldm.pipeline import denoise

# Sampling-time augmentation of an SR stage's input.  Imagen sweeps s at inference (Sec. 2.4) and gives no single
# value; 0.1 is our default, between the SD x4 upscaler's noise_level 20/1000 and DeepFloyd IF stage II's 250/1000
# (diffusers StableDiffusionUpscalePipeline / IFSuperResolutionPipeline defaults).
DEFAULT_SR_AUG_LEVEL = 0.1
DEFAULT_STEPS = {"base": 30, "sr": 20}  # our defaults
DEFAULT_CFG = {"base": 5.0, "sr": 4.0}  # our defaults
STAGE_METADATA_KEY = "xldm.cascade_stage"
STAGE_FORMAT_VERSION = 1


def is_sr(config: ModelConfig) -> bool:
    return config.sr_scale > 0


def input_size(config: ModelConfig, size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(width, height) of the low-res image an SR stage making `size` (default: its own) expects; None for a base."""
    if not is_sr(config):
        return None
    w, h = size or (config.default_size, config.default_size)
    return w // config.sr_scale, h // config.sr_scale


def describe(config: ModelConfig) -> str:
    s = config.default_size
    if not is_sr(config):
        return f"base {s}x{s}"
    i = s // config.sr_scale
    return f"sr x{config.sr_scale} {i}x{i} -> {s}x{s}"


def random_stage(config: ModelConfig, seed: int = 0, text_encoders: Sequence[nn.Module] | None = None) -> Components:
    """A stage with freshly initialised networks (seeded); `text_encoders` reuses given (e.g. pretrained) ones."""
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet

    torch.manual_seed(seed)
    unet = UNet(config.unet)
    encoders = tuple(text_encoders) if text_encoders is not None else tuple(
        CLIPTextModel(te) for te in config.text_encoders)
    _check_encoder_configs(config, encoders, "text_encoders")
    return Components(config=config, unet=unet, text_encoders=encoders)


def _check_encoder_configs(config: ModelConfig, encoders: Sequence[nn.Module], where: str) -> None:
    found = tuple(getattr(e, "cfg", None) for e in encoders)
    if found != config.text_encoders:
        raise ValueError(f"{where}: the stage ({describe(config)}) expects text encoders {config.text_encoders}, "
                         f"found {found}")


def aug_alpha(s: Tensor) -> Tensor:
    """alpha_s = cos^2(pi s / 2): signal variance kept at augmentation level s in [0, 1] (cosine VP schedule,
    Nichol & Dhariwal 2021 eq. 17 with offset 0); alpha_0 = 1 exactly, alpha_1 ~ 0."""
    return torch.cos(s.double() * (math.pi / 2)).pow(2).float()


def _levels(s: float | Tensor, batch: int, device) -> Tensor:
    s = torch.as_tensor(s, dtype=torch.float32, device=device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise ValueError(f"augmentation level: expected one value or {batch} (one per image), found {s.numel()}")
    if not bool(torch.all((s >= 0) & (s <= 1))):
        raise ValueError(f"augmentation level must lie in [0, 1], found {s.tolist()}")
    return s


def augment(x: Tensor, s: float | Tensor, generator=None, *, noise: Tensor | None = None) -> Tensor:
    """Imagen's noise conditioning augmentation: z = sqrt(alpha_s) x + sqrt(1 - alpha_s) eps per image.

    `s` is one level or one per image (B,), in [0, 1]; eps is `noise` or drawn from `generator` (one
    torch.Generator, or one per image, as `xldm.diffusion.randn`).  Images with s = 0 are returned unchanged,
    bit for bit (no noise is added).  The result is float32."""
    levels = _levels(s, x.shape[0], x.device)
    if noise is None:
        noise = randn(x.shape, generator, x.device, torch.float32)
    elif noise.shape != x.shape:
        raise ValueError(f"augmentation noise: expected shape {tuple(x.shape)}, found {tuple(noise.shape)}")
    alpha = aug_alpha(levels)[:, None, None, None]
    x = x.float()
    z = alpha.sqrt() * x + (1 - alpha).sqrt() * noise.to(x)
    return torch.where((levels == 0)[:, None, None, None], x, z)


def check_low_res(config: ModelConfig, low_res: Tensor, target_size: tuple[int, int]) -> None:
    """An SR stage making a `target_size` (width, height) image needs a (B, 3, H / scale, W / scale) low-res image:
    a wrong size or aspect ratio is a ValueError naming both."""
    tw, th = target_size
    scale = config.sr_scale
    expected = (tw // scale, th // scale)
    if low_res.ndim != 4 or low_res.shape[1] != 3:
        raise ValueError(f"{describe(config)}: the low-res image must be a (B, 3, H, W) tensor, found shape "
                         f"{tuple(low_res.shape)}")
    found = (int(low_res.shape[-1]), int(low_res.shape[-2]))
    if found != expected or tw % scale or th % scale:
        ratio = "" if found[0] * expected[1] == found[1] * expected[0] else \
            f" (aspect ratio {_ratio(*found)} instead of {_ratio(*expected)})"
        raise ValueError(f"{describe(config)}: to make a {tw}x{th} image it expects a low-res image of "
                         f"{expected[0]}x{expected[1]}, found {found[0]}x{found[1]}{ratio}")


def _ratio(w: int, h: int) -> str:
    g = math.gcd(w, h) or 1
    return f"{w // g}:{h // g}"


def upsample_low_res(low_res: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling to (width, height) with align_corners=False (pixel centres), as the SR input."""
    return F.interpolate(low_res.float(), size=(size[1], size[0]), mode="bilinear", align_corners=False)


def downsample_for_sr(high_res: Tensor, scale: int) -> Tensor:
    """The low-res half of a training pair: box-filter (area) downsampling by `scale` (our choice)."""
    h, w = high_res.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"a {w}x{h} image cannot be downsampled by {scale}: sides must be multiples of it")
    return F.avg_pool2d(high_res.float(), scale)


def check_stage_order(configs: Sequence[ModelConfig], *, has_init_image: bool | None = None) -> None:
    """A cascade is [base?, sr, sr, ...] with each SR stage's input the previous stage's output and resolutions
    increasing.  `has_init_image` (when known): a cascade starting with an SR stage needs one, a base-first
    cascade takes none.  Violations are ValueErrors naming what was expected and found."""
    if not configs:
        raise ValueError("a cascade needs at least one stage, found none")
    for i, cfg in enumerate(configs):
        if cfg.vae is not None:
            raise ValueError(f"stage {i} is a latent model ({cfg.kind}); a cascade's stages are pixel-space models")
        if not is_sr(cfg) and i > 0:
            raise ValueError(f"stage {i} is a base stage ({describe(cfg)}); a base stage can only come first, "
                             f"found after {describe(configs[i - 1])}")
    for i in range(1, len(configs)):
        prev, cur = configs[i - 1], configs[i]
        if cur.default_size <= prev.default_size:
            raise ValueError(f"stages out of order: resolutions must increase, but stage {i} ({describe(cur)}) "
                             f"follows stage {i - 1} ({describe(prev)})")
    for i in range(1, len(configs)):
        prev, cur = configs[i - 1], configs[i]
        if input_size(cur)[0] != prev.default_size:
            iw, ih = input_size(cur)
            raise ValueError(f"stage {i} ({describe(cur)}) expects a {iw}x{ih} input, but stage {i - 1} "
                             f"({describe(prev)}) makes {prev.default_size}x{prev.default_size}")
    if has_init_image is True and not is_sr(configs[0]):
        raise ValueError(f"init_image given, but stage 0 is a base stage ({describe(configs[0])}); an input image "
                         f"needs a cascade that starts with an SR stage")
    if has_init_image is False and is_sr(configs[0]):
        raise ValueError(f"stage 0 is an SR stage ({describe(configs[0])}) and expects a low-res input image; "
                         f"found no init_image (or put a base stage first)")


def plan_sizes(configs: Sequence[ModelConfig], size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """(width, height) of each stage's output: the last one `size` (default: the last stage's resolution), each
    earlier one the next one divided by that stage's scale (must divide exactly).  Any aspect ratio works: the
    UNets are convolutional."""
    final = tuple(size) if size is not None else (configs[-1].default_size,) * 2
    if len(final) != 2 or not all(isinstance(v, int) and v > 0 for v in final):
        raise ValueError(f"size must be (width, height) of positive ints, found {size!r}")
    sizes = [final]
    for cfg in reversed(configs[1:]):
        w, h = sizes[0]
        if w % cfg.sr_scale or h % cfg.sr_scale:
            raise ValueError(f"output size {w}x{h} is not divisible by the scale {cfg.sr_scale} of {describe(cfg)}")
        sizes.insert(0, (w // cfg.sr_scale, h // cfg.sr_scale))
    return sizes


def stage_generators(seeds: Sequence[int], size: tuple[int, int]) -> list[torch.Generator]:
    """One CPU generator per image for the stage making a (width, height) image, seeded by (seed, width, height):
    a stage draws the same numbers whether it runs inside a cascade or alone on the same input."""
    gens = []
    for s in seeds:
        state = np.random.SeedSequence([int(s), size[0], size[1]]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def per_stage(values, n: int, name: str, default: Callable[[int], Any]) -> list:
    """One value per stage from None (stage i gets `default(i)`), a scalar (every stage), or a list of n."""
    if values is None:
        return [default(i) for i in range(n)]
    if isinstance(values, (int, float)):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values (one per stage), found {len(values)}: {values}")
    return values


@dataclass
class CascadeResult:
    images: list  # PIL images of the last stage
    stage_outputs: list[Tensor]  # per stage, (B, 3, H, W) float32 in [-1, 1]
    seeds: list[int]
    params: dict[str, Any] = field(default_factory=dict)


class CascadePipeline:
    """`CascadePipeline(stages)(prompt, steps=[30, 20, 20], cfg=[5, 4, 4], aug=[0, 0.1, 0.1], seed=1)`.

    Runs base -> SR -> SR; an SR stage is conditioned on the previous output, clipped to [-1, 1] and noise-augmented
    at its level s.  A cascade starting with an SR stage upscales `init_image` (of the expected size, or of its
    aspect ratio with `resize_init_image`, e.g. an SDXL output).  `stages`: `Components` (`load_cascade`)."""

    def __init__(self, stages: Sequence[Components], *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.stages = list(stages)
        check_stage_order([s.config for s in self.stages])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        for stage in self.stages:
            stage.to(device=self.device, dtype=self.dtype)
            for module in stage.modules().values():
                module.eval().requires_grad_(False)

    @property
    def configs(self) -> list[ModelConfig]:
        return [s.config for s in self.stages]

    def _init_tensor(self, init_image, expected: tuple[int, int], resize: bool, batch: int) -> Tensor:
        from xldm.images import image_size, image_to_tensor

        found = image_size(init_image)
        if found != expected:
            same_ratio = found[0] * expected[1] == found[1] * expected[0]
            if not (resize and same_ratio):
                hint = " (pass resize_init_image=True to rescale an image of the same aspect ratio)" \
                    if same_ratio else ""
                raise ValueError(
                    f"stage 0 ({describe(self.configs[0])}) expects a low-res image of {expected[0]}x{expected[1]} "
                    f"(aspect ratio {_ratio(*expected)}), found {found[0]}x{found[1]} (aspect ratio "
                    f"{_ratio(*found)}){hint}")
            if isinstance(init_image, Tensor):  # [0, 1] tensor: antialiased resize to the expected size
                init_image = F.interpolate(init_image.float(), size=(expected[1], expected[0]), mode="bilinear",
                                           antialias=True, align_corners=False).clamp(0, 1)
        x = image_to_tensor(init_image, *expected)
        if x.shape[0] == 1:
            x = x.repeat(batch, 1, 1, 1)
        if x.shape[0] != batch:
            raise ValueError(f"init_image holds {x.shape[0]} images, expected 1 or {batch} (the batch)")
        return x.to(self.device)

    def __call__(self, prompt: str, *, steps: Sequence[int] | int | None = None,
                 cfg: Sequence[float] | float | None = None, aug: Sequence[float] | float | None = None,
                 seed: int = 0, init_image=None, resize_init_image: bool = False,
                 size: tuple[int, int] | None = None, negative_prompt: str | None = None, batch: int = 1,
                 sampler: str = "euler", original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0),
                 callback: Callable[[int, int, int], None] | None = None) -> CascadeResult:
        """Generate `batch` images of `size` (width, height; default the last stage's resolution).

        steps / cfg / aug: one value per stage (or one for all); defaults 30 / 5.0 for a base stage, 20 / 4.0 /
        `DEFAULT_SR_AUG_LEVEL` for an SR stage; a base stage's aug must be 0.  `original_size` / `crop_top_left`
        ((height, width) / (top, left), SDXL order) feed a stage that takes them; original_size defaults to the
        final output size.  `init_image` (PIL, or a (B, 3, H, W) tensor in [0, 1]) is the low-res input of a
        cascade that starts with an SR stage.  Image i uses seed + i.  `callback(stage, step, total)`."""
        configs, n = self.configs, len(self.configs)
        check_stage_order(configs, has_init_image=init_image is not None)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, found {prompt!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, found {batch!r}")
        kinds = ["sr" if is_sr(c) else "base" for c in configs]
        steps = per_stage(steps, n, "steps", lambda i: DEFAULT_STEPS[kinds[i]])
        cfg = per_stage(cfg, n, "cfg", lambda i: DEFAULT_CFG[kinds[i]])
        aug = per_stage(aug, n, "aug", lambda i: 0.0 if kinds[i] == "base" else DEFAULT_SR_AUG_LEVEL)
        for i in range(n):
            if not isinstance(steps[i], int) or steps[i] < 1:
                raise ValueError(f"steps for stage {i} must be a positive int, found {steps[i]!r}")
            if not math.isfinite(float(cfg[i])) or float(cfg[i]) < 0:
                raise ValueError(f"cfg for stage {i} must be a finite number >= 0, found {cfg[i]!r}")
            if kinds[i] == "base" and aug[i]:
                raise ValueError(f"stage {i} is a base stage and takes no augmentation level; found {aug[i]}")
            if not 0.0 <= float(aug[i]) <= 1.0:
                raise ValueError(f"aug for stage {i} must lie in [0, 1], found {aug[i]!r}")
        sizes = plan_sizes(configs, size)
        final_w, final_h = sizes[-1]
        seeds = [seed + i for i in range(batch)]
        prompts = [prompt] * batch
        negatives = None if negative_prompt is None else [negative_prompt] * batch

        low = None
        if init_image is not None:
            low = self._init_tensor(init_image, input_size(configs[0], sizes[0]), resize_init_image, batch)
        outputs: list[Tensor] = []
        for i, (stage, (w, h)) in enumerate(zip(self.stages, sizes)):
            c = stage.config
            gens = stage_generators(seeds, (w, h))
            micro = {"original_size": original_size or (final_h, final_w), "crop_top_left": crop_top_left} \
                if kinds[i] == "base" else {"aug_level": float(aug[i])}
            with torch.no_grad():
                cond = sampling_conditioning(stage, prompts, negatives, height=h, width=w, guidance=cfg[i] > 1,
                                             **micro)
            up = None
            if kinds[i] == "sr":
                check_low_res(c, low, (w, h))
                # the low-res input is augmented once, before sampling (Imagen Sec. 2.4), with this stage's noise
                up = upsample_low_res(augment(low, float(aug[i]), gens), (w, h)).to(self.dtype)
            schedule = make_schedule(sampler, steps[i], prediction_type=c.prediction_type)
            x = randn((batch, 3, h, w), gens, self.device, self.dtype) * schedule.init_noise_sigma
            step_cb = None if callback is None else (lambda k, total, *_, i=i: callback(i, k, total))
            x = denoise(stage.unet, cond, c.prediction_type, sampler, float(cfg[i]), x, schedule, gens,
                        extra_channels=up, callback=step_cb, name=f"stage {i} ({describe(c)})")
            low = x.float().clamp(-1, 1)  # Imagen clips each stage's output to the data range
            outputs.append(low)
        from xldm.images import tensor_to_images

        # per-stage lists under cascade_* keys (A1111's Steps / CFG scale are single numbers)
        params = {"prompt": prompt, "negative_prompt": negative_prompt, "sampler": sampler, "width": final_w,
                  "height": final_h, "cascade_steps": steps, "cascade_cfg": [float(v) for v in cfg],
                  "cascade_aug": [float(v) for v in aug], "cascade_sizes": [list(s) for s in sizes],
                  "cascade_stages": [describe(c) for c in configs], "init_image": init_image is not None}
        return CascadeResult(images=tensor_to_images(outputs[-1]), stage_outputs=outputs, seeds=seeds, params=params)


def stage_header(config: ModelConfig) -> dict[str, Any]:
    """The header config of a stage file (format 1): kind "base" | "sr", resolution (w, h), scale, and the rest."""
    return {"kind": "sr" if is_sr(config) else "base", "resolution": [config.default_size] * 2,
            "unet": asdict(config.unet), "text_encoders": [asdict(te) for te in config.text_encoders],
            "scale": max(config.sr_scale, 1), "micro_conditioning": list(config.micro_conditioning),
            "micro_conditioning_dim": config.micro_conditioning_dim, "prediction_type": config.prediction_type}


def stage_config(header: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a stage file's header config (`stage_header`'s inverse)."""
    def tup(v):
        return tuple(v) if isinstance(v, list) else v

    w, h = header["resolution"]
    if w != h:
        raise ValueError(f"cascade stage resolution {w}x{h}: only square stages are supported")
    sr = header["kind"] == "sr"
    return ModelConfig(
        kind=f"cascade-{header['kind']}", vae=None, unet=UNetConfig(**{k: tup(v) for k, v in header["unet"].items()}),
        text_encoders=tuple(TextEncoderConfig(**te) for te in header["text_encoders"]),
        prediction_type=header["prediction_type"], micro_conditioning=tuple(header["micro_conditioning"]),
        micro_conditioning_dim=header["micro_conditioning_dim"], default_size=w, sr_scale=header["scale"] if sr else 0)


def stage_state_dict(stage: Components, *, include_text_encoders: bool = True) -> dict[str, Tensor]:
    """`unet.*` and `text_encoders.{i}.*` (xldm's CLIP layout)."""
    out = {f"unet.{k}": v for k, v in stage.unet.state_dict().items()}
    if include_text_encoders:
        for i, te in enumerate(stage.text_encoders):
            out.update({f"text_encoders.{i}.{k}": v for k, v in te.state_dict().items()})
    return out


def save_stage(stage: Components, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               include_text_encoders: bool = True) -> Path:
    """One stage as a safetensors file (atomic write), its config JSON in the header under `xldm.cascade_stage`.
    Without its text encoders the file needs them from elsewhere when loaded (`load_stage(text_encoders=...)`)."""
    from xldm.weights.io import save_file

    path = Path(path)
    tensors = stage_state_dict(stage, include_text_encoders=include_text_encoders)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {"format_version": STAGE_FORMAT_VERSION, "config": stage_header(stage.config),
            "has_text_encoders": include_text_encoders}
    save_file(tensors, path, metadata={STAGE_METADATA_KEY: json.dumps(meta), "format": "pt"})
    return path


def read_stage_header(path: str | os.PathLike) -> tuple[ModelConfig, bool]:
    """(config, whether the file holds the text encoders), from the header only."""
    from xldm.weights.io import open_checkpoint

    return _parse_header(path, open_checkpoint(path).metadata)


def _parse_header(path, metadata: dict[str, str]) -> tuple[ModelConfig, bool]:
    if STAGE_METADATA_KEY not in metadata:
        raise ValueError(f"{path}: not a cascade stage file (no '{STAGE_METADATA_KEY}' in its header metadata)")
    meta = json.loads(metadata[STAGE_METADATA_KEY])
    if meta.get("format_version") != STAGE_FORMAT_VERSION:
        raise ValueError(f"{path}: cascade stage format {meta.get('format_version')}, expected {STAGE_FORMAT_VERSION}")
    return stage_config(meta["config"]), bool(meta["has_text_encoders"])


def load_stage(path: str | os.PathLike, *, text_encoders: Sequence[nn.Module] | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Components:
    """Load a stage strictly (every key used, every parameter present).  `text_encoders` supplies them for a file
    saved without its own (and overrides a file's own)."""
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.weights.io import load_strict, open_checkpoint

    ckpt = open_checkpoint(path)
    config, has_encoders = _parse_header(path, ckpt.metadata)
    allowed = ("unet.",) + tuple(f"text_encoders.{i}." for i in range(len(config.text_encoders)))
    unknown = [k for k in ckpt.keys() if not k.startswith(allowed)]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} keys belong to no part of a cascade stage: {sorted(unknown)[:10]}")
    unet = UNet(config.unet)
    load_strict(unet, ckpt.tensors("unet.", dtype=dtype), component=f"{path}: UNet")
    if text_encoders is not None:
        encoders = tuple(text_encoders)
        _check_encoder_configs(config, encoders, f"{path}: text_encoders")
    elif has_encoders:
        encoders = tuple(CLIPTextModel(te_cfg) for te_cfg in config.text_encoders)
        for i, te in enumerate(encoders):
            load_strict(te, ckpt.tensors(f"text_encoders.{i}.", dtype=dtype), component=f"{path}: text encoder {i}")
    else:
        raise ValueError(f"{path}: this stage file holds no text encoders (they are stored with an earlier stage "
                         f"of its cascade); load the whole cascade, or pass text_encoders=")
    for module in (unet, *encoders):
        module.eval().requires_grad_(False)
    return Components(config=config, unet=unet, text_encoders=encoders).to(device=device, dtype=dtype)


def _same_encoders(a: Components, b: Components) -> bool:
    if a.config.text_encoders != b.config.text_encoders:
        return False
    for ea, eb in zip(a.text_encoders, b.text_encoders):
        if ea is eb:
            continue
        sa, sb = ea.state_dict(), eb.state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa):
            return False
    return True


def save_cascade(stages: Sequence[Components], folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 text_encoders: str = "shared") -> list[Path]:
    """`folder/stage_0.safetensors`, `stage_1...`.  text_encoders="shared": a stage whose encoders equal stage 0's
    (configs and weights) is saved without them, so shared encoders are stored once; "none": no stage holds them
    (the default cascade: `load_cascade` then takes the default model's)."""
    check_stage_order([s.config for s in stages])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    own = [text_encoders == "shared" and (i == 0 or not _same_encoders(stages[0], s)) for i, s in enumerate(stages)]
    return [save_stage(stage, folder / f"stage_{i}.safetensors", dtype=dtype, include_text_encoders=own[i])
            for i, stage in enumerate(stages)]


def cascade_files(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The stage files of `--cascade`: a folder (its stage_N.safetensors, by N), comma-separated files (in that
    order), a list of paths, or "default" (the cascade shipped with xldm)."""
    if not isinstance(spec, (str, os.PathLike)):
        paths = [Path(p) for p in spec]
    elif str(spec) == "default":
        paths = _folder_stages(DEFAULT_CASCADE_DIR, hint="the default cascade is not installed with this copy of xldm")
    elif Path(spec).is_dir():
        paths = _folder_stages(Path(spec))
    else:
        paths = [Path(p.strip()) for p in str(spec).split(",") if p.strip()]
    if not paths:
        raise ValueError(f"--cascade {spec}: no stage files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no such cascade stage file: {p}")
    return paths


def _folder_stages(folder: Path, hint: str = "") -> list[Path]:
    import re

    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.fullmatch(r"stage_(\d+)\.safetensors", p.name)
            if m:
                found.append((int(m.group(1)), p))
    found.sort()
    if not found:
        raise FileNotFoundError(f"{folder}: no stage_N.safetensors files" + (f" ({hint})" if hint else ""))
    numbers = [k for k, _ in found]
    if numbers != list(range(len(found))):
        raise ValueError(f"{folder}: stage files must be numbered 0..{len(found) - 1}, found {numbers}")
    return [p for _, p in found]


def pick_encoders(encoders: Sequence[nn.Module], configs: Sequence[TextEncoderConfig],
                  where: str) -> tuple[nn.Module, ...]:
    """The encoders with these configs, in this order, out of a model's (e.g. the bigG-shaped one of an SDXL-style
    pair); ValueError naming `where` when one is missing."""
    picked = []
    for wanted in configs:
        matches = [e for e in encoders if e.cfg == wanted]
        if not matches:
            raise ValueError(f"{where}: none of its text encoders {[e.cfg for e in encoders]} has the config {wanted}")
        picked.append(matches[0])
    return tuple(picked)


def encoders_from(path: str | os.PathLike, configs: Sequence[TextEncoderConfig], *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[nn.Module, ...]:
    """Text encoders with these configs from a stage file, or from an xldm model file / folder (matched by config)."""
    from xldm.weights.load import load_model

    dtype = dtype or torch.float32
    try:
        read_stage_header(path)
    except (ValueError, FileNotFoundError, IsADirectoryError):
        encoders = load_model(path, components=["text_encoders"], dtype=dtype, device=device).text_encoders
    else:
        encoders = load_stage(path, dtype=dtype, device=device).text_encoders
    return pick_encoders(encoders, configs, str(path))


def load_cascade(spec, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> list[Components]:
    """Load every stage of `spec` (see `cascade_files`); a stage saved without text encoders borrows those of an
    earlier stage with the same encoder configs, of the `stage_0.safetensors` in its folder, or of the bundled
    default model (the default cascade ships without an encoder of its own)."""
    stages: list[Components] = []
    for path in cascade_files(spec):
        config, has_encoders = read_stage_header(path)
        shared = None
        if not has_encoders:
            donors = [s.text_encoders for s in stages if s.config.text_encoders == config.text_encoders]
            sibling = path.parent / "stage_0.safetensors"  # a stage file picked out of its cascade folder
            if not donors and sibling.is_file() and sibling.resolve() != path.resolve():
                sibling_config, sibling_has = read_stage_header(sibling)
                if sibling_has and sibling_config.text_encoders == config.text_encoders:
                    donors = [load_stage(sibling, dtype=dtype, device=device).text_encoders]
            if not donors and DEFAULT_MODEL_PATH.is_file():
                try:
                    donors = [encoders_from(DEFAULT_MODEL_PATH, config.text_encoders, dtype=dtype, device=device)]
                except ValueError:
                    pass
            if not donors:
                raise ValueError(f"{path}: holds no text encoders, and neither an earlier stage, {sibling.name} "
                                 f"beside it nor the default model has encoders of the same configs")
            shared = donors[0]
        stages.append(load_stage(path, text_encoders=shared, dtype=dtype, device=device))
    check_stage_order([s.config for s in stages])
    return stages
