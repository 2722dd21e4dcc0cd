"""Weight-only int8 for a network's Linear and 1x1 Conv2d layers, with torch's own ops.

Each weight row (one output channel) is stored as int8 values q and one scale s = max|W_row| / 127, so that
W ~ q * s (symmetric per-channel quantization, Jacob et al. 2018, "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference", Sec. 2; per-output-channel scales as in Krishnamoorthi 2018,
Sec. 3.1).  The weight is dequantized to the compute dtype in each forward and multiplied as usual, so activations
keep their precision: only the weights' memory shrinks, to a quarter of fp32 (half of bf16) plus one scale per row.

The quantized layers stay `nn.Linear` / `nn.Conv2d` (subclasses) whose `weight` is the dequantized tensor, so
LoRA adapters that add their own output (`xldm.lora.network.Patch`, unfused) work on them unchanged; a fused LoRA,
which writes into the weight, is refused (`QuantizedWeight` is read-only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANTIZE_MODES = ("int8",)


def check_quantize(value: str | None) -> str | None:
    """`value` if it names a mode (None: no quantization), else a ValueError saying which exist."""
    if value is None or value in QUANTIZE_MODES:
        return value
    raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)} (or None for none), got {value!r}")


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values, per-row scale of shape (out, 1, ...) in the weight's dtype) with weight ~ values * scale.  The
    scale is rounded to its dtype before the values are computed against it, so no rounding of the stored scale
    is left to bias a row."""
    w = weight.detach().float()
    amax = w.flatten(1).abs().amax(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    scale = (amax / 127).clamp(min=torch.finfo(weight.dtype).tiny).to(weight.dtype)
    values = torch.round(w / scale.float()).clamp_(-127, 127).to(torch.int8)
    return values, scale


class QuantizedWeight:
    """Mixin of the int8 layers: `qweight` (int8) and `scale` buffers in place of the `weight` parameter."""

    qweight: Tensor
    scale: Tensor

    def _quantize_from(self, layer: nn.Module) -> None:
        values, scale = quantize_rows(layer.weight)
        self.register_buffer("qweight", values)
        self.register_buffer("scale", scale)
        self.register_parameter("bias", layer.bias)  # (a Parameter, or None)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, in the scale's dtype (the layer's compute dtype)."""
        return self.qweight.to(self.scale.dtype) * self.scale


class Int8Linear(QuantizedWeight, nn.Linear):
    def __init__(self, layer: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._quantize_from(layer)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Int8Conv2d(QuantizedWeight, nn.Conv2d):
    """A 1x1 convolution (a per-pixel Linear)."""

    def __init__(self, layer: nn.Conv2d) -> None:
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(layer, name))
        self._quantize_from(layer)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _quantizable(layer: nn.Module) -> bool:
    if isinstance(layer, QuantizedWeight):
        return False
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros")


def quantize_weights(module: nn.Module) -> int:
    """Replace every Linear and 1x1 Conv2d of `module` by its int8 form, in place, one layer at a time (the float
    weight is freed as its int8 copy is made); returns how many were replaced.  Run it before any LoRA is set."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _quantizable(child):
                if "_adapter_patch" in child.__dict__:
                    raise ValueError("quantize the weights before any LoRA is applied to them")
                quantized = Int8Linear(child) if isinstance(child, nn.Linear) else Int8Conv2d(child)
                setattr(parent, name, quantized.requires_grad_(False))
                count += 1
    return count


def weight_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of the Linear / 1x1 Conv2d weights of `module` ('weights', int8 values and scales when quantized)
    and of everything else ('other')."""
    weights = other = 0
    for layer in module.modules():
        own = {**layer._parameters, **layer._buffers}
        for name, t in own.items():
            if t is None:
                continue
            if isinstance(layer, QuantizedWeight) and name in ("qweight", "scale") or (
                    name == "weight" and _quantizable(layer)):
                weights += t.numel() * t.element_size()
            else:
                other += t.numel() * t.element_size()
    return {"weights": weights, "other": other}
