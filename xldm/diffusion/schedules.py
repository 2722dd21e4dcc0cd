"""Noise schedules: which noise levels a sampler visits, equal to the diffusers schedulers at SDXL's settings.

In VE (k-diffusion) terms a latent at noise level sigma is `x = x0 + sigma * eps` and the network sees
`x / sqrt(sigma^2 + 1)`, which diffusers' VP schedulers (DDIM, DPM-Solver, UniPC) keep as `x_vp`: same trajectory.
SDXL's hub `scheduler/scheduler_config.json`: scaled_linear betas 0.00085..0.012 over 1000 steps,
timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False; every other scheduler
is `X.from_config(that config, **extra)`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xldm.config import PREDICTION_TYPES

SAMPLER_NAMES = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "ddim", "unipc",
                 "dpmpp_sde_karras", "dpmpp_3m_sde", "dpmpp_3m_sde_karras", "lcm")
# diffusers `timestep_spacing` (Lin et al. 2023, Table 2): which of the 1000 training timesteps a schedule visits
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# the samplers whose schedule no spacing changes (make_schedule: Karras sigmas between the training extremes, LCM's
# distillation grid; diffusers ignores `timestep_spacing` for them too)
SPACING_FREE_SAMPLERS = frozenset({"dpmpp_2m_karras", "dpmpp_2m_sde_karras", "dpmpp_3m_sde_karras", "lcm"})

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # SDXL scheduler_config.json
STEPS_OFFSET = 1  # SDXL scheduler_config.json (class default 0)
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5
LCM_ORIGINAL_STEPS = 50  # diffusers LCMScheduler original_inference_steps (class default)
ZTSNR_LAST_ALPHA_CUMPROD = 2.0**-24  # diffusers Euler/DPM/UniPC with rescale_betas_zero_snr: finite last sigma


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift and scale sqrt(abar) so the last is 0 and the first unchanged (diffusers
    scheduling_ddim.py `rescale_zero_terminal_snr`, float32 op for op)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt -= last
    abar_sqrt *= first / (first - last)
    abar = abar_sqrt**2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


def alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END, *, zero_terminal_snr: bool = False) -> torch.Tensor:
    """alpha-bar_t of "scaled_linear", float32 as diffusers: cumprod(1 - linspace(sqrt(b0), sqrt(b1), T)**2).
    `zero_terminal_snr`: the betas rescaled (`rescale_betas_zero_snr=True`), the last abar 0 raised to 2**-24 as
    diffusers' Euler/DPM-Solver/UniPC do (DDIM keeps 0; the VE samplers need a finite sigma)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if zero_terminal_snr:
        betas = _rescale_zero_terminal_snr(betas)
    acp = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        acp[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    return acp


def train_sigmas(zero_terminal_snr: bool = False) -> np.ndarray:
    """VE noise level of every training timestep, sqrt((1 - abar) / abar), float32 (index = timestep)."""
    acp = alphas_cumprod(zero_terminal_snr=zero_terminal_snr)
    return (((1 - acp) / acp) ** 0.5).numpy()


@dataclass(frozen=True)
class Schedule:
    """Step i goes from sigmas[i] to sigmas[i+1], evaluating the network at timesteps[i].  A slice (refiner split,
    img2img start) keeps `offset` (index of sigmas[0] in the full schedule) and `total` (the full step count),
    which the multistep solvers' final-step order rules need."""

    sigmas: torch.Tensor  # (n+1,) float32
    timesteps: torch.Tensor  # (n,) float32
    init_noise_sigma: float  # scale of the initial noise for the full schedule, in VE terms
    offset: int = 0
    total: int = 0  # 0 means "this schedule is the full one"

    def __post_init__(self) -> None:
        if self.sigmas.ndim != 1 or self.timesteps.ndim != 1 or len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError(f"expected sigmas (n+1,) and timesteps (n,), got {tuple(self.sigmas.shape)} "
                             f"and {tuple(self.timesteps.shape)}")
        if self.total == 0:
            object.__setattr__(self, "total", self.offset + len(self.timesteps))
        if self.offset < 0 or self.offset + len(self.timesteps) > self.total:
            raise ValueError(f"slice [{self.offset}, {self.offset + len(self.timesteps)}) lies outside a "
                             f"schedule of {self.total} steps")

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def ends_schedule(self) -> bool:
        """True when the last step of this slice is the last step of the full schedule."""
        return self.offset + len(self) == self.total

    def head(self, k: int) -> "Schedule":
        """The first k steps (the base model's part with `denoising_end`): sigmas[:k+1]."""
        self._check_cut(k)
        return Schedule(self.sigmas[: k + 1], self.timesteps[:k], self.init_noise_sigma, self.offset, self.total)

    def tail(self, k: int) -> "Schedule":
        """Steps k.. (the refiner with `denoising_start`, or img2img from t_start): sigmas[k:]."""
        self._check_cut(k)
        return Schedule(self.sigmas[k:], self.timesteps[k:], self.init_noise_sigma, self.offset + k, self.total)

    def _check_cut(self, k: int) -> None:
        if not 0 <= k <= len(self):
            raise ValueError(f"cannot cut a schedule of {len(self)} steps at step {k}")


def _leading_timesteps(num_steps: int, grid: int) -> np.ndarray:
    """diffusers "leading" spacing: multiples of T // grid, descending, + steps_offset.  Euler/Heun/DDIM: grid = N
    (N=50 -> 981..1); DPM-Solver/UniPC build N+1 points and drop the last (grid = N + 1; N=25 -> 951..39)."""
    ratio = NUM_TRAIN_TIMESTEPS // grid
    return (np.arange(grid - num_steps, grid) * ratio).round()[::-1].astype(np.int64) + STEPS_OFFSET


def _spaced_timesteps(spacing: str, num_steps: int, *, extra_point: bool, integer: bool) -> np.ndarray:
    """The descending timesteps of `timestep_spacing` as each diffusers scheduler's set_timesteps computes them.
    leading: `_leading_timesteps`; trailing: round(arange(T, 0, -T/N)) - 1 (N=1: 999); linspace: linspace(0, T-1,
    N) reversed, fractional for Euler/EulerAncestral/Heun (`integer=False`), rounded for DDIM, and with N+1
    points, the last dropped, for DPMSolverMultistep/UniPC (`extra_point`)."""
    if spacing == "leading":
        return _leading_timesteps(num_steps, num_steps + extra_point)
    if spacing == "trailing":
        return np.arange(NUM_TRAIN_TIMESTEPS, 0, -NUM_TRAIN_TIMESTEPS / num_steps).round().astype(np.int64) - 1
    if extra_point:
        return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    ts = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, num_steps, dtype=np.float32)[::-1]
    return ts.round().astype(np.int64) if integer else ts.copy()


