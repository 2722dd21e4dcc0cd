"""One UNet step, xldm vs diffusers, same weights, one process, alternating runs.

    python benchmarks/unet_step.py --config tiny-sdxl-base
    python benchmarks/unet_step.py --config sdxl-base --size 512 --dtype bf16 --repeats 3
    python benchmarks/unet_step.py --config sdxl-base --size 1024 --dtype bf16 --repeats 3  # >10 GiB RAM
    python benchmarks/unet_step.py --config sdxl-base --size 1024 --dtype bf16 --device cuda --compile --sdpa flash

Prints the median time of each, their ratio (xldm / diffusers; < 1 means xldm is faster), the max abs
difference of the outputs, and memory: peak RSS on CPU, peak allocated per side on CUDA.
`--compile` runs both UNets through `torch.compile` (xldm's `compile_unet`, diffusers' forward compiled the same
way) and prints each side's compile time (its first call); `--sdpa` runs every attention under one SDPA backend
(`torch.nn.attention.sdpa_kernel`; default: torch's own choice for the device, dtype and shapes).
Needs the test extra (diffusers) installed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from xldm.config import PRESETS
from xldm.models.layers import timestep_embedding
from xldm.models.unet import UNet
from xldm.weights.keys_unet import unet_diffusers_config, unet_original_to_diffusers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}


def check_size(parser: argparse.ArgumentParser, size: int) -> None:
    """Image sides the SDXL UNet takes: multiples of 8 (the VAE factor), 1024 (SDXL's native size) included."""
    if size % 8 or size < 64:
        parser.error(f"--size must be a multiple of 8 and at least 64 (the latents are size / 8), got {size}")


def device_arg(parser: argparse.ArgumentParser, value: str) -> torch.device:
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {value}: CUDA is not available here")
    return device


def attention_backend(name: str | None):
    """The context to run under: one forced SDPA backend, or none (torch chooses per call)."""
    return sdpa_kernel(SDPA_BACKENDS[name]) if name else contextlib.nullcontext()


def compile_timed(fn):
    """`fn` compiled with torch.compile, and a list that gets the seconds of its first (compiling) call."""
    compiled, seconds = torch.compile(fn), []

    def run(*args, **kwargs):
        if seconds:
            return compiled(*args, **kwargs)
        start = time.perf_counter()
        out = compiled(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return out

    return run, seconds


def build(config_name: str, dtype: torch.dtype, device: torch.device):
    from diffusers import UNet2DConditionModel

    config = PRESETS[config_name]
    torch.manual_seed(0)
    with torch.device(device):
        ours = UNet(config.unet).to(dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**unet_diffusers_config(
            config.unet, addition_time_embed_dim=config.micro_conditioning_dim))
    # diffusers gets its own copy of the same values (clone: the two models must not share storage)
    state = {k: v.clone() for k, v in unet_original_to_diffusers(ours.state_dict(), config.unet).items()}
    theirs.load_state_dict(state, strict=True, assign=True)
    return config, ours.eval(), theirs.eval()


def inputs(config, batch: int, size: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    x = torch.randn(batch, config.unet.in_channels, latent, latent, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    ctx = torch.randn(batch, 77, config.unet.context_dim, generator=g).to(device, dtype)
    added = None
    y = None
    if config.unet.adm_in_channels:
        pooled_dim = config.text_encoders[-1].projection_dim
        n_ids = (config.unet.adm_in_channels - pooled_dim) // config.micro_conditioning_dim
        pooled = torch.randn(batch, pooled_dim, generator=g).to(device, dtype)
        ids = torch.tensor([[float(size)] * n_ids] * batch, device=device)
        added = {"text_embeds": pooled, "time_ids": ids.to(dtype)}
        emb = timestep_embedding(ids.flatten(), config.micro_conditioning_dim).reshape(batch, -1)
        y = torch.cat([pooled, emb.to(dtype)], dim=-1)
    return x, t, ctx, y, added


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(runs: dict, repeats: int, device) -> tuple[dict, dict]:
    """Each named run `repeats` times, the runs alternating so that load changes hit every side alike: the median
    seconds per name and, on CUDA, the peak allocated bytes per name (0 on CPU)."""
    times = {name: [] for name in runs}
    peak = {name: 0 for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            gc.collect()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(timed(fn, device))
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
    return {name: statistics.median(t) for name, t in times.items()}, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny-sdxl-base", choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the preset's)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG pair")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets (compile time printed)")
    parser.add_argument("--sdpa", default=None, choices=sorted(SDPA_BACKENDS),
                        help="force one SDPA backend (default: torch's choice)")
    args = parser.parse_args()
    device, dtype = device_arg(parser, args.device), DTYPES[args.dtype]
    if args.size is not None:
        check_size(parser, args.size)

    config, ours, theirs = build(args.config, dtype, device)
    size = args.size or config.default_size
    x, t, ctx, y, added = inputs(config, args.batch, size, dtype, device)
    ours_fn, theirs_fn = ours, theirs
    compile_seconds = {}
    if args.compile:
        from xldm.models.unet import compile_unet

        compile_unet(ours, lambda s: compile_seconds.__setitem__("xldm", s))
        theirs_fn, theirs_seconds = compile_timed(theirs)

    def run_ours():
        return ours_fn(x, t, ctx, y)

    def run_theirs():
        return theirs_fn(x, t, ctx, added_cond_kwargs=added).sample

    with torch.inference_mode(), attention_backend(args.sdpa):
        diff = (run_ours().float() - run_theirs().float()).abs().max().item()  # also the warm-up (and compile)
        med, peak = alternate({"xldm": run_ours, "diffusers": run_theirs}, args.repeats, device)
    print(f"config {args.config}, {size}x{size}, batch {args.batch}, {args.dtype}, {device}, "
          f"sdpa {args.sdpa or 'auto'}{', compiled' if args.compile else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.compile:
        print(f"compile time (first call): xldm {compile_seconds['xldm']:.1f} s, diffusers {theirs_seconds[0]:.1f} s")
    print(f"xldm      {med['xldm'] * 1000:9.1f} ms  (median of {args.repeats})")
    print(f"diffusers {med['diffusers'] * 1000:9.1f} ms")
    print(f"ratio xldm/diffusers {med['xldm'] / med['diffusers']:.3f}   max abs diff {diff:.2e}")
    if device.type == "cuda":
        print(f"peak allocated: xldm {peak['xldm'] / 2**30:.2f} GiB, diffusers {peak['diffusers'] / 2**30:.2f} GiB")
    else:
        print(f"peak RSS (both models in one process) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
