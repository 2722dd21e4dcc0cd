"""Few-step sampling (SDXL Turbo / Lightning / LCM): timestep spacing, zero-terminal-SNR, the LCM sampler, no-CFG
runs, and the v_pred / ztsnr marker keys, against diffusers 0.42.1 on tiny random models (fp32, CPU).

Schedules: timesteps equal, sigmas within 1e-6 (relative above 1), init_noise_sigma within 1e-5 relative.
Images: decoded pixels within 2/255, final latents within 1e-4 (relative above 1), as tests/test_pipeline.py."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from xldm.config import TINY_SDXL_BASE
from xldm.diffusion.schedules import (SAMPLER_NAMES, SPACING_FREE_SAMPLERS, alphas_cumprod, make_schedule,
                                      split_for_refiner)
from xldm.pipeline import Pipeline, resolve_request
from xldm.request import GenerationRequest
from xldm.pngmeta import a1111_to_params, format_a1111_parameters, parse_a1111_parameters
from xldm.weights.save import save_diffusers, save_single_file

from tiny_models import random_components

diffusers = pytest.importorskip("diffusers")
from diffusers_schedulers import SDXL_SCHEDULER_CONFIG  # noqa: E402  (after the importorskip)

PIXEL_TOL, LATENT_TOL = 2, 1e-4
PROMPT = "a red apple on a wooden table, studio light"
SEED = 1234
SIZE = dict(width=96, height=64)
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}), "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}
EULER_FAMILY = ("euler", "euler_a", "heun")


def diffusers_scheduler(name: str, config=None, **options):
    cls, extra = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config or SDXL_SCHEDULER_CONFIG, **extra, **options)


def diffusers_schedule(name: str, num_steps: int, **options):
    """(timesteps, sigmas incl. the final one, init_noise_sigma in VE terms) of the diffusers scheduler."""
    sched = diffusers_scheduler(name, **options)
    sched.set_timesteps(num_steps)
    ts, sig = sched.timesteps.float(), getattr(sched, "sigmas", None)
    if name == "heun":  # first-order entries of the interleaved lists
        ts, sig = ts[::2], torch.cat([sig[:1], sig[1:-1:2], sig[-1:]])
    if name in ("ddim", "lcm"):  # the table at each timestep, then abar_0 (DDIM, set_alpha_to_one=False) or 0
        acp = sched.alphas_cumprod
        last = ((1 - sched.final_alpha_cumprod) / sched.final_alpha_cumprod) ** 0.5 if name == "ddim" else 0.0
        sig = torch.cat([((1 - acp[sched.timesteps]) / acp[sched.timesteps]) ** 0.5, last * torch.ones(1)])
    init = float(sched.init_noise_sigma)
    if name not in EULER_FAMILY:  # VP schedulers: unit-variance x_vp = x_ve / sqrt(sigma_0^2 + 1)
        init = float((sig[0] ** 2 + 1) ** 0.5) if sig is not None else None
    return ts, sig.float(), init


def assert_schedule_matches(ours, name: str, num_steps: int, **options) -> None:
    ts, sig, init = diffusers_schedule(name, num_steps, **options)
    assert torch.equal(ours.timesteps, ts), (ours.timesteps, ts)
    scale = max(1.0, sig.abs().max().item())
    assert (ours.sigmas - sig).abs().max().item() <= 1e-6 * scale
    assert ours.init_noise_sigma == pytest.approx(init, rel=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 25])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpmpp_2m", "unipc"])
def test_spacing_matches_diffusers(name, spacing, num_steps):
    assert_schedule_matches(make_schedule(name, num_steps, spacing=spacing), name, num_steps,
                            timestep_spacing=spacing)


def test_spacing_picks_diffusers_timesteps():
    """The table of Lin et al. 2023 (Table 2) at SDXL's config, 4 steps."""
    picks = {spacing: make_schedule("euler", 4, spacing=spacing).timesteps.tolist()
             for spacing in ("leading", "trailing", "linspace")}
    assert picks == {"leading": [751, 501, 251, 1], "trailing": [999, 749, 499, 249], "linspace": [999, 666, 333, 0]}
    assert make_schedule("euler", 1, spacing="trailing").timesteps.tolist() == [999]
    assert make_schedule("euler", 1).timesteps.tolist() == [1]  # leading: a 1-step run starts at t=1
    assert make_schedule("dpmpp_2m", 4, spacing="linspace").timesteps.tolist() == [999, 749, 500, 250]  # 249.75, 499.5 (to even), 749.25
    # Euler-family starts from max(sigmas) with trailing / linspace, from sqrt(max^2 + 1) with leading
    trailing = make_schedule("euler", 4, spacing="trailing")
    assert trailing.init_noise_sigma == pytest.approx(trailing.sigmas[0].item(), rel=1e-6)
    assert trailing.sigmas[0].item() == pytest.approx(14.6146, abs=1e-3)


