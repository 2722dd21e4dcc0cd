"""VAE decoding and encoding for large images and reduced precision: overlapping tiles, and a float32 retry on
overflow.

Tiled decode follows the rule of diffusers `AutoencoderKL.tiled_decode` (models/autoencoders/autoencoder_kl.py,
with `blend_v` / `blend_h`): the latent is cut into `tile x tile` tiles whose starts are `tile - overlap` apart;
each tile is decoded on its own; then, tile by tile in row-major order, the top `overlap * f` pixel rows of a tile
are blended linearly with the bottom rows of the (already blended) tile above, and its left `overlap * f` columns
with the right columns of the (already blended) tile to the left, weight y / (overlap * f) on the new tile at
pixel y of the overlap.  Each tile then contributes its pixels up to the start of the next tile.

Differences from diffusers: tile and overlap are arguments, not `sample_size` / 0.25; and a tile that would lie
entirely inside the previous one (diffusers starts a tile at every multiple of the stride below the size) is not
decoded, so a latent no larger than one tile decodes in one piece, exactly as `decode_latents`.  On every tile
grid without such a redundant tile the result equals diffusers' (tests/test_vae_tiling.py).  Tiled encode
(`encode_tiled`) is the same rule in reverse, as diffusers' `_tiled_encode`: pixel tiles of `tile * f`, the encoder's
moments blended over `overlap` latent rows.

SDXL's VAE overflows in float16 (NaN / inf, i.e. black images; diffusers `AutoencoderKL` config `force_upcast`):
`decode_checked` re-decodes in float32 when a reduced-precision decode is not finite."""

from __future__ import annotations

import warnings

import torch

from xldm.errors import NonFiniteError
from xldm.models.vae import AutoencoderKL, DiagonalGaussian

DEFAULT_TILE_LATENT = 64  # 512 px with the 8x SD/SDXL VAE
DEFAULT_OVERLAP_LATENT = 16  # a quarter of the tile, as diffusers' tile_overlap_factor = 0.25
# decode_checked(tile=None) tiles above this latent area: 192 x 192 latents = 1536 x 1536 px.  A 1024^2 SDXL
# image (128 x 128 latents) still decodes in one piece, exactly like diffusers' default (tiling off).
AUTO_TILE_LATENT_AREA = 192 * 192


def latents_are_finite(t: torch.Tensor) -> bool:
    """True when every element of `t` is finite (no NaN, no +-inf)."""
    return bool(torch.isfinite(t).all().item())


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Starts 0, stride, 2*stride, ... until a tile reaches the end of `size` (no tile inside the previous one)."""
    starts = [0]
    while starts[-1] + tile < size:
        starts.append(starts[-1] + stride)
    return starts


def _blend(previous_edge: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """In place: the first `extent` rows (dim=2) or columns (dim=3) of `tile` become previous * (1 - w) + tile * w,
    w = y / extent (diffusers blend_v / blend_h), where `previous_edge` holds the neighbour's last `extent`."""
    if extent == 0:
        return
    head = tile.narrow(dim, 0, extent)
    weight = torch.arange(extent, device=tile.device, dtype=torch.float32) / extent
    weight = weight.view((1, 1, extent, 1) if dim == 2 else (1, 1, 1, extent))
    # Blend in float32 so a bf16/fp16 decode loses no precision in the weights, then store in the tile's dtype.
    head.copy_((previous_edge.float() * (1 - weight) + head.float() * weight).to(tile.dtype))


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, latents: torch.Tensor, *, tile_latent: int = DEFAULT_TILE_LATENT,
                 overlap_latent: int = DEFAULT_OVERLAP_LATENT) -> torch.Tensor:
    """UNet latents (B, z, h, w) -> image (B, 3, h*f, w*f), like `vae.decode_latents(latents)` but one
    `tile_latent x tile_latent` latent tile at a time, with `overlap_latent` latent rows/columns of overlap
    blended linearly (the rule of diffusers' tiled_decode; see the module docstring).

    Works for any latent size (edge tiles are smaller), any batch size, device and dtype; the output has the
    latents' device and the decoder's dtype.  Peak memory is one tile's decode plus the output image."""
    if tile_latent < 1:
        raise ValueError(f"tile_latent must be at least 1, got {tile_latent}")
    if not 0 <= overlap_latent < tile_latent:
        raise ValueError(f"overlap_latent must be in [0, tile_latent={tile_latent}), got {overlap_latent}")
    vae._check_latents(latents)
    f = vae.cfg.downsample_factor
    z = latents / vae.scaling_factor  # the same division as AutoencoderKL.decode_latents
    height, width = z.shape[-2:]
    stride = tile_latent - overlap_latent
    rows, cols = _tile_starts(height, tile_latent, stride), _tile_starts(width, tile_latent, stride)
    if len(rows) == 1 and len(cols) == 1:
        return vae.decode(z)
    return _run_tiled(vae.decode, z, tile_latent, stride, numerator=f, denominator=1)


