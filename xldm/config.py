"""Frozen configuration dataclasses and named presets for the SD / SDXL family.

Every number in a preset cites where it comes from: the original sgm / ldm inference configs
(`configs/inference/sd_xl_base.yaml`, `sd_xl_refiner.yaml`, `v1-inference.yaml`, `v2-inference-v.yaml`)
and the SDXL paper (Podell et al. 2023).  The field names follow the original (sgm) UNet arguments,
so a reader can hold a preset next to those YAML files."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


PREDICTION_TYPES = ("epsilon", "v", "x0")
# CLIP's byte-level BPE vocabulary (OpenAI CLIP simple_tokenizer.py): 49,406 tokens, then BOS 49406 and EOS 49407.
CLIP_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class UNetConfig:
    """The SD/SDXL UNet (sgm `UNetModel`).

    `block_out_channels[i]` is the width of level i (level i has downsample factor 2**i), as diffusers
    `UNet2DConditionModel.block_out_channels`; any widths divisible by `norm_groups`.
    `transformer_depth[i]` is the number of transformer blocks in each attention layer of level i;
    0 means that level has no attention at all.
    SDXL base: (0, 2, 10), "heterogeneous transformer depth, no 8x level" (SDXL paper, Sec. 2.1)."""

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
            raise ValueError(f"transformer_depth has {len(self.transformer_depth)} entries, expected one per level "
                             f"({len(self.block_out_channels)})")
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
    vocab_size: int = CLIP_VOCAB_SIZE
    max_positions: int = 77
    # OpenAI CLIP uses quick_gelu, x*sigmoid(1.702x); OpenCLIP H/bigG use exact gelu.
    activation: str = "quick_gelu"
    # Width of the pooled-output projection; 0 = the encoder has none (its pooled output is unused).
    projection_dim: int = 0
    layer_norm_eps: float = 1e-5
    # Which hidden state feeds cross-attention: "last" (SD 1.x) or "penultimate" (SD 2.x, SDXL) ...
    layer: str = "penultimate"
    # ... and whether final_layer_norm is applied to it (SD 1.x/2.x: yes; SDXL: no; sgm
    # FrozenCLIPEmbedder(layer="hidden", layer_idx=11) / FrozenOpenCLIPEmbedder2(layer="penultimate")).
    final_norm_on_hidden: bool = False
    # Token id used for padding to 77: EOS (49407) for CLIP-L, 0 ("!") for the SDXL bigG tokenizer.
    pad_token_id: int = 49407
    # A pruned vocabulary: the CLIP BPE ids this encoder keeps, ascending (BOS, EOS and the pad id among them).
    # Its token embedding then has one row per kept id, in this order, and a last row, the fallback, that every
    # other CLIP id maps to (xldm.models.clip.CLIPTextEmbeddings); the tokenizer still gives CLIP ids.  Empty: the
    # full vocabulary, ids index the table directly (every released checkpoint).
    kept_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
        if self.layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {self.layer!r}")
        object.__setattr__(self, "kept_tokens", tuple(self.kept_tokens))  # a JSON list read back stays hashable
        if self.kept_tokens:
            kept = self.kept_tokens
            if not all(type(i) is int and 0 <= i < CLIP_VOCAB_SIZE for i in kept) or \
                    any(a >= b for a, b in zip(kept, kept[1:])):
                raise ValueError(f"kept_tokens must be ascending, distinct CLIP ids in [0, {CLIP_VOCAB_SIZE}), got "
                                 f"{len(kept)} values from {kept[0]!r} to {kept[-1]!r}")
            required = {CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1, self.pad_token_id}  # BOS, EOS, padding
            if not required <= set(kept):
                raise ValueError(f"kept_tokens must keep BOS, EOS and the pad id {sorted(required)}, lacks "
                                 f"{sorted(required - set(kept))}")
            if self.vocab_size != len(kept) + 1:
                raise ValueError(f"a pruned vocabulary of {len(kept)} kept tokens has {len(kept) + 1} embedding rows "
                                 f"(the last is the fallback), but vocab_size is {self.vocab_size}")

    @property
    def input_vocab_size(self) -> int:
        """Ids the encoder takes (before attached embeddings): CLIP's 49,408 for a pruned vocabulary, which maps
        them onto its rows, else the embedding's rows."""
        return CLIP_VOCAB_SIZE if self.kept_tokens else self.vocab_size


