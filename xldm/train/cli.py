"""`xldm train`: parse flags and an optional TOML file into a `TrainConfig`, then run `xldm.train.loop.train`.

    xldm train --preset tiny-sdxl-base --data DIR_OR_SHARDS --steps N --batch-size B --out RUN_DIR
               [--checkpoint-every K] [--resume] [--seed S] [--lr X] [--init PATH] [--grad-accum N]
               [--sample-every N --sample-prompts FILE] [--tensorboard] [--set FIELD=VALUE ...]
    xldm train CONFIG.toml [flags]
    xldm train --preset cascade-base-32 --data DIR --out RUN_DIR [--text-encoders-from MODEL_OR_STAGE] [flags]

A cascade preset trains one stage of a pixel-space cascade (--init then takes a stage file).  The TOML file holds
data only: `preset = "sdxl-base"` (optional) and any `TrainConfig` field at the top level (`steps = 1000`,
`lr = 1e-5`, `data = "shards/{000..099}.tar"`).  Precedence: preset < TOML < flags.
Under torchrun the same command runs in every process: `torchrun --nproc_per_node 2 -m xldm.train.cli ...`.
Before step 1 the run prints what the data holds (also in RUN_DIR/dataset.json; skipped files in
RUN_DIR/skipped.txt); `xldm plot RUN_DIR` draws RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import re
import sys
import textwrap
import tokenize
import tomllib
from pathlib import Path
from typing import Any

from xldm.train.config import TRAIN_PRESETS, TrainConfig, preset

# flag -> TrainConfig field, for the flags that set a field directly.
_FIELD_FLAGS = ("data", "steps", "batch_size", "out", "checkpoint_every", "seed", "lr", "init", "keep_checkpoints",
                "mixed_precision", "device", "text_encoders_from", "grad_accum_steps", "sample_every",
                "sample_prompts", "lora_rank", "lora_alpha", "teacher", "control")
RANDOM_INIT_NOTE = ("random init of every network unless --init is given (a tiny preset is meant for tests; a full "
                    "one from scratch needs pretrained text encoders and VAE: pass --init with a single file or "
                    "diffusers folder)")


@functools.cache
def field_notes() -> tuple[tuple[str, str, str], ...]:
    """(group note, field name, help) for every TrainConfig field, in declaration order, read from the comments of
    the dataclass's source: a field's help is its trailing comment (with the lower-case comment lines that continue
    it), a group note the comment block above a run of fields.  Without the source (a zipped install) the helps are
    empty and the fields still listed."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):
        return tuple(("", name, "") for name in names)
    comments = {token.start[0]: (token.start[1], token.string.lstrip("#").strip())
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    helps: dict[str, str] = {}
    groups: dict[str, str] = {}
    block: list[str] = []  # the comment lines since the last blank line or field
    continuing: str | None = None  # the field whose trailing comment the next lower-case comment lines continue
    after_field = False
    for number, line in enumerate(source.splitlines(), start=1):
        field = re.match(r"    (\w+)\s*:", line)
        if field and field.group(1) in names:
            name = field.group(1)
            trailing = comments.get(number)
            helps[name] = trailing[1] if trailing and trailing[0] > 4 else ""
            groups[name] = " ".join(block)
            continuing, after_field = (name if helps[name] else None), True
        elif not line.strip():
            block, continuing, after_field = [], None, False
        elif line.strip().startswith("#"):
            text = comments[number][1]
            if continuing is not None and text[:1].islower():
                helps[continuing] += " " + text
                continue
            if after_field:  # a new group starts right below the last one's fields
                block, after_field = [], False
            continuing = None
            block.append(text)
        elif line.startswith(("    def ", "    @")):  # the methods: no fields below
            break
    return tuple((groups.get(name, ""), name, helps.get(name, "")) for name in names)


def fields_help(flags: dict[str, tuple[str, str]], width: int = 118) -> str:
    """Every TrainConfig field with its default and help (`field_notes`; a field without a comment: its flag's
    help), a group's note printed once above it; `flags`: field -> (the option that sets it directly, its help)."""
    lines = textwrap.wrap("TrainConfig fields, with their defaults before any --preset (set by the flag in brackets, "
                          "or by --set FIELD=VALUE, or in the TOML file):", width)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    group = ""
    for note, name, text in field_notes():
        if note and note != group:
            lines += textwrap.wrap(note, width, initial_indent="  # ", subsequent_indent="  # ")
        group = note
        flag, flag_help = flags.get(name, ("", ""))
        text = text or flag_help
        flag = f" [{flag}]" if flag else ""
        lines += textwrap.wrap(f"{name} = {defaults[name]!r}{flag}" + (f": {text}" if text else ""), width,
                               initial_indent="  ", subsequent_indent="        ")
    return "\n".join(lines)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` sub-command to an `argparse` sub-parsers object."""
    p = subparsers.add_parser("train", help="train or fine-tune a base, refiner, VAE, text encoders or cascade stage",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml", help="TOML file of TrainConfig fields")
    p.add_argument("--preset", default=None, help=f"starting settings: {', '.join(sorted(TRAIN_PRESETS))}")
    p.add_argument("--data", default=None, help="image folder (name.txt captions, metadata.jsonl, or kohya "
                                                        "N_name/ subfolders) or .tar shards")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps (resumed ones included)")
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="checkpoints/, metrics.jsonl, final/")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="a resumable checkpoint every K steps (and at the last)")
    p.add_argument("--keep-checkpoints", type=int, default=None, metavar="K", help="keep the newest K")
    p.add_argument("--resume", action="store_true", help="continue from the newest loadable checkpoint")
    p.add_argument("--seed", type=int, default=None, help="of the data order, crops, noise and initial weights")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (after warm-up)")
    p.add_argument("--init", default=None, metavar="PATH", help="starting weights: single file or diffusers folder "
                                                                "(cascade presets: a stage file)")
    p.add_argument("--init-components", default=None, metavar="LIST",
                   help="comma-separated subset of unet,vae,text_encoders to take from --init (default: all)")
    p.add_argument("--text-encoders-from", default=None, metavar="MODEL_OR_STAGE",
                   help="cascade presets: frozen text encoders from an xldm model file or folder, a stage file, or "
                        "'default' (the bundled default model's)")
    p.add_argument("--grad-accum", dest="grad_accum_steps", type=int, default=None, metavar="N",
                   help="gradient accumulation: one step = one update over N batches (default 1)")
    p.add_argument("--sample-every", type=int, default=None, metavar="N", help="sample images every N steps (0 = off)")
    p.add_argument("--sample-prompts", default=None, metavar="FILE",
                   help="one prompt per line, kohya options --n --s --l --d --w --h; grids in RUN_DIR/samples/")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="distillation presets (*-turbo): the model distilled into a few-step student")
    p.add_argument("--control", default=None, metavar="PREPROCESSOR",
                   help="ControlNet presets (*-controlnet): how control images are made from the training images: "
                        "canny or canny:LOW,HIGH; or dir:FOLDER, a folder mirroring --data with each image's control "
                        "image (same relative path and stem)")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="train a rank-R LoRA (kohya file RUN/final/lora.safetensors) instead of the weights")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-conv", action="store_true", help="LoCon: adapt the convolutions too")
    p.add_argument("--lora-text-encoders", action="store_true", help="adapt the text encoders too")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other TrainConfig field, e.g. --set offset_noise=0.05 (repeatable)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events into RUN_DIR/tensorboard/ (pip install 'xldm[tensorboard]')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {action.dest: (action.option_strings[-1], action.help or "") for action in p._actions
             if action.dest in names and action.option_strings}
    p.epilog = fields_help(flags)
    return p


def _parse_value(field: dataclasses.Field, text: str) -> Any:
    """A --set value as the field's type (bool, int, float, str, tuple of str, optional str)."""
    kind = str(field.type)
    if "bool" in kind:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {field.name}: expected true/false, got {text!r}")
    try:
        if "tuple" in kind:
            return tuple(int(part) if "int" in kind else part for part in text.split(",") if part)
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"--set {field.name}: expected {kind}, got {text!r}") from None
    if "None" in kind and text.lower() in ("", "none"):
        return None
    return text


def _read_toml(path: str) -> dict[str, Any]:
    """The settings of a CONFIG.toml file, or a ValueError naming the file."""
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder; expected a TOML file of TrainConfig fields")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """preset < TOML < flags."""
    values: dict[str, Any] = {}
    if args.config:
        values = _read_toml(args.config)
    file_preset = values.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ValueError(f"{args.config}: preset must be a preset name (a string), got {file_preset!r}")
    name = args.preset or file_preset
    base = TrainConfig() if name is None else preset(name)  # (an unknown name is a ValueError listing the presets)
    values.update({flag: getattr(args, flag) for flag in _FIELD_FLAGS if getattr(args, flag) is not None})
    if args.init_components is not None:
        values["init_components"] = tuple(c for c in args.init_components.split(",") if c)
    for flag in ("deterministic", "lora_conv", "lora_text_encoders", "tensorboard"):
        if getattr(args, flag):
            values[flag] = True
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for item in args.set:
        field, sep, text = item.partition("=")
        if not sep or field not in fields:
            raise ValueError(f"--set expects FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        values[field] = _parse_value(fields[field], text)
    return TrainConfig.from_dict({**base.to_dict(), **values})


def cmd_train(args: argparse.Namespace) -> int:
    from xldm.train.loop import train

    config = config_from_args(args)
    if config.device != "auto":
        from xldm.devices import check_device

        check_device(config.device)
    if not config.data:
        raise ValueError("xldm train: --data DIR_OR_SHARDS is required (or `data` in the TOML file)")
    if not config.out:
        raise ValueError("xldm train: --out RUN_DIR is required (or `out` in the TOML file)")
    if args.preset and not config.init and not config.text_encoders_from and config.task != "add":
        print(f"xldm train: preset {args.preset}: {RANDOM_INIT_NOTE}", file=sys.stderr)
    from xldm.train.events import MissingExtraError
    from xldm.train.loop import TrainingStopped

    try:
        result = train(config, resume=args.resume, progress=not args.no_progress)
    except MissingExtraError as e:
        raise SystemExit(f"xldm train: error: {e}") from None
    except TrainingStopped as e:
        print(f"xldm train: {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's status for a process ended by that signal
    if result.final_path is not None:
        print(f"step {result.step}: wrote {result.final_path}")
    return 0


def add_plot_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `plot` sub-command (xldm.train.plot) to an `argparse` sub-parsers object."""
    p = subparsers.add_parser("plot", help="a training run's loss, learning rate and gradient norm as a PNG",
                              description="Plot RUN/metrics.jsonl: loss (raw and EMA-smoothed), validation losses if "
                                          "recorded, learning rate and gradient norm against the step.  Needs "
                                          "matplotlib: pip install 'xldm[plot]'.")
    p.add_argument("run", metavar="RUN", help="a run directory (or its metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="PNG", help="where to write the PNG (default RUN/metrics.png)")
    p.set_defaults(func=cmd_plot)
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    from xldm.train.events import MissingExtraError
    from xldm.train.plot import plot_metrics

    try:
        path = plot_metrics(args.run, args.out)
    except MissingExtraError as e:
        raise SystemExit(f"xldm plot: error: {e}") from None
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m xldm.train.cli ...` (the same arguments as `xldm train`), e.g. under torchrun."""
    parser = argparse.ArgumentParser(prog="xldm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"xldm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
