"""`xldm generate`: the flags (`add_generate_parser`), a request built from them and checked before anything is
loaded, the output files (numbered like A1111's, or --out), `--from-png`, and `--cascade` (a pixel-space cascade,
`xldm.cascade`, instead of --model: PROMPT, --negative, --seed, --batch, --sampler, --dtype, --device, --out keep
their meaning; --width/--height set the final size; --init-image is the low-res input of a cascade that starts
with an SR stage, resized to the expected input; any other flag, or --cascade-* without --cascade, is refused)."""

from __future__ import annotations

import argparse
import functools
import random
import re
import sys
from pathlib import Path

from xldm.png_settings import apply_png_settings
from xldm.serve.cli import DTYPES, torch_dtype


def _output_paths(out: str, batch: int) -> list[str]:
    """FILE.png for one image; FILE_0.png ... FILE_{N-1}.png for a batch."""
    if batch == 1:
        return [out]
    stem, dot, ext = out.rpartition(".")
    if not dot:
        stem, ext = out, "png"
    return [f"{stem}_{i}.{ext}" for i in range(batch)]


DEFAULT_OUTPUTS = "outputs"  # the folder of images written without --out (A1111: outputs/txt2img-images)
_NUMBERED = re.compile(r"^(\d+)-")


def next_image_number(folder: str | Path) -> int:
    """The number of the next image in `folder`: one more than the largest "NNNNN-" file name prefix there, 0 for
    an empty or missing folder (A1111 modules/images.py get_next_sequence_number)."""
    folder = Path(folder)
    numbers = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else ()) if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def save_numbered(image, folder: str | Path, seed: int, params) -> Path:
    """`image` saved as folder/NNNNN-SEED.png with the next free number (A1111 save_image's "[number]-[seed]"
    names); never over an existing file, even one another process wrote meanwhile."""
    from xldm.pngmeta import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    number = next_image_number(folder)
    while (path := folder / f"{number:05d}-{seed}.png").exists():
        number += 1
    return save_image(image, path, params)


def save_output(image, path: str | None, seed: int, params, outputs: str = DEFAULT_OUTPUTS) -> Path:
    """An image at its --out path (parent folders made; .png, .jpg, .webp by the extension) or numbered under
    `outputs`."""
    from xldm.pngmeta import save_image

    if path is None:
        return save_numbered(image, outputs, seed, params)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_image(image, path, params)


MAX_SIDE = 16384  # largest width/height/crop value accepted on the command line (pixels)


def number_list(kind, separator: str = ",", length: int | None = None, expected: str | None = None,
                bounds: tuple[str, int, int] | None = None):
    """An argparse type: numbers joined by `separator` -> a list (one per cascade stage), or a tuple of exactly
    `length` numbers (WIDTHxHEIGHT, TOP,LEFT; a single number for length 1), each within `bounds` (name, low,
    high) when given."""
    expected = expected or f"comma-separated {kind.__name__}s such as {'30,20,20' if kind is int else '5,4,4'}"

    def parse(text: str):
        try:
            values = [kind(v) for v in text.lower().split(separator)]
        except ValueError:
            values = []
        if not values or (length is not None and len(values) != length):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if bounds is not None and any(not bounds[1] <= v <= bounds[2] for v in values):
            raise argparse.ArgumentTypeError(f"{bounds[0]} values must be in [{bounds[1]}, {bounds[2]}], got {text!r}")
        return values if length is None else values[0] if length == 1 else tuple(values)

    return parse


_size = number_list(int, "x", 2, "WIDTHxHEIGHT such as 1024x768", bounds=("size", 1, MAX_SIDE))
_crop = number_list(int, ",", 2, "TOP,LEFT such as 0,0", bounds=("crop", 0, MAX_SIDE))
_side = number_list(int, ",", 1, "an integer", bounds=("side", 1, MAX_SIDE))
_hires_size = number_list(int, "x", 2, "WIDTHxHEIGHT such as 2048x1536 (one side 0: from the aspect ratio)",
                          bounds=("hires size", 0, MAX_SIDE))


