"""Training step time and memory: measured for tiny configs, estimated on the meta device for full SDXL.

    python benchmarks/train_step.py [--steps 5] [--batch 4] [--device cpu]

Measured rows: wall time per optimisation step (after one warm-up step) of `xldm.train.loop.training_step` on a
fixed batch, and peak memory (CUDA: max_memory_allocated; CPU: the process's peak RSS, all presets so far).
Estimated rows (full size, nothing allocated): parameters are counted on the meta device, then

    fp32:          weights 4 + gradients 4 + AdamW moments 8 + EMA 4                    = 20 bytes / parameter
    bf16 autocast: the same fp32 master weights/grads/moments/EMA (autocast casts per op) = 20 bytes / parameter
    bf16 weights:  bf16 weights 2 + bf16 grads 2 + fp32 moments 8 + fp32 EMA 4            = 16 bytes / parameter

plus the frozen networks (VAE and text encoders) in bf16 for inference.  Activations are not included: they
depend on resolution and batch and are what gradient checkpointing trades for compute.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from xldm.train.config import preset
from xldm.train.loop import build_run, training_step


def _batch(size: int, batch: int) -> dict:
    return {"pixels": torch.rand(batch, 3, size, size) * 2 - 1, "captions": ["a red circle"] * batch,
            "original_size": torch.tensor([[size, size]] * batch), "crop_top_left": torch.zeros(batch, 2).long(),
            "target_size": torch.tensor([[size, size]] * batch), "aesthetic_score": torch.full((batch,), 6.0),
            "keys": [str(i) for i in range(batch)]}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, steps: int, batch: int, device: str) -> tuple[float, float]:
    config = preset(name, out="unused", device=device)
    run = build_run(config)
    data = _batch(config.resolution, batch)
    training_step(run, data, 1)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(2, steps + 2):
        training_step(run, data, step)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _rss_mib()
    seconds = (time.perf_counter() - t0) / steps
    return seconds, peak


def parameter_count(module_factory) -> int:
    with torch.device("meta"):
        module = module_factory()
    return sum(p.numel() for p in module.parameters())


def estimate(name: str) -> list[tuple[str, float, float, float]]:
    """(row, trained params, GiB for training state, GiB frozen) per precision for a full-size preset."""
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.models.vae import AutoencoderKL

    config = preset(name)
    model = config.model_config
    vae = parameter_count(lambda: AutoencoderKL(model.vae))
    text = sum(parameter_count(lambda te=te: CLIPTextModel(te)) for te in model.text_encoders)
    if config.task == "vae":
        trained, frozen = vae, 0
    else:
        trained, frozen = parameter_count(lambda: UNet(model.unet)), vae + text
    gib = 2**30
    return [
        (f"{name} fp32", trained, trained * 20 / gib, frozen * 4 / gib),
        (f"{name} bf16 autocast", trained, trained * 20 / gib, frozen * 2 / gib),
        (f"{name} bf16 weights", trained, trained * 16 / gib, frozen * 2 / gib),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"\nmeasured: batch {args.batch}, mean of {args.steps} steps after 1 warm-up")
    print(f"{'preset':<22}{'s/step':>10}{'peak MiB':>12}")
    for name in ("tiny-sdxl-base", "tiny-sdxl-refiner", "tiny-vae"):
        seconds, peak = measure(name, args.steps, args.batch, args.device)
        print(f"{name:<22}{seconds:>10.3f}{peak:>12.0f}", flush=True)

    print("\nestimated (meta device; activations excluded): trained params x bytes/param + frozen networks")
    print(f"{'preset / precision':<32}{'trained params':>16}{'train GiB':>12}{'frozen GiB':>12}{'total GiB':>12}")
    for name in ("sdxl-base", "sdxl-refiner", "sdxl-vae"):
        for row, params, train_gib, frozen_gib in estimate(name):
            print(f"{row:<32}{params:>16,}{train_gib:>12.1f}{frozen_gib:>12.1f}{train_gib + frozen_gib:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
