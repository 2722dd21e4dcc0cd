"""Text-to-image, image-to-image, inpainting and base -> refiner, with the denoising loop written out once.

Every step reproduces diffusers' `StableDiffusionXLPipeline`, `StableDiffusionXLImg2ImgPipeline` and
`StableDiffusionXLInpaintPipeline` (diffusers 0.42.1) so the same weights, seed and settings give the same
pixels: per-image CPU generators seeded `seed + i` (diffusers with a list of generators), the posterior
sample drawn before the noise, the refiner continuing the base's schedule (`denoising_end` / `denoising_start`).
A request (`xldm.request.GenerationRequest`) is resolved and checked once, at the boundary (`resolve_request`);
`Pipeline.run` trusts it.  The networks of each model come from a `xldm.handle.ModelHandle`; device and dtype
defaults from `xldm.devices`."""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from xldm.conditioning import Conditioning, sampling_conditioning
from xldm.controlnet import (ControlStack, ControlUnit, check_unit, control_image, open_control_image, unit_infotext,
                             unit_name)
from xldm.config import PREDICTION_TYPES
from xldm.diffusion import noise as noise_lib
from xldm.diffusion.denoiser import Denoiser
from xldm.diffusion.samplers import CHURN_DEFAULTS, ETA_DEFAULTS, check_sampler_options, sample
from xldm.errors import ControlNetError, NonFiniteError
from xldm.hires import check_hires, hires_enabled, hires_params, hires_steps, run_hires
from xldm.diffusion.schedules import (SAMPLER_NAMES, TIMESTEP_SPACINGS, Schedule, img2img_start, make_schedule,
                                      refiner_start, split_for_refiner)
from xldm.speedups import NO_SPEEDUPS, SpeedUps, check_cache_branch, check_speedups, speedup_model_fn
from xldm.lora import LoraUse, lora_infotext, parse_lora_tags
from xldm.images import image_size, image_to_tensor, mask_to_tensor, round_to_multiple, tensor_to_images
from xldm.models.components import Components
from xldm.models.quantize import check_quantize
from xldm.vae_tiling import decode_checked
from xldm.vae_tiling import encode as encode_posterior
from xldm.devices import DTYPE_NAMES, default_device, default_dtype, unet_parameters
from xldm.handle import ModelHandle
from xldm.prompt_weighting import parse_weighted_prompt
from xldm.request import (MAX_SEED, PREDICTION_ALIASES, GenerationRequest, GenerationResult, check_lora_weights,
                          request_loras, sampler_churn)


def _check_size(name: str, size: tuple[int, int] | None) -> None:
    if size is None:
        return
    if len(size) != 2 or any(not isinstance(v, int) or v <= 0 for v in size):
        raise ValueError(f"{name} must be two positive integers (width, height), got {size!r}")