def _lora(text: str) -> tuple:
    """FILE[:WEIGHT[:TEXT_WEIGHT]]: trailing numbers are weights (so Windows drive letters stay in the path)."""
    parts, weights = text, []
    while ":" in parts and len(weights) < 2:
        head, _, tail = parts.rpartition(":")
        try:
            weights.insert(0, float(tail))
        except ValueError:
            break
        parts = head
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FILE[:WEIGHT[:TEXT_WEIGHT]]")
    return (parts, *weights)


def check_output_paths(paths: list[str], force: bool = False) -> None:
    """Before any work: each output is an image file name (.png, .jpg, .jpeg, .webp), not a folder, and not an
    existing file unless `force`; its folder is a folder or can be made (no file in the way)."""
    import os

    from xldm.pngmeta import image_format

    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"--out {path}: is a folder; give a file name such as {os.path.join(path, 'out.png')}")
        try:
            image_format(path)
        except ValueError as e:
            raise ValueError(f"--out {e}") from None
        if os.path.exists(path) and not force:
            raise ValueError(f"--out {path}: the file exists; pass --force to overwrite it, or leave --out out to "
                             f"number a new file under {DEFAULT_OUTPUTS}/")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):  # folders to be made: the nearest existing one must be a folder
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"--out {path}: {parent} is not a folder")


def _progress_bars(quiet: bool = False):
    """A step callback drawing one tqdm bar per stage on stderr, and the function that closes them."""
    from tqdm import tqdm

    bars: dict = {}
    if quiet:
        return (lambda stage, total, desc: None), (lambda: None)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    def update(stage, total: int, desc: str) -> None:
        if stage not in bars:
            close()
            bars[stage] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
        bars[stage].update(1)

    return update, close


def _control_units(args: argparse.Namespace) -> tuple:
    """The --controlnet groups: the k-th --control-image / -scale / -start / -end / -preprocess belong to the k-th
    --controlnet; each ControlNet needs an image, the other options default (1, 0, 1, none)."""
    from xldm.controlnet import ControlUnit

    n = len(args.controlnet)
    options = {"--control-image": args.control_image, "--control-scale": args.control_scale,
               "--control-start": args.control_start, "--control-end": args.control_end,
               "--control-preprocess": args.control_preprocess}
    for flag, values in options.items():
        if len(values) > n:
            raise SystemExit(f"xldm generate: error: {len(values)} {flag} for {n} --controlnet; each {flag} belongs "
                             f"to the --controlnet of the same rank")
    if len(args.control_image) != n:
        raise SystemExit(f"xldm generate: error: {n} --controlnet but {len(args.control_image)} --control-image; "
                         f"every ControlNet needs its control image")
    from xldm.config import BUNDLED_CONTROLNETS

    for k, name in enumerate(args.controlnet):
        if name in BUNDLED_CONTROLNETS:
            if not (BUNDLED_CONTROLNETS[name] / "config.json").exists():
                raise SystemExit(f"xldm generate: error: the bundled ControlNet {name} is not installed (expected "
                                 f"{BUNDLED_CONTROLNETS[name]}; scripts/train_default_controlnet.sh makes it)")
            args.controlnet[k] = str(BUNDLED_CONTROLNETS[name])
    for path in (*args.controlnet, *args.control_image):
        if not Path(path).exists():
            raise SystemExit(f"xldm generate: error: {path}: no such file or folder")

    def nth(values: list, k: int, default):
        return values[k] if k < len(values) else default

    return tuple(ControlUnit(args.controlnet[k], args.control_image[k], nth(args.control_scale, k, 1.0),
                             nth(args.control_start, k, 0.0), nth(args.control_end, k, 1.0),
                             nth(args.control_preprocess, k, None)) for k in range(n))