def _run_tiled(network, x: torch.Tensor, tile: int, stride: int, *, numerator: int, denominator: int) -> torch.Tensor:
    """`network` over `tile x tile` tiles of `x` whose starts are `stride` apart, blended and stitched as the module
    docstring says; the output is `numerator / denominator` times the input's size (8/1 to decode, 1/8 to encode),
    the overlap blended over `(tile - stride)` input rows scaled the same way."""
    height, width = x.shape[-2:]
    rows, cols = _tile_starts(height, tile, stride), _tile_starts(width, tile, stride)
    scale = lambda n: n * numerator // denominator  # noqa: E731
    extent = scale(tile - stride)  # output rows / columns blended across each seam
    output: torch.Tensor | None = None
    bottom_edges: list[torch.Tensor | None] = [None] * len(cols)  # last `extent` rows of the tiles above
    for i, top in enumerate(rows):
        right_edge: torch.Tensor | None = None  # last `extent` columns of the tile to the left
        for j, left in enumerate(cols):
            out = network(x[:, :, top:top + tile, left:left + tile])
            if output is None:
                output = out.new_empty((x.shape[0], out.shape[1], scale(height), scale(width)))
            if i > 0:
                _blend(bottom_edges[j], out, extent, dim=2)
            if j > 0:
                _blend(right_edge, out, extent, dim=3)
            # The blended tile owns its output up to the next tile's start (to the end for the last tile).
            y0, x0 = scale(top), scale(left)
            y1 = scale(rows[i + 1]) if i + 1 < len(rows) else scale(height)
            x1 = scale(cols[j + 1]) if j + 1 < len(cols) else scale(width)
            output[:, :, y0:y1, x0:x1] = out[:, :, : y1 - y0, : x1 - x0]
            bottom_edges[j] = out[:, :, out.shape[2] - extent:, :].clone()
            right_edge = out[:, :, :, out.shape[3] - extent:].clone()
    assert output is not None
    return output


@torch.no_grad()
def encode_tiled(vae: AutoencoderKL, images: torch.Tensor, *, tile_latent: int = DEFAULT_TILE_LATENT,
                 overlap_latent: int = DEFAULT_OVERLAP_LATENT) -> DiagonalGaussian:
    """Images (B, 3, H, W) in [-1, 1] -> the posterior, like `vae.encode(images)` but one `tile_latent * f` pixel
    tile at a time: the encoder's moments (mean and log-variance, after quant_conv) of neighbouring tiles blended
    linearly over `overlap_latent` latent rows / columns, as diffusers' `AutoencoderKL._tiled_encode` blends them
    (models/autoencoders/autoencoder_kl.py, `blend_v` / `blend_h`), with the same tile grid rule as `decode_tiled`.
    H and W must be multiples of the VAE's factor f; an image no larger than one tile is encoded in one piece."""
    if tile_latent < 1:
        raise ValueError(f"tile_latent must be at least 1, got {tile_latent}")
    if not 0 <= overlap_latent < tile_latent:
        raise ValueError(f"overlap_latent must be in [0, tile_latent={tile_latent}), got {overlap_latent}")
    f = vae.cfg.downsample_factor
    height, width = images.shape[-2:]
    if images.dim() != 4 or height % f or width % f:
        raise ValueError(f"images to encode: expected (B, 3, H, W) with H and W multiples of {f}, found "
                         f"{tuple(images.shape)}")
    tile, stride = tile_latent * f, (tile_latent - overlap_latent) * f
    if height <= tile and width <= tile:
        return vae.encode(images)
    moments = _run_tiled(lambda x: vae.quant_conv(vae.encoder(x)), images, tile, stride, numerator=1,
                         denominator=f)
    return DiagonalGaussian(moments)


