"""Imagen-style cascade on tiny random stages: augmentation math, SR input assembly, training steps, the pipeline
end to end, input checks, stage files and the CLI.  Every comparison states its tolerance."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from xldm.cascade import (
    CascadePipeline,
    aug_alpha,
    augment,
    cascade_files,
    check_low_res,
    check_stage_order,
    load_cascade,
    load_stage,
    plan_sizes,
    random_stage,
    read_stage_header,
    save_cascade,
    upsample_low_res,
)
from xldm.conditioning import AUG_LEVEL_EMBED_SCALE, concat_channels, micro_ids, vector_conditioning
from xldm.config import TINY_CASCADE_BASE, TINY_CASCADE_SR, TINY_CASCADE_SR2
from xldm.models.components import Components

PROMPT = "red apple"
EXACT = 0.0
FP32_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(stage: Components, seed: int) -> Components:
    """Random values everywhere (a layer left at zero, e.g. a bias, cannot hide a wiring mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stage.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return stage


@pytest.fixture(scope="module")
def stages() -> list[Components]:
    base = random_stage(TINY_CASCADE_BASE, seed=0)
    sr1 = random_stage(TINY_CASCADE_SR, seed=1, text_encoders=base.text_encoders)
    sr2 = random_stage(TINY_CASCADE_SR2, seed=2, text_encoders=base.text_encoders)
    return [_randomise(s, i) for i, s in enumerate((base, sr1, sr2))]


# --- noise augmentation -----------------------------------------------------------------------------------------

def test_augment_level_zero_is_identity_bit_for_bit():
    x = torch.randn(3, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    out = augment(x, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(out, x)  # tolerance: exact
    # per-image levels: only the image at s = 0 is untouched
    mixed = augment(x, torch.tensor([0.0, 0.5, 0.0]), torch.Generator().manual_seed(1))
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[2], x[2])
    assert (mixed[1] - x[1]).abs().max() > 0.1


def test_augment_formula_and_variance():
    x = torch.full((8, 3, 64, 64), 0.7)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    # z = sqrt(alpha_s) x + sqrt(1 - alpha_s) eps with alpha_s = cos^2(pi s / 2): at s = 0.5, alpha = 0.5
    z = augment(x, 0.5, noise=noise)
    assert float(aug_alpha(torch.tensor(0.5))) == pytest.approx(0.5, abs=1e-7)
    assert (z - (math.sqrt(0.5) * x + math.sqrt(0.5) * noise)).abs().max() <= 1e-6
    # s = 1: pure noise, unit variance and zero mean (98304 samples: |mean| < 0.02, |var - 1| < 0.03)
    z1 = augment(x, 1.0, torch.Generator().manual_seed(3))
    assert float(aug_alpha(torch.tensor(1.0))) <= 1e-12
    assert abs(float(z1.mean())) < 0.02 and abs(float(z1.var()) - 1.0) < 0.03
    # variance preserving: unit-variance input keeps unit variance at every level (|var - 1| < 0.03)
    xs = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    for s in (0.1, 0.3, 0.7):
        assert abs(float(augment(xs, s, torch.Generator().manual_seed(5)).var()) - 1.0) < 0.03
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augment(x, 1.5, None)


def test_aug_level_embedding_reaches_the_model(stages):
    sr = stages[1]
    cfg = sr.config
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 3, 32, 32, generator=g)
    up = upsample_low_res(torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, (32, 32))
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(2, 16, generator=g)
    outs, vectors = [], []
    for s in (0.0, 0.1, 0.4):
        v = vector_conditioning(cfg, pooled, micro_ids(cfg, {"aug_level": s}, 2))
        vectors.append(v)
        with torch.no_grad():
            outs.append(sr.unet(concat_channels(noisy, up), torch.tensor(500.0), context, v))
    # only the aug-level columns of the vector change, and they hold fourier(1000 s)
    assert torch.equal(vectors[0][:, :16], vectors[1][:, :16])
    assert float(vectors[1][0, 16]) == pytest.approx(math.cos(0.1 * AUG_LEVEL_EMBED_SCALE), abs=1e-5)
    # ... and the network's output moves with them (by far more than float noise: > 1e-3)
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[1] - outs[2]).abs().max() > 1e-3


# --- SR input assembly -------------------------------------------------------------------------------------------

