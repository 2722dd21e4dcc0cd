"""Low-rank adapters on a model's layers: the weight arithmetic of every format, and how it is applied.

One `Adapter` per adapted layer holds that layer's tensors under the names the files use (kohya `lora_down` /
`lora_up` / `lora_mid`, LyCORIS `hada_*`, `lokr_*`, `diff`, and `dora_scale`).  Its update is
  LoRA / LoCon   (alpha / r) * up @ down   (Hu et al. 2022, Eq. 3; alpha absent: alpha = r), Tucker `lora_mid`;
  LoHa           (alpha / r) * (w1a @ w1b) * (w2a @ w2b)  (Hyeon-Woo et al. 2022; Tucker `hada_t1/t2`);
  LoKr           (alpha / r) * kron(w1, w2), each factor whole or `_a @ _b` (r from the factored one, else 1);
  full           diff (and diff_b for the bias);
and DoRA (Liu et al. 2024) rescales W + update to the stored magnitude, per output row when `dora_scale` has one
value per row, per input column otherwise (A1111 `network.py` `apply_weight_decompose`).  A multiplier m gives
m * update (kohya / LyCORIS `dora_scale`: m * (W_dora - W)), as A1111 and ComfyUI apply it.  PEFT DoRA files
(`lora_magnitude_vector`, `multiplier_inside_norm`) follow peft instead (peft `tuners/lora/dora.py`
`get_weight_norm`, `tuners/lora/layer.py` `set_scale`): with s = m * alpha / r,
W' = magnitude * (W + s * up @ down) / ||W + s * up @ down||, so even m = 0 rescales W to the magnitude.

`Patch` keeps the adapters active on one layer: unfused as a forward hook (`W x + m * up(down(x))` for plain
LoRA, the full update otherwise), or fused into the weight with the original kept, so removing them restores
it bit for bit."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xldm.errors import LoraError

FACTOR_NAMES = ("lora_down", "lora_up", "lora_mid", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a",
                "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                "lokr_w2_b", "lokr_t2", "diff", "diff_b")
_KINDS = {"lora": ("lora_down", "lora_up"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
          "lokr": (), "full": ("diff",)}


class MalformedAdapterError(LoraError):
    """One layer's tensors have impossible shapes or contradict each other (`tensor`: the one at fault, if one is)."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _tucker(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """(out, in, kh, kw) from a Tucker core (r1, r2, kh, kw), left (r1, out) and right (r2, in): LyCORIS
    `rebuild_tucker` (LoHa's `hada_w*_a` is stored (r1, out); LoCon's `lora_up` (out, r1, 1, 1) is passed
    transposed)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, right.flatten(1), left.flatten(1))