def resolve_request(req: GenerationRequest, *, default_size: int | Callable[[], int],
                    has_refiner: bool) -> GenerationRequest:
    """The request with every default filled in (seed, size, strength, refiner start) and every setting checked:
    the one validation of a request, made before anything is loaded.  `default_size` is the main model's native
    side, or a function that reads it (from the file's header), called only once the settings that need no
    model have passed.  Raises ValueError naming the problem."""
    if not isinstance(req.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(req.prompt).__name__}")
    if req.sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {req.sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    if isinstance(req.steps, bool) or not isinstance(req.steps, int) or req.steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {req.steps!r}")
    if isinstance(req.batch, bool) or not isinstance(req.batch, int) or req.batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {req.batch!r}")
    if not math.isfinite(req.cfg) or req.cfg < 0:
        raise ValueError(f"cfg must be a finite number >= 0, got {req.cfg!r}")
    if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, int)):
        raise ValueError(f"seed must be an int, got {type(req.seed).__name__} {req.seed!r}")
    if req.seed is not None and not (0 <= req.seed <= MAX_SEED):
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {req.seed}")
    for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
        _check_size(name, getattr(req, name))
    if req.mask is not None and req.init_image is None:
        raise ValueError("a mask needs an init image to inpaint (--init-image)")
    if req.strength is not None:
        if req.init_image is None:
            raise ValueError("strength applies to img2img/inpainting; give an init image too")
        if not (0 < req.strength <= 1):
            raise ValueError(f"strength must be in (0, 1], got {req.strength}")
    if req.refiner_start is not None:
        if not has_refiner:
            raise ValueError("refiner_start given without a refiner model (--refiner)")
        if not (0 < req.refiner_start < 1):
            raise ValueError(f"refiner_start must be in (0, 1), got {req.refiner_start}")
    if req.clip_skip is not None and (isinstance(req.clip_skip, bool) or not isinstance(req.clip_skip, int)
                                      or req.clip_skip < 1):
        raise ValueError(f"clip_skip must be an integer >= 1 (A1111: 1 = no skip), got {req.clip_skip!r}")
    if req.timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, "
                         f"got {req.timestep_spacing!r}")
    prediction = PREDICTION_ALIASES.get(req.prediction, req.prediction)
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of eps, {', '.join(PREDICTION_TYPES)}, got {req.prediction!r}")
    if req.zero_terminal_snr not in (None, True, False):
        raise ValueError(f"zero_terminal_snr must be True, False or None, got {req.zero_terminal_snr!r}")
    check_sampler_options(req.sampler, req.eta, **sampler_churn(req))
    check_speedups(req.cache_interval, req.cache_branch, req.cfg_end)
    try:  # the schedule itself (ddim refuses spacings its diffusers step cannot follow; lcm has at most 50 steps)
        make_schedule(req.sampler, req.steps, spacing=req.timestep_spacing)
    except ValueError as e:
        raise ValueError(f"{req.sampler}, {req.steps} steps: {e}") from None
    units = []
    for index, unit in enumerate(req.controlnets):
        check_unit(unit, index)
        if isinstance(unit.image, (str, Path)):  # read now: a missing or non-image file is refused before any work
            unit = replace(unit, image=open_control_image(unit.image))
        elif not isinstance(unit.image, Image.Image):
            raise ControlNetError(f"ControlNet {index}: the control image must be a PIL image or an image file, "
                                  f"got {type(unit.image).__name__}")
        units.append(unit)
    req = replace(req, controlnets=tuple(units))
    if req.long_prompts not in ("truncate", "chunk"):
        raise ValueError(f"long_prompts must be 'truncate' or 'chunk', got {req.long_prompts!r}")
    if req.weighting:  # "(word:w)" weights read now: one that is not a finite number is refused before any work
        for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if isinstance(text, str):
                try:
                    parse_weighted_prompt(text)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
    if req.init_image is not None and req.mask is not None and image_size(req.mask) != image_size(req.init_image):
        (mw, mh), (iw, ih) = image_size(req.mask), image_size(req.init_image)
        raise ValueError(f"mask is {mw}x{mh} but the init image is {iw}x{ih}; they must match")
    for name in ("width", "height"):
        v = getattr(req, name)
        if v is not None and (not isinstance(v, int) or v < 8 or v % 8):
            raise ValueError(f"{name} must be a positive multiple of 8, got {v!r}")
    width, height = req.width, req.height
    if req.init_image is not None:  # the init image's size, rounded to multiples of 8
        iw, ih = round_to_multiple(*image_size(req.init_image))
        width, height = width or iw, height or ih
    if width is None or height is None:
        default_size = default_size() if callable(default_size) else default_size
        width, height = width or default_size, height or default_size
    strength = req.strength
    if req.init_image is not None and strength is None:
        strength = 0.9999 if req.mask is not None else 0.3
    if strength is not None and min(int(req.steps * strength), req.steps) < 1:
        raise ValueError(f"strength {strength} with {req.steps} steps leaves no denoising step; "
                         f"raise steps or strength")
    refiner_start = req.refiner_start
    if has_refiner and refiner_start is None:
        refiner_start = 0.8
    if has_refiner and strength is not None:
        start = img2img_start(req.steps, strength)
        end = split_for_refiner(req.steps, refiner_start, req.sampler, req.timestep_spacing)
        if end <= start:
            raise ValueError(f"the refiner would take over at step {end}, before the image-to-image start "
                             f"at step {start}; lower strength or raise refiner_start")
    check_hires(req, width, height)
    if has_refiner and hires_enabled(req):  # the refiner takes over during the second pass
        steps = hires_steps(req)
        start = img2img_start(steps, req.hires_strength)
        if split_for_refiner(steps, refiner_start, req.sampler, req.timestep_spacing) <= start:
            raise ValueError(f"the refiner would take over before the hires pass starts (step {start} of "
                             f"{steps}); raise hires_strength or refiner_start")
    seed = req.seed if req.seed is not None else random.randint(0, MAX_SEED - req.batch)
    if seed + req.batch - 1 > MAX_SEED:
        raise ValueError(f"seed {seed} + batch {req.batch} exceeds {MAX_SEED}")
    return replace(req, width=width, height=height, strength=strength, refiner_start=refiner_start, seed=seed,
                   prediction=prediction)


