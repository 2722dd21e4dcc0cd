"""Samplers: pure functions over a denoiser D(x, sigma, t) -> x0, in VE coordinates (k-diffusion style).

Each reproduces one diffusers scheduler in the SDXL pipelines' loop (noise levels, order rules, random draws),
so a seed gives diffusers' image.  Arguments:

    denoiser   D(x, sigma, t) -> x0 (`denoiser.Denoiser`)
    x          the start in VE coordinates: noise * schedule.init_noise_sigma, a noised image (img2img), or
               the base model's latents (refiner)
    schedule   a `Schedule` or a slice of one (`head`/`tail`); a slice starts with empty solver history, like
               a freshly set diffusers scheduler with `set_begin_index`
    generator  torch.Generator or one per batch row; stochastic samplers draw with `noise.randn` when
               diffusers' `scheduler.step` draws
    step_hook  step_hook(i, x) -> x after step i (inpainting puts back the known region, as diffusers' inpaint
               pipeline does after each `scheduler.step`); sampling continues from the hooked sample
    callback   callback(i, n, x, x0) after each step (and after step_hook); i counts steps of this slice
    eta        the noise scale of the samplers that add noise (`ETA_DEFAULTS`: 1 = today's ancestral / SDE step,
               0 = none, DDIM's default); s_churn, s_tmin, s_tmax, s_noise: Euler's churn (Karras et al. 2022,
               Alg. 2; `sample_euler`).  `sample` refuses an option the chosen sampler cannot apply

and return the sample at schedule.sigmas[-1]; float32 arithmetic, each step cast back to `x.dtype` (as diffusers
casts to the model's dtype)."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from xldm.diffusion.denoiser import Denoiser
from xldm.diffusion.noise import randn
from xldm.diffusion.schedules import Schedule, make_schedule, sde_midpoint_timesteps

StepHook = Callable[[int, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _euler_slope(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, i: int):
    """(sigma, sigma_next, x in float32, x0, d = (x - x0) / sigma): the opening of diffusers' Euler-family `step`."""
    sigma = schedule.sigmas[i]
    x0 = denoiser(x, sigma, schedule.timesteps[i].to(x.device))
    xf = x.float()
    return sigma, schedule.sigmas[i + 1], xf, x0, (xf - x0) / sigma


def _after_step(i: int, n: int, x: torch.Tensor, x0: torch.Tensor, step_hook: StepHook | None,
                callback: Callback | None) -> torch.Tensor:
    if step_hook is not None:
        x = step_hook(i, x)
    if callback is not None:
        callback(i, n, x, x0)
    return x


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's time lambda = log(alpha / sigma_vp) = -log(sigma_ve)."""
    return -torch.log(sigma)