class Adapter(nn.Module):
    """The tensors one file holds for one layer (parameters: trainable when the adapter is trained)."""

    def __init__(self, tensors: dict[str, Tensor], *, trainable: bool = False) -> None:
        super().__init__()
        unknown = sorted(set(tensors) - set(FACTOR_NAMES))
        if unknown:
            raise ValueError(f"unknown adapter tensors {unknown}; expected names among {FACTOR_NAMES}")
        self.kind = next((k for k, need in _KINDS.items() if need and all(n in tensors for n in need)),
                         "lokr" if any(n.startswith("lokr_") for n in tensors) else "")
        if not self.kind:
            raise ValueError(f"adapter tensors {sorted(tensors)} form no known kind (LoRA lora_down + lora_up, LoHa "
                             f"hada_w1_a/b + hada_w2_a/b, LoKr lokr_w1* + lokr_w2*, full diff)")
        if self.kind == "lokr":
            for i in (1, 2):
                if f"lokr_w{i}" not in tensors and not {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(tensors):
                    raise MalformedAdapterError(f"LoKr tensors {sorted(tensors)} lack factor {i}: expected lokr_w{i} "
                                                f"or lokr_w{i}_a and lokr_w{i}_b")
        alpha = tensors.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise MalformedAdapterError(f"alpha has shape {_shape(alpha)}; expected one number", "alpha")
        empty = next((k for k, v in tensors.items() if k != "alpha" and v.numel() == 0), None)
        if empty is not None:
            raise MalformedAdapterError(f"{empty} has shape {_shape(tensors[empty])}, with no values (rank 0?)", empty)
        self.alpha = None if alpha is None else float(alpha.float().reshape(-1)[0])
        self.factors = nn.ParameterDict({k: nn.Parameter(v, requires_grad=trainable)
                                         for k, v in tensors.items() if k != "alpha"})
        self.multiplier_inside_norm = False  # PEFT DoRA: the multiplier scales the update inside the norm

    def file_tensors(self) -> dict[str, Tensor]:
        """What a file stores for this layer (kohya names without the `.weight` suffix, alpha as a 0-d tensor)."""
        out = {k: v.detach() for k, v in self.factors.items()}
        if self.alpha is not None:
            out["alpha"] = torch.tensor(self.alpha)
        return out

    @property
    def rank(self) -> int | None:
        f = self.factors
        for name in ("lora_down", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if name in f:
                return f[name].shape[0]
        return None

    @property
    def scale(self) -> float:
        """alpha / rank (kohya); LoKr with neither factor split: 1 (ComfyUI `lokr` weight adapter)."""
        rank = self.rank
        if rank is None or self.kind == "full":
            return 1.0
        if self.kind == "lokr" and "lokr_w1_b" not in self.factors and "lokr_w2_b" not in self.factors:
            return 1.0
        return (self.alpha if self.alpha is not None else rank) / rank

    @property
    def low_rank(self) -> bool:
        """Plain LoRA / LoCon without Tucker core or DoRA: the hook can run it as two small layers."""
        return self.kind == "lora" and "lora_mid" not in self.factors and "dora_scale" not in self.factors

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """MalformedAdapterError when the tensors contradict each other, ValueError unless the update fits a weight
        of `shape` (LoRA: from the factor shapes alone; the other kinds by a trial update)."""
        f = self.factors
        if "dora_scale" in f:
            outputs = (shape[0],) if self.multiplier_inside_norm else (shape[0], shape[1])  # PEFT: one per output
            if f["dora_scale"].numel() not in outputs:
                raise ValueError(f"dora_scale has {f['dora_scale'].numel()} values; the layer has {shape[0]} outputs "
                                 f"and {shape[1]} inputs")
        if self.kind != "lora":
            try:
                self.update(torch.zeros(shape))
            except (RuntimeError, IndexError, KeyError) as e:  # factors whose shapes do not multiply
                shapes = ", ".join(f"{k} {_shape(v)}" for k, v in f.items())
                kind = {"loha": "LoHa", "lokr": "LoKr"}.get(self.kind, self.kind)
                raise MalformedAdapterError(f"the {kind} factors do not multiply: {shapes} ({e})") from None
            return
        down, up = f["lora_down"], f["lora_up"]
        for name, tensor in (("lora_down", down), ("lora_up", up)):
            if tensor.dim() not in (2, 4):
                raise MalformedAdapterError(f"{name} has shape {_shape(tensor)}; expected a matrix or a 4-d "
                                            f"convolution weight", name)
        rank = up.flatten(1).shape[1]
        if "lora_mid" in f:  # LyCORIS Tucker: down (r2, in, 1, 1), mid (r1, r2, kh, kw), up (out, r1, 1, 1)
            mid = f["lora_mid"]
            if mid.dim() != 4 or mid.shape[:2] != (rank, down.shape[0]) or math.prod(down.shape[2:]) != 1:
                raise MalformedAdapterError(f"lora_mid {_shape(mid)} does not join lora_down {_shape(down)} to "
                                            f"lora_up {_shape(up)}: expected ({rank}, {down.shape[0]}, kh, kw) "
                                            f"and a 1x1 lora_down", "lora_mid")
            if len(shape) != 4 or (up.shape[0], down.shape[1], *mid.shape[2:]) != tuple(shape):
                raise ValueError(f"lora_up {_shape(up)}, lora_mid {_shape(mid)}, lora_down {_shape(down)} do not "
                                 f"give the layer's weight {tuple(shape)}")
            return
        if rank != down.shape[0]:
            raise MalformedAdapterError(f"lora_up {_shape(up)} has rank {rank}, lora_down {_shape(down)} rank "
                                        f"{down.shape[0]}", "lora_up")
        if up.shape[0] != shape[0] or up.shape[0] * math.prod(down.shape[1:]) != math.prod(shape):
            raise ValueError(f"lora_up {_shape(up)} @ lora_down {_shape(down)} does not give the layer's "
                             f"weight {tuple(shape)}")

    def update(self, weight: Tensor, multiplier: float = 1.0) -> Tensor:
        """The update of `weight` at `multiplier`, in float32, shaped like it."""
        f = {k: v.float() for k, v in self.factors.items()}
        shape = weight.shape
        if self.kind == "lora":
            up, down = f["lora_up"], f["lora_down"]
            # Tucker LoCon: down (1x1, in -> r), mid (k x k, r -> r), up (1x1, r -> out), composed into one weight
            delta = (_tucker(f["lora_mid"], up.flatten(1).t(), down) if "lora_mid" in f
                     else up.flatten(1) @ down.flatten(1))
        elif self.kind == "loha":
            halves = [_tucker(f[f"hada_t{i}"], f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]) if f"hada_t{i}" in f
                      else f[f"hada_w{i}_a"] @ f[f"hada_w{i}_b"] for i in (1, 2)]
            if halves[0].shape != halves[1].shape:  # (no broadcasting: each half is a whole weight)
                raise RuntimeError(f"hada_w1 gives {_shape(halves[0])}, hada_w2 {_shape(halves[1])}")
            delta = halves[0] * halves[1]
        elif self.kind == "lokr":
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            if "lokr_w2" in f:
                w2 = f["lokr_w2"]
            elif "lokr_t2" in f:
                w2 = torch.einsum("i j k l, i p, j r -> p r k l", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
            else:
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
            if w2.dim() == 4 and w1.dim() == 2:
                w1 = w1[:, :, None, None]
            delta = torch.kron(w1, w2)
        else:
            delta = f["diff"]
        if delta.numel() != weight.numel():
            raise ValueError(f"{self.kind} update has {tuple(delta.shape)} values, the layer's weight is "
                             f"{tuple(shape)}")
        delta = delta.reshape(shape) * self.scale
        inside = "dora_scale" in f and self.multiplier_inside_norm
        if inside:
            delta = delta * multiplier
        if "dora_scale" in f:
            base = weight.float()
            merged = base + delta
            magnitude = f["dora_scale"]
            per_output = magnitude.numel() == shape[0] and (magnitude.shape[0] == shape[0] or inside)  # PEFT: always
            if per_output:  # one value per output row (peft stores a conv's as (1, out, 1, 1))
                norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
            else:  # one per input column (LyCORIS' default, wd_on_out=False)
                norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (merged.dim() - 2))
            delta = merged * (magnitude.reshape(norm.shape) / norm) - base
        return delta if inside else delta * multiplier

    def active_at(self, multiplier: float) -> bool:
        """Whether the layer changes at `multiplier` (PEFT DoRA rescales W to the magnitude even at 0)."""
        return multiplier != 0 or ("dora_scale" in self.factors and self.multiplier_inside_norm)

    def low_rank_output(self, layer: nn.Module, x: Tensor) -> Tensor:
        """up(down(x)) * scale with the layer's own stride/padding for the down convolution (kohya LoRAModule)."""
        down, up = self.factors["lora_down"].to(x.dtype), self.factors["lora_up"].to(x.dtype)
        if isinstance(layer, nn.Conv2d):
            down = down if down.dim() == 4 else down[:, :, None, None]
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
            return F.conv2d(h, up if up.dim() == 4 else up[:, :, None, None]) * self.scale
        return F.linear(F.linear(x, down.flatten(1)), up.flatten(1)) * self.scale


def _layer_output(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


class Patch:
    """The adapters active on one Linear / Conv2d layer: `entries[key] = (adapter, multiplier, fused)`."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.entries: dict[str, tuple[Adapter, float, bool]] = {}
        self.original: tuple[Tensor, Tensor | None] | None = None  # weight, bias before fusing
        self.hook = layer.register_forward_hook(self._forward)
        self._cached: tuple[tuple, Tensor, Tensor | None] | None = None  # unfused full updates, summed

    def _forward(self, layer: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
        x = inputs[0]
        unfused = [(a, m) for a, m, fused in self.entries.values() if not fused and a.active_at(m)]
        for adapter, multiplier in unfused:
            if adapter.low_rank:
                out = out + adapter.low_rank_output(layer, x) * multiplier
        full = [(a, m) for a, m in unfused if not a.low_rank]
        if full:
            signature = tuple((id(a), m, a.factors.training) for a, m in full)
            if self._cached is None or self._cached[0] != signature or torch.is_grad_enabled():
                weight = layer.weight if self.original is None else self.original[0].to(layer.weight.device)
                delta = sum(a.update(weight, m) for a, m in full)
                bias = sum(a.factors["diff_b"].float() * m for a, m in full if "diff_b" in a.factors) \
                    if any("diff_b" in a.factors for a, _ in full) else None
                self._cached = (signature, delta, bias)
            _, delta, bias = self._cached
            out = out + _layer_output(layer, x, delta.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return out

    def refuse(self) -> None:
        """Rewrite the weight from the original plus every fused update (or restore it when none is left)."""
        layer, fused = self.layer, [(a, m) for a, m, f in self.entries.values() if f]
        self._cached = None
        with torch.no_grad():
            if fused and self.original is None:
                self.original = (layer.weight.detach().to("cpu", copy=True),
                                 None if layer.bias is None else layer.bias.detach().to("cpu", copy=True))
            if self.original is None:
                return
            weight, bias = self.original
            if not fused:
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
                self.original = None
                return
            base = weight.to(layer.weight.device)
            total = base.float() + sum(a.update(base, m) for a, m in fused)
            layer.weight.copy_(total.to(layer.weight.dtype))
            biases = [a.factors["diff_b"].float() * m for a, m in fused if "diff_b" in a.factors]
            if biases and layer.bias is not None:
                layer.bias.copy_((bias.to(layer.bias.device).float() + sum(biases)).to(layer.bias.dtype))

    def close(self) -> None:
        self.entries.clear()
        self.refuse()
        self.hook.remove()


def patch_of(layer: nn.Module, create: bool = True) -> Patch | None:
    patch = layer.__dict__.get("_adapter_patch")
    if patch is None and create:
        patch = layer.__dict__["_adapter_patch"] = Patch(layer)
    return patch


def set_adapter(layer: nn.Module, key: str, adapter: Adapter | None, multiplier: float = 1.0,
                fused: bool = False) -> None:
    """Activate (or, with None, remove) adapter `key` on `layer`; a layer left with none is restored and unhooked."""
    from xldm.models.quantize import QuantizedWeight

    if adapter is not None and fused and isinstance(layer, QuantizedWeight):
        raise ValueError("a LoRA cannot be fused into int8-quantized weights (quantize='int8'); use it unfused "
                         "(the default), which adds its output to the layer's")
    patch = patch_of(layer, create=adapter is not None)
    if patch is None:
        return
    was_fused = patch.entries.get(key, (None, 0.0, False))[2]
    if adapter is None:
        patch.entries.pop(key, None)
    else:
        adapter.to(layer.weight.device)  # (the file's dtype is kept; the hook casts to the activations')
        patch.entries[key] = (adapter, float(multiplier), fused)
    if fused or was_fused:
        patch.refuse()
    patch._cached = None
    if not patch.entries:
        patch.close()
        del layer.__dict__["_adapter_patch"]
