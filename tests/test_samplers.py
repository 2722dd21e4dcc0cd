"""Samplers against the diffusers schedulers, driven the way the SDXL pipelines drive them.

A deterministic fake network f(x_in, t) (a fixed random 1x1 convolution through tanh, plus a smooth
per-channel function of t) runs (a) through the real diffusers loop (latents = randn * init_noise_sigma;
for t: scale_model_input, f, step(..., generator)) and (b) through `xldm.diffusion.samplers.sample`.
Tolerance: max abs diff <= 1e-4 * max(1, max |reference|) (fp32, CPU).  The Euler-family samplers work in
the same VE coordinates as diffusers; DDIM, DPM-Solver and UniPC work in VP coordinates in diffusers, so
the arithmetic differs at ~1e-6 there (VP latents are compared after x_vp = x / sqrt(sigma^2 + 1)).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffusers_schedulers import DIFFUSERS_SAMPLERS, SDXL_SCHEDULER_CONFIG, VP_SAMPLERS
from xldm.diffusion import noise as noise_lib
from xldm.diffusion.denoiser import Denoiser
from xldm.diffusion.samplers import SAMPLERS, sample
from xldm.diffusion.schedules import (
    SAMPLER_NAMES,
    Schedule,
    alphas_cumprod,
    img2img_start,
    make_schedule,
    refiner_start,
    split_for_refiner,
)

REL_TOL = 1e-4  # max abs diff relative to max(1, scale of the reference latents)
SHAPE = (1, 4, 8, 8)
STOCHASTIC = ("euler_a", "dpmpp_2m_sde_karras", "dpmpp_sde_karras", "dpmpp_3m_sde", "dpmpp_3m_sde_karras", "lcm")
TREE_NOISE = ("dpmpp_sde_karras",)  # diffusers seeds its Brownian tree with noise_sampler_seed; xldm with the seed


class FakeNetwork:
    """A deterministic stand-in for the UNet that depends on both x_in and t and keeps latents O(1):

    f(x_in, t) = c * sqrt(1 - abar(t)) * x_in + 0.3 tanh(W x_in) + 0.2 sin(t / 170 + phase_c)

    with c = 1 for epsilon (the ideal noise prediction for unit-variance data, so x0 stays bounded) and
    c = 0 for v (whose ideal value there is 0); W is a fixed random 1x1 convolution."""

    def __init__(self, prediction_type: str = "epsilon", channels: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, channels, generator=g) / channels**0.5
        self.phase = torch.rand(channels, generator=g) * 6.0
        self.linear = 1.0 if prediction_type == "epsilon" else 0.0
        self.abar = alphas_cumprod()

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).float()
        sigma_vp = (1 - self.abar[t.round().long().clamp(0, 999)]) ** 0.5
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x_in)
        bias = torch.sin(t / 170 + self.phase)[None, :, None, None]
        return self.linear * sigma_vp * x_in + 0.3 * torch.tanh(mixed) + 0.2 * bias


def diffusers_scheduler(name: str, num_steps: int, prediction_type: str = "epsilon", seed=None):
    cls, extra = DIFFUSERS_SAMPLERS[name]
    if name in TREE_NOISE:
        extra = {**extra, "noise_sampler_seed": seed}
    euler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG, prediction_type=prediction_type)
    sched = cls.from_config(euler.config, **extra)
    sched.set_timesteps(num_steps)
    return sched


def set_begin(sched, index: int) -> None:
    if hasattr(sched, "set_begin_index"):  # the pipelines' guard (DDIM has no step index)
        sched.set_begin_index(index)


def diffusers_loop(sched, net, latents, timesteps, generator, hook=None):
    """The body of StableDiffusionXLPipeline's denoising loop (no CFG), plus the 4-channel inpaint blend."""
    extra = {}
    if "generator" in sched.step.__code__.co_varnames:
        extra["generator"] = generator
    if "eta" in sched.step.__code__.co_varnames:
        extra["eta"] = 0.0
    for i, t in enumerate(timesteps):
        x_in = sched.scale_model_input(latents, t)
        latents = sched.step(net(x_in, t), t, latents, **extra, return_dict=False)[0]
        if hook is not None:
            latents = hook(sched, i, timesteps, latents)
    return latents