def sample_euler(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                 callback: Callback | None = None, step_hook: StepHook | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al. 2022, Alg. 2), with
    diffusers EulerDiscreteScheduler.step's arithmetic: x += d * (sigma_next - sigma) (x + eps*dt differs by ~1 ulp).

    Churn (Alg. 2, lines 4-6): where s_tmin <= sigma <= s_tmax, gamma = min(s_churn / N, sqrt 2 - 1) (N: the full
    schedule's steps), sigma_hat = sigma (1 + gamma), and x gains noise of std s_noise sqrt(sigma_hat^2 - sigma^2)
    drawn from `generator`; the step then runs from sigma_hat.  As diffusers EulerDiscreteScheduler.step (the same
    four arguments), the network is evaluated once, at (x, sigma) before the churn, and its slope d reused from
    sigma_hat (Alg. 2 evaluates D at the churned point); for an epsilon model this is diffusers' step exactly.
    s_churn = 0 (the default) is the plain ODE step, with no draw."""
    dtype, n = x.dtype, len(schedule)
    for i in range(n):
        sigma, sigma_next, xf, x0, d = _euler_slope(denoiser, x, schedule, i)
        gamma = min(s_churn / schedule.total, 2**0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
        if gamma > 0:
            sigma_hat = sigma * (gamma + 1)
            noise = randn(x.shape, generator, x.device, dtype)  # diffusers: model_output.dtype, only when gamma > 0
            xf = xf + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
            sigma = sigma_hat
        x = _after_step(i, n, (xf + d * (sigma_next - sigma)).to(dtype), x0, step_hook, callback)
    return x


def _ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral move to sigma_next, k-diffusion `get_ancestral_step(sigma_from, sigma_to,
    eta)`: sigma_up = eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2), sigma_down^2 + sigma_up^2 =
    sigma_next^2 (for eta <= 1 sigma_up never exceeds sigma_next, k-diffusion's cap)."""
    sigma_up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                           callback: Callback | None = None, step_hook: StepHook | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Ancestral Euler: Euler to sigma_down, then fresh noise of std sigma_up (`_ancestral_step`; eta = 1 is
    diffusers EulerAncestralDiscreteScheduler, k-diffusion `sample_euler_ancestral`'s default; eta = 0 is Euler).
    Noise is drawn on every step, the last one (sigma_up = 0) included."""
    dtype, n = x.dtype, len(schedule)
    for i in range(n):
        sigma, sigma_next, xf, x0, d = _euler_slope(denoiser, x, schedule, i)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        xf = xf + d * (sigma_down - sigma)
        noise = randn(x.shape, generator, x.device, dtype)  # diffusers: model_output.dtype
        x = _after_step(i, n, (xf + noise * sigma_up).to(dtype), x0, step_hook, callback)
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                callback: Callback | None = None, step_hook: StepHook | None = None) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1, no churn) as diffusers HeunDiscreteScheduler: Euler to sigma_next,
    a second evaluation there (at the next step's model time), then the averaged slope from the start.  The last
    step is plain Euler (diffusers' interleaved list ends on a first-order half: at sigma 0, or at the base's
    `denoising_end`); 2n - 1 network calls.  step_hook also runs on the intermediate point (diffusers' inpaint
    loop blends after each half step)."""
    dtype, n = x.dtype, len(schedule)
    for i in range(n):
        sigma, sigma_next, xf, x0, d = _euler_slope(denoiser, x, schedule, i)
        dt = sigma_next - sigma
        x = (xf + d * dt).to(dtype)
        if i < n - 1:  # x is the intermediate Euler point at sigma_next
            x_mid = x if step_hook is None else step_hook(i, x)
            x0 = denoiser(x_mid, sigma_next, schedule.timesteps[i + 1].to(x.device))
            d_mid = (x_mid.float() - x0) / sigma_next
            x = (xf + (d + d_mid) / 2 * dt).to(dtype)
        x = _after_step(i, n, x, x0, step_hook, callback)
    return x


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                callback: Callback | None = None, step_hook: StepHook | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) as the SDXL pipeline calls diffusers DDIMScheduler; in VE terms
    x_next = x0 + sigma_next * eps, eps = (x - x0) / sigma, at eta = 0 (the pipeline's default).  eta > 0 adds
    eq. 16's noise: diffusers' std_dev_t = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)) is, in VE
    terms, `_ancestral_step`'s sigma_up, so x_next = x0 + sigma_down eps + sigma_up z, z drawn from `generator` on
    every step (diffusers `if eta > 0`).  set_alpha_to_one=False makes the last step land on
    abar_0 (sigma 0.0292) and diffusers decodes that VP sample; so when this slice ends the schedule, the result
    (and the last step_hook/callback) is x / sqrt(sigma_end^2 + 1), and decoding it gives diffusers' image."""
    dtype, n = x.dtype, len(schedule)
    for i in range(n):
        sigma, sigma_next, _, x0, eps = _euler_slope(denoiser, x, schedule, i)
        if eta > 0:
            sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
            xf = x0 + sigma_down * eps + sigma_up * randn(x.shape, generator, x.device, dtype)
        else:
            xf = x0 + sigma_next * eps
        if i == n - 1 and schedule.ends_schedule and sigma_next > 0:
            xf = xf / ((sigma_next**2 + 1) ** 0.5)
        x = _after_step(i, n, xf.to(dtype), x0, step_hook, callback)
    return x


