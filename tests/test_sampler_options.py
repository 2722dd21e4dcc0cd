"""Sampler options: Euler's churn (s_churn, s_tmin, s_tmax, s_noise; Karras et al. 2022, Alg. 2) against diffusers
EulerDiscreteScheduler.step with the same four arguments, DDIM's eta against diffusers DDIMScheduler(eta), the
ancestral and SDE samplers' eta against k-diffusion's formulas (`get_ancestral_step`; eta = 0 is the ODE sampler),
the refusals, and the options' way through GenerationRequest, infotext and --from-png.

The same deterministic fake network and noise matching as tests/test_samplers.py (one CPU generator per batch row,
diffusers drawing with `randn_tensor` where its `step` draws); tolerance 1e-4 * max(1, max |reference|), fp32."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffusers_schedulers import SDXL_SCHEDULER_CONFIG
from test_samplers import FakeNetwork, assert_close, gens
from xldm.config import TINY_SDXL_BASE
from xldm.diffusion import noise as noise_lib
from xldm.diffusion.denoiser import Denoiser
from xldm.diffusion.samplers import check_sampler_options, sample
from xldm.diffusion.schedules import make_schedule
from xldm.pipeline import Pipeline
from xldm.request import GenerationRequest
from xldm.pngmeta import a1111_to_params, format_a1111_parameters, parse_a1111_parameters

from tiny_models import random_components

SHAPE = (2, 4, 8, 8)  # batch 2: one generator per row, as the pipeline draws
SEEDS = [5, 6]


def ours(name, steps, seeds=SEEDS, **options):
    """The start noise and then the steps' draws from one generator per row (seeds), as the pipeline draws."""
    schedule, generator = make_schedule(name, steps), gens(seeds)
    x = noise_lib.randn(SHAPE, generator, "cpu", torch.float32) * schedule.init_noise_sigma
    return sample(name, Denoiser("epsilon", FakeNetwork()), x, schedule, generator=generator, **options)


