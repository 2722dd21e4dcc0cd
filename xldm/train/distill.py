"""Adversarial diffusion distillation (Sauer et al. 2023, "ADD"): a 1-4 step student from a diffusion teacher.

The student starts as the teacher's UNet.  Per sample, one student timestep s of `student_timesteps` (ADD Sec. 3.1)
and the student's one-step estimate x_hat = x0(student(x_s, s)) of the training latent x0 from x_s = noised(x0, s):

    distillation (ADD eq. 3): x_hat re-noised to a teacher timestep t, the teacher's x0 estimate there (with
        classifier-free guidance `teacher_cfg`) as the target:  c(t) * mean (x_hat - sg(x0_teacher))^2, c(t) = sqrt(abar_t)
        (ADD's exponential weighting, c(t) = alpha_t)
    adversarial (ADD eq. 2, hinge loss): a discriminator of trainable heads on frozen features; here, as in latent ADD
        (Sauer et al. 2024), the teacher UNet's encoder features of the noised latent (noise level t_d drawn
        uniformly: ours), one head per encoder block (1x1 conv, SiLU, 1x1 conv -> a logit per position)
    student loss = -mean D(x_hat) + distill_weight * distillation;  discriminator loss = mean relu(1 - D(x0))
        + mean relu(1 + D(x_hat)) + r1_weight / 2 * |grad D(x0)|^2 (R1, Mescheder et al. 2018)

Export: `final/model.safetensors`, the student with the teacher's VAE and text encoders, which samples in
len(student_timesteps) steps with trailing spacing and no guidance."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from xldm.conditioning import training_conditioning
from xldm.diffusion.denoiser import Denoiser
from xldm.models.components import Components
from xldm.train import parallel
from xldm.train.config import NUM_TRAIN_TIMESTEPS, TrainConfig, lr_at
from xldm.train.diffusion import batches, export, sample_generators  # noqa: F401  (batches, export: diffusion's)
from xldm.train.run import Run, StepResult, apply_update, make_optimizer, update


class FeatureHeads(nn.Module):
    """One small head per frozen feature map: a logit per position, averaged to one per sample, summed over heads."""

    def __init__(self, widths: list[int], hidden: int = 64) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(w, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, 1, 1))
                                   for w in widths)

    def forward(self, features: list[Tensor]) -> Tensor:
        return sum(head(f.float()).mean(dim=(1, 2, 3)) for head, f in zip(self.heads, features))


def _teacher(config: TrainConfig) -> Components:
    from xldm.weights.load import load_model

    if not config.teacher:
        raise ValueError("distillation (task 'add') needs --teacher MODEL: a latent model's single file or folder")
    teacher = load_model(config.teacher, dtype=torch.float32)
    if teacher.unet is None or teacher.vae is None or not teacher.text_encoders:
        raise ValueError(f"--teacher {config.teacher}: needs a UNet, a VAE and text encoders")
    for module in teacher.modules().values():
        module.requires_grad_(False).eval()
    return teacher


def build(config: TrainConfig, procs: parallel.Processes, model: Components | None = None) -> Run:
    """Student (trained) = a copy of the teacher's UNet, or `--init`'s; discriminator heads (seeded by seed + 1)
    with their own AdamW as an extra; the teacher frozen."""
    from xldm.weights.load import load_model

    if parallel.uses_fsdp(config, procs):
        raise NotImplementedError("parallel='fsdp' is not supported for distillation; use parallel='ddp'")
    teacher = model or _teacher(config)
    teacher.to(device=procs.device)
    torch.manual_seed(config.seed)
    student = (load_model(config.init, components=["unet"], dtype=torch.float32).unet if config.init
               else copy.deepcopy(teacher.unet))
    student = student.to(procs.device).requires_grad_(True).train()
    student.gradient_checkpointing = config.gradient_checkpointing
    torch.manual_seed(config.seed + 1)
    widths = [f.shape[1] for f in _encoder_shapes(teacher)]
    heads = FeatureHeads(widths, config.disc_channels).to(procs.device)
    heads_optimizer = make_optimizer(config, heads.parameters(), lr=config.disc_lr or config.lr)
    trained = Components(config=teacher.config, unet=student, vae=teacher.vae, text_encoders=teacher.text_encoders)
    return Run(config=config, procs=procs, model=trained, trainable={"unet": student},
               forward={"unet": parallel.wrap_ddp(student, procs), "discriminator": parallel.wrap_ddp(heads, procs)},
               optimizer=make_optimizer(config, student.parameters()), extras={"discriminator": (heads, heads_optimizer)},
               denoiser=Denoiser(teacher.config.prediction_type), tokenizers=teacher.tokenizers(),
               frozen={"teacher": teacher.unet})


def _encoder_shapes(teacher: Components) -> list[Tensor]:
    """The teacher's encoder features of a tiny input on the meta device (their channel counts)."""
    cfg = teacher.config.unet
    with torch.device("meta"):
        probe = type(teacher.unet)(cfg)
        x = torch.empty(1, cfg.in_channels, 8, 8)
        y = torch.empty(1, cfg.adm_in_channels) if cfg.adm_in_channels > 0 else None
        return probe.encoder_features(x, torch.zeros(1), torch.empty(1, 1, cfg.context_dim), y)[0]


