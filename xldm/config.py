"""Frozen configuration dataclasses and named presets for the SD / SDXL family.

Every number in a preset cites where it comes from: the original sgm / ldm inference configs
(`configs/inference/sd_xl_base.yaml`, `sd_xl_refiner.yaml`, `v1-inference.yaml`, `v2-inference-v.yaml`)
and the SDXL paper (Podell et al. 2023).  The field names follow the original (sgm) UNet arguments,
so a reader can hold a preset next to those YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class UNetConfig:
    """The SD/SDXL UNet (sgm `UNetModel`).

    `block_out_channels[i]` is the width of level i (level i has downsample factor 2**i), as diffusers
    `UNet2DConditionModel.block_out_channels`; any widths divisible by `norm_groups`.
    `transformer_depth[i]` is the number of transformer blocks in each attention layer of level i;
    0 means that level has no attention at all.
    SDXL base: (0, 2, 10), "heterogeneous transformer depth, no 8x level" (SDXL paper, Sec. 2.1).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    # Attention heads: either a fixed head width (SD 2.x / SDXL: 64) or a fixed head count (SD 1.x: 8).
    num_head_channels: int = 64
    num_heads: int = -1
    context_dim: int = 2048
    # Width of the "vector" conditioning (pooled text + Fourier micro-conditioning); 0 = none (SD 1.x/2.x).
    adm_in_channels: int = 2816
    # SD 2.x / SDXL project into the transformer with Linear layers, SD 1.x with 1x1 convolutions.
    use_linear_in_transformer: bool = True
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.block_out_channels):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} entries, expected one per level "
                f"({len(self.block_out_channels)})"
            )
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError("set exactly one of num_heads and num_head_channels to a positive value")

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        """4x the first width (sgm `time_embed_dim = model_channels * 4`, diffusers `block_out_channels[0] * 4`)."""
        return self.block_out_channels[0] * 4

    @property
    def attention_widths(self) -> tuple[int, ...]:
        """Widths of the levels with attention, and of the mid block (the last width), which always has it."""
        return tuple(w for w, d in zip(self.block_out_channels, self.transformer_depth) if d > 0) + (
            self.block_out_channels[-1],)

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of an attention layer with `channels` channels."""
        if self.num_heads > 0:
            heads, head_dim = self.num_heads, channels // self.num_heads
        else:
            heads, head_dim = channels // self.num_head_channels, self.num_head_channels
        if heads < 1 or heads * head_dim != channels:
            raise ValueError(f"channel width {channels} does not split into {heads} heads of {head_dim}")
        return heads, head_dim


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder (ldm `AutoencoderKL`, ddconfig names)."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    # Latents fed to the UNet are scaling_factor * z: 0.13025 for SDXL (sgm sd_xl_base.yaml),
    # 0.18215 for SD 1.x/2.x (ldm v1-inference.yaml).
    scaling_factor: float = 0.13025

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer (OpenAI CLIP ViT-L/14 or OpenCLIP ViT-H/14, ViT-bigG/14)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 49408
    max_positions: int = 77
    # OpenAI CLIP uses quick_gelu, x*sigmoid(1.702x); OpenCLIP H/bigG use exact gelu.
    activation: str = "quick_gelu"
    # Width of the pooled-output projection; 0 = the encoder has none (its pooled output is unused).
    projection_dim: int = 0
    layer_norm_eps: float = 1e-5
    # Which hidden state feeds cross-attention: "last" (SD 1.x) or "penultimate" (SD 2.x, SDXL) ...
    layer: str = "penultimate"
    # ... and whether final_layer_norm is applied to it (SD 1.x/2.x: yes; SDXL: no, SDXL_SPEC 3.2).
    final_norm_on_hidden: bool = False
    # Token id used for padding to 77: EOS (49407) for CLIP-L, 0 ("!") for the SDXL bigG tokenizer.
    pad_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
        if self.layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {self.layer!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: UNet, VAE and text encoders, plus how they are wired."""

    kind: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    prediction_type: str = "epsilon"  # or "v" (SD 2.x 768-v)
    # Scalars Fourier-embedded into the vector conditioning, in order (SDXL paper, Sec. 2.2;
    # each is a pair except the aesthetic score).
    micro_conditioning: tuple[str, ...] = ()
    micro_conditioning_dim: int = 256  # per scalar (sgm ConcatTimestepEmbedderND(outdim=256))
    default_size: int = 1024

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v', got {self.prediction_type!r}")
        n_scalars = sum(1 if name == "aesthetic_score" else 2 for name in self.micro_conditioning)
        pooled = self.text_encoders[-1].projection_dim if self.micro_conditioning else 0
        expected = pooled + n_scalars * self.micro_conditioning_dim
        if self.unet.adm_in_channels != expected:
            raise ValueError(
                f"{self.kind}: UNet adm_in_channels is {self.unet.adm_in_channels}, but pooled text "
                f"({pooled}) + {n_scalars} micro-conditioning scalars x {self.micro_conditioning_dim} = {expected}"
            )
        context = sum(te.width for te in self.text_encoders)
        if self.unet.context_dim != context:
            raise ValueError(
                f"{self.kind}: UNet context_dim is {self.unet.context_dim}, but the text encoders give {context}"
            )

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels


