"""The sampling speed-ups of xldm.speedups: DeepCache feature caching, CFG over part of the schedule (cfg_end) and
the fitted latent previewer, on tiny random models (and the bundled default model's VAE for the previewer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from xldm.config import TINY_SDXL_BASE
from xldm.diffusion.schedules import make_schedule
from xldm.images import image_to_tensor
from xldm.models.layers import timestep_embedding
from xldm.pipeline import Pipeline
from xldm.request import GenerationRequest
from xldm.speedups import (DeepCacheUNet, fit_latent_preview, input_block_count, latent_preview_map,
                           preview_image, preview_pixels, psnr)

from tiny_models import random_components

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def base():
    return random_components(TINY_SDXL_BASE, seed=0, scale=0.05)


def unet_inputs(unet, batch: int = 2, size: tuple[int, int] = (10, 14), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    context = torch.randn(batch, 5, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g)
    return x, context, y


def random_control(unet, x, seed: int = 3):
    """ControlNet-like residuals: one per input block and one for the middle block, shaped like its features."""
    with torch.no_grad():
        feats, _, _ = unet.encoder_features(x, torch.tensor(500.0), torch.zeros(x.shape[0], 1, unet.config.context_dim),
                                            torch.zeros(x.shape[0], unet.config.adm_in_channels))
    g = torch.Generator().manual_seed(seed)
    rs = [torch.randn(f.shape, generator=g) * 0.1 for f in feats]
    return rs[:-1], rs[-1]


def hand_pass(unet, x, t, context, y, control=None, replace_at: int | None = None, replacement=None):
    """The UNet written out block by block (sgm UNetModel.forward): returns (output, input from below of every
    output block); with `replace_at`, that output block's input from below is `replacement` instead."""
    timesteps = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
    emb = unet.time_embed(timestep_embedding(timesteps, unet.config.block_out_channels[0])) + unet.label_emb(y)
    h, skips = x, []
    for block in unet.input_blocks:
        h = block(h, emb, context)
        skips.append(h)
    h = unet.middle_block(h, emb, context)
    if control is not None:
        skips = [s + r for s, r in zip(skips, control[0])]
        h = h + control[1]
    inputs = []
    for j, block in enumerate(unet.output_blocks):
        if j == replace_at:
            h = replacement
        inputs.append(h)
        h = torch.cat([h, skips.pop()], dim=1)
        h = block(h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
    return unet.out(h), inputs


def test_interval_one_is_the_plain_unet(base):
    unet = base.unet
    x, context, y = unet_inputs(unet)
    wrapped = DeepCacheUNet(unet, 1, 0)
    with torch.no_grad():
        for step in range(3):
            assert torch.equal(wrapped(x, torch.tensor(700.0 - step), context, y), unet(x, 700.0 - step, context, y))
            wrapped.advance(step)


@pytest.mark.parametrize("branch", [0, 2, 5])
def test_cached_steps_equal_the_full_pass_on_the_cached_features(base, branch):
    """Interval 3: steps 1 and 2 equal a hand-written full pass whose deep features (the input from below of the
    output block that takes input block `branch`'s skip) are those of step 0; step 3 is a full pass again.
    ControlNet residuals are added on both paths."""
    unet = base.unet
    x, context, y = unet_inputs(unet)
    control = random_control(unet, x)
    wrapped = DeepCacheUNet(unet, 3, branch)
    kept = len(unet.output_blocks) - 1 - branch
    ts = [900.0, 700.0, 500.0, 300.0]
    xs = [x + 0.1 * k for k in range(4)]
    with torch.no_grad():
        ref0, inputs0 = hand_pass(unet, xs[0], ts[0], context, y, control)
        out0 = wrapped(xs[0], torch.tensor(ts[0]), context, y, control=control)
        assert (out0 - ref0).abs().max() < 1e-5
        cached = inputs0[kept]
        for step in (1, 2):
            wrapped.advance(step - 1)
            out = wrapped(xs[step], torch.tensor(ts[step]), context, y, control=control)
            ref, _ = hand_pass(unet, xs[step], ts[step], context, y, control, replace_at=kept, replacement=cached)
            assert (out - ref).abs().max() < 1e-5
            full, inputs = hand_pass(unet, xs[step], ts[step], context, y, control)
            # the cache really stands in for this step's deep features, which differ
            assert (inputs[kept] - cached).abs().max() > 1e-3 and not torch.equal(out, full)
        wrapped.advance(2)
        out3 = wrapped(xs[3], torch.tensor(ts[3]), context, y, control=control)
        assert (out3 - hand_pass(unet, xs[3], ts[3], context, y, control)[0]).abs().max() < 1e-5
    assert (wrapped.full_calls, wrapped.partial_calls) == (2, 2)


def test_cached_steps_skip_the_deep_blocks(base):
    unet = base.unet
    branch = 1
    calls: dict[str, int] = {}

    def counter(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = [unet.middle_block.register_forward_hook(counter("middle"))]
    handles += [b.register_forward_hook(counter(f"in{i}")) for i, b in enumerate(unet.input_blocks)]
    handles += [b.register_forward_hook(counter(f"out{j}")) for j, b in enumerate(unet.output_blocks)]
    try:
        x, context, y = unet_inputs(unet)
        wrapped = DeepCacheUNet(unet, 3, branch)
        with torch.no_grad():
            wrapped(x, torch.tensor(900.0), context, y)
            calls.clear()
            wrapped.advance(0)
            wrapped(x, torch.tensor(800.0), context, y)
    finally:
        for h in handles:
            h.remove()
    n_in, n_out = input_block_count(unet.config), len(unet.output_blocks)
    assert n_in == len(unet.input_blocks)
    assert set(calls) == {f"in{i}" for i in range(branch + 1)} | {f"out{j}" for j in range(n_out - 1 - branch, n_out)}
    assert all(v == 1 for v in calls.values())


def run_latents(pipe, **settings):
    req = GenerationRequest(prompt=PROMPT, seed=7, steps=6, cfg=5.0, batch=2, width=64, height=48, **settings)
    return pipe.run(pipe.resolve(req), output="latent")


def test_defaults_are_bit_identical_and_settings_recorded(base):
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    plain = run_latents(pipe)
    explicit = run_latents(pipe, cache_interval=1, cache_branch=0, cfg_end=1.0)
    assert torch.equal(plain.latents, explicit.latents)
    assert not {"cache_interval", "cache_branch", "cfg_end"} & set(plain.params[0])
    cached = run_latents(pipe, cache_interval=3, cache_branch=1, cfg_end=0.5)
    assert (cached.params[0]["cache_interval"], cached.params[0]["cache_branch"], cached.params[0]["cfg_end"]) \
        == (3, 1, 0.5)
    assert 0 < (cached.latents - plain.latents).abs().max() < 10


def test_cfg_end_matches_a_hand_built_euler_loop(base):
    """cfg_end=0.5 over 6 Euler steps: steps 0-2 guided on the 2B batch, steps 3-5 on the B positives alone."""
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    batches: list[int] = []
    handle = base.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        ours = run_latents(pipe, cfg_end=0.5).latents
    finally:
        handle.remove()
    assert batches == [4, 4, 4, 2, 2, 2]

    req = pipe.resolve(GenerationRequest(prompt=PROMPT, seed=7, steps=6, cfg=5.0, batch=2, width=64, height=48))
    cond = pipe._conditioning(pipe.model, req, [PROMPT] * 2, None, 64, 48)
    schedule = make_schedule("euler", 6, prediction_type="epsilon", spacing=req.timestep_spacing)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (7, 8)]
    x = torch.cat([torch.randn((1, 4, 6, 8), generator=g) for g in gens]) * schedule.init_noise_sigma
    unet = base.unet
    with torch.no_grad():
        for i in range(6):
            sigma, t = schedule.sigmas[i], schedule.timesteps[i]
            x_in = x / (sigma ** 2 + 1) ** 0.5
            if i < 3:
                uncond, text = unet(torch.cat([x_in] * 2), t, cond.context, cond.vector).chunk(2)
                eps = uncond + 5.0 * (text - uncond)
            else:
                eps = unet(x_in, t, cond.context[2:], cond.vector[2:])
            x0 = x - sigma * eps
            x = x + (x - x0) / sigma * (schedule.sigmas[i + 1] - sigma)
    assert (ours - x).abs().max() < 1e-5


def test_deep_cache_and_cfg_end_together_follow_the_cut(base):
    """A cache made on the CFG batch serves the positives-only steps after the cut with its positive half."""
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    together = run_latents(pipe, cache_interval=2, cfg_end=0.5).latents
    assert torch.isfinite(together).all()
    assert not torch.equal(together, run_latents(pipe, cfg_end=0.5).latents)


@pytest.mark.parametrize("settings, message", [
    (dict(cache_interval=0), "cache_interval must be an integer >= 1"),
    (dict(cache_interval=2.5), "cache_interval must be an integer >= 1"),
    (dict(cache_branch=-1), "cache_branch must be an integer >= 0"),
    (dict(cache_interval=3, cache_branch=99), r"cache_branch must be in \[0, 8\]"),
    (dict(cfg_end=1.5), r"cfg_end must be a number in \[0, 1\]"),
    (dict(cfg_end=float("nan")), r"cfg_end must be a number in \[0, 1\]"),
])
def test_bad_settings_are_refused_by_name(base, settings, message):
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        pipe.resolve(GenerationRequest(prompt=PROMPT, **settings))


@pytest.fixture(scope="module")
def default_vae():
    from xldm.weights.load import load_model

    return load_model(ROOT / "xldm/data/default/base.safetensors", components=["vae"], dtype=torch.float32,
                      device="cpu").vae


PREVIEW_PSNR_DB = 18.0  # measured 20.8 dB on this picture (a flat grey: 7.5 dB; fitted on it alone: 24.5 dB)


def test_fitted_preview_follows_a_real_image_and_is_cheap(default_vae):
    """A picture made by the default model (tests/golden), encoded: its preview at latent resolution is close to
    the picture averaged over 8x8 cells, far closer than a flat grey; the map is fitted once per VAE; a preview
    costs under 1 % of the floating-point operations of a UNet step of the default model at that size."""
    vae = default_vae
    with Image.open(ROOT / "tests/golden/base_red_heart.png") as img:
        image = image_to_tensor(img.convert("RGB"), *img.size)
    with torch.no_grad():
        latents = vae.encode_latents(image, sample=False)
    weights = latent_preview_map(vae)
    assert latent_preview_map(vae) is weights  # fitted once, kept
    assert torch.equal(weights, fit_latent_preview(vae))  # deterministic
    target = F.avg_pool2d(image, 8)
    ours = psnr(preview_pixels(latents, weights), target)
    assert ours > PREVIEW_PSNR_DB, ours
    assert ours > psnr(torch.zeros_like(target), target) + 6
    assert preview_image(latents, weights).size == (latents.shape[-1], latents.shape[-2])

    from xldm.weights.load import load_model

    unet = load_model(ROOT / "xldm/data/default/base.safetensors", components=["unet"], dtype=torch.float32,
                      device="cpu").unet
    batch = torch.cat([latents] * 2)
    context = torch.zeros(2, 77, unet.config.context_dim)
    y = torch.zeros(2, unet.config.adm_in_channels)

    def flops(fn) -> int:  # counted, not timed: a wall-clock ratio depends on what else the machine runs
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.no_grad():
        step = flops(lambda: unet(batch, 500.0, context, y))  # one CFG step of a 64 px image
    preview = flops(lambda: preview_image(latents, weights))
    assert 0 < preview < 0.01 * step, (preview, step)


def test_cli_and_server_apply_the_same_speedups(base, tmp_path):
    """`xldm generate --deep-cache 3 --cfg-end 0.5` and the server's deep_cache / cfg_end give the same pixels,
    which differ from the plain image; the preview PNG is written; bad values are refused by name."""
    import base64
    import io

    import httpx
    import numpy as np

    from xldm.cli import main as cli_main
    from xldm.serve.app import ServerConfig, create_app
    from xldm.weights.save import save_single_file

    from running_server import RunningServer

    model = save_single_file(base, tmp_path / "base.safetensors")
    common = ["generate", PROMPT, "--model", str(model), "--steps", "4", "--width", "64", "--height", "64",
              "--seed", "3", "--cfg", "5", "--dtype", "fp32", "--device", "cpu"]
    fast, plain, preview = tmp_path / "fast.png", tmp_path / "plain.png", tmp_path / "preview.png"
    assert cli_main(common + ["--deep-cache", "3", "--cfg-end", "0.5", "--preview", str(preview),
                              "--preview-every", "2", "--out", str(fast)]) == 0
    assert cli_main(common + ["--out", str(plain)]) == 0
    assert Image.open(preview).size == (64, 64)
    again = tmp_path / "again.png"  # the settings travel in the image's metadata
    assert cli_main(["generate", "--from-png", str(fast), "--model", str(model), "--dtype", "fp32", "--device", "cpu",
                     "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(fast)))
    running = RunningServer(create_app(ServerConfig(models=[model], dtype=torch.float32, device="cpu")))
    try:
        with httpx.Client(base_url=running.url, timeout=120) as client:
            body = {"prompt": PROMPT, "steps": 4, "width": 64, "height": 64, "seed": 3, "cfg_scale": 5,
                    "sampler_name": "Euler", "deep_cache": 3, "cfg_end": 0.5}
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            for bad in ({"cfg_end": 1.5}, {"deep_cache": 0}, {"cache_branch": -1}):
                refused = client.post("/sdapi/v1/txt2img", json={**body, **bad})
                assert refused.status_code == 422 and next(iter(bad)) in refused.text, refused.text
    finally:
        running.stop()
    api = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")).astype(int)
    cli = np.asarray(Image.open(fast).convert("RGB")).astype(int)
    assert np.abs(api - cli).max() == 0
    assert np.abs(cli - np.asarray(Image.open(plain).convert("RGB")).astype(int)).max() > 0


def test_preview_fit_of_an_overflowing_half_precision_vae_uses_float32():
    """An fp16 VAE whose encoding overflows is fitted through a float32 copy (not a NaN map that would draw
    garbage silently); a VAE non-finite in float32 too is a clear error."""
    from xldm.speedups import fit_latent_preview

    class Overflowing(torch.nn.Module):
        def __init__(self, finite_in_fp32: bool = True):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 4, 1)
            self.finite_in_fp32 = finite_in_fp32

        def encode_latents(self, images, sample=False):
            latents = torch.nn.functional.avg_pool2d(self.proj(images), 8)
            if images.dtype == torch.float16 or not self.finite_in_fp32:
                return latents + float("inf")
            return latents

    vae = Overflowing().half()
    weights = fit_latent_preview(vae)
    assert torch.isfinite(weights).all() and weights.shape == (5, 3)
    assert next(vae.parameters()).dtype == torch.float16  # the model itself is untouched
    with pytest.raises(ValueError, match="non-finite"):
        fit_latent_preview(Overflowing(finite_in_fp32=False))
