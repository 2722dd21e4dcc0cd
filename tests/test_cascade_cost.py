"""The cascade cost model (benchmarks/cascade_cost.py): FLOPs measured with torch's FLOP counter on the meta device,
for tiny cascade stages and the tiny latent model."""

from __future__ import annotations


import pytest

from conftest import load_script
from xldm.config import TINY_CASCADE_BASE, TINY_CASCADE_SR, TINY_CASCADE_SR2

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_benchmark():
    return load_script("benchmarks/cascade_cost.py", "cascade_cost")


_cost = _load_benchmark()
cascade_cost, format_cost_table, format_side_by_side = _cost.cascade_cost, _cost.format_cost_table, \
    _cost.format_side_by_side
latent_model_cost, unet_flops, vae_decode_flops = _cost.latent_model_cost, _cost.unet_flops, _cost.vae_decode_flops


def test_cost_table_measured_and_sr_cheaper_than_direct():
    configs = [TINY_CASCADE_BASE, TINY_CASCADE_SR, TINY_CASCADE_SR2]
    cost = cascade_cost(configs, steps=[30, 20, 20], cfg=[5, 4, 1])
    assert [s.pixels for s in cost.stages] == [256, 1024, 4096] and cost.total_pixels == 5376
    assert [s.evals for s in cost.stages] == [60, 40, 20]  # steps x 2 with guidance
    assert all(s.flops_per_eval > 0 for s in cost.stages)
    # measured, not assumed: a batch of two costs exactly twice one image
    assert unet_flops(TINY_CASCADE_SR.unet, (32, 32), batch=2) == 2 * cost.stages[1].flops_per_eval
    # the last SR stage is cheaper than the base network at the same final size, and so is the whole cascade
    assert cost.stages[-1].flops_per_eval < cost.direct.flops_per_eval
    assert cost.total_flops < cost.direct.total_flops and cost.ratio < 1
    table = format_cost_table(cost)
    assert "cascade / direct" in table and "64x64" in table


def test_latent_model_cost_splits_steps_at_the_hand_off_and_counts_the_decode():
    from xldm.config import TINY_SDXL_BASE, TINY_SDXL_REFINER
    from xldm.diffusion.schedules import split_for_refiner

    parts = latent_model_cost(TINY_SDXL_BASE, TINY_SDXL_REFINER, (64, 64), steps=30, cfg=5.0)
    base, refiner, decode = parts
    assert base.steps == split_for_refiner(30, 0.8) and base.steps + refiner.steps == 30
    assert base.size == refiner.size == (8, 8) and base.evals == 2 * base.steps
    assert base.flops_per_eval == unet_flops(TINY_SDXL_BASE.unet, (8, 8))
    assert decode.evals == 1 and decode.total_flops == vae_decode_flops(TINY_SDXL_BASE.vae, (64, 64)) > 0
    # 4x the area: 4x the convolutions' FLOPs, a little more from the mid-block attention (quadratic in tokens)
    assert 4 * decode.total_flops <= vae_decode_flops(TINY_SDXL_BASE.vae, (128, 128)) <= 4.1 * decode.total_flops
    alone = latent_model_cost(TINY_SDXL_BASE, None, (64, 64), steps=30, cfg=1.0)
    assert [p.steps for p in alone] == [30, 1] and alone[0].evals == 30
    table = format_side_by_side(cascade_cost_tiny(), parts)
    assert "latent model total" in table and "pixel cascade total" in table


def cascade_cost_tiny():
    return cascade_cost([TINY_CASCADE_BASE, TINY_CASCADE_SR, TINY_CASCADE_SR2])
