"""LoRA and LyCORIS adapters: read every common file format, apply several at once, train kohya-format files."""

from xldm.lora.apply import LoraSet, LoraUse, lora_infotext, parse_lora_tags, resolve_lora_name
from xldm.lora.files import LoraError, LoraFile, layer_names, read_lora, write_kohya
from xldm.lora.network import Adapter

__all__ = ["Adapter", "LoraError", "LoraFile", "LoraSet", "LoraUse", "layer_names", "lora_infotext",
           "parse_lora_tags", "read_lora", "resolve_lora_name", "write_kohya"]