BASE_MICRO_CONDITIONING = ("original_size", "crop_top_left", "target_size")
REFINER_MICRO_CONDITIONING = ("original_size", "crop_top_left", "aesthetic_score")

# --- text encoders -------------------------------------------------------------------------------
# OpenAI CLIP ViT-L/14 text tower (transformers CLIPTextConfig of openai/clip-vit-large-patch14).
CLIP_L = TextEncoderConfig(width=768, layers=12, heads=12, intermediate_size=3072, activation="quick_gelu")
# OpenCLIP ViT-bigG/14 text tower (open_clip model_configs/ViT-bigG-14.json), projection 1280.
OPENCLIP_BIGG = TextEncoderConfig(
    width=1280, layers=32, heads=20, intermediate_size=5120, activation="gelu", projection_dim=1280, pad_token_id=0
)
# OpenCLIP ViT-H/14 text tower (open_clip ViT-H-14.json), as SD 2.x uses it: penultimate layer + ln_final
# (ldm FrozenOpenCLIPEmbedder(layer="penultimate")).
OPENCLIP_H = TextEncoderConfig(
    width=1024, layers=24, heads=16, intermediate_size=4096, activation="gelu", projection_dim=1024,
    final_norm_on_hidden=True, pad_token_id=0,
)

# --- SDXL 1.0 (sgm configs/inference/sd_xl_base.yaml, sd_xl_refiner.yaml) ------------------------
SDXL_VAE = VAEConfig(scaling_factor=0.13025)

SDXL_BASE = ModelConfig(
    kind="sdxl-base",
    unet=UNetConfig(
        block_out_channels=(320, 640, 1280), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
        num_head_channels=64, context_dim=2048, adm_in_channels=2816,
    ),
    vae=SDXL_VAE,
    text_encoders=(CLIP_L, OPENCLIP_BIGG),
    micro_conditioning=BASE_MICRO_CONDITIONING,
)

SDXL_REFINER = ModelConfig(
    kind="sdxl-refiner",
    unet=UNetConfig(
        block_out_channels=(384, 768, 1536, 1536), transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
        num_head_channels=64, context_dim=1280, adm_in_channels=2560,
    ),
    vae=SDXL_VAE,
    text_encoders=(OPENCLIP_BIGG,),
    micro_conditioning=REFINER_MICRO_CONDITIONING,
)

