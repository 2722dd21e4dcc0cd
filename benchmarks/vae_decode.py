"""VAE decode, xldm vs diffusers `AutoencoderKL`, same random weights, one process, alternating runs.

    python benchmarks/vae_decode.py --config sdxl --size 1024 --dtype bf16 --repeats 3
    python benchmarks/vae_decode.py --config tiny --size 64 --compare-layout   # channels-last vs contiguous

Prints the median decode time of each side, their ratio (xldm / diffusers; < 1 means xldm is faster), the
max abs difference of the images, and peak RSS (both models in one process) or peak CUDA memory.
With --compare-layout the second column is xldm itself in channels-last memory format instead of diffusers.
With --checked xldm decodes as its pipeline does (`xldm.vae_tiling.decode_checked`: the finiteness check and, for a
half-precision decode that overflows, the float32 retry); --overflow makes every fp16/bf16 decode overflow at one
pixel (random weights do not overflow like the real SDXL VAE does in fp16), so that the time of that fallback shows:

    python benchmarks/vae_decode.py --config sdxl --size 1024 --dtype fp16 --device cuda --checked --overflow
Needs the test extra (diffusers) installed.
"""

from __future__ import annotations

import argparse
import resource
import warnings

import torch

from xldm.config import SDXL_VAE, TINY_VAE
from xldm.models.vae import AutoencoderKL
from xldm.vae_tiling import decode_checked
from xldm.weights.keys_vae import vae_diffusers_config, vae_original_to_diffusers

from unet_step import DTYPES, alternate, check_size, device_arg  # the UNet benchmark's (this folder)

CONFIGS = {"sdxl": SDXL_VAE, "tiny": TINY_VAE}


def build(cfg, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(0)
    ours = AutoencoderKL(cfg).to(device, dtype).eval()
    kwargs = {k: v for k, v in vae_diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = DiffusersAutoencoderKL(**kwargs)
    state = {k: v.clone() for k, v in vae_original_to_diffusers(ours.state_dict(), cfg).items()}
    theirs.load_state_dict(state, strict=True, assign=True)
    return ours, theirs.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-layout", action="store_true",
                        help="compare xldm contiguous (left) with xldm channels-last (right) instead of diffusers")
    parser.add_argument("--checked", action="store_true",
                        help="xldm decodes through decode_checked (finiteness check, float32 retry)")
    parser.add_argument("--overflow", action="store_true",
                        help="with --checked: make fp16/bf16 decodes overflow, timing the float32 retry")
    args = parser.parse_args()
    device, dtype, cfg = device_arg(parser, args.device), DTYPES[args.dtype], CONFIGS[args.config]
    check_size(parser, args.size)
    if args.overflow and not args.checked:
        parser.error("--overflow needs --checked (only decode_checked retries an overflowing decode)")

    ours, theirs = build(cfg, dtype, device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, cfg.z_channels, args.size // 8, args.size // 8, generator=g).to(device, dtype)
    if args.compare_layout:
        import copy

        right_name = "xldm-cl"
        right_model = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        z_right = z.contiguous(memory_format=torch.channels_last)

        def run_right():
            return right_model.decode(z_right)
    else:
        right_name = "diffusers"

        def run_right():
            return theirs.decode(z).sample

    z_unet = z * cfg.scaling_factor  # decode_checked takes UNet latents: the decoder sees z, as on the other side
    if args.overflow:
        decoder_forward = ours.decoder.forward

        def overflowing(latents):  # one +inf pixel whenever the decoder runs in half precision
            out = decoder_forward(latents)
            if out.dtype in (torch.float16, torch.bfloat16):
                out = out.clone()
                out[0, 0, 0, 0] = float("inf")
            return out

        ours.decoder.forward = overflowing

    def run_ours():
        if args.checked:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the retry's warning, once per run
                return decode_checked(ours, z_unet, tile=False)
        return ours.decode(z)

    names = ("xldm", right_name)
    with torch.inference_mode():
        diff = (run_ours().float() - run_right().float()).abs().max().item()  # also the warm-up
        med, peak = alternate(dict(zip(names, (run_ours, run_right))), args.repeats, device)
    mode = ""
    if args.checked:
        mode = ", decode_checked" + (" with forced overflow (float32 retry)" if args.overflow else "")
    print(f"VAE decode {args.config}, {args.size}x{args.size}, batch {args.batch}, {args.dtype}{mode}, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in names:
        print(f"{name:<10}{med[name] * 1000:10.1f} ms  (median of {args.repeats})")
    print(f"ratio xldm/{right_name} {med['xldm'] / med[right_name]:.3f}   max abs diff {diff:.2e}")
    if device.type == "cuda":
        print(f"peak allocated: " + ", ".join(f"{n} {peak[n] / 2**30:.2f} GiB" for n in names))
    else:
        print(f"peak RSS (both models in one process) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