@pytest.mark.parametrize("num_steps", [1, 4, 10, 25])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_spacing_matches_diffusers(spacing, num_steps):
    assert_schedule_matches(make_schedule("ddim", num_steps, spacing=spacing), "ddim", num_steps,
                            timestep_spacing=spacing)


@pytest.mark.parametrize("spacing, num_steps", [("linspace", 4), ("trailing", 3)])
def test_ddim_refuses_spacings_its_step_cannot_follow(spacing, num_steps):
    """diffusers' DDIM steps from t to t - T // N: with these grids that is not the next timestep
    (linspace 4: 999 -> 749, next 666), which would need a sampler that evaluates at another noise level."""
    with pytest.raises(ValueError, match="not to the next timestep"):
        make_schedule("ddim", num_steps, spacing=spacing)
    with pytest.raises(ValueError, match="ddim, .* steps"):
        resolve_request(GenerationRequest(PROMPT, sampler="ddim", steps=num_steps, timestep_spacing=spacing),
                        default_size=64, has_refiner=False)


@pytest.mark.parametrize("num_steps", [1, 4, 25])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_sde_karras_spacing_matches_diffusers(spacing, num_steps):
    """DPMSolverSDEScheduler(use_karras_sigmas=True) spans its Karras sigmas between the spaced grid's ends (unlike
    DPMSolverMultistep's Karras variants, which ignore the spacing); its lists interleave the midpoints."""
    ours = make_schedule("dpmpp_sde_karras", num_steps, spacing=spacing)
    ref = diffusers.DPMSolverSDEScheduler.from_config(SDXL_SCHEDULER_CONFIG, use_karras_sigmas=True,
                                                      timestep_spacing=spacing)
    ref.set_timesteps(num_steps)
    assert torch.allclose(ours.timesteps.double(), ref.timesteps[0::2].double(), rtol=0, atol=1e-4)
    sig = torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2], ref.sigmas[-1:]])
    assert (ours.sigmas - sig).abs().max().item() <= 1e-6 * max(1.0, sig.abs().max().item())
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_karras_and_lcm_ignore_spacing(spacing):
    for name in ("dpmpp_2m_karras", "lcm"):
        ours = make_schedule(name, 6, spacing=spacing)
        assert torch.equal(ours.sigmas, make_schedule(name, 6).sigmas)
        assert_schedule_matches(ours, name, 6, timestep_spacing=spacing)
    for name in SAMPLER_NAMES:  # SPACING_FREE_SAMPLERS (the server's "SGM Uniform" check) is exactly these
        if name == "ddim":  # (refuses 6 steps at these spacings: tests/test_few_step.py ddim tests)
            continue
        same = torch.equal(make_schedule(name, 6, spacing=spacing).sigmas, make_schedule(name, 6).sigmas)
        assert same == (name in SPACING_FREE_SAMPLERS), name


def test_lcm_schedule_matches_diffusers():
    assert make_schedule("lcm", 4).timesteps.tolist() == [999, 759, 499, 259]
    for n in (1, 2, 4, 8, 50):
        assert_schedule_matches(make_schedule("lcm", n), "lcm", n)
    with pytest.raises(ValueError, match="at most 50"):
        make_schedule("lcm", 51)


def test_zero_terminal_snr_alphas_equal_diffusers():
    ref = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG, rescale_betas_zero_snr=True)
    ours = alphas_cumprod(zero_terminal_snr=True)
    assert torch.equal(ours, ref.alphas_cumprod)
    assert ours[-1].item() == 2.0**-24 and ours[0].item() == pytest.approx(alphas_cumprod()[0].item(), rel=1e-6)
    assert torch.equal(alphas_cumprod(), diffusers.EulerDiscreteScheduler.from_config(
        SDXL_SCHEDULER_CONFIG).alphas_cumprod)  # the default is untouched


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "unipc", "dpmpp_2m_karras"])
def test_zero_terminal_snr_schedule_matches_diffusers(name, spacing):
    ours = make_schedule(name, 5, prediction_type="v", spacing=spacing, zero_terminal_snr=True)
    assert_schedule_matches(ours, name, 5, timestep_spacing=spacing, rescale_betas_zero_snr=True)
    if spacing == "trailing" and name != "dpmpp_2m_karras":
        assert ours.sigmas[0].item() == pytest.approx(4096.0, rel=1e-4)  # sqrt((1 - 2^-24) / 2^-24)


