"""The training step, objective, EMA and non-finite handling on tiny configs (CPU, fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from xldm.config import TINY_SDXL_BASE
from xldm.diffusion.schedules import alphas_cumprod
from xldm.train.config import TrainConfig, preset
from xldm.train.ema import EMA
from xldm.train.loop import NonFiniteLossError, build_run, lr_at, train, training_step
from xldm.conditioning import training_conditioning
from xldm.diffusion.denoiser import Denoiser
from xldm.train.diffusion import draw_noise, sample_generators
from xldm.train.diffusion import loss as diffusion_loss_for_batch
from xldm.train.vae import kl_loss, reconstruction_loss

torch.set_num_threads(1)


def fixed_batch(batch: int = 2, size: int = 64, *, nan: bool = False) -> dict:
    g = torch.Generator().manual_seed(123)
    pixels = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    if nan:
        pixels[:] = float("nan")
    return {"pixels": pixels, "captions": [f"a red circle number {i}" for i in range(batch)],
            "original_size": torch.tensor([[size, size]] * batch), "crop_top_left": torch.zeros(batch, 2).long(),
            "target_size": torch.tensor([[size, size]] * batch), "aesthetic_score": torch.full((batch,), 6.0),
            "keys": [str(i) for i in range(batch)]}


def _eval_loss(run, batch) -> float:
    """Loss at a fixed noise draw (step id 10**6), so before/after values are comparable."""
    with torch.no_grad():
        if run.config.task == "vae":
            gens = sample_generators(0, 10**6, range(batch["pixels"].shape[0]))
            x_hat, mean, logvar = run.forward["vae"](batch["pixels"], gens)
            return float(reconstruction_loss(batch["pixels"], x_hat, "l1") + run.config.kl_weight * kl_loss(mean, logvar))
        return float(diffusion_loss_for_batch(run, batch, 10**6))


class TimestepRecorder(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.seen = unet, []

    def forward(self, x, t, context, y):
        self.seen.append(t.clone())
        return self.unet(x, t, context, y)


@pytest.mark.parametrize("name", ["tiny-sdxl-base", "tiny-sdxl-refiner", "tiny-vae"])
def test_step_changes_weights_and_lowers_loss(name):
    run = build_run(preset(name, out="unused"))
    batch = fixed_batch()
    if run.config.task == "diffusion":
        recorder = TimestepRecorder(run.trainable["unet"])
        run.forward["unet"] = recorder
    before = {k: p.detach().clone() for k, p in run.named_trainable_parameters()}
    loss_before = _eval_loss(run, batch)
    for step in range(1, 7):
        assert training_step(run, batch, step).applied
    changed = sum(not torch.equal(before[k], p) for k, p in run.named_trainable_parameters())
    loss_after = _eval_loss(run, batch)
    assert changed == len(before)  # every trainable tensor moved
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    if run.config.task == "diffusion":
        seen = torch.cat(recorder.seen)
        assert int(seen.min()) >= 0
        if name == "tiny-sdxl-refiner":
            assert int(seen.max()) <= 199  # SDXL paper Sec. 2.5: the refiner's 200 low-noise steps
    # frozen networks stay frozen
    for module_name, module in run.model.modules().items():
        if module_name not in run.trainable:
            assert not any(p.requires_grad for p in module.parameters())


def test_vae_discriminator_joins_after_warmup():
    run = build_run(preset("tiny-vae", out="unused", disc_start=3))
    disc = run.extras["discriminator"][0]
    before = [p.detach().clone() for p in disc.parameters()]
    results = [training_step(run, fixed_batch(), step) for step in range(1, 5)]
    assert "d_loss" not in results[1].extra and "d_loss" in results[2].extra  # steps 1-2 no, 3+ yes
    assert all(not torch.equal(b, p) for b, p in zip(before, disc.parameters()))
    assert results[3].extra["d_weight"] >= 0.0


def test_refiner_timesteps_stay_below_200():
    gens = sample_generators(7, 1, range(5000))
    draw = draw_noise(gens, (4, 2, 2), t_min=0, t_max=199)
    assert int(draw.timesteps.min()) == 0 and int(draw.timesteps.max()) == 199  # whole range, nothing above


def test_conditioning_dropout_rates_and_effect():
    n = 4000
    draw = draw_noise(sample_generators(0, 5, range(n)), (4, 2, 2), t_min=0, t_max=999,
                      text_dropout=0.3, micro_dropout=0.2)
    text_rate = 1 - draw.keep_text.float().mean().item()
    micro_rate = 1 - draw.keep_micro.float().mean().item()
    both = (~draw.keep_text & ~draw.keep_micro).float().mean().item()
    # binomial standard deviations are <= 0.0073 at n = 4000; allow 4 of them
    assert abs(text_rate - 0.3) < 0.03 and abs(micro_rate - 0.2) < 0.03
    assert abs(both - 0.06) < 0.02  # drawn independently

    from tests.tiny_models import random_components

    model = random_components(TINY_SDXL_BASE)
    batch = fixed_batch(4)
    keep_text = torch.tensor([True, False, True, False])
    keep_micro = torch.tensor([True, True, False, False])
    context, vector = training_conditioning(model.config, model.text_encoders, model.tokenizers(), batch,
                                            keep_text, keep_micro, device=torch.device("cpu"))
    full_context, full_vector = training_conditioning(model.config, model.text_encoders, model.tokenizers(), batch,
                                                      torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool),
                                                      device=torch.device("cpu"))
    pooled = model.config.text_encoders[-1].projection_dim
    assert context[1].abs().max() == 0 and context[3].abs().max() == 0  # dropped text: zero context ...
    assert vector[1, :pooled].abs().max() == 0 and vector[3, :pooled].abs().max() == 0  # ... and zero pooled
    assert vector[2, pooled:].abs().max() == 0 and vector[3, pooled:].abs().max() == 0  # dropped micro-cond.
    assert torch.equal(context[0], full_context[0]) and torch.equal(vector[0], full_vector[0])
    assert torch.equal(vector[1, pooled:], full_vector[1, pooled:]) and torch.equal(vector[2, :pooled],
                                                                                   full_vector[2, :pooled])


def test_offset_noise_statistics():
    n, shape = 2000, (4, 16, 16)
    plain = draw_noise(sample_generators(1, 1, range(n)), shape, t_min=0, t_max=999).noise
    offset = draw_noise(sample_generators(1, 1, range(n)), shape, t_min=0, t_max=999, offset_noise=0.05).noise
    # Var of a channel's spatial mean: 1/(16*16) without offset, + 0.05^2 with it (Guttenberg 2023).
    var_plain = plain.mean(dim=(2, 3)).var().item()
    var_offset = offset.mean(dim=(2, 3)).var().item()
    assert abs(var_plain - 1 / 256) / (1 / 256) < 0.08
    assert abs(var_offset - (1 / 256 + 0.0025)) / (1 / 256 + 0.0025) < 0.08
    # the offset is constant over the pixels of a channel: offset - plain has zero spatial spread
    diff = offset - plain
    assert diff.std(dim=(2, 3)).max().item() < 1e-6


def test_min_snr_weights_match_formula():
    abar = alphas_cumprod().double()
    t = torch.tensor([0, 10, 100, 250, 500, 999])
    snr = abar[t] / (1 - abar[t])
    cpu = torch.device("cpu")
    for prediction, denominator in (("epsilon", snr), ("v", snr + 1)):
        expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / denominator
        got = Denoiser(prediction).min_snr_weights(t, 5.0, cpu).double()
        assert torch.allclose(got, expected, rtol=1e-5, atol=0), (prediction, got, expected)
    assert float(Denoiser("epsilon").min_snr_weights(torch.tensor([999]), 5.0, cpu)) == pytest.approx(1.0, abs=1e-6)


def test_noising_and_v_target():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    abar = alphas_cumprod()[t][:, None, None, None]
    xt = Denoiser("v").noised(x0, eps, t)
    v = Denoiser("v").target(x0, eps, t)
    assert (xt - (abar.sqrt() * x0 + (1 - abar).sqrt() * eps)).abs().max() < 1e-6
    # x0 = sqrt(abar) x_t - sqrt(1 - abar) v (Salimans & Ho 2022)
    assert (abar.sqrt() * xt - (1 - abar).sqrt() * v - x0).abs().max() < 1e-5
    assert torch.equal(Denoiser("epsilon").target(x0, eps, t), eps)


def test_ema_formula_warmup_and_state():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9, warmup=True)
    expected = torch.zeros(3, dtype=torch.float64)
    for n in range(30):
        with torch.no_grad():
            p.add_(1.0)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d, abs=1e-12)
        ema.update([("w", p)])
        expected = d * expected + (1 - d) * p.detach().double()
    assert (ema.shadow["w"].double() - expected).abs().max() < 1e-5
    assert ema.num_updates == 30
    state = ema.state_dict()
    other = EMA([("w", torch.zeros(3))], decay=0.5, warmup=False)
    other.load_state_dict(state)
    assert other.num_updates == 30 and other.decay == 0.9 and other.warmup
    assert torch.equal(other.shadow["w"], ema.shadow["w"])
    no_warm = EMA([("w", p)], decay=0.9, warmup=False)
    assert no_warm.current_decay() == 0.9


def test_lr_warmup_and_cosine():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(cfg, 1) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(cfg, 10) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(cfg, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))), rel=1e-12)
    assert lr_at(cfg, 110) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(TrainConfig(lr=2e-5, warmup_steps=0), 500) == 2e-5


def test_nonfinite_step_leaves_everything_unchanged():
    run = build_run(preset("tiny-sdxl-base", out="unused"))
    assert training_step(run, fixed_batch(), 1).applied  # AdamW and EMA now hold state
    weights = {k: p.detach().clone() for k, p in run.named_trainable_parameters()}
    optim = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(run.optimizer.state.values())}
    shadow = {k: v.clone() for k, v in run.ema.shadow.items()}
    updates = run.ema.num_updates
    result = training_step(run, fixed_batch(nan=True), 2)
    assert not result.applied and not math.isfinite(result.loss)
    assert all(torch.equal(weights[k], p) for k, p in run.named_trainable_parameters())
    for i, s in enumerate(run.optimizer.state.values()):
        assert all(torch.equal(optim[i][k], v) for k, v in s.items())
    assert all(torch.equal(shadow[k], v) for k, v in run.ema.shadow.items()) and run.ema.num_updates == updates
    assert all(p.grad is None for _, p in run.named_trainable_parameters())


class ListBatches:
    """Minimal TrainingBatches stand-in: a list of batches, cycled, with a position."""

    def __init__(self, batches):
        self.batches, self.position, self.stats = batches, 0, {"skipped_total": 0}

    def __iter__(self):
        while True:
            yield self.batches[self.position % len(self.batches)]
            self.position += 1

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_repeated_nonfinite_steps_stop_the_run(tmp_path):
    good, bad = fixed_batch(), fixed_batch(nan=True)
    config = preset("tiny-sdxl-base", out=str(tmp_path / "run"), steps=10, max_nonfinite_steps=3,
                    checkpoint_every=100)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with pytest.raises(NonFiniteLossError, match="stopped at step 4: 3 steps in a row"):
            train(config, progress=False, data=ListBatches([good, bad, bad, bad]))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # steps 1-3 logged; step 4 raised
    assert '"skipped_step": false' in lines[0] and '"skipped_step": true' in lines[2]


def test_sigterm_ends_the_run_at_a_step_with_a_checkpoint_and_resume_continues_exactly(tmp_path):
    """A time-limited job or a logout sends SIGTERM: the loop finishes the step under way, checkpoints it, and
    `--resume` goes on as if nothing happened (tolerance 0: CPU fp32, same batches)."""
    import os
    import signal

    from xldm.train import checkpoint as ckpt
    from xldm.train.loop import TrainingStopped

    def config(name: str) -> TrainConfig:
        return preset("tiny-sdxl-base", out=str(tmp_path / name), steps=5, checkpoint_every=100)

    straight = train(config("straight"), progress=False, data=ListBatches([fixed_batch()]))
    handler_before = signal.getsignal(signal.SIGTERM)
    during = []

    def on_step(step, run):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # noted at once, acted on after the next step
            during.append(signal.getsignal(signal.SIGTERM))

    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 3") as stopped:
        train(config("stopped"), progress=False, data=ListBatches([fixed_batch()]), on_step=on_step)
    assert during == [handler_before]  # a second SIGTERM would act as usual
    assert signal.getsignal(signal.SIGTERM) == handler_before
    assert stopped.value.step == 3 and stopped.value.checkpoint.name == ckpt.checkpoint_name(3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "stopped" / "checkpoints")] == [3]
    assert not (tmp_path / "stopped" / "final").exists()
    resumed = train(config("stopped"), resume=True, progress=False, data=ListBatches([fixed_batch()]))
    assert resumed.losses == straight.losses[3:]
    assert resumed.step == 5 and resumed.final_path is not None


def test_xldm_train_exits_with_the_signal_status_when_stopped(tmp_path, monkeypatch, capsys):
    import signal

    import xldm.train.loop
    from xldm.train.cli import main
    from xldm.train.loop import TrainingStopped

    def stopped(config, **kwargs):
        raise TrainingStopped(7, signal.SIGTERM, tmp_path / "checkpoints" / "step_00000007.safetensors")

    monkeypatch.setattr(xldm.train.loop, "train", stopped)
    status = main(["--preset", "tiny-sdxl-base", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert status == 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
    assert "stopped by SIGTERM after step 7" in capsys.readouterr().err


def test_snapshot_of_the_last_checkpoint_is_the_exported_file(tmp_path):
    """scripts/default_model.py snapshot: a checkpoint of a stage under way, as the single file the stage's export
    writes at that step (EMA weights over the frozen parts), tensor for tensor (fp32, tolerance 0)."""
    from conftest import load_script

    from xldm.train import checkpoint as ckpt
    from xldm.weights.io import open_checkpoint

    script = load_script("scripts/default_model.py", "default_model_script")
    result = train(preset("tiny-sdxl-base", out=str(tmp_path / "run"), steps=3, checkpoint_every=3), progress=False,
                   data=ListBatches([fixed_batch()]))
    (step, last), = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert step == 3
    put_in = script.snapshot(last, result.final_path, tmp_path / "snapshot.safetensors")
    assert put_in[0] == "unet"
    exported, snapshot = (open_checkpoint(p).tensors() for p in (result.final_path, tmp_path / "snapshot.safetensors"))
    assert exported.keys() == snapshot.keys()
    assert all(torch.equal(exported[k], snapshot[k]) for k in exported)

    earlier = train(preset("tiny-sdxl-base", out=str(tmp_path / "other"), steps=1, seed=1), progress=False,
                    data=ListBatches([fixed_batch()]))
    script.snapshot(last, earlier.final_path, tmp_path / "into_other.safetensors")  # a UNet there is replaced
    other = open_checkpoint(tmp_path / "into_other.safetensors").tensors()
    unet_keys = [k for k in exported if k.startswith("model.diffusion_model.")]
    assert unet_keys and all(torch.equal(exported[k], other[k]) for k in unet_keys)
    train(preset("tiny-vae", out=str(tmp_path / "vae"), steps=1, checkpoint_every=1), progress=False,
          data=ListBatches([fixed_batch()]))
    with pytest.raises(ValueError, match="no UNet weights"):
        script.snapshot(ckpt.list_checkpoints(tmp_path / "vae" / "checkpoints")[-1][1], result.final_path,
                        tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