def diffusers_run(sched, step_kwargs, start: int = 0):
    """StableDiffusionXLPipeline's loop (no CFG) over sched.timesteps[start:], its generators passed to `step`."""
    net, g = FakeNetwork(), gens(SEEDS)
    latents = randn_tensor(SHAPE, generator=g, dtype=torch.float32)
    if start == 0:
        latents = latents * sched.init_noise_sigma
    else:  # an img2img-style start part-way (latents = noise at that level, image 0)
        latents = latents * sched.sigmas[start]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    for t in sched.timesteps[start:]:
        latents = sched.step(net(sched.scale_model_input(latents, t), t), t, latents, generator=g,
                             **step_kwargs, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("steps,churn", [
    (6, dict(s_churn=1.0)),  # gamma = 1/6 on every step
    (8, dict(s_churn=40.0, s_noise=1.007)),  # gamma capped at sqrt 2 - 1
    (10, dict(s_churn=3.0, s_tmin=0.3, s_tmax=5.0, s_noise=0.9)),  # churn only inside [s_tmin, s_tmax]
])
def test_euler_churn_matches_diffusers(steps, churn):
    sched = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    ref = diffusers_run(sched, churn)
    out = ours("euler", steps, **churn)
    assert_close(out, ref)
    plain = ours("euler", steps)
    assert (out - plain).abs().max() > 1e-2  # the churn changed the result


def test_euler_churn_on_a_slice_counts_the_full_schedule():
    """img2img / refiner slices: gamma = s_churn / N with N the full schedule's steps (diffusers len(sigmas) - 1)."""
    steps, start, churn = 8, 3, dict(s_churn=2.0, s_noise=1.0)
    sched = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    ref = diffusers_run(sched, churn, start=start)
    schedule, generator = make_schedule("euler", steps).tail(start), gens(SEEDS)
    x = noise_lib.randn(SHAPE, generator, "cpu", torch.float32) * schedule.sigmas[0]
    out = sample("euler", Denoiser("epsilon", FakeNetwork()), x, schedule, generator=generator, **churn)
    assert_close(out, ref)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers(eta):
    steps = 6
    sched = DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    ref = diffusers_run(sched, {"eta": eta})
    out = ours("ddim", steps, eta=eta)  # DDIM returns the VP sample at the schedule's end
    assert_close(out, ref)
    assert (out - ours("ddim", steps)).abs().max() > 1e-2


def _ancestral_step(sigma_from, sigma_to, eta):  # k-diffusion sampling.get_ancestral_step, written out
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def test_euler_ancestral_eta_is_the_ancestral_step_formula():
    steps, eta = 7, 0.6
    schedule = make_schedule("euler_a", steps)
    net, g = Denoiser("epsilon", FakeNetwork()), gens(SEEDS)
    x = noise_lib.randn(SHAPE, g, "cpu", torch.float32) * schedule.init_noise_sigma
    expected = x.clone()
    for i in range(steps):  # k-diffusion sample_euler_ancestral's loop, noise drawn on every step (diffusers)
        sigma, sigma_next = schedule.sigmas[i].item(), schedule.sigmas[i + 1].item()
        denoised = net(expected, schedule.sigmas[i], schedule.timesteps[i])
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        expected = expected + (expected - denoised) / sigma * (sigma_down - sigma)
        expected = expected + noise_lib.randn(SHAPE, g, "cpu", torch.float32) * sigma_up
    out = ours("euler_a", steps, eta=eta)  # the same start noise, then the same draws
    assert_close(out, expected)
    # eta = 0: no noise at all, plain Euler; eta = 1 given = the default, bit for bit
    assert_close(ours("euler_a", steps, eta=0.0), ours("euler", steps))
    assert torch.equal(ours("euler_a", steps, eta=1.0), ours("euler_a", steps))


def test_sde_samplers_eta():
    steps = 6
    # eta = 0 turns SDE-DPM-Solver++(2M) into DPM-Solver++(2M) (k-diffusion sample_dpmpp_2m_sde, eta=0)
    assert_close(ours("dpmpp_2m_sde_karras", steps, eta=0.0),
                 ours("dpmpp_2m_karras", steps))
    for name in ("dpmpp_2m_sde_karras", "dpmpp_3m_sde", "dpmpp_sde_karras"):
        default = ours(name, steps)
        assert torch.equal(ours(name, steps, eta=1.0), default), name
        half = ours(name, steps, eta=0.5)
        assert torch.isfinite(half).all() and (half - default).abs().max() > 1e-2, name
    # eta = 0: the 3M sampler draws noise but adds none (the steps' draws no longer matter)
    schedule = make_schedule("dpmpp_3m_sde", steps)
    x = noise_lib.randn(SHAPE, gens(SEEDS), "cpu", torch.float32) * schedule.init_noise_sigma
    a, b = (sample("dpmpp_3m_sde", Denoiser("epsilon", FakeNetwork()), x, schedule, generator=gens(seeds), eta=0.0)
            for seeds in ([1, 2], [3, 4]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler,options,words", [
    ("euler", dict(eta=0.5), ["eta", "euler sampler adds no noise", "euler_a", "ddim"]),
    ("dpmpp_2m", dict(eta=1.0), ["eta", "dpmpp_2m_sde_karras"]),
    ("dpmpp_2m", dict(s_churn=1.0), ["s_churn", "dpmpp_2m sampler has no churn", "euler"]),
    ("heun", dict(s_noise=0.5), ["s_noise", "heun", "euler"]),
    ("euler", dict(s_noise=0.9), ["s_noise", "churn, which is off", "s_churn > 0"]),
    ("euler", dict(s_churn=1.0, s_tmin=3.0, s_tmax=2.0), ["s_tmin 3 is above s_tmax 2"]),
    ("euler_a", dict(eta=1.5), ["eta must be a number in [0, 1]"]),
    ("euler", dict(s_churn=-1.0), ["s_churn must be a number >= 0"]),
])
def test_options_a_sampler_cannot_apply_are_refused(sampler, options, words):
    with pytest.raises(ValueError) as error:
        check_sampler_options(sampler, options.pop("eta", None), **options)
    for word in words:
        assert word in str(error.value)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(random_components(TINY_SDXL_BASE, seed=0), dtype=torch.float32, device="cpu")


def test_request_options_reach_the_sampler_and_the_infotext(pipe, tmp_path):
    base = dict(prompt="a red heart", steps=3, seed=7, width=64, height=64)
    plain = pipe(sampler="euler", **base)
    churned = pipe(sampler="euler", s_churn=2.0, s_tmax=20.0, s_noise=0.95, **base)
    assert (churned.latents - plain.latents).abs().max() > 1e-3
    # defaults: the same image and the same metadata as before the options existed
    same = pipe(sampler="euler", s_churn=0.0, s_noise=1.0, **base)
    assert torch.equal(same.latents, plain.latents) and same.params == plain.params
    assert not {"eta", "s_churn", "s_tmin", "s_tmax", "s_noise"} & set(plain.params[0])
    text = format_a1111_parameters(churned.params[0])
    assert "Sigma churn: 2.0" in text and "Sigma tmax: 20.0" in text and "Sigma noise: 0.95" in text
    assert "Sigma tmin" not in text and "Eta" not in text
    back = a1111_to_params(parse_a1111_parameters(text))
    assert (back["s_churn"], back["s_tmax"], back["s_noise"]) == (2.0, 20.0, 0.95)

    ddim = pipe(sampler="ddim", eta=0.4, **base)
    assert (ddim.latents - pipe(sampler="ddim", **base).latents).abs().max() > 1e-3
    text = format_a1111_parameters(ddim.params[0])
    assert "Eta DDIM: 0.4" in text
    assert a1111_to_params(parse_a1111_parameters(text))["eta"] == 0.4
    ancestral = format_a1111_parameters(pipe(sampler="euler_a", eta=0.3, **base).params[0])
    assert "Eta: 0.3" in ancestral and "Eta DDIM" not in ancestral
    # eta given at the sampler's default is the default image and metadata
    assert pipe(sampler="euler_a", eta=1.0, **base).params == pipe(sampler="euler_a", **base).params

    with pytest.raises(ValueError, match="eta: the euler sampler adds no noise"):
        pipe(sampler="euler", eta=0.5, **base)
    with pytest.raises(ValueError, match="s_churn: the dpmpp_2m sampler has no churn"):
        pipe(sampler="dpmpp_2m", s_churn=1.0, **base)


def test_cli_flags_and_from_png_round_trip(tmp_path, capsys):
    from xldm.cli import main
    from xldm.pngmeta import read_png_params
    from xldm.weights.save import save_single_file

    model = save_single_file(random_components(TINY_SDXL_BASE, seed=0), tmp_path / "base.safetensors")
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["--model", str(model), "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu", "-q"]
    assert main(["generate", "a red heart", *common, "--seed", "3", "--sampler", "euler", "--s-churn", "1.5",
                 "--s-noise", "0.9", "--out", str(first)]) == 0
    params = read_png_params(first)
    assert (params["s_churn"], params["s_noise"]) == (1.5, 0.9) and "s_tmax" not in params
    assert main(["generate", *common, "--from-png", str(first), "--out", str(again)]) == 0
    assert read_png_params(again) == params
    capsys.readouterr()
    assert main(["generate", "x", *common, "--sampler", "euler", "--eta", "0.5", "--out",
                 str(tmp_path / "no.png")]) != 0
    assert "eta: the euler sampler adds no noise" in capsys.readouterr().err and not (tmp_path / "no.png").exists()
    with pytest.raises(SystemExit, match="--eta, --s-churn apply to a --model's sampler"):
        main(["generate", "x", "--cascade", str(tmp_path), "--eta", "0.5", "--s-churn", "1", "-q"])
    assert math.isinf(GenerationRequest("x").s_tmax)