def _dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, sde: bool, generator, callback,
              step_hook, eta: float = 1.0) -> torch.Tensor:
    dtype, n = x.dtype, len(schedule)
    x0_prev = None
    for i in range(n):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        x0 = denoiser(x, sigma, schedule.timesteps[i].to(x.device))
        xf = x.float()
        noise = randn(x.shape, generator, x.device, torch.float32) if sde else None  # drawn every step
        if sigma_next == 0:
            x_next = x0  # h = inf: every formula below reduces to x0 (diffusers computes 0 * x + 1 * x0)
        else:
            h = _lam(sigma_next) - _lam(sigma)
            # DPMSolverMultistepScheduler(solver_order=2) steps at first order right after set_timesteps (no history:
            # lower_order_nums < 1) and on the full schedule's last step (lower_order_final, final_sigmas_type="zero").
            if i == 0 or schedule.offset + i == schedule.total - 1:
                d = x0
            else:
                r = (_lam(sigma) - _lam(schedule.sigmas[i - 1])) / h
                d = x0 + 0.5 * (1.0 / r * (x0 - x0_prev))  # midpoint: D0 + D1/2, D1 = (m0 - m1) / r
            if sde:  # sde-dpmsolver++ (Lu et al. 2022b, sec. 5), VE form; eta as k-diffusion sample_dpmpp_2m_sde
                x_next = (sigma_next / sigma * torch.exp(-h * eta)) * xf + (1 - torch.exp(-h * (eta + 1.0))) * d \
                    + sigma_next * torch.sqrt(1.0 - torch.exp(-2 * h * eta)) * noise
            else:  # dpmsolver++ (Lu et al. 2022b, Alg. 2), VE form
                x_next = sigma_next / sigma * xf - (torch.exp(-h) - 1.0) * d
        x0_prev = x0
        x = _after_step(i, n, x_next.to(dtype), x0, step_hook, callback)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                    callback: Callback | None = None, step_hook: StepHook | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), multistep midpoint (Lu et al. 2022b, Alg. 2) at diffusers DPMSolverMultistepScheduler's
    defaults; with lambda = -log sigma, h = lambda_next - lambda, r = h_prev / h:
    x_next = (sigma_next / sigma) x - (e^-h - 1) (x0 + (x0 - x0_prev) / (2 r))."""
    return _dpmpp_2m(denoiser, x, schedule, sde=False, generator=generator, callback=callback, step_hook=step_hook)


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                        callback: Callback | None = None, step_hook: StepHook | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), midpoint (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")):
    x_next = (sigma_next / sigma) e^-h x + (1 - e^-2h) D + sigma_next sqrt(1 - e^-2h) z, float32 z every step.
    With k-diffusion `sample_dpmpp_2m_sde`'s eta: e^-(eta h) x, (1 - e^-((1 + eta) h)) D, sqrt(1 - e^-(2 eta h)) z;
    eta = 1 is the above, eta = 0 DPM++ 2M (z still drawn, times 0)."""
    return _dpmpp_2m(denoiser, x, schedule, sde=True, generator=generator, callback=callback, step_hook=step_hook,
                     eta=eta)