# the options `cmd_generate_cascade` reads (--model: refused there); a --cascade refuses the others when given
CASCADE_OPTIONS = ("negative", "seed", "width", "height", "sampler", "batch", "dtype", "device",
                   "init_image", "out", "force", "quiet", "from_png", "cascade", "cascade_steps", "cascade_cfg",
                   "cascade_aug", "model")


@functools.cache
def _generate_options() -> tuple[argparse.Action, ...]:
    """The flags of `xldm generate`, with their defaults (the parser built once per process)."""
    return tuple(action for action in add_generate_parser(argparse.ArgumentParser().add_subparsers())._actions
                 if action.option_strings and action.dest != "help")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def given_options(args: argparse.Namespace) -> dict[str, str]:
    """{dest: flag} of the options given on the command line with a value other than their default."""
    given = {}
    for action in _generate_options():
        value = getattr(args, action.dest, action.default)
        if value != action.default:
            negated = isinstance(action, argparse.BooleanOptionalAction) and value is False
            given[action.dest] = f"--no-{_flag(action.dest)[2:]}" if negated else _flag(action.dest)
    return given


def cmd_generate(args: argparse.Namespace) -> int:
    if args.list_sizes:
        from xldm.buckets import SDXL_BUCKETS, format_sizes

        print(format_sizes(SDXL_BUCKETS))
        return 0
    given = given_options(args)  # before --from-png and the defaults fill in the others
    source = apply_png_settings(args) if args.from_png else None
    from_image = {dest: flag for dest, flag in given_options(args).items() if dest not in given}
    if not args.prompt:
        raise SystemExit("xldm generate: error: a PROMPT is required")
    if args.out is not None:
        check_output_paths(_output_paths(args.out, max(args.batch, 1)), force=args.force)
    from xldm.devices import check_device

    check_device(args.device)
    from xldm.config import (DEFAULT_MODEL_PATH, DEFAULT_REFINER_PATH, DEFAULT_TURBO_UNET_PATH, GENERATE_DEFAULTS,
                             TURBO_DEFAULTS)

    hires_options = [flag for flag, value in (("--hires-upscaler", args.hires_upscaler),
                                              ("--hires-strength", args.hires_strength),
                                              ("--hires-steps", args.hires_steps)) if value is not None]
    if hires_options and args.hires_scale is None and args.hires_size is None:
        raise SystemExit(f"xldm generate: error: {', '.join(hires_options)} set the hires fix, which needs "
                         f"--hires-scale S or --hires-size WxH")
    turbo = args.model == "default-turbo"  # the bundled base's distilled UNet: few steps, no guidance
    if args.no_prompt_weighting:  # diffusers' encoding: the first 75 tokens, "(word:1.2)" read literally
        args.long_prompts, args.weighting = False, False
    for name, value in ({**GENERATE_DEFAULTS, **TURBO_DEFAULTS} if turbo else GENERATE_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value == "chunk" if name == "long_prompts" else value)
    if turbo:
        if not DEFAULT_TURBO_UNET_PATH.exists():
            raise SystemExit("xldm generate: error: the bundled turbo student is not in this copy of xldm (distil it "
                             "with scripts/train_default_turbo.sh)")
        args.model, args.unet = "default", str(DEFAULT_TURBO_UNET_PATH)
    if args.cascade and (args.hires_scale is not None or args.hires_size is not None):
        raise SystemExit("xldm generate: error: --hires-scale / --hires-size apply to a --model's txt2img; a "
                         "--cascade has its own super-resolution stages")
    sampler_flags = [flag for flag in ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
                     if getattr(args, flag) is not None]
    if args.cascade and sampler_flags:
        raise SystemExit(f"xldm generate: error: {', '.join('--' + f.replace('_', '-') for f in sampler_flags)} "
                         f"apply to a --model's sampler; a --cascade's stages take none")
    if args.cascade and args.controlnet:
        raise SystemExit("xldm generate: error: --controlnet steers a --model's UNet; a --cascade has none")
    if args.cascade:
        takes = f"a --cascade takes only {', '.join(_flag(dest) for dest in CASCADE_OPTIONS if dest != 'model')}"
        if unused := [flag for dest, flag in given.items() if dest not in CASCADE_OPTIONS]:
            raise ValueError(f"{', '.join(unused)}: not used by a --cascade; {takes}")
        if unused := [flag for dest, flag in from_image.items() if dest not in CASCADE_OPTIONS]:
            raise ValueError(f"--from-png {args.from_png}: its settings ({', '.join(unused)}) are not used by a "
                             f"--cascade; {takes}")
        return cmd_generate_cascade(args)
    if cascade_only := [flag for dest, flag in given.items() if dest.startswith("cascade_")]:
        raise ValueError(f"{', '.join(cascade_only)} set the stages of a --cascade; give --cascade DIR_OR_FILES, "
                         f"or --steps / --cfg for a --model")
    # the small model trained by this project (xldm/data/default): no --model, --model default, --refiner default

    no_model = args.model is None
    for flag, value, bundled in (("--model", args.model or "default", DEFAULT_MODEL_PATH),
                                 ("--refiner", args.refiner, DEFAULT_REFINER_PATH)):
        if value == "default" and not bundled.exists():
            raise SystemExit(f"xldm generate: error: {'no --model given and ' if no_model else ''}the bundled "
                             f"default {flag[2:]} is not in this copy of xldm (retrain it with "
                             f"scripts/train_default.sh); pass {flag} PATH")
        if value == "default":
            setattr(args, flag[2:], str(bundled))

    from xldm.images import open_image
    from xldm.pipeline import resolve_request
    from xldm.request import GenerationRequest

    controlnets = _control_units(args)
    from xldm.weights.info import model_info

    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, width=args.width, height=args.height,
        steps=args.steps, cfg=args.cfg, seed=args.seed, sampler=args.sampler, batch=args.batch,
        init_image=open_image(args.init_image) if args.init_image else None, strength=args.strength,
        mask=open_image(args.mask) if args.mask else None, refiner_start=args.refiner_start,
        original_size=args.original_size, crop_top_left=args.crop_top_left or (0, 0), target_size=args.target_size,
        negative_original_size=args.negative_original_size, negative_target_size=args.negative_target_size,
        **{name: value for name in ("aesthetic_score", "negative_aesthetic_score")
           if (value := getattr(args, name)) is not None},
        long_prompts="chunk" if args.long_prompts else "truncate", weighting=args.weighting,
        tile_vae=True if args.tile_vae else None, loras=tuple(args.lora), clip_skip=args.clip_skip,
        timestep_spacing=args.timestep_spacing, prediction=args.prediction, zero_terminal_snr=args.zero_terminal_snr,
        controlnets=controlnets, hires_scale=args.hires_scale, hires_size=args.hires_size,
        hires_upscaler=args.hires_upscaler, hires_strength=args.hires_strength, hires_steps=args.hires_steps,
        eta=args.eta, **{name: value for name in ("s_churn", "s_tmin", "s_tmax", "s_noise")
                         if (value := getattr(args, name)) is not None},
        **{setting: value for setting, value in (("cache_interval", args.deep_cache),
                                                  ("cache_branch", args.cache_branch), ("cfg_end", args.cfg_end))
           if value is not None},
    )
    if args.preview_every < 1:
        raise SystemExit(f"xldm generate: error: --preview-every must be >= 1, got {args.preview_every}")
    # resolved and checked once, from the header alone, before anything is loaded
    request = resolve_request(request, default_size=lambda: model_info(args.model).config.default_size,
                              has_refiner=args.refiner is not None)
    from xldm.lora import LoraSet
    from xldm.pipeline import load
    from xldm.request import request_loras

    # the LoRA files (tags too) checked against the header's config before the model is loaded
    lora_uses = request_loras(request, args.lora_dir)  # their weights checked first: no file is read for that
    checked_loras = LoraSet(model_info(args.model).config)
    checked_loras.set(lora_uses)
    for flag, path in (("--vae", args.vae), ("--unet", args.unet), ("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir),
                       *(("--embedding", p) for p in args.embedding)):
        if path is not None and not Path(path).exists():
            raise SystemExit(f"xldm generate: error: {flag} {path}: no such file or folder")
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    say(f"loading {args.model}" + (f" and the refiner {args.refiner}" if args.refiner else "") +
        (f" (UNet {args.unet})" if args.unet else "") + (f" (VAE {args.vae})" if args.vae else ""))
    pipe = load(args.model, refiner=args.refiner, dtype=torch_dtype(args.dtype), device=args.device,
                low_memory=args.low_memory, vae=args.vae, unet=args.unet, lora_dir=args.lora_dir, embeddings=args.embedding,
                embeddings_dir=args.embeddings_dir, compile=args.compile, quantize=args.quantize)
    if pipe.model.loras.config == checked_loras.config:
        pipe.model.loras = checked_loras  # the files read for the check, not read again
    from xldm.devices import dtype_reason

    say(dtype_reason(pipe.device, pipe.dtype, pipe.dtype_chosen))
    from xldm.hashes import cached_sha256

    for file in (pipe.model.file, pipe.model.vae_path):  # the infotext's hashes: said when slow (once per file)
        if file is not None and file.is_file() and cached_sha256(file) is None:
            say(f"hashing {file.name} for the image metadata (once; cached)")
            pipe.model.short_hash(file)
    say(f"seed {request.seed}" + (f" (images use {request.seed}..{request.seed + request.batch - 1})"
                                  if request.batch > 1 else ""))
    update, close = _progress_bars(args.quiet)
    on_step = lambda stage, i, total, x, x0: update(stage, total, stage)  # noqa: E731
    if args.preview is not None:  # the fitted linear latent -> RGB map of this VAE (xldm.speedups), no decode
        from xldm.speedups import model_preview_map, preview_image

        preview_map = model_preview_map(pipe.model)

        def on_step(stage, i, total, x, x0):
            update(stage, total, stage)
            if (i + 1) % args.preview_every == 0 or i + 1 == total:
                preview_image(x0, preview_map).resize((request.width, request.height)).save(args.preview)

    result = pipe.run(request, callback=on_step, status=lambda message: (close(), say(message)))
    close()
    for seconds in pipe.compile_seconds:
        say(f"compile: the UNet's first call took {seconds:.1f} s (torch.compile included)")
    if source is not None and source.get("model_hash") not in (None, result.params[0].get("model_hash")):
        say(f"note: {args.from_png} was made with {source.get('model', 'another model')} (hash "
            f"{source['model_hash']}), not this model; give it with --model for the same image")
    paths = _output_paths(args.out, request.batch) if args.out is not None else [None] * request.batch
    for path, image, params in zip(paths, result.images, result.params):
        print(save_output(image, path, params["seed"], params))
    return 0


def cmd_generate_cascade(args: argparse.Namespace) -> int:
    if args.model is not None:
        raise SystemExit("xldm generate: error: --cascade and --model are exclusive")
    if (args.width is None) != (args.height is None):
        raise SystemExit("xldm generate: error: with --cascade give both --width and --height (the final size)")
    import torch

    from xldm.cascade import CascadePipeline, describe, load_cascade
    from xldm.images import open_image

    dtype = torch_dtype(args.dtype) or torch.float32
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    init = open_image(args.init_image) if args.init_image else None
    pipe = CascadePipeline(load_cascade(args.cascade, dtype=dtype, device=device), device=device, dtype=dtype)
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    print(f"seed {seed}", file=sys.stderr)
    update, close = _progress_bars(args.quiet)
    result = pipe(args.prompt, steps=args.cascade_steps, cfg=args.cascade_cfg, aug=args.cascade_aug, seed=seed,
                  init_image=init, resize_init_image=True,
                  size=(args.width, args.height) if args.width is not None else None, negative_prompt=args.negative,
                  batch=args.batch, sampler=args.sampler,
                  callback=lambda stage, i, total: update(stage, total,
                                                          f"stage {stage} ({describe(pipe.configs[stage])})"))
    close()
    paths = _output_paths(args.out, args.batch) if args.out is not None else [None] * args.batch
    for path, image, s in zip(paths, result.images, result.seeds):
        print(save_output(image, path, s, {**result.params, "seed": s, "cascade": str(args.cascade)}))
    return 0




def add_generate_parser(sub) -> argparse.ArgumentParser:
    """Add the `generate` sub-command to an `argparse` sub-parsers object."""
    gen = sub.add_parser("generate", help="text-to-image, image-to-image, inpainting, base -> refiner")
    gen.add_argument("prompt", nargs="?", help="what to draw")
    gen.add_argument("--model", help="single-file .safetensors or diffusers folder (default: the bundled model; "
                                     "default-turbo: its 4-step distilled student)")
    gen.add_argument("--refiner", help="refiner model ('default': the bundled one); takes over at --refiner-start")
    gen.add_argument("--refiner-start", type=float, default=None,
                     help="fraction of the schedule after which the refiner takes over (default 0.8)")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=None, help="default 30 (default-turbo: 4)")
    gen.add_argument("--cfg", type=float, default=None,
                     help="classifier-free guidance scale, 1 or less = off (default 5; default-turbo: 1)")
    gen.add_argument("--seed", type=int, default=None, help="image i of a batch uses seed + i (default: random)")
    gen.add_argument("--width", type=_side, default=None, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--height", type=_side, default=None)
    gen.add_argument("--sampler", default=None, metavar="NAME",
                     help="euler | euler_a | heun | dpmpp_2m | dpmpp_2m_karras | dpmpp_2m_sde_karras | dpmpp_sde_karras | "
                          "dpmpp_3m_sde | dpmpp_3m_sde_karras | ddim | unipc | lcm (LCM / LCM-LoRA models: 2-8 steps, "
                          "--cfg 1)")
    gen.add_argument("--timestep-spacing", choices=("leading", "trailing", "linspace"), default=None,
                     help="which training timesteps the schedule visits (diffusers timestep_spacing; trailing = "
                          "A1111 SGM Uniform, for SDXL Turbo / Lightning; default leading)")
    gen.add_argument("--prediction", choices=("eps", "v"), default=None,
                     help="the model's output: noise (eps) or v; default: the model's own (v_pred marker key)")
    gen.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                     help="zero-terminal-SNR schedule (v-prediction fine-tunes); default: the model's own "
                          "(ztsnr marker key)")
    gen.add_argument("--original-size", type=_size, default=None, metavar="WxH")
    gen.add_argument("--crop-top-left", type=_crop, default=None, metavar="T,L", help="default 0,0")
    gen.add_argument("--target-size", type=_size, default=None, metavar="WxH")
    gen.add_argument("--negative-original-size", type=_size, default=None, metavar="WxH")
    gen.add_argument("--negative-target-size", type=_size, default=None, metavar="WxH")
    gen.add_argument("--aesthetic-score", type=float, default=None, help="refiner conditioning (default 6.0)")
    gen.add_argument("--negative-aesthetic-score", type=float, default=None, help="default 2.5")
    gen.add_argument("--init-image", default=None, help="image-to-image / SDEdit source")
    gen.add_argument("--strength", type=float, default=None, help="img2img strength in (0, 1] (default 0.3)")
    gen.add_argument("--mask", default=None, help="inpainting mask, white = repaint (same size as the init image)")
    gen.add_argument("--hires-scale", type=float, default=None, metavar="S",
                     help="hires fix (A1111): generate at --width x --height, upscale S times (> 1), then an img2img "
                          "pass at --hires-strength")
    gen.add_argument("--hires-size", type=_hires_size, default=None, metavar="WxH",
                     help="hires fix to this size instead of --hires-scale (A1111 hr_resize_x/y; one side 0 keeps "
                          "the aspect ratio)")
    gen.add_argument("--hires-upscaler", default=None, metavar="NAME",
                     help="Latent (default; bilinear on the latents), 'Latent (antialiased)', 'Latent (bicubic)', "
                          "'Latent (bicubic antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', or on the "
                          "decoded image: Lanczos, Nearest, None (= Lanczos, as A1111)")
    gen.add_argument("--hires-strength", type=float, default=None, metavar="X",
                     help="denoising strength of the hires pass, in (0, 1] (default 0.7)")
    gen.add_argument("--hires-steps", type=int, default=None, metavar="N",
                     help="schedule length of the hires pass, which runs the last int(N * strength) of them "
                          "(diffusers img2img; default/0: --steps)")
    gen.add_argument("--eta", type=float, default=None, metavar="X",
                     help="noise scale in [0, 1] of the samplers that add noise (euler_a, the SDE samplers: default 1; "
                          "ddim: default 0)")
    gen.add_argument("--s-churn", type=float, default=None, metavar="X",
                     help="euler: churn (Karras et al. 2022, Alg. 2), default 0; --s-tmin / --s-tmax bound the "
                          "sigmas it applies at, --s-noise scales its noise")
    gen.add_argument("--s-tmin", type=float, default=None, metavar="SIGMA", help="default 0")
    gen.add_argument("--s-tmax", type=float, default=None, metavar="SIGMA", help="default infinity")
    gen.add_argument("--s-noise", type=float, default=None, metavar="X", help="default 1")
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="default: bf16 on a GPU that has it (else fp16); on a CPU bf16 when it has AVX512-BF16 / "
                          "AMX and the UNet has over 100 M parameters, else fp32 (the choice is printed)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the UNet (its first call, compiling included, is timed on stderr)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    gen.add_argument("--low-memory", action="store_true",
                     help="one network at a time on the device, each read once and kept near it (GPU: pinned host "
                          "RAM; CPU: the mapped file), so later images read no file again")
    gen.add_argument("--quantize", choices=("int8",), default=None,
                     help="weight-only int8 for the UNet's Linear and 1x1 conv layers (about half the UNet's "
                          "memory in bf16; quality cost: README)")
    gen.add_argument("--long-prompts", action=argparse.BooleanOptionalAction, default=None,
                     help="encode prompts over 75 tokens in 75-token chunks, BREAK starting a new one (A1111; "
                          "default on); --no-long-prompts: truncate at 75 tokens (diffusers)")
    gen.add_argument("--weighting", action=argparse.BooleanOptionalAction, default=None,
                     help="A1111 (word:1.2) / [word] prompt weighting (default on); --no-weighting: literal text")
    gen.add_argument("--no-prompt-weighting", action="store_true",
                     help="diffusers' prompt encoding: both --no-long-prompts and --no-weighting")
    gen.add_argument("--tile-vae", action="store_true",
                     help="VAE decode and encode in tiles (large images, little memory)")
    gen.add_argument("--lora", type=_lora, action="append", default=[], metavar="FILE[:WEIGHT[:TEXT_WEIGHT]]",
                     help="LoRA / LyCORIS file on the model (repeatable, applied in order; weight default 1)")
    gen.add_argument("--lora-dir", default=None, metavar="DIR",
                     help="folder of LoRA files that <lora:NAME:WEIGHT> in the prompt names (DIR/NAME.safetensors)")
    gen.add_argument("--embedding", action="append", default=[], metavar="FILE",
                     help="textual-inversion file, used by its file name in the prompt (repeatable)")
    gen.add_argument("--embeddings-dir", default=None, metavar="DIR",
                     help="folder of textual-inversion files (those for another model are skipped)")
    gen.add_argument("--vae", default=None, metavar="FILE", help="a VAE file that replaces the model's")
    gen.add_argument("--unet", default=None, metavar="FILE", help="a UNet file that replaces the model's "
                                                                 "(e.g. a distilled student)")
    gen.add_argument("--deep-cache", type=int, default=None, metavar="N",
                     help="DeepCache: run the whole UNet every N-th step only, the shallow branch on its cached "
                          "deep features between (default 1 = off; see the README's Speed-ups table for the cost)")
    gen.add_argument("--cache-branch", type=int, default=None, metavar="B",
                     help="DeepCache: the deepest UNet input block run on cached steps (default 0: the first "
                          "conv only)")
    gen.add_argument("--cfg-end", type=float, default=None, metavar="F",
                     help="classifier-free guidance on the first fraction F of the steps only, the conditional "
                          "branch alone after (default 1: every step)")
    gen.add_argument("--preview", default=None, metavar="PATH",
                     help="write a cheap preview PNG of the denoised estimate here during sampling (a linear "
                          "latent -> RGB map fitted to the model's VAE)")
    gen.add_argument("--preview-every", type=int, default=1, metavar="N", help="--preview every N steps")
    gen.add_argument("--clip-skip", type=int, default=None, metavar="N",
                     help="A1111 Clip skip: 1 = the model's own text layer, 2 = one layer earlier, ...")
    gen.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                     help="ControlNet (diffusers folder or single file, or default-canny: the bundled base's) on the "
                          "base; repeatable, applied in order: the k-th --control-* option goes with the k-th "
                          "--controlnet")
    gen.add_argument("--control-image", action="append", default=[], metavar="IMG",
                     help="control image of a --controlnet (resized to the output size)")
    gen.add_argument("--control-scale", type=float, action="append", default=[], metavar="S",
                     help="ControlNet weight (default 1; 0 = off)")
    gen.add_argument("--control-start", type=float, action="append", default=[], metavar="A",
                     help="fraction of the steps where the ControlNet starts (default 0)")
    gen.add_argument("--control-end", type=float, action="append", default=[], metavar="B",
                     help="fraction of the steps where it ends (default 1)")
    gen.add_argument("--control-preprocess", action="append", default=[], metavar="canny[:LOW,HIGH]",
                     help="make the control map from the image: canny edges (OpenCV, default 100,200); 'none' = "
                          "the image is the map (depth, pose, ...)")
    gen.add_argument("--list-sizes", action="store_true", help="print the SDXL aspect-ratio buckets and exit")
    gen.add_argument("--out", default=None, metavar="FILE",
                     help=".png, .jpg/.jpeg or .webp (the settings in PNG text or EXIF UserComment, as A1111); "
                          f"parent folders are made; default: {DEFAULT_OUTPUTS}/NNNNN-SEED.png, the next free number")
    gen.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    gen.add_argument("--from-png", default=None, metavar="IMAGE",
                     help="regenerate an image from its settings (xldm or A1111 metadata, PNG/JPEG/WebP); flags "
                          "given too override them; the model is --model (or the default)")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages on stderr")
    gen.add_argument("--cascade", default=None, metavar="DIR_OR_FILES",
                     help="run a pixel-space cascade instead of --model: a folder of stage_N.safetensors, "
                          "comma-separated stage files, or 'default'")
    gen.add_argument("--cascade-steps", type=number_list(int), default=None, metavar="N,N,N",
                     help="sampling steps per stage (default 30 for a base stage, 20 for SR)")
    gen.add_argument("--cascade-cfg", type=number_list(float), default=None, metavar="G,G,G",
                     help="guidance scale per stage (default 5 base, 4 SR)")
    gen.add_argument("--cascade-aug", type=number_list(float), default=None, metavar="S,S,S",
                     help="noise augmentation level in [0, 1] of each stage's low-res input (0 for a base stage; "
                          "default 0.1 for SR)")
    gen.set_defaults(func=cmd_generate)
    return gen