def _lcm_timesteps(num_steps: int) -> np.ndarray:
    """diffusers LCMScheduler.set_timesteps (strength 1): the distillation grid k*i - 1 (k = T // 50, i = 1..50),
    descending, at floor(linspace(0, 50, N, endpoint=False)) (N=4: 999, 759, 499, 259)."""
    if num_steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"lcm takes at most {LCM_ORIGINAL_STEPS} steps (its distillation grid), got {num_steps}")
    k = NUM_TRAIN_TIMESTEPS // LCM_ORIGINAL_STEPS
    grid = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1]
    return grid[np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, num=num_steps, endpoint=False)).astype(np.int64)]


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolated in log-sigma (diffusers `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


def _build(sigmas: np.ndarray, timesteps: np.ndarray, *, noise_at_max_sigma: bool = False) -> Schedule:
    sig = torch.from_numpy(np.asarray(sigmas).astype(np.float32))
    # init_noise_sigma = sqrt(max(sigmas)^2 + 1) (diffusers EulerDiscreteScheduler, "leading"); the VP schedulers'
    # unit-variance x_vp = noise is x_ve = noise * sqrt(sigma_0^2 + 1): the same value.  Euler/EulerAncestral/Heun
    # with "trailing" or "linspace" start at max(sigmas) instead (their `init_noise_sigma`): `noise_at_max_sigma`.
    init = sig.max() if noise_at_max_sigma else (sig.max() ** 2 + 1) ** 0.5
    return Schedule(sig, torch.from_numpy(np.asarray(timesteps).astype(np.float32)), float(init))


def _sde_karras_schedule(num_steps: int, table: np.ndarray, spacing: str) -> Schedule:
    """DPMSolverSDEScheduler(use_karras_sigmas=True).set_timesteps (scheduling_dpmsolver_sde.py, set_timesteps):
    Karras sigmas between the table sigmas at the ends of the spaced grid (leading, N=10: timesteps 901 and 1, not
    the training extremes; trailing: 999 and T/N - 1), fractional timesteps (`_sigma_to_t`, unrounded), final
    sigma 0; the first noise is max(sigmas) for trailing / linspace (its `init_noise_sigma`).  The midpoint
    evaluations' timesteps: `sde_midpoint_timesteps`."""
    ends = np.interp(_spaced_timesteps(spacing, num_steps, extra_point=False, integer=False),
                     np.arange(len(table)), table)
    min_inv, max_inv = float(ends[-1]) ** (1 / KARRAS_RHO), float(ends[0]) ** (1 / KARRAS_RHO)
    sig = (max_inv + np.linspace(0, 1, num_steps) * (min_inv - max_inv)) ** KARRAS_RHO
    return _build(np.concatenate([sig, [0.0]]), _sigma_to_t(sig, np.log(table)),
                  noise_at_max_sigma=spacing != "leading")


def sde_midpoint_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """Model time of each step's midpoint sigma_mid = exp(-(lambda + lambda_next) / 2), lambda = -log sigma, for
    the steps with sigma_next > 0 (diffusers DPMSolverSDEScheduler `_second_order_timesteps`)."""
    sig = sigmas.double().numpy()
    sig = sig[sig > 0]
    t = -np.log(sig)
    mid = np.exp(-(t[:-1] + np.diff(t) * 0.5))
    return torch.from_numpy(_sigma_to_t(mid, np.log(train_sigmas())).astype(np.float32))


def make_schedule(sampler: str, num_steps: int, *, prediction_type: str = "epsilon", spacing: str = "leading",
                  zero_terminal_snr: bool = False) -> Schedule:
    """The schedule the matching diffusers scheduler builds from SDXL's config (with `timestep_spacing=spacing`,
    `rescale_betas_zero_snr=zero_terminal_snr`) and `set_timesteps(num_steps)`.

    euler, euler_a, heun (Euler/EulerAncestral/HeunDiscrete): T//N leading grid (N=50: 981..1), table sigmas
    (interpolated at linspace's fractional timesteps), final 0.
    ddim: the same grid; the last step lands on abar_0 (set_alpha_to_one=False), sigma 0.0292, not 0.
    dpmpp_2m, dpmpp_3m_sde, unipc: T//(N+1) leading grid (DPMSolverMultistep / UniPCMultistep), final sigma 0.
    dpmpp_sde_karras: DPMSolverSDEScheduler's own Karras schedule between the spaced grid's ends
    (`_sde_karras_schedule`).
    *_karras: Karras sigmas between the training extremes (use_karras_sigmas=True), timesteps rounded from
    log-sigma interpolation, final sigma 0; no spacing applies (diffusers ignores it too).
    lcm (LCMScheduler): its own distillation grid (`_lcm_timesteps`), no spacing, final sigma 0.
    `prediction_type` changes none of these; it is only checked."""
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(TIMESTEP_SPACINGS)}")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be an int in [1, {NUM_TRAIN_TIMESTEPS}], got {num_steps!r}")

    table = train_sigmas(zero_terminal_snr)
    if sampler in ("euler", "euler_a", "heun"):
        ts = _spaced_timesteps(spacing, num_steps, extra_point=False, integer=False)
        sig = np.interp(ts, np.arange(len(table)), table)  # diffusers np.interp: the table itself at integers
        return _build(np.concatenate([sig, [0.0]]), ts, noise_at_max_sigma=spacing != "leading")
    if sampler == "ddim":
        ts = _spaced_timesteps(spacing, num_steps, extra_point=False, integer=True)
        # DDIMScheduler.step goes from t to t - T // N, whatever the spacing (abar_0 below 0): the next timestep
        # only on an evenly spaced grid, which a Schedule (step i ends where step i + 1 starts) needs.
        prev = ts - NUM_TRAIN_TIMESTEPS // num_steps
        if not np.array_equal(np.maximum(prev[:-1], -1), ts[1:]):
            raise ValueError(f"ddim with {spacing!r} spacing at {num_steps} steps: diffusers' DDIM steps from "
                             f"{ts[0]} to {prev[0]}, not to the next timestep {ts[1]}; use leading spacing or a "
                             f"step count that divides {NUM_TRAIN_TIMESTEPS}")
        last = table[max(int(prev[-1]), 0)]  # final_alpha_cumprod = alphas_cumprod[0] below t = 0
        return _build(np.concatenate([table[ts], [last]]), ts)
    if sampler == "dpmpp_sde_karras":
        return _sde_karras_schedule(num_steps, table, spacing)
    if sampler in ("dpmpp_2m", "dpmpp_3m_sde", "unipc"):
        ts = _spaced_timesteps(spacing, num_steps, extra_point=True, integer=True)
        return _build(np.concatenate([table[ts], [0.0]]), ts)
    if sampler == "lcm":
        ts = _lcm_timesteps(num_steps)
        return _build(np.concatenate([table[ts], [0.0]]), ts)
    # Karras variants (DPMSolverMultistepScheduler(use_karras_sigmas=True)): Karras et al. 2022, eq. 5 (rho = 7),
    # float64 as in diffusers `_convert_to_karras`, from sigma_min = table[0] to sigma_max = table[-1].
    min_inv, max_inv = float(table[0]) ** (1 / KARRAS_RHO), float(table[-1]) ** (1 / KARRAS_RHO)
    sig = (max_inv + np.linspace(0, 1, num_steps) * (min_inv - max_inv)) ** KARRAS_RHO
    ts = _sigma_to_t(sig, np.log(table)).round()
    return _build(np.concatenate([sig, [0.0]]), ts)


def split_for_refiner(num_steps: int, fraction: float, sampler: str = "euler", spacing: str = "leading") -> int:
    """Base steps when the base hands over at `fraction` (ensemble of experts): diffusers
    pipeline_stable_diffusion_xl.py:1178, cutoff = int(round(T - fraction * T)); the base runs the timesteps >=
    cutoff (`denoising_end`), the refiner the rest.  Depends on the sampler's timesteps (Karras ones differ)."""
    if isinstance(fraction, bool) or not isinstance(fraction, float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"the hand-off fraction must be a float strictly between 0 and 1, got {fraction!r}")
    cutoff = int(round(NUM_TRAIN_TIMESTEPS - fraction * NUM_TRAIN_TIMESTEPS))
    return int((make_schedule(sampler, num_steps, spacing=spacing).timesteps >= cutoff).sum())


def refiner_start(num_steps: int, fraction: float, sampler: str = "euler", spacing: str = "leading") -> int:
    """Step at which diffusers' refiner (`denoising_start=fraction`) starts: `split_for_refiner` for every
    sampler except Heun.  Heun's interleaved timestep list makes the img2img pipeline add one entry
    ("+1 if even", pipeline_stable_diffusion_xl_img2img.get_timesteps), so its refiner repeats the base's
    last step as a full Heun step on the base latents: start = base steps - 1."""
    k = split_for_refiner(num_steps, fraction, sampler, spacing)
    return max(k - 1, 0) if sampler == "heun" else k


def img2img_start(num_steps: int, strength: float) -> int:
    """First step of an img2img/SDEdit run: t_start = N - min(int(N * strength), N) (diffusers
    pipeline_stable_diffusion_xl_img2img.py:652, `get_timesteps`; int() truncates: N=100, strength=0.29 runs 28)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return max(num_steps - min(int(num_steps * strength), num_steps), 0)