class _BrownianNoise:
    """Brownian-tree noise as diffusers `BrownianTreeNoiseSampler` (k-diffusion's): torchsde.BrownianInterval over
    [sigma_min, sigma_max] with diffusers' settings; noise(s, s_next) = (W(s_next) - W(s)) / sqrt|s_next - s|.
    One tree per seed: a single seed covers the whole batch (diffusers' `noise_sampler_seed`), a list of seeds
    gives row i its own tree of one row (A1111: image i of a batch equals seed + i alone).  The tree lives on
    the CPU in float32 and its noise moves to x's device, so a seed gives the same noise on every device and
    dtype (as `noise.randn` with CPU generators); diffusers builds it in the latents' dtype on their device,
    equal to this for float32 latents on the CPU."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: list[int]) -> None:
        import torchsde  # a runtime dependency, loaded only by this sampler

        self.device = x.device
        size = x.shape if len(seeds) == 1 else (1, *x.shape[1:])
        self.trees = [torchsde.BrownianInterval(
            t0=torch.as_tensor(sigma_min), t1=torch.as_tensor(sigma_max), size=size, dtype=torch.float32,
            device="cpu", entropy=seed, tol=1e-6, pool_size=24, halfway_tree=True) for seed in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        lo, hi = sorted((sigma, sigma_next))
        sign = -1.0 if sigma > sigma_next else 1.0
        with warnings.catch_warnings():  # exp(-(-log sigma_max)) lands 1 ulp past t1; torchsde warns, as in diffusers
            warnings.filterwarnings("ignore", message="Should have")
            w = torch.cat([tree(lo, hi) for tree in self.trees]) * sign
        return (w / (sigma_next - sigma).abs().sqrt()).to(self.device)


def _tree_seeds(generator) -> list[int]:
    """The Brownian tree seeds: each generator's `initial_seed()` (xldm seeds image i with seed + i); without a
    generator a seed from torch's global RNG, as diffusers with noise_sampler_seed=None."""
    if generator is None:
        return [torch.randint(0, 2**63 - 1, []).item()]
    gens = generator if isinstance(generator, list) else [generator]
    return [g.initial_seed() for g in gens]


def _sde_substep(xf: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                 noise: _BrownianNoise, eta: float = 1.0) -> torch.Tensor:
    """One ancestral DPM-Solver++(1S) move from lambda t to t_next (diffusers DPMSolverSDEScheduler.step; eta as
    k-diffusion `sample_dpmpp_sde`'s, through `get_ancestral_step`)."""
    sigma_from, sigma_to = t.neg().exp(), t_next.neg().exp()
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    t_down = (sigma_to**2 - sigma_up**2).sqrt().log().neg()
    x = (t_down.neg().exp() / sigma_from) * xf - (t - t_down).expm1() * x0
    return x + noise(sigma_from, sigma_to) * sigma_up


def _full_sde_sigmas(schedule: Schedule) -> torch.Tensor:
    """The sigmas the Brownian tree spans: diffusers spans the full schedule's range even for a slice (img2img,
    refiner), so a slice of the standard dpmpp_sde_karras schedule spans that; any other schedule its own."""
    if schedule.offset == 0 and schedule.ends_schedule:
        return schedule.sigmas
    full = make_schedule("dpmpp_sde_karras", schedule.total).sigmas
    part = full[schedule.offset: schedule.offset + len(schedule) + 1]
    return full if torch.equal(part, schedule.sigmas) else schedule.sigmas


def sample_dpmpp_sde(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                     callback: Callback | None = None, step_hook: StepHook | None = None,
                     eta: float = 1.0) -> torch.Tensor:
    """DPM++ SDE: k-diffusion `sample_dpmpp_sde` (r = 1/2; eta = 1 is diffusers DPMSolverSDEScheduler).  Each step
    moves ancestrally to the lambda-midpoint, evaluates there (at `sde_midpoint_timesteps`), then moves from the
    start to sigma_next with the midpoint's x0; the last step to sigma 0 is Euler; 2n - 1 network calls.  Noise
    comes from a Brownian tree over the schedule's sigma range (`_full_sde_sigmas`) seeded with each generator's
    initial_seed() (`_BrownianNoise`); step_hook also runs on the midpoint, as for Heun."""
    dtype, n = x.dtype, len(schedule)
    sig = schedule.sigmas
    if n == 0:
        return x
    mid_timesteps = sde_midpoint_timesteps(sig)
    span = _full_sde_sigmas(schedule)
    noise = _BrownianNoise(x, span[span > 0].min().item(), span.max().item(), _tree_seeds(generator))
    for i in range(n):
        sigma, sigma_next, xf, x0, d = _euler_slope(denoiser, x, schedule, i)
        if sigma_next == 0:
            x = (xf + d * (sigma_next - sigma)).to(dtype)
        else:
            t, t_next = sigma.log().neg(), sigma_next.log().neg()
            t_mid = t + (t_next - t) * 0.5
            x_mid = _sde_substep(xf, x0, t, t_mid, noise, eta).to(dtype)
            if step_hook is not None:
                x_mid = step_hook(i, x_mid)
            x0 = denoiser(x_mid, t_mid.neg().exp(), mid_timesteps[i].to(x.device))
            x = _sde_substep(xf, x0, t, t_next, noise, eta).to(dtype)
        x = _after_step(i, n, x, x0, step_hook, callback)
    return x


