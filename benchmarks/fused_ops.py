"""GroupNorm + SiLU and GEGLU: eager (what the UNet runs) vs the same code through `torch.compile`, which fuses them.

    python benchmarks/fused_ops.py                                  # a mid UNet block's shapes, fp32, CPU
    python benchmarks/fused_ops.py --device cuda --dtype bf16 --channels 640 --side 64

torch has no eager fused GroupNorm+SiLU or GEGLU op (`F.group_norm` then `F.silu` are two kernels, each a full
pass over the activation; GEGLU's `value * F.gelu(gate)` three); inductor fuses each pair into one kernel.  Prints
the median time of each (alternating runs, `unet_step.alternate`), the ratio compiled / eager and the compile time.
The shapes are those of a ResBlock's norm (B, C, side, side) and of a transformer block's GEGLU (B, side^2, 2 x 4C)
-> (B, side^2, 4C) at one UNet level (SDXL: C 320 / 640 / 1280 at latent sides 128 / 64 / 32 for 1024^2).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from unet_step import DTYPES, alternate, device_arg  # the UNet benchmark's dtype names, timer, checks (this folder)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """The ResBlock's `nn.GroupNorm(groups, C, eps=1e-5)` then `nn.SiLU()` (xldm.models.layers.ResBlock)."""
    return F.silu(F.group_norm(x, groups, weight, bias, 1e-5))


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """xldm.models.layers.GEGLU after its Linear: value * gelu(gate), exact (erf) gelu."""
    value, gate = projected.chunk(2, dim=-1)
    return value * F.gelu(gate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=320, help="C: the level's width")
    parser.add_argument("--side", type=int, default=32, help="the latent side at that level")
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG pair")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = device_arg(parser, args.device), DTYPES[args.dtype]
    if args.channels % args.groups:
        parser.error(f"--channels ({args.channels}) must be divisible by --groups ({args.groups})")

    g = torch.Generator().manual_seed(0)
    c, side = args.channels, args.side
    x = torch.randn(args.batch, c, side, side, generator=g).to(device, dtype)
    weight, bias = (torch.randn(c, generator=g).to(device, dtype) for _ in range(2))
    projected = torch.randn(args.batch, side * side, 2 * 4 * c, generator=g).to(device, dtype)
    cases = {
        "group_norm+silu": (group_norm_silu, (x, weight, bias, args.groups)),
        "geglu": (geglu, (projected,)),
    }
    print(f"{args.batch}x{c}x{side}x{side}, {args.dtype}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| op | eager | compiled | compiled / eager | compile time | max abs diff |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (fn, inputs) in cases.items():
            compiled = torch.compile(fn)
            start = time.perf_counter()
            diff = (compiled(*inputs).float() - fn(*inputs).float()).abs().max().item()
            compile_s = time.perf_counter() - start
            med, _ = alternate({"eager": lambda: fn(*inputs), "compiled": lambda: compiled(*inputs)},
                               args.repeats, device)
            print(f"| {name} | {med['eager'] * 1000:.2f} ms | {med['compiled'] * 1000:.2f} ms | "
                  f"{med['compiled'] / med['eager']:.3f} | {compile_s:.1f} s | {diff:.1e} |")


if __name__ == "__main__":
    main()
