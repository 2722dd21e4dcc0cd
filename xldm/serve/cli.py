"""`xldm serve`: the API and the page, on 127.0.0.1:7860 by default.  Another address needs `--api-key KEY` (or
`--allow-remote`, with a warning): the webui's API has no authentication by default, and open instances have been
used to run other people's code."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from pathlib import Path

# Dtype names of every xldm command (`xldm generate`, `convert`, `serve`); here, where `xldm.cli` can import them.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str | None):
    """A --dtype name -> the torch dtype; None stays None (the command's default)."""
    if name is None:
        return None
    import torch

    return getattr(torch, DTYPES[name])


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="AUTOMATIC1111-compatible HTTP API and a web page")
    serve.add_argument("--model", action="append", default=[], metavar="PATH",
                       help="checkpoint (single file or diffusers folder); repeat for more; the first is current "
                            "(default: the bundled default model and its refiner)")
    serve.add_argument("--models-dir", default=None, metavar="DIR",
                       help="also offer every *.safetensors file and diffusers folder directly inside DIR")
    serve.add_argument("--refiner", default=None, metavar="PATH", help="refiner checkpoint (the page's switch)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (or HTTP Basic with KEY as the password); "
                            "default: the XLDM_API_KEY environment variable, if set")
    serve.add_argument("--allow-remote", action="store_true",
                       help="listen on a non-loopback address without an API key (not recommended)")
    serve.add_argument("--queue-size", type=int, default=8, metavar="N",
                       help="jobs that may wait behind the running one; more get 503 with Retry-After")
    serve.add_argument("--outputs", default=None, metavar="DIR",
                       help="folder for images of requests with save_images (default: nothing is written)")
    serve.add_argument("--lora-dir", default=None, metavar="DIR",
                       help="LoRA / LyCORIS *.safetensors files that <lora:NAME:WEIGHT> prompt tags name")
    serve.add_argument("--vae-dir", default=None, metavar="DIR",
                       help="VAE *.safetensors files the sd_vae option chooses from (/sdapi/v1/sd-vae)")
    serve.add_argument("--embeddings-dir", default=None, metavar="DIR",
                       help="textual-inversion embeddings (*.safetensors, *.pt) listed by /sdapi/v1/embeddings")
    serve.add_argument("--controlnet-dir", default=None, metavar="DIR",
                       help="ControlNet files (*.safetensors, diffusers folders) that the ControlNet extension API's "
                            "units name (/controlnet/model_list)")
    serve.add_argument("--cors-allow-origins", default=None, metavar="ORIGINS",
                       help="comma-separated browser origins allowed to call the API cross-origin (e.g. "
                            "http://localhost:3000; '*' for any); default: none, cross-origin requests are refused")
    serve.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="default: fp32 on CPU, bf16 on GPU")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    serve.set_defaults(func=cmd_serve)
    return serve


def build_config(args: argparse.Namespace):
    """The ServerConfig of parsed arguments; raises ValueError for unsafe or impossible settings."""
    from xldm.serve.guard import LOOPBACK_HOSTS
    from xldm.serve.server import ServerConfig
    from xldm.devices import check_device
    from xldm.serve.jobs import find_models

    if args.queue_size < 0:
        raise ValueError(f"--queue-size is the number of jobs that may wait (0 or more), got {args.queue_size}")
    models = [Path(p) for p in args.model]
    if args.models_dir:
        models += [p for p in find_models(args.models_dir) if p.resolve() not in {m.resolve() for m in models}]
    if args.refiner:
        models.append(Path(args.refiner))
    students: dict[str, tuple[Path, Path]] = {}
    if not models:  # the small model bundled with xldm (xldm/data/default), with its refiner
        from xldm.config import DEFAULT_MODEL_PATH, DEFAULT_REFINER_PATH

        if not DEFAULT_MODEL_PATH.is_file():
            raise ValueError("give --model PATH (or --models-dir DIR); this copy of xldm has no bundled default model")
        models = [DEFAULT_MODEL_PATH]
        from xldm.config import DEFAULT_TURBO_UNET_PATH

        if DEFAULT_TURBO_UNET_PATH.is_file():  # offered as "default-turbo" (sample it with 4 steps, cfg 1)
            students["default-turbo"] = (DEFAULT_MODEL_PATH, DEFAULT_TURBO_UNET_PATH)
        if DEFAULT_REFINER_PATH.is_file():
            args.refiner = str(DEFAULT_REFINER_PATH)
            models.append(DEFAULT_REFINER_PATH)
    for path in models:  # a path, never a preset name (which xldm.weights.info.model_info would also accept)
        if not path.exists():
            raise FileNotFoundError(f"no such checkpoint: {path}")
    api_key = args.api_key or os.environ.get("XLDM_API_KEY") or None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback and api_key is None:
        if not args.allow_remote:
            raise ValueError(f"refusing to listen on {args.host} without --api-key: anyone who can reach it could "
                             f"use it; give --api-key KEY, or --allow-remote to do it anyway")
        print(f"xldm serve: WARNING: listening on {args.host} with no API key: anyone who can reach this "
              f"address can use the server", file=sys.stderr)
    check_device(args.device)
    if args.outputs and Path(args.outputs).exists() and not Path(args.outputs).is_dir():
        raise ValueError(f"--outputs {args.outputs}: is not a folder")
    folders = {}
    for flag in ("lora_dir", "vae_dir", "embeddings_dir", "controlnet_dir"):
        value = getattr(args, flag, None)
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"--{flag.replace('_', '-')} {value}: is not a folder")
        folders[flag] = Path(value) if value is not None else None
    origins = tuple(o.strip() for o in (getattr(args, "cors_allow_origins", None) or "").split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"--cors-allow-origins: {origin!r} is no origin; expected scheme://host[:port], e.g. "
                             f"http://localhost:3000, or '*'")
    # /sdapi/v1/cmd-flags: the options, folders and files only as whether they were given, never the API key
    hidden = {"model", "models_dir", "refiner", "outputs", "lora_dir", "vae_dir", "embeddings_dir", "controlnet_dir"}
    cmd_flags = {k: (bool(v) if k in hidden else v) for k, v in sorted(vars(args).items())
                 if k not in ("func", "api_key", "command") and not callable(v)}
    cmd_flags["api_key"] = api_key is not None
    hosts = LOOPBACK_HOSTS | {args.host.strip("[]").lower()}  # 127.0.0.2 serves Host: 127.0.0.2
    return ServerConfig(
        models=models, model=Path(args.model[0]).name if args.model else None,
        refiner=Path(args.refiner).name if args.refiner else None,
        api_key=api_key, queue_size=args.queue_size, outputs=Path(args.outputs) if args.outputs else None,
        allowed_hosts=hosts if loopback else None, dtype=torch_dtype(args.dtype), device=args.device, students=students,
        models_dir=Path(args.models_dir) if args.models_dir else None, cors_allow_origins=origins,
        cmd_flags=cmd_flags, **folders)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise SystemExit(f"xldm serve: error: {e.name} is not installed; install the server's extra: "
                         f"pip install 'xldm[serve]'") from None
    from xldm.serve.app import create_app

    app = create_app(build_config(args))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"xldm serve: http://{host}:{args.port}/  (API: /sdapi/v1/*, OpenAPI: /openapi.json)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    return 0