def denoise(unet: torch.nn.Module, cond: Conditioning, prediction_type: str, sampler: str, cfg: float,
            x: torch.Tensor, schedule: Schedule, generators: list[torch.Generator], *, extra_channels=None,
            step_hook=None, callback=None, name: str = "", control: ControlStack | None = None,
            sampler_options: dict[str, Any] | None = None, speedups: SpeedUps = NO_SPEEDUPS) -> torch.Tensor:
    """The sampling loop of every model, latent or pixel-space: a sampler over the guided denoiser of one UNet
    (steered by `control`'s ControlNets, whose step count follows the sampler's steps), with the speed-ups of
    `xldm.speedups.speedup_model_fn`.  NaN/inf results are an error that says where, never a silent black image."""
    model_fn, advance, _ = speedup_model_fn(cond, unet, cfg, len(schedule), extra_channels=extra_channels,
                                            control=control, speedups=speedups)
    for stepper in (control.advance if control is not None else None, advance):
        if stepper is not None:
            callback = _also_advance(stepper, callback)
    denoiser = Denoiser(prediction_type, model_fn)
    with torch.no_grad():
        out = sample(sampler, denoiser, x, schedule, generator=generators, callback=callback, step_hook=step_hook,
                     **(sampler_options or {}))
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).flatten(1).any(1).nonzero().flatten().tolist()
        advice = "lower --cfg or check the model weights (more precision will not help: this is float32)" \
            if out.dtype == torch.float32 else "try --dtype fp32, a lower --cfg, or check the model weights"
        raise NonFiniteError(f"{name}: sampling ({sampler}, {len(schedule)} steps, {out.dtype}) produced NaN/inf "
                             f"for batch item(s) {bad}; {advice}")
    return out


def _also_advance(advance: Callable, callback: Callable | None) -> Callable:
    """A step callback that first tells `advance` the step is done, then calls `callback`."""
    def both(i, n, x_i, x0):
        advance(i)
        if callback is not None:
            callback(i, n, x_i, x0)

    return both