OURS = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers' prediction_type names -> xldm's


def ours(name: str, schedule: Schedule, net, x, generator, prediction_type="epsilon", **kw):
    return sample(name, Denoiser(OURS[prediction_type], net), x, schedule, generator=generator, **kw)


def to_vp(name: str, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Our VE sample in diffusers' coordinates (VP for DDIM/DPM-Solver/UniPC)."""
    return x / ((sigma**2 + 1) ** 0.5) if name in VP_SAMPLERS else x


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    diff = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert diff <= REL_TOL * scale, f"max abs diff {diff:.3e} > {REL_TOL} * {scale:.3f}"
    return diff


def gens(seeds):
    if isinstance(seeds, list):
        return [torch.Generator().manual_seed(s) for s in seeds]
    return torch.Generator().manual_seed(seeds)


def run_both(name: str, num_steps: int, prediction_type="epsilon", seed=0, shape=SHAPE):
    net = FakeNetwork(prediction_type)
    ref_sched = diffusers_scheduler(name, num_steps, prediction_type, seed)
    set_begin(ref_sched, 0)  # as StableDiffusionXLPipeline does
    g_ref = gens(seed)
    latents = randn_tensor(shape, generator=g_ref, dtype=torch.float32) * ref_sched.init_noise_sigma
    ref = diffusers_loop(ref_sched, net, latents, ref_sched.timesteps, g_ref)

    schedule = make_schedule(name, num_steps, prediction_type=OURS[prediction_type])
    g = gens(seed)
    x = noise_lib.randn(shape, g, "cpu", torch.float32) * schedule.init_noise_sigma
    out = ours(name, schedule, net, x, g, prediction_type)
    return out, ref


# --- full runs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 4, 25, 30])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_matches_diffusers_epsilon(name: str, num_steps: int):
    out, ref = run_both(name, num_steps)
    diff = assert_close(out, ref)
    if name in ("euler", "euler_a", "heun"):
        assert diff == 0.0  # same VE arithmetic as diffusers: bit-exact in fp32


@pytest.mark.parametrize("num_steps", [1, 4, 25, 30])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_matches_diffusers_v_prediction(name: str, num_steps: int):
    out, ref = run_both(name, num_steps, prediction_type="v_prediction")
    assert_close(out, ref)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_with_generator_list(name: str):
    """Batch 2 with one generator per row: noise is drawn row by row, on every step, as diffusers does."""
    out, ref = run_both(name, 12, seed=[3, 7], shape=(2, 4, 8, 8))
    assert_close(out, ref)
    solo, _ = run_both(name, 12, seed=7, shape=(1, 4, 8, 8))
    assert_close(out[1:], solo)  # row 1 only depends on its own generator


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_depend_on_seed(name: str):
    a, _ = run_both(name, 8, seed=1)
    b, _ = run_both(name, 8, seed=2)
    assert (a - b).abs().max().item() > 1e-2


# --- base -> refiner hand-off -----------------------------------------------------------------------------------


def diffusers_handoff(name, num_steps, fraction, net, shape, seed):
    """txt2img base with denoising_end, then a second scheduler instance with the img2img pipeline's
    denoising_start rule (get_timesteps + set_begin_index), the base latents passed on unchanged."""
    g = gens(seed)
    base = diffusers_scheduler(name, num_steps, seed=seed)
    set_begin(base, 0)
    latents = randn_tensor(shape, generator=g, dtype=torch.float32) * base.init_noise_sigma
    cutoff = int(round(1000 - fraction * 1000))
    n_base = len([t for t in base.timesteps if t >= cutoff])
    mid = diffusers_loop(base, net, latents, base.timesteps[:n_base], g)

    refiner = diffusers_scheduler(name, num_steps, seed=seed)
    n_ref = int((refiner.timesteps < cutoff).sum())
    if refiner.order == 2 and n_ref % 2 == 0:
        n_ref += 1
    t_start = len(refiner.timesteps) - n_ref
    set_begin(refiner, t_start)
    return mid, diffusers_loop(refiner, net, mid, refiner.timesteps[t_start:], g)


@pytest.mark.parametrize(("num_steps", "fraction"), [(25, 0.8), (30, 0.7), (4, 0.5)])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_base_refiner_handoff(name: str, num_steps: int, fraction: float):
    net, seed = FakeNetwork(), 11
    if name in TREE_NOISE and split_for_refiner(num_steps, fraction, name) * 2 - 1 == len(
            [t for t in diffusers_scheduler(name, num_steps).timesteps if t >= round(1000 - fraction * 1000)]):
        pytest.skip("diffusers' base stops at the last step's midpoint and its refiner repeats that step; "
                    "xldm hands over after whole steps")
    ref_mid, ref_out = diffusers_handoff(name, num_steps, fraction, net, SHAPE, seed)

    schedule = make_schedule(name, num_steps)
    k = split_for_refiner(num_steps, fraction, name)
    g = gens(seed)
    x = noise_lib.randn(SHAPE, g, "cpu", torch.float32) * schedule.init_noise_sigma
    mid = ours(name, schedule.head(k), net, x, g)
    assert_close(to_vp(name, mid, schedule.sigmas[k]), ref_mid)
    out = ours(name, schedule.tail(refiner_start(num_steps, fraction, name)), net, mid, g)
    assert_close(out, ref_out)


# --- img2img ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_steps", "strength"), [(25, 0.3), (30, 0.75), (4, 0.5)])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_img2img_start_matches_add_noise(name: str, num_steps: int, strength: float):
    """diffusers img2img: timesteps[t_start * order:], set_begin_index, latents = add_noise(z, noise, t_start);
    ours: x = z + noise * sigmas[t_start] over schedule.tail(t_start)."""
    net = FakeNetwork()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * 0.8
    start = img2img_start(num_steps, strength)

    ref_sched = diffusers_scheduler(name, num_steps, seed=9)
    g_ref = gens(9)
    noise = randn_tensor(SHAPE, generator=g_ref, dtype=torch.float32)
    timesteps = ref_sched.timesteps[start * ref_sched.order:]
    set_begin(ref_sched, start * ref_sched.order)
    ref_start = ref_sched.add_noise(z, noise, timesteps[:1].repeat(SHAPE[0]))
    ref = diffusers_loop(ref_sched, net, ref_start, timesteps, g_ref)

    schedule = make_schedule(name, num_steps)
    g = gens(9)
    x = z + noise_lib.randn(SHAPE, g, "cpu", torch.float32) * schedule.sigmas[start]
    assert_close(to_vp(name, x, schedule.sigmas[start]), ref_start)
    out = ours(name, schedule.tail(start), net, x, g)
    assert_close(out, ref)


# --- step_hook (4-channel inpainting blend) ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_step_hook_matches_inpaint_blend(name: str):
    """StableDiffusionXLInpaintPipeline (4-channel UNet): after each step, the known region is replaced by the
    image latents noised to the next timestep (clean after the last)."""
    net, num_steps = FakeNetwork(), 12
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1.0  # 1 = repaint

    ref_sched = diffusers_scheduler(name, num_steps, seed=4)
    set_begin(ref_sched, 0)
    g_ref = gens(4)
    noise = randn_tensor(SHAPE, generator=g_ref, dtype=torch.float32)
    latents = noise * ref_sched.init_noise_sigma

    def blend(sched, i, timesteps, latents):
        known = z
        if i < len(timesteps) - 1:
            known = sched.add_noise(z, noise, torch.tensor([timesteps[i + 1]]))
        return (1 - mask) * known + mask * latents

    ref = diffusers_loop(ref_sched, net, latents, ref_sched.timesteps, g_ref, hook=blend)

    schedule = make_schedule(name, num_steps)
    g = gens(4)
    x0_noise = noise_lib.randn(SHAPE, g, "cpu", torch.float32)
    calls = []

    def hook(i, x):
        calls.append(i)
        known = z + x0_noise * schedule.sigmas[i + 1] if i < len(schedule) - 1 else z
        return (1 - mask) * known + mask * x

    out = ours(name, schedule, net, x0_noise * schedule.init_noise_sigma, g, step_hook=hook)
    assert_close(out, ref)
    assert torch.equal(out * (1 - mask), z * (1 - mask))  # the known region ends exactly on the image
    expected = list(range(num_steps))
    if name in ("heun", "dpmpp_sde_karras"):  # also after each intermediate point (all steps but the last)
        expected = sorted(expected + list(range(num_steps - 1)))
    assert sorted(calls) == expected


# --- callback, denoiser, noise ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_callback_sees_every_step(name: str):
    schedule = make_schedule(name, 6).tail(2)
    seen = []
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * schedule.sigmas[0].item()
    out = ours(name, schedule, FakeNetwork(), x, gens(0),
               callback=lambda i, n, x, x0: seen.append((i, n, x.clone(), x0.shape)))
    assert [(i, n) for i, n, _, _ in seen] == [(i, 4) for i in range(4)]
    assert all(shape == SHAPE for *_, shape in seen)
    assert torch.equal(seen[-1][2], out)


def test_empty_slice_returns_input():
    x = torch.randn(SHAPE)
    for name in SAMPLER_NAMES:
        assert torch.equal(sample(name, lambda *a: 1 / 0, x, make_schedule(name, 10).tail(10)), x)
    with pytest.raises(ValueError):
        sample("plms", lambda *a: None, x, make_schedule("euler", 10))
    assert set(SAMPLERS) == set(SAMPLER_NAMES)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_model_denoiser_equals_diffusers_pred_original_sample(prediction_type: str):
    net = FakeNetwork()
    sched = diffusers_scheduler("euler", 20, prediction_type)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * 3.0
    t = sched.timesteps[5]
    set_begin(sched, 5)
    x_in = sched.scale_model_input(x, t)
    ref_x0 = sched.step(net(x_in, t), t, x, return_dict=True).pred_original_sample
    s = make_schedule("euler", 20)
    ours_x0 = Denoiser(OURS[prediction_type], net)(x, s.sigmas[5], s.timesteps[5])
    assert torch.equal(ours_x0, ref_x0)
    with pytest.raises(ValueError):
        Denoiser("sample", net)


def test_randn_matches_randn_tensor():
    shape = (3, 4, 5, 5)
    assert torch.equal(noise_lib.randn(shape, gens(1), "cpu", torch.float32),
                       randn_tensor(shape, generator=gens(1), device=torch.device("cpu"), dtype=torch.float32))
    assert torch.equal(noise_lib.randn(shape, gens([1, 2, 3]), "cpu", torch.float32),
                       randn_tensor(shape, generator=gens([1, 2, 3]), device=torch.device("cpu"), dtype=torch.float32))
    # a one-element list is the plain generator; row i of a list draw is generator i's first sample
    assert torch.equal(noise_lib.randn(shape, gens([4]), "cpu", torch.float32),
                       noise_lib.randn(shape, gens(4), "cpu", torch.float32))
    rows = noise_lib.randn((2, 4, 5, 5), gens([8, 9]), "cpu", torch.float32)
    assert torch.equal(rows[1:], torch.randn((1, 4, 5, 5), generator=gens(9)))
    half = noise_lib.randn(shape, gens(1), "cpu", torch.float16)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError):
        noise_lib.randn(shape, gens([1, 2]), "cpu", torch.float32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_one_denoiser_for_training_and_sampling(prediction_type: str):
    """The training side of `Denoiser` equals diffusers' DDPMScheduler (`add_noise`, `get_velocity`), and its
    sampling side inverts it: the training target fed back as the network output gives the clean sample."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 999])
    d = Denoiser(prediction_type)
    noisy = d.noised(x0, noise, t)
    assert torch.equal(noisy, ddpm.add_noise(x0, noise, t))
    target = {"epsilon": noise, "v": ddpm.get_velocity(x0, noise, t), "x0": x0}[prediction_type]
    assert (d.target(x0, noise, t) - target).abs().max().item() <= 1e-6
    abar = ddpm.alphas_cumprod[t][:, None, None, None]
    sigma = ((1 - abar) / abar) ** 0.5  # the same point in VE coordinates: x = noisy / sqrt(abar)
    back = d.denoised(noisy / abar.sqrt(), sigma, d.target(x0, noise, t))
    assert (back - x0).abs().max().item() <= 1e-4
    assert d.loss(d.target(x0, noise, t), x0, noise, t).item() == 0.0