def test_split_for_refiner_follows_spacing():
    assert split_for_refiner(10, 0.8, "euler") == 8  # leading 901..1: 8 timesteps >= 200
    assert split_for_refiner(10, 0.8, "euler", "trailing") == 8  # 999..99: 8 >= 200 (199 and 99 below)
    assert split_for_refiner(4, 0.5, "euler", "trailing") == 2  # 999, 749 | 499, 249


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = random_components(TINY_SDXL_BASE, seed=0, scale=0.05)
    folder = save_diffusers(base, tmp_path_factory.mktemp("few") / "base")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    return base, ref, dict(ref.scheduler.config)


@pytest.fixture(scope="module")
def tiny_vpred(tmp_path_factory):
    config = replace(TINY_SDXL_BASE, prediction_type="v", zero_terminal_snr=True)
    base = random_components(config, seed=3, scale=0.05)
    folder = save_diffusers(base, tmp_path_factory.mktemp("few") / "vpred")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    return base, ref, dict(ref.scheduler.config)


def run_both(model, ref, config, *, sampler: str, steps: int, cfg: float, ref_options=None, **request):
    """(our latents, diffusers latents, our images, diffusers images) for the same settings."""
    ref.scheduler = diffusers_scheduler(sampler, config, **(ref_options or {}))
    kw = dict(num_inference_steps=steps, guidance_scale=cfg, **SIZE)
    gens = lambda: [torch.Generator("cpu").manual_seed(SEED)]  # noqa: E731
    ref_lat = ref(PROMPT, generator=gens(), output_type="latent", **kw).images
    ref_img = ref(PROMPT, generator=gens(), **kw).images
    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    req = GenerationRequest(PROMPT, steps=steps, cfg=cfg, seed=SEED, sampler=sampler, **SIZE, **request)
    ours = pipe.generate(req)
    return ours, ref_lat, ref_img


def assert_close(ours, ref_lat, ref_img) -> None:
    lat_diff = (ours.latents - ref_lat).abs().max().item()
    assert lat_diff <= LATENT_TOL * max(1.0, ref_lat.abs().max().item()), lat_diff
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in ours.images])
    b = np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in ref_img])
    assert a.shape == b.shape and np.abs(a - b).max() <= PIXEL_TOL, np.abs(a - b).max()


def test_lcm_4_steps_cfg_1_matches_diffusers(tiny):
    ours, ref_lat, ref_img = run_both(*tiny, sampler="lcm", steps=4, cfg=1.0)
    assert_close(ours, ref_lat, ref_img)
    assert ours.params[0]["sampler"] == "lcm" and "timestep_spacing" not in ours.params[0]


def test_euler_a_trailing_1_step_cfg_0_matches_diffusers(tiny):
    ours, ref_lat, ref_img = run_both(*tiny, sampler="euler_a", steps=1, cfg=0.0, timestep_spacing="trailing",
                                      ref_options={"timestep_spacing": "trailing"})
    assert_close(ours, ref_lat, ref_img)
    assert ours.params[0]["timestep_spacing"] == "trailing"


def test_euler_trailing_4_steps_cfg_0_matches_diffusers(tiny):
    ours, ref_lat, ref_img = run_both(*tiny, sampler="euler", steps=4, cfg=0.0, timestep_spacing="trailing",
                                      ref_options={"timestep_spacing": "trailing"})
    assert_close(ours, ref_lat, ref_img)


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_no_guidance_runs_the_conditional_batch_only(tiny, cfg):
    """cfg <= 1: diffusers' do_classifier_free_guidance is False; xldm encodes no negative and runs B rows."""
    base, ref, config = tiny
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    req = pipe.resolve(GenerationRequest(PROMPT, steps=3, cfg=cfg, seed=SEED, **SIZE))
    cond = pipe._conditioning(pipe.model, req, [PROMPT], None, req.width, req.height)
    assert not cond.guided and cond.context.shape[0] == 1
    ours, ref_lat, ref_img = run_both(base, ref, config, sampler="euler", steps=3, cfg=cfg)
    assert_close(ours, ref_lat, ref_img)


def test_vpred_zero_terminal_snr_trailing_matches_diffusers(tiny_vpred):
    base, ref, config = tiny_vpred
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    ours, ref_lat, ref_img = run_both(base, ref, config, sampler="euler", steps=4, cfg=3.0,
                                      timestep_spacing="trailing", ref_options={"timestep_spacing": "trailing"})
    assert_close(ours, ref_lat, ref_img)
    assert ours.params[0]["prediction"] == "v" and ours.params[0]["zero_terminal_snr"] is True