# Numbers each micro-conditioning scalar contributes to the vector, by name (SDXL paper Sec. 2.2: sizes and crops
# are (height, width) / (top, left) pairs; the refiner's aesthetic score, Sec. 2.5, and a cascade SR stage's
# noise-augmentation level, Imagen Sec. 2.4, are single numbers).
SCALAR_WIDTHS = {"original_size": 2, "crop_top_left": 2, "target_size": 2, "aesthetic_score": 1, "aug_level": 1}


@dataclass(frozen=True)
class ModelConfig:
    """A whole diffusion model: UNet, VAE and text encoders, plus how they are wired.

    `vae=None` is a pixel-space model, a stage of an Imagen-style cascade (`xldm.cascade`): its UNet denoises RGB
    images directly.  A super-resolution stage (`sr_scale` >= 2) takes the noisy image concatenated with the
    bilinearly upsampled low-resolution image (UNet in_channels = 2 x out_channels) and ends its scalars with
    the noise-augmentation level "aug_level"; its `default_size` is its output side."""

    kind: str
    unet: UNetConfig
    vae: VAEConfig | None
    text_encoders: tuple[TextEncoderConfig, ...]
    prediction_type: str = "epsilon"  # "epsilon", "v" (SD 2.x 768-v, the cascade stages) or "x0"
    zero_terminal_snr: bool = False  # trained on zero-terminal-SNR betas (Lin et al. 2023; v-prediction fine-tunes)
    # Scalars Fourier-embedded into the vector conditioning, in order (SDXL paper, Sec. 2.2); see SCALAR_WIDTHS.
    micro_conditioning: tuple[str, ...] = ()
    micro_conditioning_dim: int = 256  # per scalar (sgm ConcatTimestepEmbedderND(outdim=256))
    default_size: int = 1024
    sr_scale: int = 0  # a cascade super-resolution stage: its output is sr_scale x its low-res input; 0 = none

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"{self.kind}: {message}")

        check(self.prediction_type in PREDICTION_TYPES,
              f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        unknown = [n for n in self.micro_conditioning if n not in SCALAR_WIDTHS]
        check(not unknown, f"unknown micro-conditioning {unknown}; expected names from {sorted(SCALAR_WIDTHS)}")
        check(len(set(self.micro_conditioning)) == len(self.micro_conditioning),
              f"repeated micro-conditioning in {self.micro_conditioning}")
        pooled = self.text_encoders[-1].projection_dim if self.micro_conditioning else 0
        expected = pooled + self.num_scalars * self.micro_conditioning_dim
        check(self.unet.adm_in_channels == expected,
              f"UNet adm_in_channels is {self.unet.adm_in_channels}, but pooled text ({pooled}) + "
              f"{self.num_scalars} micro-conditioning scalars x {self.micro_conditioning_dim} = {expected}")
        context = sum(te.width for te in self.text_encoders)
        check(self.unet.context_dim == context,
              f"UNet context_dim is {self.unet.context_dim}, but the text encoders give {context}")
        is_sr = self.sr_scale != 0
        check(not is_sr or (self.vae is None and self.sr_scale >= 2),
              f"a super-resolution stage is a pixel-space model (no VAE) with sr_scale >= 2, got {self.sr_scale}")
        check(is_sr == (self.micro_conditioning[-1:] == ("aug_level",)) and
              self.micro_conditioning.count("aug_level") <= 1,
              f"exactly the super-resolution stages end their scalars with 'aug_level', got {self.micro_conditioning}")
        if self.vae is None:
            inputs = self.unet.out_channels * (2 if is_sr else 1)
            check(self.unet.in_channels == inputs,
                  f"a pixel-space {'SR ' if is_sr else ''}stage's UNet takes {inputs} channels, found "
                  f"{self.unet.in_channels}")
            check(is_sr or pooled > 0 or not self.micro_conditioning, "needs a pooled text projection")
            check(self.default_size % max(self.sr_scale, 1) == 0,
                  f"size {self.default_size} is not divisible by sr_scale {self.sr_scale}")

    @property
    def num_scalars(self) -> int:
        return sum(SCALAR_WIDTHS[name] for name in self.micro_conditioning)

    @property
    def latent_channels(self) -> int:
        """Channels of what the UNet denoises: the VAE's latents, or RGB for a pixel-space model."""
        return self.vae.z_channels if self.vae is not None else self.unet.out_channels

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor if self.vae is not None else 1

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """No negative prompt means zero context and pooled text: the SDXL base's hub setting (diffusers
        `force_zeros_for_empty_prompt`, model_index.json of stabilityai/stable-diffusion-xl-base-1.0) and the
        unconditional input a cascade stage saw under caption dropout; other models encode ""."""
        return self.kind == "sdxl-base" or self.vae is None


BASE_MICRO_CONDITIONING = ("original_size", "crop_top_left", "target_size")
REFINER_MICRO_CONDITIONING = ("original_size", "crop_top_left", "aesthetic_score")

# OpenAI CLIP ViT-L/14 text tower (transformers CLIPTextConfig of openai/clip-vit-large-patch14).
CLIP_L = TextEncoderConfig(width=768, layers=12, heads=12, intermediate_size=3072, activation="quick_gelu")
# OpenCLIP ViT-bigG/14 text tower (open_clip model_configs/ViT-bigG-14.json), projection 1280.
OPENCLIP_BIGG = TextEncoderConfig(width=1280, layers=32, heads=20, intermediate_size=5120, activation="gelu",
                                  projection_dim=1280, pad_token_id=0)
# OpenCLIP ViT-H/14 text tower (open_clip ViT-H-14.json), as SD 2.x uses it: penultimate layer + ln_final
# (ldm FrozenOpenCLIPEmbedder(layer="penultimate")).
OPENCLIP_H = TextEncoderConfig(width=1024, layers=24, heads=16, intermediate_size=4096, activation="gelu",
                               projection_dim=1024, final_norm_on_hidden=True, pad_token_id=0)

# SDXL 1.0 (sgm configs/inference/sd_xl_base.yaml, sd_xl_refiner.yaml)
SDXL_VAE = VAEConfig(scaling_factor=0.13025)

SDXL_BASE = ModelConfig(
    kind="sdxl-base", vae=SDXL_VAE, text_encoders=(CLIP_L, OPENCLIP_BIGG), micro_conditioning=BASE_MICRO_CONDITIONING,
    unet=UNetConfig(block_out_channels=(320, 640, 1280), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                    num_head_channels=64, context_dim=2048, adm_in_channels=2816))
SDXL_REFINER = ModelConfig(
    kind="sdxl-refiner", vae=SDXL_VAE, text_encoders=(OPENCLIP_BIGG,), micro_conditioning=REFINER_MICRO_CONDITIONING,
    unet=UNetConfig(block_out_channels=(384, 768, 1536, 1536), transformer_depth=(0, 4, 4, 0),
                    transformer_depth_middle=4, num_head_channels=64, context_dim=1280, adm_in_channels=2560))

# SD 1.5 (ldm configs/stable-diffusion/v1-inference.yaml)
SD15 = ModelConfig(
    kind="sd15", vae=VAEConfig(scaling_factor=0.18215), default_size=512,
    text_encoders=(replace(CLIP_L, layer="last", final_norm_on_hidden=True),),
    unet=UNetConfig(block_out_channels=(320, 640, 1280, 1280), transformer_depth=(1, 1, 1, 0),
                    transformer_depth_middle=1, num_head_channels=-1, num_heads=8, context_dim=768, adm_in_channels=0,
                    use_linear_in_transformer=False))

# SD 2.1 768-v (stablediffusion configs/stable-diffusion/v2-inference-v.yaml)
SD21 = ModelConfig(
    kind="sd21", vae=VAEConfig(scaling_factor=0.18215), text_encoders=(OPENCLIP_H,), prediction_type="v",
    default_size=768,
    unet=UNetConfig(block_out_channels=(320, 640, 1280, 1280), transformer_depth=(1, 1, 1, 0),
                    transformer_depth_middle=1, num_head_channels=64, context_dim=1024, adm_in_channels=0,
                    use_linear_in_transformer=True))

TINY_CLIP_L = TextEncoderConfig(width=32, layers=3, heads=4, intermediate_size=64, activation="quick_gelu")
TINY_OPENCLIP_BIGG = TextEncoderConfig(width=48, layers=3, heads=4, intermediate_size=192, activation="gelu",
                                       projection_dim=48, pad_token_id=0)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=0.13025)
