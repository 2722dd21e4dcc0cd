"""`xldm reproduce NAME`: the metrics against independent formulas / scipy, the micro-conditioning switches of
TrainConfig as the loss applies them, each reproduction's smoke scale end to end (every table row in report.md,
every number in results.json), resumption, and (slow) the small scale."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from xldm.reproduce import REPRODUCTIONS, common, reproduce

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frechet_distance_matches_scipy_and_the_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    linalg = pytest.importorskip("scipy.linalg")  # test-time oracle only
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert common.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(common.frechet_distance(a, a)) < 1e-8
    # independent coordinates: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2
    x = rng.normal(size=(20000, 3)) * np.array([1.0, 2.0, 3.0])
    y = rng.normal(size=(20000, 3)) * np.array([2.0, 2.0, 1.0]) + np.array([1.0, 0.0, 0.0])
    closed = 1.0 + 1.0 + 0.0 + 4.0
    assert common.frechet_distance(x, y) == pytest.approx(closed, rel=0.05)
    with pytest.raises(ValueError, match="feature sets"):
        common.frechet_distance(a, b[:, :3])


def test_sharpness_and_frame_measures():
    rng = np.random.default_rng(1)
    sharp = Image.fromarray((rng.random((64, 64, 3)) > 0.5).astype(np.uint8) * 255)
    soft = sharp.filter(ImageFilter.GaussianBlur(2))
    assert common.laplacian_variance(sharp) > 10 * common.laplacian_variance(soft)
    assert common.high_frequency_energy(sharp) > common.high_frequency_energy(soft)
    flat = Image.new("RGB", (32, 32), (120, 120, 120))
    assert common.laplacian_variance(flat) == 0.0 and common.high_frequency_energy(flat) == 0.0
    import random

    centred = common.shape_image(64, "red", "circle", random.Random(0))
    assert not common.touches_frame(centred)
    cut = centred.crop((20, 20, 64, 64)).resize((64, 64))  # the circle cut by the top and left sides
    assert common.touches_frame(cut)
    ci = common.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx(1.96 * 1.0 / math.sqrt(3))


@pytest.mark.parametrize("switch", ["size_conditioning", "crop_conditioning"])
def test_micro_conditioning_switches_reach_the_loss(tmp_path, monkeypatch, switch):
    from xldm.train import diffusion
    from xldm.train.config import preset

    seen = {}
    real = diffusion.training_conditioning

    def spy(mc, encoders, tokenizers, values, *args, **kwargs):
        seen.update({k: torch.as_tensor(values[k]).clone() for k in ("original_size", "crop_top_left",
                                                                      "target_size")})
        return real(mc, encoders, tokenizers, values, *args, **kwargs)

    monkeypatch.setattr(diffusion, "training_conditioning", spy)
    config = preset("tiny-sdxl-base").replace(out=str(tmp_path / "run"), batch_size=2, **{switch: False})
    from xldm.train.loop import build_run

    run = build_run(config)
    batch = {"pixels": torch.zeros(2, 3, 64, 64), "captions": ["a", "b"],
             "original_size": torch.tensor([[16, 24], [64, 64]]), "crop_top_left": torch.tensor([[8, 16], [0, 0]]),
             "target_size": torch.tensor([[64, 64], [64, 64]]), "aesthetic_score": torch.tensor([6.0, 6.0]),
             "keys": ["a", "b"]}
    assert torch.isfinite(diffusion.loss(run, batch, 1))
    if switch == "size_conditioning":
        assert seen["original_size"].tolist() == [[64, 64], [64, 64]]  # the target size, not the stored one
        assert seen["crop_top_left"].tolist() == [[8, 16], [0, 0]]
    else:
        assert seen["crop_top_left"].tolist() == [[0, 0], [0, 0]]
        assert seen["original_size"].tolist() == [[16, 24], [64, 64]]


def _numbers(value) -> list:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _check_report(out, rows: list[str], keys: list[str]) -> dict:
    report = (out / "report.md").read_text()
    for row in rows:
        assert f"| {row} |" in report, f"row {row!r} missing from the report"
    for line in report.splitlines():
        if line.startswith("![") and "](" in line:
            name = line.split("](")[1].rstrip(")")
            assert Image.open(out / name).size[0] > 0
    results = json.loads((out / "results.json").read_text())
    for key in keys:  # a dotted path to a number
        value = results
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{key} = {value!r}"
    assert isinstance(results["paper_ordering_holds"], bool)
    assert all(math.isfinite(n) for n in _numbers(results) if not (isinstance(n, float) and math.isnan(n)))
    return results


def test_smoke_size_conditioning(tmp_path):
    out = tmp_path / "size"
    results = reproduce("size-conditioning", out, scale="smoke", seed=0)
    keys = [f"runs.{k}.fid.{f}" for k in ("discard", "nocond", "sizecond") for f in ("mean", "ci95")]
    keys += [f"runs.{k}.training_images" for k in ("discard", "nocond", "sizecond")]
    _check_report(out, ["(a) images below the training size discarded | CIN-512-only",
                        "(b) all images, no size conditioning | CIN-nocond",
                        "(c) all images, size-conditioned | CIN-size-cond"], keys + ["heldout_images", "seconds"])
    runs = results["runs"]
    assert runs["discard"]["training_images"] < runs["nocond"]["training_images"] == runs["sizecond"][
        "training_images"]  # (a) really discards the low-resolution copies
    assert all(len(r["fid"]["values"]) == 2 for r in runs.values())


def test_smoke_crop_conditioning_and_reuse_of_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "crop"
    reproduce("crop-conditioning", out, scale="smoke", seed=0)
    results = _check_report(out, ["without crop conditioning", "with crop conditioning", "training crops (the data)"],
                            ["runs.crop.touches_frame_at_0_0", "runs.crop.touches_frame_at_16_16",
                             "runs.nocrop.touches_frame_at_0_0", "runs.nocrop.touches_frame_at_16_16",
                             "training_crops_touching_frame"])
    assert 0.0 < results["training_crops_touching_frame"] < 1.0  # the zoomed crops really cut some subjects
    # rerunning the same command reuses the finished training runs (nothing is trained again)
    from xldm.train import loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    config = common.unet_config(common.scale_settings("smoke"), "tiny-sdxl-base", out / "runs" / "crop",
                                out / "data" / "shapes", 0, 2)
    assert common.train_once(config) == out / "runs" / "crop" / "final" / "model.safetensors"


def test_smoke_refiner(tmp_path):
    out = tmp_path / "refiner"
    reproduce("refiner", out, scale="smoke", seed=0)
    keys = [f"settings.{k}.{m}" for k in ("base", "handoff", "sdedit")
            for m in ("prompt_following", "laplacian_variance", "high_frequency_energy", "seconds_per_image")]
    _check_report(out, ["base alone", "base + refiner, hand-off at 0.8", "base + refiner as SDEdit (strength 0.3)",
                        "real training images"], keys + ["real_images.laplacian_variance"])


def test_smoke_cascade_cost(tmp_path):
    out = tmp_path / "cascade"
    results = reproduce("cascade-cost", out, scale="smoke", seed=0)
    _check_report(out, ["**pixel cascade total**", "**direct: base UNet at 64x64**", "**latent model total**",
                        "VAE decode to 64x64"],
                  ["cascade.flops", "cascade.seconds", "direct.flops", "direct.seconds", "latent.flops",
                   "latent.seconds", "flops_ratio_cascade_to_direct", "seconds_ratio_cascade_to_direct"])
    from xldm.config import CASCADES
    from xldm.reproduce.cost import cascade_cost

    expected = cascade_cost(CASCADES["tiny-cascade"], [4, 4, 4], [5.0, 4.0, 4.0])
    assert results["cascade"]["flops"] == expected.total_flops and results["direct"]["flops"] == \
        expected.direct.total_flops  # the FLOP counter's numbers, not estimates
    assert results["flops_ratio_cascade_to_direct"] < 1


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown reproduction 'tabel-2'.*size-conditioning"):
        reproduce("tabel-2", tmp_path)
    with pytest.raises(ValueError, match="unknown scale 'tiny'"):
        reproduce("refiner", tmp_path, scale="tiny")
    with pytest.raises(ValueError, match="metadata.jsonl"):
        reproduce("refiner", tmp_path, data=str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPRODUCTIONS))
def test_small_scale(tmp_path, name):
    """The real small-scale experiment (< 2 h each on a 2-core CPU): the report is complete."""
    out = tmp_path / name
    results = reproduce(name, out, scale="small", seed=0)
    assert (out / "report.md").is_file() and isinstance(results["paper_ordering_holds"], bool)