def test_request_overrides_give_the_vpred_model_run(tiny_vpred):
    """An epsilon-labelled copy of the v / ztsnr weights with --prediction v --zero-terminal-snr: the same run."""
    base, ref, config = tiny_vpred
    mislabelled = replace(base, config=replace(base.config, prediction_type="epsilon", zero_terminal_snr=False))
    ours, ref_lat, ref_img = run_both(mislabelled, ref, config, sampler="euler", steps=4, cfg=3.0,
                                      timestep_spacing="trailing", prediction="v", zero_terminal_snr=True,
                                      ref_options={"timestep_spacing": "trailing"})
    assert_close(ours, ref_lat, ref_img)
    eps = Pipeline(mislabelled, device="cpu", dtype=torch.float32).generate(GenerationRequest(
        PROMPT, steps=4, cfg=3.0, seed=SEED, timestep_spacing="trailing", **SIZE))
    assert (eps.latents - ref_lat).abs().max().item() > 0.1  # without the overrides: another image


def test_marker_keys_in_a_single_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from xldm.weights.info import model_info
    from xldm.weights.load import load_model

    base = random_components(TINY_SDXL_BASE, seed=0, scale=0.05)
    plain = save_single_file(base, tmp_path / "plain.safetensors")
    tensors = load_file(plain)
    assert "v_pred" not in tensors and "ztsnr" not in tensors
    markers = dict(v_pred=torch.empty(0), ztsnr=torch.empty(0))
    save_file(tensors, tmp_path / "eps.safetensors")  # no xldm metadata: detected from the keys
    save_file(dict(tensors, **markers), tmp_path / "vz.safetensors")
    eps = model_info(tmp_path / "eps.safetensors").config
    assert (eps.prediction_type, eps.zero_terminal_snr) == ("epsilon", False)
    info = model_info(tmp_path / "vz.safetensors")
    assert (info.config.prediction_type, info.config.zero_terminal_snr) == ("v", True)
    assert "prediction  v, zero-terminal-SNR schedule" in info.lines()
    assert "prediction  epsilon" in model_info(tmp_path / "eps.safetensors").lines()
    # markers added to a file with xldm's metadata (whose config says epsilon) win; loading skips them
    with safe_open(plain, "pt") as f:
        metadata = f.metadata()
    save_file(dict(tensors, **markers), tmp_path / "vz_meta.safetensors", metadata=metadata)
    loaded = load_model(tmp_path / "vz_meta.safetensors", dtype=torch.float32, device="cpu")
    assert loaded.config.prediction_type == "v" and loaded.config.zero_terminal_snr
    assert torch.equal(loaded.unet.state_dict()["out.2.weight"], base.unet.state_dict()["out.2.weight"])
    # xldm writes the markers for such a model
    vz = replace(base, config=replace(base.config, prediction_type="v", zero_terminal_snr=True))
    written = load_file(save_single_file(vz, tmp_path / "written.safetensors"))
    assert written["v_pred"].numel() == 0 and written["ztsnr"].numel() == 0


def test_png_params_and_infotext():
    from xldm.cli import build_parser

    args = build_parser().parse_args(["generate", "x", "--timestep-spacing", "trailing", "--prediction", "v",
                                      "--zero-terminal-snr", "--out", "o.png"])
    assert (args.timestep_spacing, args.prediction, args.zero_terminal_snr) == ("trailing", "v", True)
    args = build_parser().parse_args(["generate", "x", "--no-zero-terminal-snr", "--prediction", "eps"])
    # spacing None: the model's default, filled in from GENERATE_DEFAULTS / TURBO_DEFAULTS
    assert (args.timestep_spacing, args.prediction, args.zero_terminal_snr) == (None, "eps", False)
    req = resolve_request(GenerationRequest(PROMPT, prediction="eps", seed=1), default_size=64, has_refiner=False)
    assert req.prediction == "epsilon"
    with pytest.raises(ValueError, match="timestep_spacing"):
        resolve_request(GenerationRequest(PROMPT, timestep_spacing="even"), default_size=64, has_refiner=False)
    params = {"prompt": "p", "steps": 4, "sampler": "euler", "cfg": 0.0, "seed": 1, "width": 64, "height": 64,
              "timestep_spacing": "trailing"}
    text = format_a1111_parameters(params)
    assert text == "p\nSteps: 4, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 0.0, Seed: 1, Size: 64x64, " \
                   f"Version: {text.rsplit('Version: ', 1)[1]}"
    back = a1111_to_params(parse_a1111_parameters(text))
    assert back["timestep_spacing"] == "trailing" and back["schedule"] == "sgm_uniform"
    assert "Schedule type" not in format_a1111_parameters(dict(params, timestep_spacing="linspace"))
    assert "Sampler: LCM," in format_a1111_parameters(dict(params, sampler="lcm"))