TINY_SDXL_BASE = ModelConfig(
    kind="sdxl-base", vae=TINY_VAE, text_encoders=(TINY_CLIP_L, TINY_OPENCLIP_BIGG),
    micro_conditioning=BASE_MICRO_CONDITIONING, micro_conditioning_dim=8, default_size=64,
    unet=UNetConfig(block_out_channels=(32, 64, 128), transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                    num_head_channels=32, context_dim=32 + 48, adm_in_channels=48 + 6 * 8))
TINY_SDXL_REFINER = ModelConfig(
    kind="sdxl-refiner", vae=TINY_VAE, text_encoders=(TINY_OPENCLIP_BIGG,),
    micro_conditioning=REFINER_MICRO_CONDITIONING, micro_conditioning_dim=8, default_size=64,
    unet=UNetConfig(block_out_channels=(32, 64, 128, 128), transformer_depth=(0, 2, 2, 0), transformer_depth_middle=2,
                    num_head_channels=32, context_dim=48, adm_in_channels=48 + 5 * 8))
TINY_SD15 = ModelConfig(
    kind="sd15", vae=replace(TINY_VAE, scaling_factor=0.18215), default_size=64,
    text_encoders=(replace(TINY_CLIP_L, layer="last", final_norm_on_hidden=True),),
    unet=UNetConfig(block_out_channels=(32, 64, 64, 64), transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
                    num_head_channels=-1, num_heads=2, context_dim=32, adm_in_channels=0,
                    use_linear_in_transformer=False))

