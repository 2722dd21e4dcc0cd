"""Training the KL autoencoder: SDXL's improved VAE (Podell et al. 2023, Sec. 2.4) with the ldm recipe.

SDXL trains "the same autoencoder architecture used for the original Stable Diffusion at a larger batch-size (256 vs
9) and additionally track[s] the weights with an exponential moving average".  The loss is ldm's
`LPIPSWithDiscriminator` (Rombach et al. 2022; taming-transformers, Esser et al. 2021) without the LPIPS term
(its VGG weights are a download we do not make; `perceptual` is therefore 0 here):

    rec   = |x - x_hat|  (or (x - x_hat)^2),  nll = sum_chw rec / B        (ldm: logvar fixed at 0)
    kl    = 0.5 * sum_chw (mu^2 + var - 1 - log var) / B
    loss  = nll + kl_weight * kl  [+ d_weight * (-mean D(x_hat)) once step >= disc_start]
    d_weight = disc_weight * clamp(|grad nll| / (|grad g| + 1e-4), 0, 1e4) on the decoder's last conv weight
    discriminator: hinge loss 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), its own AdamW

The patch discriminator is pix2pix's NLayerDiscriminator (Isola et al. 2017; 3 layers, 4x4 convs, LeakyReLU 0.2)
with GroupNorm instead of BatchNorm, so each sample is judged alone and DDP needs no synced statistics."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xldm.models.components import Components
from xldm.train import parallel
from xldm.train.config import TrainConfig, lr_at
from xldm.train.diffusion import batches, build_model, sample_generators  # noqa: F401  (batches: as diffusion's)
from xldm.train.run import Run, StepResult, apply_update, make_optimizer, update


class PatchDiscriminator(nn.Module):
    """pix2pix `NLayerDiscriminator(input_nc, ndf, n_layers=3)`: a logit per overlapping 70x70 patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            blocks += [nn.Conv2d(width, out, 4, 2 if i < layers else 1, 1, bias=False),
                       nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for m in self.modules():  # taming weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Reconstruction(nn.Module):
    """VAE forward that also returns the posterior, so one (DDP-wrapped) call gives all the loss needs."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generators: list[torch.Generator]):
        posterior = self.vae.encode(x)
        return self.vae.decode(posterior.sample(generators)), posterior.mean, posterior.logvar


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample sum over pixels, mean over the batch (ldm `nll_loss = sum(rec) / B` with logvar 0)."""
    diff = (x.float() - x_hat.float())
    return (diff.abs() if kind == "l1" else diff.square()).sum() / x.shape[0]


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), summed per sample, mean over the batch (ldm `DiagonalGaussianDistribution.kl`)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum() / mean.shape[0]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_disc_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                         disc_weight: float) -> torch.Tensor:
    """ldm `calculate_adaptive_weight`: balance the adversarial gradient against the reconstruction one."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach() * disc_weight


def build(config: TrainConfig, procs: parallel.Processes, model: Components | None = None) -> Run:
    """The VAE trained, with the patch discriminator (seeded by `seed + 1`) and its own AdamW as an extra."""
    if parallel.uses_fsdp(config, procs):
        raise NotImplementedError("parallel='fsdp' shards the diffusion UNet; train the VAE with parallel='ddp'")
    model = model or build_model(config)
    model.to(device=procs.device)
    vae = model.vae.requires_grad_(True).train()
    torch.manual_seed(config.seed + 1)
    disc = PatchDiscriminator(model.config.vae.out_channels, config.disc_channels).to(procs.device)
    disc_optimizer = make_optimizer(config, disc.parameters(), lr=config.disc_lr or config.lr)
    return Run(config=config, procs=procs, model=model, trainable={"vae": vae},
               forward={"vae": parallel.wrap_ddp(Reconstruction(vae), procs),
                        "discriminator": parallel.wrap_ddp(disc, procs)},
               optimizer=make_optimizer(config, vae.parameters()), extras={"discriminator": (disc, disc_optimizer)})


def step(run: Run, batch: dict, step: int) -> StepResult:
    """One autoencoder step, then (after `disc_start`) one discriminator step on the same batch."""
    config = run.config
    vae = run.trainable["vae"]
    disc, disc_optimizer = run.extras["discriminator"]
    adversarial = step >= config.disc_start  # ldm adopt_weight: the discriminator joins at disc_start
    gens = sample_generators(config.seed, step, run.rows(batch))
    x = batch["pixels"].to(device=run.device, dtype=torch.float32)
    with run.autocast():
        x_hat, mean, logvar = run.forward["vae"](x, gens)
    nll = reconstruction_loss(x, x_hat, config.reconstruction_loss)
    kl = kl_loss(mean, logvar)
    loss = nll + config.kl_weight * kl
    extra = {"rec_loss": float(nll.detach()), "kl_loss": float(kl.detach())}
    if adversarial:
        with run.autocast():
            g_loss = -disc(x_hat).float().mean()  # the unwrapped discriminator: its gradients are discarded below
        d_weight = adaptive_disc_weight(nll, g_loss, vae.decoder.conv_out.weight, config.disc_weight)
        loss = loss + d_weight * g_loss
        extra.update(g_loss=float(g_loss.detach()), d_weight=float(d_weight))
    result = update(run, loss, step, [p for _, p in run.named_trainable_parameters()], extra=extra)
    disc_optimizer.zero_grad(set_to_none=True)  # the generator loss's gradients in the discriminator
    if adversarial and result.applied:
        with run.autocast():
            logits_real = run.forward["discriminator"](x)
            logits_fake = run.forward["discriminator"](x_hat.detach())
        d_loss = hinge_d_loss(logits_real.float(), logits_fake.float())
        disc_lr = (config.disc_lr or config.lr) * lr_at(config, step) / config.lr
        d_applied, d_value, _ = apply_update(run, d_loss, disc_optimizer, list(disc.parameters()), disc_lr)
        extra.update(d_loss=d_value, d_applied=float(d_applied))
    return result


def export(run: Run, data, final: Path, gathered: dict | None = None) -> Path:
    """`final/model.safetensors`: the EMA weights (raw weights without EMA) in the bare VAE layout (`encoder.*`,
    `decoder.*`, as the released sdxl_vae.safetensors)."""
    from xldm.weights.io import save_file

    final.mkdir(parents=True, exist_ok=True)
    save_file(run.averaged("vae").state_dict(), final / "model.safetensors", metadata={"format": "pt"})
    return final / "model.safetensors"