def sample_dpmpp_3m_sde(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                        callback: Callback | None = None, step_hook: StepHook | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    (k-diffusion `sample_dpmpp_3m_sde`, eta = 1), VE form of `multistep_dpm_solver_third_order_update`; order 1 on
    the slice's first and the schedule's last step, 2 on the slice's second and (under 15 steps) the schedule's
    second-to-last step, else 3; a float32 z from `generator` every step, as the 2M SDE.  eta as k-diffusion's
    (its `h_eta = h (eta + 1)` in place of 2h in every D term, e^-(eta h) on x, sqrt(1 - e^-(2 eta h)) on z)."""
    dtype, n = x.dtype, len(schedule)
    sig = schedule.sigmas
    x0s: list[torch.Tensor] = []
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        x0 = denoiser(x, sigma, schedule.timesteps[i].to(x.device))
        xf = x.float()
        z = randn(x.shape, generator, x.device, torch.float32)
        x0s = (x0s + [x0])[-3:]
        step = schedule.offset + i
        order = 1 if i == 0 or step == schedule.total - 1 else \
            2 if i == 1 or (step == schedule.total - 2 and schedule.total < 15) else 3
        if sigma_next == 0:
            x_next = x0  # h = inf
        else:
            h = _lam(sigma_next) - _lam(sigma)
            h_eta = h * (eta + 1.0)  # 2h at eta = 1
            e2h = torch.exp(-h_eta)
            x_next = (sigma_next / sigma * torch.exp(-h * eta)) * xf + (1.0 - e2h) * x0 \
                + sigma_next * torch.sqrt(1.0 - torch.exp(-2.0 * h * eta)) * z
            if order >= 2:
                r0 = (_lam(sigma) - _lam(sig[i - 1])) / h
                d1_0 = (x0 - x0s[-2]) / r0
                if order == 2:
                    x_next = x_next + 0.5 * (1.0 - e2h) * d1_0
                else:
                    r1 = (_lam(sig[i - 1]) - _lam(sig[i - 2])) / h
                    d1_1 = (x0s[-2] - x0s[-3]) / r1
                    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    x_next = x_next + ((1.0 - e2h) / (-h_eta) + 1.0) * d1 \
                        + ((1.0 - e2h - h_eta) / h_eta ** 2 - 0.5) * d2
        x = _after_step(i, n, x_next.to(dtype), x0, step_hook, callback)
    return x


def _unipc_corrector_weights(rk: torch.Tensor | None, hh: torch.Tensor, b_h: torch.Tensor) -> torch.Tensor:
    """rho_c of UniC-p (Zhao et al. 2023, Alg. 2, B(h) = e^h - 1 "bh2"): 1/2 for p = 1; for p = 2 the solution of
    R rho = b, R = [[1, 1], [r1, 1]], b_k = k! phi_{k+1}(hh) / B(h) (diffusers `multistep_uni_c_bh_update`)."""
    if rk is None:
        return torch.tensor([0.5], dtype=torch.float32)
    phi = torch.expm1(hh) / hh - 1  # h * phi_2 in diffusers' normalisation
    b1 = phi / b_h
    phi = phi / hh - 0.5
    b2 = phi * 2 / b_h
    rks = torch.stack([rk, torch.ones((), dtype=rk.dtype)])
    R = torch.stack([torch.ones_like(rks), rks])
    return torch.linalg.solve(R, torch.stack([b1, b2]))


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
                 callback: Callback | None = None, step_hook: StepHook | None = None) -> torch.Tensor:
    """UniPC, data prediction, B(h) = e^h - 1 (Zhao et al. 2023) at diffusers UniPCMultistepScheduler's defaults.

    Step i evaluates x0 at the current sample; for i > 0 the corrector UniC recomputes the current sample from
    the previous one with the new x0 (the handed-out sample, hooked or not, enters only through that evaluation,
    as in diffusers); then the predictor UniP of order min(2, steps left, i + 1) moves to sigma_next."""
    dtype, n = x.dtype, len(schedule)
    sig = schedule.sigmas
    x0s: list[torch.Tensor] = []
    prev_sample = None  # input of the previous predictor (diffusers `last_sample`)
    prev_order = 0
    for i in range(n):
        sigma, sigma_next = sig[i], sig[i + 1]
        x0 = denoiser(x, sigma, schedule.timesteps[i].to(x.device))

        if i > 0:  # UniC corrector, from sig[i-1] to sig[i], of the previous predictor's order
            h = _lam(sigma) - _lam(sig[i - 1])
            hh = -h
            b_h = torch.expm1(hh)
            m0 = x0s[-1]
            rk = d1 = None
            if prev_order == 2:
                rk = (_lam(sig[i - 2]) - _lam(sig[i - 1])) / h
                d1 = (x0s[-2] - m0) / rk
            rhos = _unipc_corrector_weights(rk, hh, b_h)
            corr = rhos[-1] * (x0 - m0)
            if d1 is not None:
                corr = rhos[0] * d1 + corr
            x = sigma / sig[i - 1] * prev_sample - torch.expm1(hh) * m0 - b_h * corr
        x0s = (x0s + [x0])[-2:]

        order = min(2, schedule.total - (schedule.offset + i), i + 1)
        xf = x.float()
        prev_sample, prev_order = xf, order
        if sigma_next == 0:
            x_next = x0  # h = inf: (0 / sigma) x - (e^-inf - 1) x0
        else:  # UniP predictor, from sigma to sigma_next
            h = _lam(sigma_next) - _lam(sigma)
            hh = -h
            b_h = torch.expm1(hh)
            x_next = sigma_next / sigma * xf - torch.expm1(hh) * x0
            if order == 2:
                rk = (_lam(sig[i - 1]) - _lam(sigma)) / h
                x_next = x_next - b_h * (0.5 * ((x0s[-2] - x0) / rk))  # rho_p = 1/2 for order 2
        x = _after_step(i, n, x_next.to(dtype), x0, step_hook, callback)
    return x


def sample_lcm(denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
               callback: Callback | None = None, step_hook: StepHook | None = None) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 3) as diffusers scheduling_lcm.py: the
    consistency function f = c_skip x_vp + c_out x0 with the boundary scalings at timestep t (sigma_data 0.5,
    timestep_scaling 10: c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25)); then fresh
    float32 noise to the next level, x_next = f + sigma_next z (VE form), on every step but the full schedule's last."""
    dtype, n = x.dtype, len(schedule)
    sigma_data, timestep_scaling = 0.5, 10.0  # LCMScheduler get_scalings_for_boundary_condition_discrete
    for i in range(n):
        sigma, sigma_next, t = schedule.sigmas[i], schedule.sigmas[i + 1], schedule.timesteps[i]
        x0 = denoiser(x, sigma, t.to(x.device))
        scaled_t = t.item() * timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2) ** 0.5
        f = c_out * x0 + c_skip * (x.float() / (sigma**2 + 1) ** 0.5)
        if schedule.offset + i < schedule.total - 1:
            f = f + sigma_next * randn(x.shape, generator, x.device, torch.float32)
        x = _after_step(i, n, f.to(dtype), x0, step_hook, callback)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler, "euler_a": sample_euler_ancestral, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m, "dpmpp_2m_sde_karras": sample_dpmpp_2m_sde,  # Karras: only the schedule differs
    "ddim": sample_ddim, "unipc": sample_unipc, "dpmpp_sde_karras": sample_dpmpp_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde, "dpmpp_3m_sde_karras": sample_dpmpp_3m_sde, "lcm": sample_lcm,
}