# The bundled default model (xldm/data/default, trained by scripts/train_default.sh)
# SDXL's design in miniature (Podell et al. 2023): both text encoder shapes (Sec. 2.1) with CLIP's full BPE
# vocabulary, a KL autoencoder with 8x downsampling and 4 latent channels (Sec. 2.4), a base UNet with SDXL's
# structure (three levels, no attention at the highest, heterogeneous depth (0, 1, 2); SDXL: (0, 2, 10)) and a
# refiner conditioned on bigG alone and the aesthetic score (Sec. 2.5); native size 128 (latent 16 x 16).  Widths
# are ours, sized for two fp16 files within 25 MB.  The VAE's scaling factor in the shipped files' headers is the
# measured 1 / std of its latents (LDM recipe, Rombach et al. 2022, Sec. 4.3.2); 0.13025 here is a placeholder.
DEFAULT_CLIP_L = TextEncoderConfig(width=32, layers=4, heads=4, intermediate_size=128, activation="quick_gelu")
DEFAULT_BIGG = TextEncoderConfig(width=48, layers=5, heads=4, intermediate_size=192, activation="gelu",
                                 projection_dim=48, pad_token_id=0)
DEFAULT_MICRO_DIM = 32  # Fourier channels per micro-conditioning scalar (SDXL: 256)
# 8 groups: 32 would leave fewer than one channel per group at width 24.
DEFAULT_VAE = VAEConfig(ch=24, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, scaling_factor=0.13025)
DEFAULT_BASE = ModelConfig(
    kind="sdxl-base",
    unet=UNetConfig(block_out_channels=(32, 64, 64), num_res_blocks=1, transformer_depth=(0, 1, 2),
                    transformer_depth_middle=2, num_head_channels=32, norm_groups=8,
                    context_dim=DEFAULT_CLIP_L.width + DEFAULT_BIGG.width,
                    adm_in_channels=DEFAULT_BIGG.projection_dim + 6 * 32),
    vae=DEFAULT_VAE, text_encoders=(DEFAULT_CLIP_L, DEFAULT_BIGG), micro_conditioning=BASE_MICRO_CONDITIONING,
    micro_conditioning_dim=DEFAULT_MICRO_DIM, default_size=128,
)
DEFAULT_REFINER = ModelConfig(
    kind="sdxl-refiner",
    unet=UNetConfig(block_out_channels=(24, 48, 48, 48), num_res_blocks=2, transformer_depth=(0, 1, 1, 0),
                    transformer_depth_middle=1, num_head_channels=24, norm_groups=8, context_dim=DEFAULT_BIGG.width,
                    adm_in_channels=DEFAULT_BIGG.projection_dim + 5 * 32),
    vae=DEFAULT_VAE, text_encoders=(DEFAULT_BIGG,), micro_conditioning=REFINER_MICRO_CONDITIONING,
    micro_conditioning_dim=DEFAULT_MICRO_DIM, default_size=128,
)
# Its second generation (scripts/train_default_v2.sh; not yet trained): the same text encoders and VAE, the encoders'
# vocabulary pruned after their pre-training to the tokens of the captions and of every CLDR emoji name and keyword
# (scripts/default_model.py prune-vocab, TextEncoderConfig.kept_tokens: ~4,500 of 49,408 rows), which frees ~7.1 MB
# of the base's fp16 file and ~4.3 MB of the refiner's; the UNets grow into that (Imagen, Saharia et al. 2022,
# Sec. 4.4, finds the text encoder matters more than UNet size, so the encoders keep their shape).  Widths ours:
# base (48, 96, 96), 4.58 M parameters (v1: 2.09 M); refiner (32, 64, 64, 64), 3.17 M (v1: 1.81 M).  With ~4,500
# kept tokens the two fp16 files hold 11.7 + 8.5 MB of tensors (v1: 13.9 + 10.1 MB; `scripts/default_model.py
# sizes --kept 4467`), the base's turbo student (a copy of its UNet) 9.2 MB: the bundled default files stay within
# 40 MB.  At 16 x 16 latents the sampling time, not the file size, limits the width: a base UNet step costs
# ~1.5-1.7x v1's on the CPU (b=2, one thread), a (64, 128, 128) base ~2.7x.
DEFAULT_BASE_V2 = replace(DEFAULT_BASE, unet=replace(DEFAULT_BASE.unet, block_out_channels=(48, 96, 96)))
DEFAULT_REFINER_V2 = replace(DEFAULT_REFINER, unet=replace(DEFAULT_REFINER.unet, block_out_channels=(32, 64, 64, 64),
                                                           num_head_channels=32))


