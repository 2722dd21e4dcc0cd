"""Seeded Gaussian noise, drawn exactly as diffusers draws it (`diffusers.utils.torch_utils.randn_tensor`)."""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape, generator: Generator, device, dtype: torch.dtype | None) -> torch.Tensor:
    """Standard normal tensor of `shape` on `device`, equal to diffusers' `randn_tensor`: a CPU generator draws on
    the CPU, then moves (same numbers on every device; a CUDA generator for a CPU tensor is an error); a list of
    generators draws row i from generators[i] (a list of one acts as the single generator)."""
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