class Pipeline:
    """SDXL generation: `Pipeline(model, refiner)(prompt, ...)` -> GenerationResult.

    `model` and `refiner` are `Components` (already loaded) or paths (single file / diffusers folder);
    `model_file` / `refiner_file` name the files loaded Components came from (infotext `Model`, `Model hash`).
    With `low_memory=True` and paths, each network is read when first needed and kept near the device
    (`ModelHandle`): one network at a time on the device (a CPU: in use), so SDXL base + refiner run where only
    one UNet fits, and later images read no file again.  `quantize="int8"`: weight-only int8 for the UNets'
    Linear and 1x1 conv layers (`xldm.models.quantize`; LoRAs then stay unfused; with `low_memory` on a CPU
    the int8 weights, which no file holds, stay resident).  `vae`: a VAE file that
    replaces the model's (e.g. the fp16-fix VAE), `unet` likewise the UNet (a distilled student); `lora_dir`: the
    folder `<lora:NAME:W>` prompt tags name files in.  LoRAs given with `load_lora` stay active for every image,
    those of a request (`loras=`, prompt tags) for that request.  `dtype` None: `default_dtype` for the device and
    the UNet's size; `compile`: `torch.compile` each UNet on first use."""

    def __init__(self, model: Components | str | Path, refiner: Components | str | Path | None = None, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 low_memory: bool = False, vae: str | Path | None = None, unet: str | Path | None = None,
                 lora_dir: str | Path | None = None, embeddings: Sequence[str | Path] = (),
                 embeddings_dir: str | Path | None = None, model_file: str | Path | None = None,
                 refiner_file: str | Path | None = None, compile: bool = False, quantize: str | None = None) -> None:
        self.quantize = check_quantize(quantize)  # "int8": the UNets' Linear / 1x1 conv weights (models/quantize.py)
        self.compile = compile  # torch.compile the UNets on first use; compile_seconds: each first call's time
        self.compile_seconds: list[float] = []
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype_chosen = dtype is None  # (the CLI says why this dtype; the params record a non-fp32 one)
        self.dtype = dtype or default_dtype(self.device, unet_parameters(unet if unet is not None else model)
                                            if self.device.type == "cpu" else None)
        self.model = ModelHandle(model, dtype=self.dtype, device=self.device, low_memory=low_memory, vae=vae,
                                 unet=unet, file=model_file, quantize=self.quantize)
        self.refiner = (ModelHandle(refiner, dtype=self.dtype, device=self.device, low_memory=low_memory,
                                    file=refiner_file, quantize=self.quantize) if refiner is not None else None)
        if self.refiner is not None and self.model.config.kind == "sdxl-refiner":
            raise ValueError("the main model is already a refiner; pass the SDXL base as the model")
        self.lora_dir = None if lora_dir is None else Path(lora_dir)
        self.loras: list[LoraUse] = []
        self.controlnets: dict[str, torch.nn.Module] = {}  # loaded ControlNets by resolved path
        self.embedding_hashes: dict[str, str] = {}
        self.load_embeddings(embeddings, embeddings_dir)

    def load_embeddings(self, paths: Sequence[str | Path] = (), folder: str | Path | None = None) -> list[str]:
        """Textual-inversion files, used by name in prompts (A1111): each of `paths` must fit the model; the files
        of `folder` that do not (another model's) are skipped with a warning, as A1111 lists them as skipped.
        The refiner gets those that fit it too (SDXL files: their clip_g vectors).  Returns the names skipped."""
        import hashlib
        import warnings

        from xldm.embeddings import EmbeddingError, read_embedding, vectors_per_encoder

        chosen = [(Path(p), True) for p in paths]
        if folder is not None:
            chosen += [(p, False) for p in sorted(Path(folder).iterdir()) if p.suffix == ".safetensors"]
        skipped = []
        for path, required in chosen:
            embedding = read_embedding(path)
            for handle in (self.model, self.refiner):
                if handle is None:
                    continue
                try:
                    vectors_per_encoder(handle.config, embedding)
                except EmbeddingError as e:
                    if handle is self.model and required:
                        raise
                    if handle is self.model:
                        warnings.warn(f"skipping embedding {path.name}: {e}", RuntimeWarning, stacklevel=2)
                        skipped.append(embedding.name)
                    continue
                handle.embeddings = [e for e in handle.embeddings if e.name != embedding.name] + [embedding]
            if embedding.name not in skipped:
                self.embedding_hashes[embedding.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return skipped

    def load_lora(self, path: str | Path, weight: float = 1.0, text_weight: float | None = None) -> None:
        """Keep a LoRA / LyCORIS file active for every image (read and checked now; several add up)."""
        use = LoraUse(Path(path), float(weight), None if text_weight is None else float(text_weight))
        check_lora_weights(f"LoRA {use.path.name}", use)
        self.model.loras.file(use.path)
        self.loras.append(use)

    def unload_loras(self) -> None:
        """Remove every LoRA; the loaded weights are the base weights again, bit for bit."""
        self.loras.clear()
        self.model.loras.set([])
        self.model.loras.sync(self.model.loaded)

    def fuse_loras(self, fused: bool = True) -> None:
        """Write the active LoRAs into the weights (faster steps; rewritten when the set changes) or not."""
        if fused and self.quantize:
            raise ValueError(f"fuse_loras: the UNet's weights are {self.quantize}-quantized and cannot take a fused "
                             f"LoRA; keep LoRAs unfused (their output is added to the layers')")
        self.model.loras.fused = fused
        self.model.loras.sync(self.model.loaded)

    def lora_uses(self, req: GenerationRequest) -> list[LoraUse]:
        return request_loras(req, self.lora_dir, self.loras)

    def resolve(self, req: GenerationRequest) -> GenerationRequest:
        req = resolve_request(req, default_size=self.model.config.default_size, has_refiner=self.refiner is not None)
        for use in self.lora_uses(req):  # every file read and checked against the model before any work
            self.model.loras.file(use.path)
        for unit in req.controlnets:
            self.controlnet(unit)  # loaded (or checked) against the model now, before any work
        if req.cache_interval > 1:
            for handle in (self.model, self.refiner):
                if handle is not None:
                    check_cache_branch(req.cache_branch, handle.config.unet)
        return req

    def controlnet(self, unit: ControlUnit):
        """The unit's ControlNet on this pipeline's device and dtype, checked to fit the main model; a path is
        loaded once and kept."""
        from xldm.models.controlnet import ControlNet, check_controlnet_fits

        if isinstance(unit.model, ControlNet):
            check_controlnet_fits(unit.model.config, self.model.config)
            return unit.model.to(device=self.device, dtype=self.dtype).eval()
        key = str(Path(unit.model).resolve())
        if key not in self.controlnets:
            from xldm.weights.load import load_controlnet

            self.controlnets[key] = load_controlnet(unit.model, self.model.config, dtype=self.dtype,
                                                    device=self.device)
        return self.controlnets[key]

    def _control(self, req: GenerationRequest, start: int) -> ControlStack | None:
        """The request's ControlNets with their images for the base's steps after the img2img start."""
        if not req.controlnets:
            return None
        units = [(self.controlnet(u), control_image(u.image, req.width, req.height, u.preprocess)
                  .repeat(req.batch, 1, 1, 1).to(self.device, self.dtype), u) for u in req.controlnets]
        return ControlStack(units, total=req.steps - start)

    def _conditioning(self, handle: ModelHandle, req: GenerationRequest, batch_prompts: list[str],
                      negatives: list[str] | None, width: int, height: int) -> Conditioning:
        def hw(size):  # (width, height) -> (height, width), the order of SDXL's time ids
            return None if size is None else (size[1], size[0])

        with handle.use("text_encoders") as comps:
            with torch.no_grad():
                return sampling_conditioning(
                    comps, batch_prompts, negatives, height=height, width=width, original_size=hw(req.original_size),
                    crop_top_left=req.crop_top_left, target_size=hw(req.target_size),
                    negative_original_size=hw(req.negative_original_size),
                    negative_crop_top_left=req.negative_crop_top_left,
                    negative_target_size=hw(req.negative_target_size),
                    aesthetic_score=req.aesthetic_score, negative_aesthetic_score=req.negative_aesthetic_score,
                    guidance=req.cfg > 1, long_prompts=req.long_prompts, weighting=req.weighting,
                    clip_skip=None if req.clip_skip is None else req.clip_skip - 1)

    def _encode_images(self, handle: ModelHandle, images: torch.Tensor, generators: list[torch.Generator],
                       tile: bool | None = None) -> torch.Tensor:
        """Posterior samples, one generator per image (diffusers `retrieve_latents` per row), scaled.
        Encoded in float32 when the model runs in fp16 (diffusers `force_upcast`); tiled as `vae_tiling.encode`
        decides for `tile` (the request's tile_vae: None tiles large images only)."""
        with handle.use("vae") as comps:
            vae = comps.vae
            vae_dtype = next(vae.parameters()).dtype
            work = torch.float32 if vae_dtype == torch.float16 else vae_dtype
            if work != vae_dtype:
                vae.to(work)
            try:
                with torch.no_grad():
                    rows = [encode_posterior(vae, images[i: i + 1].to(self.device, work), tile)
                            .sample(generator=generators[i])
                            for i in range(images.shape[0])]
            finally:
                if work != vae_dtype:
                    vae.to(vae_dtype)
            return torch.cat(rows).to(self.dtype) * vae.cfg.scaling_factor

    def _denoise(self, handle: ModelHandle, cond: Conditioning, req: GenerationRequest, x: torch.Tensor,
                 schedule: Schedule, generators: list[torch.Generator], **kw) -> torch.Tensor:
        with handle.use("unet") as comps:
            if self.compile:
                from xldm.models.unet import compile_unet

                compile_unet(comps.unet, self.compile_seconds.append)
            return denoise(comps.unet, cond, self._training_schedule(handle, req)[0], req.sampler, req.cfg, x,
                           schedule, generators, name=handle.name,
                           sampler_options=dict(eta=req.eta, **sampler_churn(req)), speedups=SpeedUps.of(req), **kw)

    def _training_schedule(self, handle: ModelHandle, req: GenerationRequest) -> tuple[str, bool]:
        """(prediction type, zero terminal SNR) of a model: the request's overrides for the main model, else its own."""
        own = handle.config.prediction_type, handle.config.zero_terminal_snr
        if handle is not self.model:
            return own
        return (req.prediction or own[0], own[1] if req.zero_terminal_snr is None else req.zero_terminal_snr)

    def _schedule(self, handle: ModelHandle, req: GenerationRequest) -> Schedule:
        prediction, ztsnr = self._training_schedule(handle, req)
        return make_schedule(req.sampler, req.steps, prediction_type=prediction, spacing=req.timestep_spacing,
                             zero_terminal_snr=ztsnr)

    def __call__(self, prompt: str, **settings: Any) -> GenerationResult:
        return self.generate(GenerationRequest(prompt=prompt, **settings))

    def generate(self, req: GenerationRequest, *, callback: Callable | None = None,
                 output: str = "pil") -> GenerationResult:
        """Resolve and run one request (see `run`)."""
        return self.run(self.resolve(req), callback=callback, output=output)

    def run(self, req: GenerationRequest, *, callback: Callable | None = None, output: str = "pil",
            status: Callable[[str], None] | None = None, first_pass: bool = False,
            start: torch.Tensor | None = None) -> GenerationResult:
        """Run a request resolved by `resolve_request`.  `callback(stage, i, total, x, x0)` after each step (raise
        Interrupted to stop).  `output="latent"` returns latents without decoding (images empty).  `status(message)`
        hears of the work between the steps (the VAE decode).  A hires request runs as `xldm.hires.run_hires`, which
        calls back here for its passes: `first_pass` (txt2img, no refiner), then img2img from `start`, each batch
        item's upscaled latents (B, C, H/8, W/8) or pixels in [-1, 1] (B, 3, H, W) to encode."""
        if hires_enabled(req) and not first_pass and start is None:
            return run_hires(self, req, callback=callback, output=output, status=status)
        width, height, batch = req.width, req.height, req.batch
        seeds = [req.seed + i for i in range(batch)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        prompts = [parse_lora_tags(req.prompt)[0]] * batch
        self.model.loras.set(self.lora_uses(req))
        negatives = None if req.negative_prompt is None else [req.negative_prompt] * batch
        base = self.model
        lat_shape = (batch, base.config.latent_channels, height // 8, width // 8)

        full = self._schedule(base, req)
        start_images, img2img = start, req.init_image is not None or start is not None
        refiner = None if first_pass else self.refiner
        start = img2img_start(req.steps, req.strength) if img2img else 0
        end = (split_for_refiner(req.steps, req.refiner_start, req.sampler, req.timestep_spacing)
               if refiner is not None else req.steps)

        def stage_callback(stage: str):
            if callback is None:
                return None
            return lambda i, total, x, x0: callback(stage, i, total, x, x0)

        cond = self._conditioning(base, req, prompts, negatives, width, height)

        # Starting latents (diffusers prepare_latents: image latents first, then noise, then masked image).
        extra = hook = None
        if start_images is not None:  # latents are used as they are (diffusers img2img given latents), pixels encoded
            image_latents = (start_images.to(self.device, self.dtype) if start_images.shape[-2:] == lat_shape[-2:]
                             else self._encode_images(base, start_images, generators, req.tile_vae))
            noise = noise_lib.randn(lat_shape, generators, self.device, self.dtype)
            x = image_latents + noise * full.sigmas[start].to(noise.dtype)
        elif req.init_image is None:
            noise = noise_lib.randn(lat_shape, generators, self.device, self.dtype)
            x = noise * full.init_noise_sigma
        else:
            image = image_to_tensor(req.init_image, width, height).repeat(batch, 1, 1, 1)
            inpaint_unet = base.config.unet.in_channels == 9
            image_latents = None
            if req.mask is None or not inpaint_unet or req.strength < 1.0:
                image_latents = self._encode_images(base, image, generators, req.tile_vae)
            noise = noise_lib.randn(lat_shape, generators, self.device, self.dtype)
            if req.mask is not None and req.strength == 1.0:
                x = noise * full.init_noise_sigma  # diffusers inpaint: pure noise at strength 1
            else:  # diffusers add_noise at the first kept step (VE form: x0 + sigma * noise)
                x = image_latents + noise * full.sigmas[start].to(noise.dtype)
            if req.mask is not None:
                mask = mask_to_tensor(req.mask, width, height).repeat(batch, 1, 1, 1)
                mask_lat = F.interpolate(mask, size=(height // 8, width // 8)).to(self.device, self.dtype)
                if inpaint_unet:
                    masked = self._encode_images(base, image * (mask < 0.5), generators, req.tile_vae)
                    extra = torch.cat([mask_lat, masked], dim=1)
                else:
                    hook = lambda sched: _inpaint_blend(image_latents, noise, mask_lat, sched)  # noqa: E731

        schedule = full.tail(start).head(end - start)
        x = self._denoise(base, cond, req, x, schedule, generators, extra_channels=extra,
                          step_hook=hook(schedule) if hook else None, callback=stage_callback("base"),
                          control=self._control(req, start))

        if refiner is not None:
            ref = refiner
            ref_cond = self._conditioning(ref, req, prompts, negatives, width, height)
            ref_schedule = self._schedule(ref, req)
            # diffusers' refiner start (Heun repeats the base's last step: its "+1 if even" rule)
            ref_schedule = ref_schedule.tail(refiner_start(req.steps, req.refiner_start, req.sampler,
                                                           req.timestep_spacing))
            # (a 4-channel inpaint keeps blending the known region during the refiner's steps too)
            x = self._denoise(ref, ref_cond, req, x, ref_schedule, generators,
                              step_hook=hook(ref_schedule) if hook else None, callback=stage_callback("refiner"))

        params = self._params(req, width, height, seeds)
        if output == "latent":
            return GenerationResult(images=[], seeds=seeds, params=params, latents=x)
        # diffusers decodes with the refiner pipeline's VAE when a refiner ran
        # (a VAE given to the pipeline replaces both models' VAEs, as A1111's sd_vae does)
        decoder = refiner if refiner is not None and refiner.has("vae") and base.vae_path is None else base
        if status is not None:
            status(f"decoding {batch} image{'s' if batch > 1 else ''} ({width}x{height})")
        return GenerationResult(images=tensor_to_images(self.decode(decoder, x, req.tile_vae)), seeds=seeds,
                                params=params, latents=x)

    def decode(self, handle: ModelHandle, latents: torch.Tensor, tile: bool | None = None) -> torch.Tensor:
        """Latents -> pixels in [-1, 1] with a model's VAE (`xldm.vae_tiling.decode_checked`)."""
        with handle.use("vae") as comps:
            return decode_checked(comps.vae, latents, tile=tile)

    def _params(self, req: GenerationRequest, width: int, height: int, seeds: list[int]) -> list[dict[str, Any]]:
        common = {k: v for k, v in asdict(replace(req, init_image=None, mask=None, controlnets=())).items()
                  if k not in ("init_image", "mask", "seed", "batch", "controlnets")}
        # A1111 infotext names the checkpoint file (its stem) and its short hash; networks given already loaded
        # have neither (their kind is in model_kind)
        model_file = self.model.file
        common.update(width=width, height=height, model=self.model.name if model_file else None,
                      model_kind=self.model.config.kind, img2img=req.init_image is not None,
                      inpaint=req.mask is not None)
        if model_file is None:
            common.pop("model")
        elif (model_hash := self.model.short_hash(model_file)) is not None:
            common["model_hash"] = model_hash
        if self.refiner is not None:
            common["refiner"] = self.refiner.name
        else:
            common.pop("refiner_start", None)
        if req.init_image is None:
            common.pop("strength", None)
        for name in ("hires_scale", "hires_size", "hires_upscaler", "hires_strength", "hires_steps"):
            common.pop(name)
        common.update(hires_params(req))  # (only with hires fix)
        active = self.model.loras.active()
        common.pop("loras")
        if req.clip_skip is None:
            common.pop("clip_skip")
        # (each only when it changes something, so plain images keep their metadata byte for byte)
        if req.timestep_spacing == "leading":
            common.pop("timestep_spacing")
        if req.eta is None or req.eta == ETA_DEFAULTS.get(req.sampler):
            common.pop("eta")
        for name, default in CHURN_DEFAULTS.items():
            if common[name] == default:
                common.pop(name)
        if req.cache_interval == 1:
            common.pop("cache_interval"), common.pop("cache_branch")
        if req.cfg_end == 1:
            common.pop("cfg_end")
        prediction, ztsnr = self._training_schedule(self.model, req)
        common.pop("prediction"), common.pop("zero_terminal_snr")
        if req.prediction is not None or prediction != "epsilon":
            common["prediction"] = prediction
        if req.zero_terminal_snr is not None or ztsnr:
            common["zero_terminal_snr"] = ztsnr
        if self.quantize:  # (absent when unused)
            common["quantize"] = self.quantize
        if self.dtype != torch.float32:  # (xldm JSON only, as A1111 has no key; fp32 images keep theirs as before)
            common["dtype"] = DTYPE_NAMES.get(self.dtype, str(self.dtype))
        if active:  # (absent when unused, so plain images keep their metadata byte for byte)
            common["loras"] = [(use.path.name, use.weight, use.text_weight) for use, _ in active]
            common["lora_hashes"] = lora_infotext(active)
        if self.model.vae_path is not None:
            common["vae"] = self.model.vae_path.name
            if (vae_hash := self.model.short_hash(self.model.vae_path)) is not None:
                common["vae_hash"] = vae_hash
        if req.controlnets:  # (absent when unused)
            common["controlnets"] = [dict(model=unit_name(u), preprocess=u.preprocess, scale=u.scale, start=u.start,
                                          end=u.end) for u in req.controlnets]
            common["controlnet_infotext"] = [unit_infotext(u, unit_name(u)) for u in req.controlnets]
        text = f"{req.prompt} {req.negative_prompt or ''}".lower()
        used = [n for n in self.embedding_hashes if re.search(rf"(?<!\w){re.escape(n.lower())}(?!\w)", text)]
        if used:  # A1111: "TI hashes" of the embeddings the prompts use
            common["ti_hashes"] = ", ".join(f"{n}: {self.embedding_hashes[n]}" for n in used)
        return [dict(common, seed=s) for s in seeds]


def _inpaint_blend(image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, schedule: Schedule):
    """diffusers' 4-channel inpainting: after each step of this schedule slice, put back the known region
    noised to the next step's level, and the clean image latents after the slice's last step
    (StableDiffusionXLInpaintPipeline: `if i < len(timesteps) - 1: add_noise(..., timesteps[i + 1])`)."""
    last = len(schedule) - 1

    def hook(i: int, x: torch.Tensor) -> torch.Tensor:
        known = image_latents + noise * schedule.sigmas[i + 1].to(noise.dtype) if i < last else image_latents
        return (1 - mask) * known + mask * x

    return hook


def load(path: str | Path, refiner: str | Path | None = None, *, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None, low_memory: bool = False, **options: Any) -> Pipeline:
    """`pipe = xldm.load("sd_xl_base_1.0.safetensors", refiner="sd_xl_refiner_1.0.safetensors")`;
    `pipe("a red apple", seed=1).images[0].save("apple.png")`."""
    if low_memory:
        return Pipeline(path, refiner, dtype=dtype, device=device, low_memory=True, **options)
    from xldm.weights.load import load_model

    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev, unet_parameters(options.get("unet") or path) if dev.type == "cpu" else None)
    model = load_model(path, dtype=dt, device=dev)
    ref = load_model(refiner, dtype=dt, device=dev) if refiner is not None else None
    # (the file names and hashes of the infotext come from the paths)
    pipe = Pipeline(model, ref, dtype=dt, device=dev, model_file=path, refiner_file=refiner,
                    **options)  # options: Pipeline's vae, lora_dir
    pipe.dtype_chosen = dtype is None
    return pipe