def test_sr_input_assembly_non_square(stages):
    g = torch.Generator().manual_seed(0)
    low = torch.rand(2, 3, 12, 20, generator=g) * 2 - 1  # 20 wide, 12 high
    up = upsample_low_res(low, (40, 24))
    assert up.shape == (2, 3, 24, 40)
    # bilinear, align_corners=False: doubling [a, b] gives [a, .75a + .25b, .25a + .75b, b] (1e-6)
    row = upsample_low_res(torch.tensor([[[[1.0, 3.0]]]]).expand(1, 3, 1, 2), (4, 1))[0, 0, 0]
    assert (row - torch.tensor([1.0, 1.5, 2.5, 3.0])).abs().max() <= 1e-6
    noisy = torch.randn(2, 3, 24, 40, generator=g)
    x = concat_channels(noisy, up)
    assert x.shape == (2, 6, 24, 40)
    assert torch.equal(x[:, :3], noisy) and torch.equal(x[:, 3:], up)  # noisy first, then the condition
    cfg = stages[1].config
    v = vector_conditioning(cfg, torch.zeros(2, 16), micro_ids(cfg, {"aug_level": 0.1}, 2))
    with torch.no_grad():
        out = stages[1].unet(x, torch.tensor(10.0), torch.zeros(2, 77, 16), v)
    assert out.shape == (2, 3, 24, 40)
    check_low_res(cfg, low, (40, 24))  # matches: no error
    with pytest.raises(ValueError, match=r"expects a low-res image of 20x12, found 20x10 \(aspect ratio 2:1"):
        check_low_res(cfg, low[..., :10, :], (40, 24))
    with pytest.raises(ValueError, match="must have the same batch and size"):
        concat_channels(noisy, up[..., :20])


# --- training -----------------------------------------------------------------------------------------------------

def _batch(size: int) -> dict:
    """Four smooth, distinct images in [-1, 1] with captions."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = torch.stack([
        torch.stack([xx, yy, -xx]), torch.stack([yy, -yy, xx]),
        torch.stack([(xx * yy), xx, torch.zeros_like(xx)]), torch.stack([-xx, torch.ones_like(xx) * 0.5, yy]),
    ])
    return {"pixels": images.clamp(-1, 1), "captions": ["red apple", "blue flag", "yellow face", "green heart"]}


@pytest.mark.parametrize("preset", ["tiny-cascade-base-16", "tiny-cascade-sr-32"])
def test_training_step_lowers_loss(preset):
    from xldm.train.config import preset as cascade_train_preset
    from xldm.train.diffusion import loss as stage_loss
    from xldm.train.loop import build_run
    from xldm.train.loop import training_step as stage_step

    config = cascade_train_preset(preset, ema_decay=0.0, text_dropout=0.0, lr=3e-3, device="cpu")
    run = build_run(config)
    batch = _batch(config.model_config.default_size)
    with torch.no_grad():
        before = float(stage_loss(run, batch, 1))
    for _ in range(8):  # the same batch and the same draws (step 1) every time
        result = stage_step(run, batch, 1)
        assert result.applied
    with torch.no_grad():
        after = float(stage_loss(run, batch, 1))
    assert math.isfinite(before) and after < 0.7 * before, (before, after)


class _ListData:
    """Batches from a list, with the TrainingBatches state interface (position)."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_train_stage_resume_is_exact_and_exports_a_loadable_stage(tmp_path):
    from xldm.train.config import preset as cascade_train_preset
    from xldm.train.loop import train as train_stage

    batches = [_batch(32), {k: v[::-1] if isinstance(v, list) else v.flip(0) for k, v in _batch(32).items()}]
    common = dict(steps=3, checkpoint_every=1, ema_decay=0.9)
    straight = train_stage(cascade_train_preset("tiny-cascade-sr-32", out=str(tmp_path / "a"), **common),
                           data=_ListData(batches), progress=False)
    half = cascade_train_preset("tiny-cascade-sr-32", out=str(tmp_path / "b"), **{**common, "steps": 1})
    train_stage(half, data=_ListData(batches), progress=False)
    resumed = train_stage(replace(half, steps=3), data=_ListData(batches), resume=True, progress=False)
    a, b = load_stage(straight.final_path), load_stage(resumed.final_path)
    for (k, va), vb in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(va, vb), k  # tolerance: exact (same draws, same data position, same EMA counter)
    assert straight.losses[1:] == resumed.losses  # the resumed steps see what the straight run saw
    assert a.config == TINY_CASCADE_SR


# --- the pipeline -------------------------------------------------------------------------------------------------

