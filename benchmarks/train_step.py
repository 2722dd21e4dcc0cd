"""Training step time and memory: measured for tiny configs, estimated on the meta device for full SDXL.

    python benchmarks/train_step.py [--steps 5] [--batch 4] [--device cpu]

Measured rows: wall time per optimisation step (after one warm-up step) of `xldm.train.loop.training_step` on a
fixed batch, and peak memory (CUDA: max_memory_allocated; CPU: the process's peak RSS, all presets so far).
Estimated rows (full size, nothing allocated): parameters are counted on the meta device, then

    fp32:          weights 4 + gradients 4 + AdamW moments 8 + EMA 4                    = 20 bytes / parameter
    bf16 autocast: the same fp32 master weights/grads/moments/EMA (autocast casts per op) = 20 bytes / parameter
    bf16 weights:  bf16 weights 2 + bf16 grads 2 + fp32 moments 8 + fp32 EMA 4            = 16 bytes / parameter

plus the frozen networks (VAE and text encoders) in bf16 for inference.  A LoRA (`--lora-rank`, kohya's layers:
the UNet's transformers) trains only its adapters (fp32 weights 4 + grads 4 + AdamW 8 = 16 bytes / parameter,
no EMA) and keeps the whole model frozen in bf16.

Activations: the tensors autograd saves in one bf16 UNet forward at 1024x1024, batch 1, counted on the meta device
(`torch.autograd.graph.saved_tensors_hooks`, frozen weights that an op keeps a reference to left out); with
gradient checkpointing, the saved block inputs plus the largest block's own activations, which backward
recomputes one block at a time.  Peak memory ~ state + frozen + activations (allocator overhead and the
text encoders' and VAE's own passes excluded).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from unittest.mock import patch

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


def measure(name: str, steps: int, batch: int, device: str, **overrides) -> tuple[float, float]:
    config = preset(name, out="unused", device=device, **overrides)
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


def lora_parameters(model, rank: int, text_encoders: bool = False) -> int:
    from xldm.lora.training import LoraNetwork
    from xldm.models.components import Components

    with torch.device("meta"):
        network = LoraNetwork(Components(config=model), rank, rank, text_encoders=text_encoders)
    return sum(p.numel() for p in network.parameters())


def activations_gib(model, size: int = 1024, batch: int = 1, lora_rank: int = 0) -> tuple[float, float]:
    """(without, with gradient checkpointing) GiB of saved activations of one bf16 UNet training forward."""
    from xldm.lora.training import LoraNetwork
    from xldm.models.components import Components
    from xldm.models.unet import UNet

    with torch.device("meta"):
        unet = UNet(model.unet).to(torch.bfloat16).requires_grad_(lora_rank == 0).train()
        if lora_rank:
            LoraNetwork(Components(config=model, unet=unet), lora_rank, lora_rank).attach(Components(config=model,
                                                                                                   unet=unet))
    weights = {id(p) for p in unet.parameters()}
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    per_block = [0] * (len(blocks) + 1)
    current = [len(blocks)]  # outside any block: the last slot
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: current.__setitem__(0, len(blocks)))

    def pack(t):
        if id(t) not in weights and id(getattr(t, "_base", None)) not in weights:
            per_block[current[0]] += t.numel() * t.element_size()
        return t

    first = []  # per-block activations without checkpointing (what one block's recompute holds)
    hw = size // 8
    inputs = (torch.empty(batch, model.unet.in_channels, hw, hw, device="meta", dtype=torch.bfloat16),
              torch.full((batch,), 500, device="meta"),
              torch.empty(batch, 77, model.unet.context_dim, device="meta", dtype=torch.bfloat16),
              torch.empty(batch, model.unet.adm_in_channels, device="meta", dtype=torch.bfloat16))
    with patch("torch.nn.functional.scaled_dot_product_attention", _FlashLike.apply), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(*inputs)
        first = per_block[:-1]
        unet.gradient_checkpointing = True
        per_block[:] = [0] * len(per_block)
        unet(*inputs)
    return sum(first) / 2**30, (sum(per_block) + max(first)) / 2**30


class _FlashLike(torch.autograd.Function):
    """What a flash / memory-efficient SDPA kernel (the CUDA backends) saves for backward: q, k, v, the output and
    the fp32 log-sum-exp per query, not the attention matrix (the meta device's math fallback keeps it in fp32)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("shape-only stand-in for counting saved tensors")


def lora_rows(rank: int) -> list[tuple[str, float, float, float, float]]:
    """(row, trained params, state GiB, frozen GiB, activations GiB) for SDXL base: full fine-tune vs LoRA."""
    from xldm.config import SDXL_BASE
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.models.vae import AutoencoderKL

    gib = 2**30
    unet = parameter_count(lambda: UNet(SDXL_BASE.unet))
    rest = parameter_count(lambda: AutoencoderKL(SDXL_BASE.vae)) + sum(
        parameter_count(lambda te=te: CLIPTextModel(te)) for te in SDXL_BASE.text_encoders)
    lora = lora_parameters(SDXL_BASE, rank)
    full_act, full_ckpt = activations_gib(SDXL_BASE)
    lora_act, lora_ckpt = activations_gib(SDXL_BASE, lora_rank=rank)
    return [("full fine-tune, bf16 weights", unet, unet * 16 / gib, rest * 2 / gib, full_act),
            ("  + gradient checkpointing", unet, unet * 16 / gib, rest * 2 / gib, full_ckpt),
            (f"LoRA rank {rank}, bf16 base", lora, lora * 16 / gib, (unet + rest) * 2 / gib, lora_act),
            ("  + gradient checkpointing", lora, lora * 16 / gib, (unet + rest) * 2 / gib, lora_ckpt)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lora-rank", type=int, default=32, help="rank of the LoRA rows (default 32)")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"\nmeasured: batch {args.batch}, mean of {args.steps} steps after 1 warm-up")
    print(f"{'preset':<22}{'s/step':>10}{'peak MiB':>12}")
    for name, overrides in (("tiny-sdxl-base", {}), ("tiny-sdxl-refiner", {}), ("tiny-vae", {}),
                            ("tiny-sdxl-base", {"lora_rank": 4})):
        seconds, peak = measure(name, args.steps, args.batch, args.device, **overrides)
        label = name + (" LoRA 4" if overrides else "")
        print(f"{label:<22}{seconds:>10.3f}{peak:>12.0f}", flush=True)

    print("\nestimated (meta device; activations excluded): trained params x bytes/param + frozen networks")
    print(f"{'preset / precision':<32}{'trained params':>16}{'train GiB':>12}{'frozen GiB':>12}{'total GiB':>12}")
    for name in ("sdxl-base", "sdxl-refiner", "sdxl-vae"):
        for row, params, train_gib, frozen_gib in estimate(name):
            print(f"{row:<32}{params:>16,}{train_gib:>12.1f}{frozen_gib:>12.1f}{train_gib + frozen_gib:>12.1f}")

    print(f"\nSDXL base at 1024x1024, batch 1: full fine-tune vs LoRA rank {args.lora_rank} (meta-device estimate)")
    print(f"{'setup':<32}{'trained params':>16}{'state GiB':>11}{'frozen GiB':>12}{'activ. GiB':>12}{'total GiB':>11}")
    for row, params, state, frozen, act in lora_rows(args.lora_rank):
        print(f"{row:<32}{params:>16,}{state:>11.1f}{frozen:>12.1f}{act:>12.1f}{state + frozen + act:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
