"""Seeded Gaussian noise, drawn exactly as diffusers draws it (`diffusers.utils.torch_utils.randn_tensor`).

Reproducing a diffusers image needs the same random numbers in the same order: a CPU generator draws on
the CPU and the result is moved to the target device; a list of generators draws one batch row each.
"""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape, generator: Generator, device, dtype: torch.dtype | None) -> torch.Tensor:
    """Standard normal tensor of `shape` on `device`, equal to diffusers'
    `randn_tensor(shape, generator=generator, device=device, dtype=dtype)`.

    - a CPU generator with a non-CPU `device`: draw on the CPU, then move (so seeds give the same numbers on
      every device); a CUDA generator with a CPU `device` is an error, as in diffusers;
    - a list of generators: row i is `randn((1, *shape[1:]), generator=generators[i])`, rows concatenated;
      a list of length 1 behaves like the single generator.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_device = device
    if generator is not None:
        gen_type = generator[0].device.type if isinstance(generator, list) else generator.device.type
        if gen_type != device.type and gen_type == "cpu":
            draw_device = torch.device("cpu")
        elif gen_type != device.type and gen_type == "cuda":
            raise ValueError(f"cannot draw a {device} tensor from a generator on {gen_type}")

    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per batch row")
        rows = [torch.randn((1,) + shape[1:], generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