def test_cascade_end_to_end_deterministic(stages):
    pipe = CascadePipeline(stages)
    settings = dict(steps=[3, 2, 2], cfg=[3.0, 2.0, 1.0], aug=[0.0, 0.1, 0.2])
    first = pipe(PROMPT, seed=7, **settings)
    again = pipe(PROMPT, seed=7, **settings)
    other = pipe(PROMPT, seed=8, **settings)
    assert [tuple(o.shape) for o in first.stage_outputs] == [(1, 3, 16, 16), (1, 3, 32, 32), (1, 3, 64, 64)]
    assert first.images[0].size == (64, 64)
    for a, b in zip(first.stage_outputs, again.stage_outputs):
        assert torch.equal(a, b)  # same seed: identical (exact)
    assert (first.stage_outputs[-1] - other.stage_outputs[-1]).abs().max() > 1e-3
    assert float(first.stage_outputs[-1].abs().max()) <= 1.0  # clipped to the data range
    # The SR stages alone on stage 0's output (as a [0, 1] image) reproduce the cascade (1e-4: the [0, 1]
    # round trip rounds in float32).
    tail = CascadePipeline(stages[1:])
    alone = tail(PROMPT, seed=7, init_image=(first.stage_outputs[0] + 1) / 2, steps=[2, 2], cfg=[2.0, 1.0],
                 aug=[0.1, 0.2])
    assert (alone.stage_outputs[-1] - first.stage_outputs[-1]).abs().max() <= FP32_TOL
    # Non-square: 96x64 final -> 24x16 base -> 48x32 -> 96x64; a batch of 2 keeps image 0 of the batch of 1.
    wide = pipe(PROMPT, seed=7, size=(96, 64), batch=2, **settings)
    assert [tuple(o.shape) for o in wide.stage_outputs] == [(2, 3, 16, 24), (2, 3, 32, 48), (2, 3, 64, 96)]
    assert wide.images[1].size == (96, 64)
    assert (wide.stage_outputs[-1][0] - wide.stage_outputs[-1][1]).abs().max() > 1e-3  # seeds 7 and 8 differ
    single = pipe(PROMPT, seed=7, size=(96, 64), **settings)
    assert (wide.stage_outputs[-1][:1] - single.stage_outputs[-1]).abs().max() <= FP32_TOL


def test_bad_inputs_raise_clear_errors(stages):
    base, sr1, sr2 = stages
    sr_only = CascadePipeline([sr1, sr2])
    with pytest.raises(ValueError, match=r"expects a low-res image of 16x16 \(aspect ratio 1:1\), found 20x20"):
        sr_only(PROMPT, init_image=torch.rand(1, 3, 20, 20), steps=1)
    with pytest.raises(ValueError, match=r"expects a low-res image of 16x16 \(aspect ratio 1:1\), found 32x16 "
                                         r"\(aspect ratio 2:1\)"):
        sr_only(PROMPT, init_image=torch.rand(1, 3, 16, 32), resize_init_image=True, steps=1)
    # same ratio + resize: accepted (an SDXL-sized output works the same way)
    out = sr_only(PROMPT, init_image=torch.rand(1, 3, 48, 48), resize_init_image=True, steps=1, cfg=1.0)
    assert out.images[0].size == (64, 64)
    with pytest.raises(ValueError, match="expects a low-res input image; found no init_image"):
        sr_only(PROMPT, steps=1)
    with pytest.raises(ValueError, match="init_image given, but stage 0 is a base stage"):
        CascadePipeline(stages)(PROMPT, init_image=torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="resolutions must increase"):
        CascadePipeline([base, sr2, sr1])
    with pytest.raises(ValueError, match="a base stage can only come first"):
        CascadePipeline([sr1, base])
    with pytest.raises(ValueError, match=r"expects a 32x32 input, but stage 0 \(base 16x16\) makes 16x16"):
        check_stage_order([TINY_CASCADE_BASE, TINY_CASCADE_SR2])
    with pytest.raises(ValueError, match="expected 3 values"):
        CascadePipeline(stages)(PROMPT, steps=[1, 1])
    with pytest.raises(ValueError, match="base stage and takes no augmentation level"):
        CascadePipeline(stages)(PROMPT, aug=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="not divisible by the scale"):
        plan_sizes([TINY_CASCADE_BASE, TINY_CASCADE_SR], (33, 32))
    with pytest.raises(ValueError, match="adm_in_channels"):
        replace(TINY_CASCADE_SR, micro_conditioning=("original_size", "aug_level"))


# --- stage files --------------------------------------------------------------------------------------------------

