"""Malformed adapter files are refused when read, with LoraError naming the file and the tensor or metadata field:
tensors with no values or impossible shapes, factors that do not multiply, and PEFT metadata of the wrong type."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from xldm.config import TINY_SDXL_BASE
from xldm.lora import LoraError, LoraSet, read_lora

LINEAR = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # weight (64, 80)
CONV = "lora_unet_input_blocks_0_0"  # weight (32, 4, 3, 3)
PEFT = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # the same layer as LINEAR


def _r(*shape):
    return torch.randn(*shape) * 0.01


def _lora(down, up, **extra):
    return {f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.lora_up.weight": up,
            **{f"{LINEAR}.{k}": v for k, v in extra.items()}}


def _loha(w1b):
    return {f"{LINEAR}.hada_w1_a": _r(64, 4), f"{LINEAR}.hada_w1_b": w1b, f"{LINEAR}.hada_w2_a": _r(64, 4),
            f"{LINEAR}.hada_w2_b": _r(4, 80)}


BAD_TENSORS = {
    "alpha_empty": (_lora(_r(4, 80), _r(64, 4), alpha=torch.zeros(0)),
                    rf"{LINEAR}\.alpha: alpha has shape \(0,\); expected one number"),
    "up_0d": (_lora(_r(1, 80), torch.tensor(1.0)), rf"{LINEAR}\.lora_up\.weight: lora_up has shape \(\)"),
    "rank_0": (_lora(_r(0, 80), _r(64, 0)), rf"{LINEAR}\.lora_down\.weight: lora_down has shape \(0, 80\).*rank 0"),
    "ranks_differ": (_lora(_r(4, 80), _r(64, 3)), rf"{LINEAR}\.lora_up\.weight: lora_up \(64, 3\) has rank 3"),
    "loha_inner": (_loha(_r(5, 80)), rf"layer {LINEAR}: the LoHa factors do not multiply: .*hada_w1_b \(5, 80\)"),
    "loha_broadcast": ({f"{LINEAR}.hada_w1_a": _r(64, 4), f"{LINEAR}.hada_w1_b": _r(4, 1),
                        f"{LINEAR}.hada_w2_a": _r(1, 4), f"{LINEAR}.hada_w2_b": _r(4, 80)},
                       rf"layer {LINEAR}: the LoHa factors do not multiply: .*hada_w1 gives \(64, 1\), hada_w2 \(1,"),
    "lokr_inner": ({f"{LINEAR}.lokr_w1_a": _r(8, 2), f"{LINEAR}.lokr_w1_b": _r(3, 8), f"{LINEAR}.lokr_w2": _r(8, 10)},
                   rf"layer {LINEAR}: the LoKr factors do not multiply: lokr_w1_a \(8, 2\), lokr_w1_b \(3, 8\)"),
    "lokr_half": ({f"{LINEAR}.lokr_w1": _r(8, 8)},
                  rf"layer {LINEAR}: LoKr tensors \['lokr_w1'\] lack factor 2: expected lokr_w2 or"),
    "tucker_mid": ({f"{CONV}.lora_down.weight": _r(4, 4, 1, 1), f"{CONV}.lora_up.weight": _r(32, 4, 1, 1),
                    f"{CONV}.lora_mid.weight": _r(5, 7, 3, 3)},
                   rf"{CONV}\.lora_mid\.weight: lora_mid \(5, 7, 3, 3\) does not join .*expected \(4, 4, kh, kw\)"),
}


@pytest.mark.parametrize("name", sorted(BAD_TENSORS))
def test_malformed_tensors_are_refused_when_read(tmp_path, name):
    tensors, message = BAD_TENSORS[name]
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with pytest.raises(LoraError, match=rf"{name}\.safetensors: {message}"):
        read_lora(path, TINY_SDXL_BASE)
    with pytest.raises(LoraError, match=message):  # and before anything is applied
        LoraSet(TINY_SDXL_BASE).set([(path, 1.0)])


BAD_METADATA = {  # the message after "lora_adapter_metadata "
    "not_an_object": ([1], r"must be a JSON object, found list \[1\]"),
    "pattern_list": ({"unet.alpha_pattern": [1]}, r"field unet\.alpha_pattern must be a JSON object.*found \[1\]"),
    "pattern_regex": ({"unet.alpha_pattern": {"(": 2}}, r"field unet\.alpha_pattern: '\(' is not a valid regular"),
    "pattern_value": ({"unet.alpha_pattern": {"to_k": "high"}},
                      r"field unet\.alpha_pattern: 'to_k' must map to a finite number, found 'high'"),
    "alpha_null": ({"unet.lora_alpha": None}, r"field unet\.lora_alpha must be a finite number, found None"),
    "alpha_text": ({"unet.lora_alpha": "x", "unet.use_rslora": True},
                   r"field unet\.lora_alpha must be a finite number, found 'x'"),
    "alpha_infinite": ({"unet.lora_alpha": float("inf")}, r"field unet\.lora_alpha must be a finite number, found inf"),
    "rslora_text": ({"unet.lora_alpha": 4, "unet.use_rslora": "yes"},
                    r"field unet\.use_rslora must be true or false, found 'yes'"),
    "rank_text": ({"unet.r": "4"}, r"field unet\.r must be a positive integer, found '4'"),
    "dora_text": ({"unet.r": 4, "unet.use_dora": 1}, r"field unet\.use_dora must be true or false, found 1"),
    "rank_pattern_differs": ({"unet.r": 4, "unet.rank_pattern": {"attn2.to_k": 8}},
                             r"field unet\.rank_pattern\['attn2.to_k'\] gives down_blocks\.1\..* rank 8; its tensors"),
}


@pytest.mark.parametrize("name", sorted(BAD_METADATA))
def test_malformed_peft_metadata_is_refused_with_its_field(tmp_path, name):
    config, message = BAD_METADATA[name]
    path = tmp_path / f"{name}.safetensors"
    save_file({f"{PEFT}.lora_A.weight": _r(4, 80), f"{PEFT}.lora_B.weight": _r(64, 4)}, str(path),
              metadata={"lora_adapter_metadata": json.dumps(config), "format": "pt"})
    with pytest.raises(LoraError, match=rf"{name}\.safetensors: lora_adapter_metadata {message}"):
        read_lora(path, TINY_SDXL_BASE)


def test_peft_magnitudes_without_use_dora_are_refused(tmp_path):
    """diffusers builds LoraConfig(use_dora=False) from such metadata and leaves the magnitudes unloaded: the file
    contradicts itself, so neither reading is picked silently."""
    path = tmp_path / "magnitudes.safetensors"
    save_file({f"{PEFT}.lora_A.weight": _r(4, 80), f"{PEFT}.lora_B.weight": _r(64, 4),
               f"{PEFT}.lora_magnitude_vector": _r(64).abs() + 0.5}, str(path),
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4}), "format": "pt"})
    with pytest.raises(LoraError, match=rf"{PEFT}\.lora_magnitude_vector: a DoRA magnitude, but the "
                                        r"lora_adapter_metadata field unet\.use_dora is not true"):
        read_lora(path, TINY_SDXL_BASE)


def test_rank_0_peft_file_names_its_key(tmp_path):
    path = tmp_path / "rank0.safetensors"
    save_file({f"{PEFT}.lora_A.weight": _r(0, 80), f"{PEFT}.lora_B.weight": _r(64, 0)}, str(path))
    with pytest.raises(LoraError, match=rf"rank0\.safetensors: {PEFT}\.lora_A\.weight: .*rank 0"):
        read_lora(path, TINY_SDXL_BASE)


def test_good_tucker_and_peft_files_still_load(tmp_path):
    tucker = tmp_path / "tucker.safetensors"
    save_file({f"{CONV}.lora_down.weight": _r(4, 4, 1, 1), f"{CONV}.lora_up.weight": _r(32, 4, 1, 1),
               f"{CONV}.lora_mid.weight": _r(4, 4, 3, 3), f"{CONV}.alpha": torch.tensor(2.0)}, str(tucker))
    assert len(read_lora(tucker, TINY_SDXL_BASE).adapters) == 1
    peft = tmp_path / "peft.safetensors"
    save_file({f"{PEFT}.lora_A.weight": _r(4, 80), f"{PEFT}.lora_B.weight": _r(64, 4)}, str(peft),
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                             "unet.use_rslora": True}), "format": "pt"})
    (adapter,) = read_lora(peft, TINY_SDXL_BASE).adapters.values()
    assert adapter.scale == pytest.approx(8 / 2)  # rsLoRA: lora_alpha / sqrt(r)