# Pixel-space cascade stages (xldm.cascade; Saharia et al. 2022, "Imagen")
def _stage_unet(in_channels: int, *, widths: tuple[int, ...], transformer_depth: tuple[int, ...],
                head_channels: int, context_dim: int, adm: int, groups: int) -> UNetConfig:
    return UNetConfig(in_channels=in_channels, out_channels=3, block_out_channels=widths, num_res_blocks=1,
                      transformer_depth=transformer_depth, transformer_depth_middle=1,
                      num_head_channels=head_channels, context_dim=context_dim, adm_in_channels=adm, norm_groups=groups)


# Tiny stages for tests: 16 -> 32 -> 64, one small text encoder shared by all stages.
TINY_CASCADE_TEXT_ENCODER = TextEncoderConfig(width=16, layers=2, heads=2, intermediate_size=32, activation="gelu",
                                              projection_dim=16, pad_token_id=0)
TINY_CASCADE_BASE = ModelConfig(
    kind="cascade-base", vae=None, text_encoders=(TINY_CASCADE_TEXT_ENCODER,), prediction_type="v",
    micro_conditioning=("original_size", "crop_top_left"), micro_conditioning_dim=8, default_size=16,
    unet=_stage_unet(3, widths=(16, 32), transformer_depth=(0, 1), head_channels=16,
                     context_dim=16, adm=16 + 4 * 8, groups=8),
)
TINY_CASCADE_SR = ModelConfig(
    kind="cascade-sr", vae=None, text_encoders=(TINY_CASCADE_TEXT_ENCODER,), prediction_type="v",
    micro_conditioning=("aug_level",), micro_conditioning_dim=8, default_size=32, sr_scale=2,
    unet=_stage_unet(6, widths=(16, 32), transformer_depth=(0, 0), head_channels=16,
                     context_dim=16, adm=16 + 8, groups=8),
)
TINY_CASCADE_SR2 = replace(TINY_CASCADE_SR, default_size=64)
# The default cascade, 32 -> 64 -> 128 (xldm/data/cascade, scripts/train_default_cascade.sh).  Its one text encoder
# is the default model's bigG-shaped one, shared by all stages and shipped once, inside the default model's file.
# Widths are ours, sized for <= 15 MB of fp16 UNets; the SR UNets attend only at their lowest resolution, as
# Imagen's Efficient U-Net does for its super-resolution models (Saharia et al. 2022, appendix).
CASCADE_BASE_32 = ModelConfig(
    kind="cascade-base", vae=None, text_encoders=(DEFAULT_BIGG,), prediction_type="v",
    micro_conditioning=("original_size", "crop_top_left"), micro_conditioning_dim=32, default_size=32,
    unet=_stage_unet(3, widths=(48, 96, 96), transformer_depth=(0, 1, 1), head_channels=32,
                     context_dim=DEFAULT_BIGG.width, adm=DEFAULT_BIGG.projection_dim + 4 * 32, groups=16),
)
CASCADE_SR_64 = ModelConfig(
    kind="cascade-sr", vae=None, text_encoders=(DEFAULT_BIGG,), prediction_type="v",
    micro_conditioning=("aug_level",), micro_conditioning_dim=32, default_size=64, sr_scale=2,
    unet=_stage_unet(6, widths=(24, 48, 48), transformer_depth=(0, 0, 1), head_channels=24,
                     context_dim=DEFAULT_BIGG.width, adm=DEFAULT_BIGG.projection_dim + 32, groups=8),
)
CASCADE_SR_128 = ModelConfig(
    kind="cascade-sr", vae=None, text_encoders=(DEFAULT_BIGG,), prediction_type="v",
    micro_conditioning=("aug_level",), micro_conditioning_dim=32, default_size=128, sr_scale=2,
    unet=_stage_unet(6, widths=(24, 24, 48, 48), transformer_depth=(0, 0, 0, 1),
                     head_channels=24, context_dim=DEFAULT_BIGG.width, adm=DEFAULT_BIGG.projection_dim + 32, groups=8),
)