# The eta each noise-adding sampler uses by default (k-diffusion's ancestral / SDE samplers: 1, A1111's
# `eta_ancestral`; DDIM: 0, the SDXL pipeline's and A1111's `eta_ddim`); the others take no eta.
ETA_DEFAULTS = {"euler_a": 1.0, "ddim": 0.0, "dpmpp_2m_sde_karras": 1.0, "dpmpp_sde_karras": 1.0,
                "dpmpp_3m_sde": 1.0, "dpmpp_3m_sde_karras": 1.0}
# Karras et al. 2022 Alg. 2's churn options and their no-churn values (diffusers EulerDiscreteScheduler.step's)
CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
CHURN_SAMPLERS = ("euler",)


def check_sampler_options(name: str, eta: float | None = None, **churn: float) -> None:
    """ValueError naming the option when `name` cannot apply it: eta on a sampler that adds no noise, churn on
    one other than Euler (or s_tmin / s_tmax / s_noise without s_churn > 0, where they do nothing); eta outside
    [0, 1], negative churn or noise, s_tmin > s_tmax."""
    unknown = sorted(set(churn) - set(CHURN_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown sampler option(s) {', '.join(unknown)}; expected eta, {', '.join(CHURN_DEFAULTS)}")
    if eta is not None:
        if name not in ETA_DEFAULTS:
            raise ValueError(f"eta: the {name} sampler adds no noise, so it has no eta; samplers that take eta: "
                             f"{', '.join(ETA_DEFAULTS)}")
        if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    given = {k: v for k, v in churn.items() if v != CHURN_DEFAULTS[k]}
    for key, value in churn.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    if given and name not in CHURN_SAMPLERS:
        raise ValueError(f"{', '.join(given)}: the {name} sampler has no churn; samplers that take "
                         f"{', '.join(CHURN_DEFAULTS)}: {', '.join(CHURN_SAMPLERS)}")
    if not math.isfinite(churn.get("s_churn", 0.0)) or not math.isfinite(churn.get("s_noise", 1.0)) \
            or not math.isfinite(churn.get("s_tmin", 0.0)):
        raise ValueError("s_churn, s_noise and s_tmin must be finite (s_tmax may be infinite)")
    if given.keys() - {"s_churn"} and not churn.get("s_churn"):
        raise ValueError(f"{', '.join(sorted(given.keys() - {'s_churn'}))}: shape the churn, which is off; give "
                         f"s_churn > 0 too")
    if churn.get("s_tmin", 0.0) > churn.get("s_tmax", math.inf):
        raise ValueError(f"s_tmin {churn['s_tmin']:g} is above s_tmax {churn['s_tmax']:g}: no step would churn")


def sample(name: str, denoiser: Denoiser, x: torch.Tensor, schedule: Schedule, *, generator=None,
           callback: Callback | None = None, step_hook: StepHook | None = None, eta: float | None = None,
           **churn: float) -> torch.Tensor:
    """Run the sampler `name` (one of `schedules.SAMPLER_NAMES`) over `schedule`; see the module docstring.
    `eta` (None: the sampler's `ETA_DEFAULTS`) and `churn` (s_churn, s_tmin, s_tmax, s_noise) are checked by
    `check_sampler_options`; options at their defaults change nothing, bit for bit."""
    try:
        fn = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}") from None
    check_sampler_options(name, eta, **churn)
    options = {k: v for k, v in churn.items() if v != CHURN_DEFAULTS[k]}
    if eta is not None:
        options["eta"] = float(eta)
    return fn(denoiser, x, schedule, generator=generator, callback=callback, step_hook=step_hook, **options)
