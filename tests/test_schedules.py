"""Noise schedules against the diffusers schedulers built from SDXL's scheduler config.

Timesteps must be equal; sigmas equal to float32 (max abs diff <= 1e-6, they come from the same float32
tables, so they are bit-equal in practice); init_noise_sigma in VE terms within 1e-5 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from diffusers_schedulers import DIFFUSERS_SAMPLERS, SDXL_SCHEDULER_CONFIG, VP_SAMPLERS
from xldm.diffusion.schedules import (
    SAMPLER_NAMES,
    Schedule,
    alphas_cumprod,
    img2img_start,
    make_schedule,
    refiner_start,
    sde_midpoint_timesteps,
    split_for_refiner,
    train_sigmas,
)

SIGMA_TOL = 1e-6  # float32 tables on both sides
STEP_COUNTS = (1, 4, 25, 30, 50, 100)


def diffusers_scheduler(name: str, num_steps: int):
    cls, extra = DIFFUSERS_SAMPLERS[name]
    euler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    sched = cls.from_config(euler.config, **extra)
    sched.set_timesteps(num_steps)
    return sched


def interleave_heun(values: torch.Tensor, *, sigmas: bool) -> torch.Tensor:
    """HeunDiscreteScheduler repeats every entry but the first (and, for sigmas, the final 0)."""
    if sigmas:
        return torch.cat([values[:1], values[1:-1].repeat_interleave(2), values[-1:]])
    return torch.cat([values[:1], values[1:].repeat_interleave(2)])


def test_alphas_cumprod_bit_equal_to_diffusers():
    ours = alphas_cumprod()
    ref = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG).alphas_cumprod
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_schedule_matches_diffusers(name: str, num_steps: int):
    if name == "lcm" and num_steps > 50:
        pytest.skip("LCMScheduler takes at most original_inference_steps = 50 steps (tests/test_few_step.py)")
    ours = make_schedule(name, num_steps)
    ref = diffusers_scheduler(name, num_steps)
    assert len(ours) == num_steps and ours.offset == 0 and ours.total == num_steps
    assert ours.sigmas.dtype == torch.float32 and ours.timesteps.dtype == torch.float32
    timesteps, sigmas = ours.timesteps, ours.sigmas
    if name == "heun":
        timesteps, sigmas = interleave_heun(timesteps, sigmas=False), interleave_heun(sigmas, sigmas=True)
    if name == "dpmpp_sde_karras":  # [t0, mid0, t1, mid1, ..., t_{N-1}]; sigmas interleaved as Heun's
        mids = sde_midpoint_timesteps(sigmas)
        assert len(mids) == num_steps - 1
        assert torch.allclose(mids.double(), ref.timesteps[1::2], rtol=0, atol=1e-4)  # from float32 sigmas
        timesteps, sigmas = ref.timesteps.to(torch.float32).clone(), interleave_heun(sigmas, sigmas=True)
        assert torch.equal(ours.timesteps, timesteps[0::2])
    assert torch.equal(timesteps, ref.timesteps.to(torch.float32))
    if name == "ddim":  # DDIM keeps alphas_cumprod: sigma_i = sqrt((1 - abar_t) / abar_t), last abar = abar_0
        acp = ref.alphas_cumprod
        idx = ref.timesteps.tolist()
        last = ref.final_alpha_cumprod.reshape(1)
        ref_sigmas = torch.cat([((1 - acp[idx]) / acp[idx]) ** 0.5, ((1 - last) / last) ** 0.5])
    elif name == "lcm":  # LCMScheduler has no sigmas: the table at its timesteps, then the clean sample
        acp = ref.alphas_cumprod[ref.timesteps]
        ref_sigmas = torch.cat([((1 - acp) / acp) ** 0.5, torch.zeros(1)])
    else:
        ref_sigmas = ref.sigmas
    assert (sigmas - ref_sigmas).abs().max().item() <= SIGMA_TOL
    # init_noise_sigma in VE terms: Euler family equals diffusers' value; the VP schedulers start from unit
    # variance x_vp, i.e. x_ve = noise / sqrt(abar_t0) = noise * sqrt(sigma_0^2 + 1).
    if name in VP_SAMPLERS:
        assert float(ref.init_noise_sigma) == 1.0
        expected = math.sqrt(float(ours.sigmas[0]) ** 2 + 1)
    else:
        expected = float(ref.init_noise_sigma)
    assert abs(ours.init_noise_sigma - expected) <= 1e-5 * expected


def test_sdxl_spec_examples():
    s = make_schedule("euler", 50)
    assert s.timesteps[0].item() == 981.0 and s.timesteps[-1].item() == 1.0
    assert abs(s.init_noise_sigma - 13.158469) < 1e-5  # sqrt(sigma_max^2 + 1), not the training max 14.6146
    s30 = make_schedule("euler", 30)
    assert s30.timesteps[0].item() == 958.0 and s30.timesteps[-1].item() == 1.0
    assert s30.sigmas[-1].item() == 0.0
    ddim = make_schedule("ddim", 50)
    assert abs(ddim.sigmas[-1].item() - 0.0291675) < 1e-6  # set_alpha_to_one=False
    sde = make_schedule("dpmpp_sde_karras", 10)  # Karras between the sigmas at timesteps 901 and 1
    assert abs(sde.sigmas[0].item() - train_sigmas()[901]) < 1e-6 and sde.timesteps[0].item() == 901.0
    assert abs(sde.sigmas[-2].item() - train_sigmas()[1]) < 1e-6 and abs(sde.timesteps[-1].item() - 1.0) < 1e-3
    karras = make_schedule("dpmpp_2m_karras", 25)
    assert karras.timesteps[0].item() == 999.0 and abs(karras.sigmas[0].item() - 14.614642) < 1e-5


@pytest.mark.parametrize(("num_steps", "fraction", "base_steps"),
                         [(40, 0.8, 32), (50, 0.8, 40), (25, 0.8, 20), (30, 0.7, 20)])
def test_split_for_refiner_spec_examples(num_steps: int, fraction: float, base_steps: int):
    assert split_for_refiner(num_steps, fraction) == base_steps


@pytest.mark.parametrize("fraction", [0.5, 0.7, 0.8, 0.93])
@pytest.mark.parametrize("num_steps", [4, 25, 30])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_split_for_refiner_matches_diffusers_rule(name: str, num_steps: int, fraction: float):
    """Base: len(t >= cutoff) (txt2img `denoising_end`); refiner: t_start of img2img `get_timesteps`."""
    ref = diffusers_scheduler(name, num_steps)
    cutoff = int(round(1000 - fraction * 1000))
    base_entries = len([t for t in ref.timesteps if t >= cutoff])
    n_ref = int((ref.timesteps < cutoff).sum())
    if ref.order == 2 and n_ref % 2 == 0:
        n_ref += 1
    t_start = len(ref.timesteps) - n_ref
    k = split_for_refiner(num_steps, fraction, name)
    if name == "heun":  # interleaved: 2k - 1 entries for k steps; refiner restarts one step early
        assert base_entries == max(2 * k - 1, 0)
        assert t_start == 2 * refiner_start(num_steps, fraction, name)
        assert refiner_start(num_steps, fraction, name) == k - 1
    elif name == "dpmpp_sde_karras":  # 2k entries: k whole steps; 2k - 1: diffusers stops at step k-1's midpoint
        assert base_entries in (2 * k - 1, 2 * k) and refiner_start(num_steps, fraction, name) == k
        assert t_start == (2 * k if base_entries == 2 * k else 2 * (k - 1))
    else:
        assert base_entries == k and t_start == k == refiner_start(num_steps, fraction, name)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1, -0.2, 1.5])
def test_split_for_refiner_rejects_non_fractions(bad):
    with pytest.raises(ValueError):
        split_for_refiner(25, bad)


@pytest.mark.parametrize(("num_steps", "strength", "start"),
                         [(100, 0.29, 72), (50, 0.3, 35), (25, 1.0, 0), (25, 0.0, 25), (30, 0.5, 15)])
def test_img2img_start(num_steps: int, strength: float, start: int):
    assert img2img_start(num_steps, strength) == start
    # the same rule as diffusers' img2img get_timesteps
    init = min(int(num_steps * strength), num_steps)
    assert start == max(num_steps - init, 0)


def test_head_tail_slices():
    s = make_schedule("dpmpp_2m", 30)
    head, tail = s.head(20), s.tail(20)
    assert len(head) == 20 and len(tail) == 10
    assert torch.equal(head.sigmas, s.sigmas[:21]) and torch.equal(tail.sigmas, s.sigmas[20:])
    assert torch.equal(head.timesteps, s.timesteps[:20]) and torch.equal(tail.timesteps, s.timesteps[20:])
    assert head.sigmas[-1].item() == tail.sigmas[0].item() > 0
    assert (head.offset, head.total, tail.offset, tail.total) == (0, 30, 20, 30)
    assert not head.ends_schedule and tail.ends_schedule
    mid = s.tail(5).head(10)  # img2img start + refiner hand-off
    assert (mid.offset, mid.total, len(mid)) == (5, 30, 10)
    assert torch.equal(mid.sigmas, s.sigmas[5:16])
    assert mid.tail(3).offset == 8
    with pytest.raises(ValueError):
        s.head(31)
    with pytest.raises(ValueError):
        s.tail(-1)


def test_schedule_validation_and_defaults():
    s = Schedule(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([900.0, 500.0]), 2.236)
    assert s.total == 2 and s.offset == 0 and s.ends_schedule
    with pytest.raises(ValueError):
        Schedule(torch.tensor([2.0, 0.0]), torch.tensor([900.0, 500.0]), 1.0)
    with pytest.raises(ValueError):
        make_schedule("lms", 10)
    with pytest.raises(ValueError):
        make_schedule("euler", 0)
    with pytest.raises(ValueError):
        make_schedule("euler", 10, prediction_type="sample")


def test_karras_timesteps_are_rounded_log_sigma_interpolation():
    """Independent check of the Karras table: timesteps are round(t(sigma)) with t linear in log sigma."""
    s = make_schedule("dpmpp_2m_karras", 10)
    acp = alphas_cumprod().double()
    log_table = (((1 - acp) / acp) ** 0.5).log().numpy()
    for sigma, t in zip(s.sigmas[:-1].double().numpy(), s.timesteps.numpy()):
        t_exact = np.interp(np.log(sigma), log_table, np.arange(1000))
        assert abs(t - round(t_exact)) <= 1