PRESETS: dict[str, ModelConfig] = {
    "sdxl-base": SDXL_BASE, "sdxl-refiner": SDXL_REFINER, "sd15": SD15, "sd21": SD21, "tiny-sdxl-base": TINY_SDXL_BASE,
    "tiny-sdxl-refiner": TINY_SDXL_REFINER, "tiny-sd15": TINY_SD15, "default-base": DEFAULT_BASE,
    "default-refiner": DEFAULT_REFINER, "default-base-v2": DEFAULT_BASE_V2, "default-refiner-v2": DEFAULT_REFINER_V2,
    "tiny-cascade-base-16": TINY_CASCADE_BASE,
    "tiny-cascade-sr-32": TINY_CASCADE_SR, "tiny-cascade-sr-64": TINY_CASCADE_SR2, "cascade-base-32": CASCADE_BASE_32,
    "cascade-sr-64": CASCADE_SR_64, "cascade-sr-128": CASCADE_SR_128,
}
# Cascades by name: their stages in order.
CASCADES: dict[str, tuple[ModelConfig, ...]] = {
    "tiny-cascade": (TINY_CASCADE_BASE, TINY_CASCADE_SR, TINY_CASCADE_SR2),
    "cascade-small": (CASCADE_BASE_32, CASCADE_SR_64, CASCADE_SR_128),
}

# Where the bundled models' weights sit (package data; absent until trained weights are copied there).
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL_PATH = DATA_DIR / "default" / "base.safetensors"
DEFAULT_REFINER_PATH = DATA_DIR / "default" / "refiner.safetensors"
# The base's 4-step student (scripts/train_default_turbo.sh: adversarial diffusion distillation): its UNet alone, the
# VAE and text encoders are the base's.  `xldm generate --model default-turbo` samples it as SDXL Turbo is sampled.
DEFAULT_TURBO_UNET_PATH = DATA_DIR / "default" / "turbo.safetensors"
# ControlNets of the bundled base by name (`xldm generate --controlnet default-canny`): diffusers folders
# (scripts/train_default_controlnet.sh); their control maps are white canny edges on black.
BUNDLED_CONTROLNETS = {"default-canny": DATA_DIR / "default" / "default-canny"}
# The one set of generation defaults: the CLI, the Python API (GenerationRequest), the server and its page read
# these.  Prompts follow A1111's semantics by default (modules/sd_hijack_clip.py: 75-token chunks, "(word:1.2)"
# weights, BREAK); long_prompts="truncate", weighting=False is diffusers' plain encoding.
GENERATE_DEFAULTS = {"steps": 30, "cfg": 5.0, "sampler": "euler", "timestep_spacing": "leading",
                     "long_prompts": "chunk", "weighting": True,
                     # hires fix (xldm.hires): A1111's defaults, hr_upscaler "Latent" (shared latent_upscale_default
                     # _mode) and the txt2img page's denoising strength 0.7 (modules/ui.py)
                     "hires_upscaler": "Latent", "hires_strength": 0.7}
# SDXL Turbo's sampling (its model card: 1-4 steps, no guidance, Euler ancestral on trailing timesteps), here at the
# student's four timesteps 999, 749, 499, 249
TURBO_DEFAULTS = {"steps": 4, "cfg": 1.0, "sampler": "euler_a", "timestep_spacing": "trailing"}
DEFAULT_CASCADE_DIR = DATA_DIR / "cascade"