def encode(vae: AutoencoderKL, images: torch.Tensor, tile: bool | None = None) -> DiagonalGaussian:
    """The posterior of `images`: tiled (`encode_tiled`, default tiles) when `tile` is True, or when it is None and
    the image's latent area is above `AUTO_TILE_LATENT_AREA` (the rule of `decode_checked`); else in one piece."""
    f = vae.cfg.downsample_factor
    if tile is None:
        tile = (images.shape[-2] // f) * (images.shape[-1] // f) > AUTO_TILE_LATENT_AREA
    return encode_tiled(vae, images) if tile else vae.encode(images)


def _where_not_finite(t: torch.Tensor) -> str:
    bad = ~torch.isfinite(t)
    count = int(bad.sum().item())
    nans = int(torch.isnan(t).sum().item())
    items = torch.nonzero(bad.flatten(1).any(dim=1)).flatten().tolist()
    first = [int(i) for i in torch.nonzero(bad)[0].tolist()]
    return (f"{count} of {t.numel()} values ({nans} NaN, {count - nans} inf) in batch item(s) {items}; "
            f"first at (item, channel, y, x) = {tuple(first)} of shape {tuple(t.shape)}")


def _advice(dtype: torch.dtype) -> str:
    """What to try after a non-finite result computed in `dtype`: more precision only helps below float32."""
    if dtype in (torch.float16, torch.bfloat16):
        return "try --dtype fp32, a lower --cfg, or check the model weights"
    return "already in float32, so more precision will not help: lower --cfg or check the model weights"


def _decode(vae: AutoencoderKL, latents: torch.Tensor, tile: bool | int | None, overlap: int | None) -> torch.Tensor:
    height, width = latents.shape[-2:]
    if tile is None:
        tile = height * width > AUTO_TILE_LATENT_AREA
    if tile is False:
        with torch.no_grad():
            return vae.decode_latents(latents)
    tile_latent = DEFAULT_TILE_LATENT if tile is True else int(tile)
    overlap_latent = overlap if overlap is not None else (DEFAULT_OVERLAP_LATENT if tile is True else tile_latent // 4)
    return decode_tiled(vae, latents, tile_latent=tile_latent, overlap_latent=overlap_latent)


def decode_checked(vae: AutoencoderKL, latents: torch.Tensor, *, tile: bool | int | None = None,
                   overlap: int | None = None) -> torch.Tensor:
    """Decode UNet latents to an image (B, 3, H, W), nominally in [-1, 1], making sure the result is finite.

    tile: None tiles only above `AUTO_TILE_LATENT_AREA`; False never; True with `DEFAULT_TILE_LATENT` /
    `DEFAULT_OVERLAP_LATENT`; an int is the tile side in latents (overlap: `overlap`, default a quarter of it).
    The latents are cast to the VAE's dtype.  A float16/bfloat16 decode with NaN or inf (diffusers `force_upcast`)
    is redone, with a warning, on the VAE upcast to float32 in place (its parameters get their dtypes back after,
    losslessly), and the float32 image is returned.  Raises NonFiniteError (an XldmError / ValueError), saying
    where, when the latents are not finite (a diverged sampler: no decode can fix that) or the float32 decode is not."""
    if not latents_are_finite(latents):
        raise NonFiniteError(f"the latents to decode are not finite (the sampler diverged): "
                             f"{_where_not_finite(latents)}; {_advice(latents.dtype)}")
    dtype = next(vae.parameters()).dtype
    image = _decode(vae, latents.to(dtype), tile, overlap)
    if latents_are_finite(image):
        return image
    if dtype not in (torch.float16, torch.bfloat16):
        raise NonFiniteError(f"VAE decode in {dtype} produced non-finite values: {_where_not_finite(image)}; "
                             f"{_advice(dtype)}")

    warnings.warn(f"VAE decode in {dtype} produced non-finite values ({_where_not_finite(image)}); decoding again "
                  "in float32 (the SDXL VAE overflows in float16; an fp16-fixed VAE avoids this retry)",
                  RuntimeWarning, stacklevel=2)
    del image  # free the failed decode before the float32 one
    original = {name: t.dtype for name, t in [*vae.named_parameters(), *vae.named_buffers()]}
    try:
        vae.to(torch.float32)
        image = _decode(vae, latents.to(torch.float32), tile, overlap)
    finally:
        for name, t in [*vae.named_parameters(), *vae.named_buffers()]:
            t.data = t.data.to(original[name])
    if not latents_are_finite(image):
        raise NonFiniteError(f"VAE decode produced non-finite values in {dtype} and again in float32: "
                             f"{_where_not_finite(image)}; {_advice(torch.float32)}")
    return image