# --- SD 1.5 (ldm configs/stable-diffusion/v1-inference.yaml) -------------------------------------
SD15 = ModelConfig(
    kind="sd15",
    unet=UNetConfig(
        block_out_channels=(320, 640, 1280, 1280), transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
        num_head_channels=-1, num_heads=8, context_dim=768, adm_in_channels=0, use_linear_in_transformer=False,
    ),
    vae=VAEConfig(scaling_factor=0.18215),
    text_encoders=(replace(CLIP_L, layer="last", final_norm_on_hidden=True),),
    default_size=512,
)

# --- SD 2.1 768-v (stablediffusion configs/stable-diffusion/v2-inference-v.yaml) -----------------
SD21 = ModelConfig(
    kind="sd21",
    unet=UNetConfig(
        block_out_channels=(320, 640, 1280, 1280), transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
        num_head_channels=64, context_dim=1024, adm_in_channels=0, use_linear_in_transformer=True,
    ),
    vae=VAEConfig(scaling_factor=0.18215),
    text_encoders=(OPENCLIP_H,),
    prediction_type="v",
    default_size=768,
)

# --- tiny presets for tests (SDXL_SPEC 7.2: same structure, small widths) -------------------------
TINY_CLIP_L = TextEncoderConfig(width=32, layers=3, heads=4, intermediate_size=64, activation="quick_gelu")
TINY_OPENCLIP_BIGG = TextEncoderConfig(
    width=48, layers=3, heads=4, intermediate_size=192, activation="gelu", projection_dim=48, pad_token_id=0
)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=0.13025)

TINY_SDXL_BASE = ModelConfig(
    kind="sdxl-base",
    unet=UNetConfig(
        block_out_channels=(32, 64, 128), transformer_depth=(0, 1, 2), transformer_depth_middle=2,
        num_head_channels=32, context_dim=32 + 48, adm_in_channels=48 + 6 * 8,
    ),
    vae=TINY_VAE,
    text_encoders=(TINY_CLIP_L, TINY_OPENCLIP_BIGG),
    micro_conditioning=BASE_MICRO_CONDITIONING,
    micro_conditioning_dim=8,
    default_size=64,
)

TINY_SDXL_REFINER = ModelConfig(
    kind="sdxl-refiner",
    unet=UNetConfig(
        block_out_channels=(32, 64, 128, 128), transformer_depth=(0, 2, 2, 0), transformer_depth_middle=2,
        num_head_channels=32, context_dim=48, adm_in_channels=48 + 5 * 8,
    ),
    vae=TINY_VAE,
    text_encoders=(TINY_OPENCLIP_BIGG,),
    micro_conditioning=REFINER_MICRO_CONDITIONING,
    micro_conditioning_dim=8,
    default_size=64,
)

TINY_SD15 = ModelConfig(
    kind="sd15",
    unet=UNetConfig(
        block_out_channels=(32, 64, 64, 64), transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
        num_head_channels=-1, num_heads=2, context_dim=32, adm_in_channels=0, use_linear_in_transformer=False,
    ),
    vae=replace(TINY_VAE, scaling_factor=0.18215),
    text_encoders=(replace(TINY_CLIP_L, layer="last", final_norm_on_hidden=True),),
    default_size=64,
)

PRESETS: dict[str, ModelConfig] = {
    "sdxl-base": SDXL_BASE,
    "sdxl-refiner": SDXL_REFINER,
    "sd15": SD15,
    "sd21": SD21,
    "tiny-sdxl-base": TINY_SDXL_BASE,
    "tiny-sdxl-refiner": TINY_SDXL_REFINER,
    "tiny-sd15": TINY_SD15,
}

__all__ = [
    "UNetConfig", "VAEConfig", "TextEncoderConfig", "ModelConfig", "PRESETS",
    "SDXL_BASE", "SDXL_REFINER", "SD15", "SD21", "TINY_SDXL_BASE", "TINY_SDXL_REFINER", "TINY_SD15",
    "CLIP_L", "OPENCLIP_BIGG", "OPENCLIP_H", "SDXL_VAE",
]