def test_save_load_round_trip(stages, tmp_path):
    paths = save_cascade(stages, tmp_path / "cascade")
    assert [p.name for p in paths] == ["stage_0.safetensors", "stage_1.safetensors", "stage_2.safetensors"]
    headers = [read_stage_header(p) for p in paths]
    assert [h[0] for h in headers] == [s.config for s in stages]
    assert [h[1] for h in headers] == [True, False, False]  # the shared text encoder is stored once
    loaded = load_cascade(tmp_path / "cascade")
    for original, back in zip(stages, loaded):
        for (k, v), w in zip(original.unet.state_dict().items(), back.unet.state_dict().values()):
            assert torch.equal(v, w), k  # fp32 round trip: exact
        for te, te_back in zip(original.text_encoders, back.text_encoders):
            assert all(torch.equal(a, b) for a, b in zip(te.state_dict().values(), te_back.state_dict().values()))
    settings = dict(seed=3, steps=[2, 1, 1], cfg=[2.0, 2.0, 2.0])
    a = CascadePipeline(stages)(PROMPT, **settings).stage_outputs[-1]
    b = CascadePipeline(loaded)(PROMPT, **settings).stage_outputs[-1]
    assert torch.equal(a, b)  # exact
    # comma-separated files give the same list; a stage without encoders cannot load alone
    assert cascade_files(",".join(str(p) for p in paths)) == paths
    with pytest.raises(ValueError, match="holds no text encoders"):
        load_stage(paths[1])
    # ... but picked out of its folder it borrows stage_0's encoders (an SR stage applied to any image)
    alone = load_cascade(str(paths[2]))[0]
    assert all(torch.equal(a, b) for a, b in zip(alone.text_encoders[0].state_dict().values(),
                                                 stages[2].text_encoders[0].state_dict().values()))
    # fp16 files: weights within fp16 rounding (relative 2^-11 of |w| <= 0.5: 5e-4)
    half = save_cascade(stages, tmp_path / "half", dtype=torch.float16)
    back16 = load_stage(half[0], dtype=torch.float32)
    diff = max(float((v - w).abs().max()) for v, w in zip(stages[0].unet.state_dict().values(),
                                                         back16.unet.state_dict().values()))
    assert diff <= 5e-4


# --- CLI (the cost model: tests/test_cascade_cost.py) ----------------------------------------------------------

def test_cli_generate_and_info(stages, tmp_path, capsys):
    from xldm.cli import main as cli_main

    save_cascade(stages, tmp_path / "c")
    out = tmp_path / "apple.png"
    assert cli_main(["generate", PROMPT, "--cascade", str(tmp_path / "c"), "--cascade-steps", "2,1,1",
                     "--cascade-cfg", "2,2,1", "--cascade-aug", "0,0.1,0.1", "--seed", "3", "--out", str(out)]) == 0
    from PIL import Image

    from xldm.images import image_to_tensor

    with Image.open(out) as img:
        assert img.size == (64, 64)
        pixels = image_to_tensor(img, 64, 64)
    expected = CascadePipeline(stages)(PROMPT, seed=3, steps=[2, 1, 1], cfg=[2, 2, 1], aug=[0, 0.1, 0.1])
    # the PNG holds the pipeline's image (uint8 rounding: 1/255 in [0, 1] = 2/255 in [-1, 1], plus 1e-4)
    assert (pixels - expected.stage_outputs[-1]).abs().max() <= 2 / 255 + FP32_TOL
    # --from-png of a cascade's image: its prompt, seed and per-stage lists give the same pixels again
    again = tmp_path / "again.png"
    assert cli_main(["generate", "--cascade", str(tmp_path / "c"), "--from-png", str(out), "--out", str(again)]) == 0
    with Image.open(again) as img:
        assert torch.equal(image_to_tensor(img, 64, 64), pixels)
    from PIL.PngImagePlugin import PngInfo

    from xldm.pngmeta import XLDM_CHUNK

    info = PngInfo()
    info.add_text(XLDM_CHUNK, json.dumps({"prompt": PROMPT, "cascade_steps": [2, 1.5, 1]}))
    Image.new("RGB", (64, 64)).save(tmp_path / "bad.png", pnginfo=info)
    capsys.readouterr()
    assert cli_main(["generate", "--cascade", str(tmp_path / "c"), "--from-png", str(tmp_path / "bad.png"),
                     "--out", str(tmp_path / "bad-out.png")]) == 2
    assert "'cascade_steps' must be a list of integers, one per stage, found [2, 1.5, 1]" in capsys.readouterr().err
    capsys.readouterr()
    assert cli_main(["info", "--cascade", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert "stage 2: sr x2 32x32 -> 64x64" in printed and "benchmarks/cascade_cost.py" in printed
