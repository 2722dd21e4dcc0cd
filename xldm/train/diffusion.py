"""The diffusion task: a UNet on VAE latents (SDXL base or refiner), or on pixels (a cascade stage, `vae=None`).

DDPM (Ho et al. 2020) on SDXL's 1000-step discrete schedule (paper Sec. 2.5), through the model's `Denoiser`
(xldm.diffusion.denoiser): x0 = the VAE posterior sample x scaling factor, or the pixels in [-1, 1] of a cascade stage;
t uniform in [timestep_min, timestep_max]; optional min-SNR-gamma weights (Hang et al. 2023), offset noise (Guttenberg
2023; SDXL Sec. 2.5: 0.05) and caption / micro-conditioning dropout for classifier-free guidance.  A super-resolution
stage trains on pairs made on the fly (Imagen Sec. 2.4; CDM Sec. 3): high = the batch (or a random `train_crop` of
it, as Imagen's SR models train on crops), low = its box-filtered downsample by `sr_scale`, noise-augmented at
s ~ U[0, aug_level_max] per image (s in the vector), upsampled and concatenated.

Randomness: each sample of each step draws from its own CPU generator seeded by (seed, step, global sample index), in
a fixed order: crop offsets, `draw_noise`'s draws, then (SR) the level and its noise.  The draws depend neither on the
split across processes (2 ranks x B == 1 rank x 2B) nor on anything but the step, so a resumed run draws exactly
what the uninterrupted one did."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from xldm.conditioning import concat_channels, training_conditioning
from xldm.diffusion.denoiser import Denoiser
from xldm.models.components import Components
from xldm.train import parallel
from xldm.train.config import TrainConfig
from xldm.train.run import Run, StepResult, make_optimizer, update


def sample_generators(seed: int, step: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from (seed, step, global index) through numpy's SeedSequence
    (well mixed, so neighbouring steps or indices give unrelated streams)."""
    gens = []
    for index in indices:
        state = np.random.SeedSequence([seed, step, int(index)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


@dataclass
class NoiseDraw:
    """The random choices of one training batch (CPU tensors)."""

    timesteps: Tensor  # (B,) int64 in [t_min, t_max]
    noise: Tensor  # (B, C, H, W) float32, offset noise included
    keep_text: Tensor  # (B,) bool: False = caption dropped (zero context and pooled)
    keep_micro: Tensor  # (B,) bool: False = micro-conditioning embedding dropped


def draw_noise(generators: Sequence[torch.Generator], latent_shape: Sequence[int], *, t_min: int, t_max: int,
               offset_noise: float = 0.0, text_dropout: float = 0.0, micro_dropout: float = 0.0) -> NoiseDraw:
    """Per sample, in a fixed order: timestep, two dropout uniforms, noise, per-channel offset.
    Every draw is made whatever the options, so changing one option never shifts the others' streams."""
    ts, keep_t, keep_m, noises = [], [], [], []
    for g in generators:
        ts.append(torch.randint(t_min, t_max + 1, (1,), generator=g))
        u = torch.rand(2, generator=g)
        keep_t.append(u[0] >= text_dropout)
        keep_m.append(u[1] >= micro_dropout)
        eps = torch.randn(tuple(latent_shape), generator=g)
        offset = torch.randn(latent_shape[0], generator=g)
        noises.append(eps + offset_noise * offset[:, None, None])
    return NoiseDraw(timesteps=torch.cat(ts), noise=torch.stack(noises), keep_text=torch.stack(keep_t),
                     keep_micro=torch.stack(keep_m))


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


def build_model(config: TrainConfig) -> Components:
    """The networks of the task: `config.init` where it has them (a cascade stage: a stage file; else a single file or
    diffusers folder), then, seeded by `config.seed`, random ones for the rest in the order UNet, VAE, text encoders
    (a cascade stage takes frozen ones from `text_encoders_from` when given)."""
    from xldm.cascade import describe, encoders_from, load_stage
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.models.vae import AutoencoderKL
    from xldm.weights.load import load_model

    mc = config.model_config
    loaded = None
    if config.init and mc.vae is None:
        loaded = load_stage(config.init, dtype=torch.float32)
        if loaded.config != mc:
            raise ValueError(f"--init {config.init} holds {describe(loaded.config)}, but the preset trains "
                             f"{describe(mc)} (configs differ)")
    elif config.init:
        loaded = load_model(config.init, components=list(config.init_components) or None, dtype=torch.float32)
        if loaded.config.kind != mc.kind:
            raise ValueError(f"--init {config.init} holds a {loaded.config.kind} model, but the preset trains "
                             f"a {mc.kind}")
        mc = loaded.config
    elif config.text_encoders_from:
        from xldm.config import DEFAULT_MODEL_PATH

        source = DEFAULT_MODEL_PATH if config.text_encoders_from == "default" else config.text_encoders_from
        loaded = Components(config=mc, text_encoders=encoders_from(source, mc.text_encoders))
    if config.prediction_type:
        mc = replace(mc, prediction_type=config.prediction_type)
    torch.manual_seed(config.seed)  # the same random init in every process (DDP also broadcasts rank 0's)
    diffusion = config.task in ("diffusion", "controlnet")  # (a UNet and text encoders)
    unet = loaded.unet if loaded and loaded.unet is not None else UNet(mc.unet) if diffusion else None
    vae = None if mc.vae is None else loaded.vae if loaded and loaded.vae is not None else AutoencoderKL(mc.vae)
    encoders = () if not diffusion else loaded.text_encoders if loaded and loaded.text_encoders else tuple(
        CLIPTextModel(te) for te in mc.text_encoders)
    model = Components(config=mc, unet=unet, vae=vae, text_encoders=tuple(encoders))
    for module in model.modules().values():
        module.float().requires_grad_(False).eval()
    return model


def build(config: TrainConfig, procs: parallel.Processes, model: Components | None = None) -> Run:
    """The UNet trained (and the text encoders with `train_text_encoders`), the rest frozen."""
    from xldm.train.cache import open_cache

    model = model or build_model(config)
    model.to(device=procs.device)
    if config.lora_rank:
        return _build_lora(config, procs, model)
    unet = model.unet.requires_grad_(True).train()
    unet.gradient_checkpointing = config.gradient_checkpointing
    trainable = {"unet": unet}
    if config.train_text_encoders:
        trainable.update({name: module.requires_grad_(True).train() for name, module in model.modules().items()
                          if name.startswith("text_encoder")})
    forward = {"unet": parallel.shard_unet(unet, procs, config.mixed_precision) if parallel.uses_fsdp(config, procs)
               else parallel.wrap_ddp(unet, procs)}  # FSDP: in place, its parameters become DTensor shards
    params = [p for m in trainable.values() for p in m.parameters()]
    return Run(config=config, procs=procs, model=model, trainable=trainable, forward=forward,
               optimizer=make_optimizer(config, params), denoiser=Denoiser(model.config.prediction_type),
               tokenizers=model.tokenizers(), cache=open_cache(config, model, procs.device))


def _build_lora(config: TrainConfig, procs: parallel.Processes, model: Components) -> Run:
    """A new LoRA on the frozen model (xldm.lora.training), the only trained network ("lora"); its gradients are
    averaged over the processes by the update (it is not DDP-wrapped: the UNet it hooks has nothing to train).
    With bf16 mixed precision the frozen networks are stored in bf16 too (half the memory)."""
    from xldm.lora.training import LoraNetwork
    from xldm.train.cache import open_cache

    if config.mixed_precision == "bf16":
        for name, module in model.modules().items():
            if name != "vae":
                module.to(torch.bfloat16)
    network = LoraNetwork(model, config.lora_rank, config.lora_alpha or config.lora_rank,
                          text_encoders=config.lora_text_encoders, conv=config.lora_conv).to(procs.device)
    network.attach(model)
    model.unet.train()
    model.unet.gradient_checkpointing = config.gradient_checkpointing
    return Run(config=config, procs=procs, model=model, trainable={"lora": network}, forward={"unet": model.unet},
               optimizer=make_optimizer(config, network.parameters()), denoiser=Denoiser(model.config.prediction_type),
               tokenizers=model.tokenizers(), cache=open_cache(config, model, procs.device))


def batches(config: TrainConfig, procs: parallel.Processes):
    """Aspect-ratio buckets of ~resolution^2 pixels (a cascade stage: one bucket, its own size), this process's rows
    of each global batch (xldm.train.data)."""
    from xldm.buckets import training_buckets
    from xldm.train.data import TrainingBatches, open_source

    if not config.data:
        raise ValueError("no training data: set --data DIR_OR_SHARDS (or `data` in the TOML file)")
    mc = config.model_config
    buckets = [(mc.default_size,) * 2] if mc.vae is None else training_buckets(config.resolution, config.bucket_step)
    return TrainingBatches(open_source(config.data), buckets=buckets, batch_size=config.batch_size, seed=config.seed,
                           rank=procs.rank, world_size=procs.world_size, center_crop=config.center_crop,
                           fixed_crops=bool(config.cache_dir),  # one crop per sample for the cache
                           augment=config.augment)


def loss(run: Run, batch: dict, step: int, control: Callable | None = None) -> Tensor:
    """The (weighted) diffusion loss of this process's rows at `step`.  `control(noisy, timesteps, context, vector,
    pixels)`: ControlNet residuals for the UNet (the ControlNet task, xldm.train.controlnet), None = none."""
    from xldm.cascade import augment, downsample_for_sr, upsample_low_res

    config, model = run.config, run.model
    mc = model.config
    gens = sample_generators(config.seed, step, run.rows(batch))
    pixels = batch["pixels"].to(device=run.device, dtype=torch.float32)
    if config.train_crop:
        pixels = random_crops(pixels, config.train_crop, gens)
    if mc.vae is None:
        x0 = pixels
    else:
        with torch.no_grad():  # the VAE is frozen: latents = posterior sample x scaling factor
            x0 = run.cache.latents(model.vae, pixels, batch, gens) if run.cache is not None else \
                model.vae.encode_latents(pixels, generator=gens)
    draw = draw_noise(gens, x0.shape[1:], t_min=config.timestep_min, t_max=config.timestep_max,
                      offset_noise=config.offset_noise, text_dropout=config.text_dropout,
                      micro_dropout=config.micro_dropout)
    timesteps, noise = draw.timesteps.to(run.device), draw.noise.to(run.device)
    h, w = pixels.shape[-2:]
    values = {"original_size": (h, w), "crop_top_left": (0, 0), "target_size": (h, w), **batch}
    if not config.size_conditioning:  # ablation (SDXL Table 2): c_size carries the training size only
        values["original_size"] = values["target_size"]
    if not config.crop_conditioning:  # ablation (SDXL Sec. 2.2): c_crop always (0, 0)
        values["crop_top_left"] = torch.zeros_like(torch.as_tensor(values["crop_top_left"]))
    low_res = None
    if mc.sr_scale:  # after draw_noise, per sample: the augmentation level, then its noise
        low = downsample_for_sr(pixels, mc.sr_scale)
        values["aug_level"] = torch.cat([torch.rand(1, generator=g) for g in gens]) * config.aug_level_max
        aug_noise = torch.stack([torch.randn(tuple(low.shape[1:]), generator=g) for g in gens]).to(run.device)
        low_res = upsample_low_res(augment(low, values["aug_level"].to(run.device), noise=aug_noise), (w, h))
    text = (run.cache.text_embeddings(model.text_encoders, run.tokenizers, mc, list(batch["captions"]))
            if run.cache is not None and run.cache.text_dir is not None else None)
    context, vector = training_conditioning(mc, model.text_encoders, run.tokenizers, values, draw.keep_text,
                                            draw.keep_micro, device=run.device,
                                            train_text_encoders=config.train_text_encoders or config.lora_text_encoders,
                                            embeddings=text)
    noisy = run.denoiser.noised(x0, noise, timesteps)
    with run.autocast():
        residuals = None if control is None else control(noisy, timesteps, context, vector, pixels)
        prediction = run.forward["unet"](noisy if low_res is None else concat_channels(noisy, low_res), timesteps,
                                         context, vector, **({} if residuals is None else {"control": residuals}))
    return run.denoiser.loss(prediction, x0, noise, timesteps, config.min_snr_gamma)


def step(run: Run, batch: dict, step: int) -> StepResult:
    params = [p for _, p in run.named_trainable_parameters()]  # before the forward (see run.update)
    return update(run, loss(run, batch, step), step, params)


def export(run: Run, data, final: Path, gathered: dict | None = None) -> Path:
    """The EMA weights of the trained networks (raw weights without EMA) with the frozen ones: `final/model.safetensors`
    in the original single-file layout `xldm generate --model` loads, or a cascade stage's `final/stage.safetensors`
    (`xldm generate --cascade`).  `gathered`: the sharded networks, already unsharded with EMA applied."""
    from xldm.cascade import save_stage
    from xldm.weights.save import save_single_file

    if "lora" in run.trainable:
        return _export_lora(run, data, final, gathered)
    exported = {name: gathered[name] if gathered and name in gathered else run.averaged(name)
                for name in run.trainable}
    model = run.model
    names = [n for n in model.modules() if n.startswith("text_encoder")]
    encoders = tuple(exported.get(name, te) for name, te in zip(names, model.text_encoders))
    result = Components(config=model.config, unet=exported["unet"], vae=model.vae, text_encoders=encoders)
    final.mkdir(parents=True, exist_ok=True)
    if model.config.vae is None:
        return save_stage(result, final / "stage.safetensors")
    return save_single_file(result, final / "model.safetensors")


def _export_lora(run: Run, data, final: Path, gathered: dict | None) -> Path:
    """RUN/final/lora.safetensors in kohya's format, with the `ss_*` metadata kohya's trainer writes (network
    module, dim, alpha, base model, resolution, steps) that A1111 and ComfyUI show."""
    import json

    config = run.config
    network = gathered["lora"] if gathered and "lora" in gathered else run.averaged("lora")
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(network.rank),
                "ss_network_alpha": str(network.alpha), "ss_base_model_version": {
                    "sdxl-base": "sdxl_base_v1-0", "sdxl-refiner": "sdxl_refiner_v1-0"}.get(run.model.config.kind,
                                                                                          run.model.config.kind),
                "ss_sd_model_name": Path(config.init).name if config.init else config.model,
                "ss_resolution": f"({config.resolution}, {config.resolution})", "ss_steps": str(config.steps),
                "ss_max_train_steps": str(config.steps), "ss_learning_rate": str(config.lr),
                "ss_batch_size_per_device": str(config.batch_size), "ss_seed": str(config.seed),
                "ss_training_comment": "trained with xldm",
                "ss_network_args": json.dumps({"conv_dim": str(network.rank), "conv_alpha": str(network.alpha)}
                                              if config.lora_conv else {}),
                "ss_text_encoder_lr": str(config.lr if config.lora_text_encoders else 0.0), "format": "pt"}
    final.mkdir(parents=True, exist_ok=True)
    return network.save(final / "lora.safetensors", run.model.config, metadata)