def _draws(gens: list[torch.Generator], shape: tuple[int, ...], config: TrainConfig) -> dict[str, Tensor]:
    """Per sample, in a fixed order: student timestep index, teacher timestep, discriminator timestep, 3 noises."""
    rows = []
    for g in gens:
        rows.append((torch.randint(len(config.student_timesteps), (1,), generator=g),
                     torch.randint(config.timestep_min, config.timestep_max + 1, (1,), generator=g),
                     torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g),
                     *(torch.randn(shape, generator=g) for _ in range(3))))
    s_index, t, t_disc, noise, renoise, disc_noise = (torch.cat(c) if c[0].dim() == 1 else torch.stack(c)
                                                      for c in zip(*rows))
    return {"s": torch.tensor(config.student_timesteps)[s_index], "t": t, "t_disc": t_disc, "noise": noise,
            "renoise": renoise, "disc_noise": disc_noise}


def step(run: Run, batch: dict, step: int) -> StepResult:
    """One student update on the adversarial + distillation loss, then one discriminator update."""
    config, model, denoiser, teacher = run.config, run.model, run.denoiser, run.frozen["teacher"]
    heads, heads_optimizer = run.extras["discriminator"]
    device = run.device
    gens = sample_generators(config.seed, step, run.rows(batch))
    pixels = batch["pixels"].to(device=device, dtype=torch.float32)
    with torch.no_grad():
        x0 = model.vae.encode_latents(pixels, generator=gens)
    d = {k: v.to(device) for k, v in _draws(gens, tuple(x0.shape[1:]), config).items()}
    h, w = pixels.shape[-2:]
    values = {"original_size": (h, w), "crop_top_left": (0, 0), "target_size": (h, w), **batch}
    keep = torch.ones(x0.shape[0], dtype=torch.bool)
    context, vector = training_conditioning(model.config, model.text_encoders, run.tokenizers, values, keep, keep,
                                            device=device)
    params = [p for _, p in run.named_trainable_parameters()]

    x_s = denoiser.noised(x0, d["noise"], d["s"])
    with run.autocast():
        x_hat = denoiser.x0_from_output(x_s, run.forward["unet"](x_s, d["s"], context, vector), d["s"])
    with torch.no_grad():  # the distillation target: the guided teacher at the re-noised student estimate
        x_t = denoiser.noised(x_hat, d["renoise"], d["t"])
        cond = denoiser.x0_from_output(x_t, teacher(x_t, d["t"], context, vector), d["t"])
        target = cond
        if config.teacher_cfg != 1.0:
            empty, empty_vector = training_conditioning(model.config, model.text_encoders, run.tokenizers, values,
                                                        ~keep, keep, device=device)
            uncond = denoiser.x0_from_output(x_t, teacher(x_t, d["t"], empty, empty_vector), d["t"])
            target = uncond + config.teacher_cfg * (cond - uncond)
    weight = denoiser.alphas_cumprod(device)[d["t"]].sqrt()
    distill = (weight * F.mse_loss(x_hat, target, reduction="none").mean(dim=(1, 2, 3))).mean()

    def logits(latents: Tensor, network: nn.Module) -> Tensor:
        noisy = denoiser.noised(latents, d["disc_noise"], d["t_disc"])
        return network(teacher.encoder_features(noisy, d["t_disc"], context, vector)[0])

    g_loss = -logits(x_hat, heads).mean()  # the unwrapped heads: their gradients are discarded below
    result = update(run, g_loss + config.distill_weight * distill, step, params,
                    extra={"distill_loss": float(distill.detach()), "g_loss": float(g_loss.detach())})
    heads_optimizer.zero_grad(set_to_none=True)
    if result.applied:
        real = x0.detach().requires_grad_(config.r1_weight > 0)
        # R1 differentiates twice; the math attention kernel has a double backward, the fused CPU one does not
        with sdpa_kernel(SDPBackend.MATH) if config.r1_weight > 0 else nullcontext():
            real_logits = logits(real, run.forward["discriminator"])
        d_loss = F.relu(1 - real_logits).mean() + F.relu(1 + logits(x_hat.detach(), run.forward["discriminator"])).mean()
        if config.r1_weight > 0:
            grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            d_loss = d_loss + config.r1_weight / 2 * grad.square().sum(dim=(1, 2, 3)).mean()
        disc_lr = (config.disc_lr or config.lr) * lr_at(config, step) / config.lr
        d_applied, d_value, _ = apply_update(run, d_loss, heads_optimizer, list(heads.parameters()), disc_lr)
        result.extra.update(d_loss=d_value, d_applied=float(d_applied))
    return result
