"""Where and in what precision a pipeline runs: the default device, `--device` checked before loading, and the
default dtype for the device and the UNet's size (bf16 on CPUs with native bf16 for large UNets, fp32 elsewhere)."""

from __future__ import annotations

from pathlib import Path

import torch

from xldm.models.components import Components


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_device(device: str | None) -> None:
    """Before any loading: `device` parses as a torch device and, for cuda/mps, the backend is available."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a device (expected cpu, cuda, cuda:1, mps ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine (use --device cpu)")


# Below this many UNet parameters bf16 is not faster on a CPU: the matmuls are too small to be compute-bound, the
# time goes to per-op overhead and dtype casts (README "Benchmarks": the bundled 2.1 M-parameter UNet runs no faster
# in bf16), so such models keep fp32 and its exact, reproducible pixels.  SDXL's UNet has 2.57 G.
CPU_BF16_MIN_UNET_PARAMETERS = 100_000_000


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), as torch's CPU kernels see it; where torch
    cannot say, the Linux /proc/cpuinfo flags (avx512_bf16, amx_bf16)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None for check in checks):
        return any(check is not None and bool(check()) for check in checks)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device, unet_parameters: int | None = None) -> torch.dtype:
    """bf16 on GPUs that have it (it does not overflow the SDXL VAE like fp16 does), else fp16; on a CPU, bf16 when
    it computes bf16 natively and the UNet is large enough to gain (`CPU_BF16_MIN_UNET_PARAMETERS`; an unknown
    size counts as small), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and unet_parameters is not None and unet_parameters >= CPU_BF16_MIN_UNET_PARAMETERS:
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def dtype_reason(device: torch.device, dtype: torch.dtype, chosen: bool) -> str:
    """One line saying which dtype runs and why, e.g. "dtype: bf16 (CPU has AVX512-BF16)"."""
    name = DTYPE_NAMES.get(dtype, str(dtype))
    if not chosen:
        return f"dtype: {name} (as asked)"
    if device.type == "cuda":
        return f"dtype: {name} ({'the GPU has bf16' if dtype == torch.bfloat16 else 'the GPU has no bf16'})"
    if dtype == torch.bfloat16:
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return f"dtype: bf16 (CPU has {'AMX' if amx is not None and amx() else 'AVX512-BF16'})"
    if device.type == "cpu" and cpu_has_native_bf16():
        return (f"dtype: fp32 (the UNet is under {CPU_BF16_MIN_UNET_PARAMETERS // 1_000_000} M parameters: "
                "bf16 would not be faster)")
    return f"dtype: fp32 ({'CPU has no native bf16' if device.type == 'cpu' else device.type})"


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def unet_parameters(model: Components | str | Path) -> int | None:
    """The UNet's parameter count, from loaded networks or a file's header (None when it has no UNet)."""
    if isinstance(model, Components):
        return None if model.unet is None else sum(p.numel() for p in model.unet.parameters())
    from xldm.weights.info import model_info

    return next((c.parameters for c in model_info(Path(model)).components if c.name == "unet"), None)
