"""Sample images during training (kohya sd-scripts `--sample_every_n_steps` / `--sample_prompts`).

The prompts file holds one prompt per line; blank lines and `#` comments are skipped.  A line may end in kohya's
options (library/train_util.py `sample_images`): `--n` negative prompt, `--s` steps, `--l` guidance scale, `--d` seed,
`--w` width, `--h` height.  Defaults: the model's native size, 20 steps, euler, cfg 5, seed = config seed + line
index.  `write_samples` renders them with the live UNet in eval mode, without gradients, global RNGs untouched, into
`samples/step_000100.png` (a grid, one cell per prompt, in order) and `step_000100.txt` (each prompt's settings)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_SAMPLER = 20, 5.0, "euler"
_OPTIONS = {"n": "negative", "s": "steps", "l": "cfg", "d": "seed", "w": "width", "h": "height"}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None


def parse_prompt(line: str) -> SamplePrompt:
    """`a cat --n blurry --s 28 --l 7 --d 1 --w 64 --h 96` (kohya splits on ' --' the same way)."""
    text, *options = line.split(" --")
    values: dict = {}
    for option in options:
        key, _, value = option.strip().partition(" ")
        if key not in _OPTIONS:
            raise ValueError(f"sample prompt {line!r}: unknown option --{key}; known: "
                             f"{', '.join('--' + k for k in _OPTIONS)}")
        name = _OPTIONS[key]
        try:
            values[name] = value.strip() if name == "negative" else (float if name == "cfg" else int)(value)
        except ValueError:
            raise ValueError(f"sample prompt {line!r}: --{key} needs a number, got {value!r}") from None
    return SamplePrompt(text.strip(), **values)


def read_prompts(path: str) -> list[SamplePrompt]:
    """The prompts of `path`; a missing file or one without prompts is an error."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"sample_prompts: {path} is not a file")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [parse_prompt(line) for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"sample_prompts: {path} holds no prompts (blank lines and # comments are skipped)")
    return prompts


def render(run, prompts: list[SamplePrompt]) -> tuple[list[Image.Image], list[str]]:
    """One image per prompt from the run's live networks, and a line describing each."""
    from xldm.pipeline import Pipeline

    model, config = run.model, run.config
    size = model.config.default_size
    pipe = Pipeline(model, dtype=torch.float32, device=run.device)
    images, lines = [], []
    for index, p in enumerate(prompts):
        settings = dict(negative_prompt=p.negative, steps=p.steps or DEFAULT_STEPS,
                        cfg=DEFAULT_CFG if p.cfg is None else p.cfg, sampler=DEFAULT_SAMPLER,
                        seed=config.seed + index if p.seed is None else p.seed,
                        width=(p.width or size) // 8 * 8, height=(p.height or size) // 8 * 8)
        images.append(pipe(p.prompt, **settings).images[0])
        lines.append(f"{p.prompt}\t" + " ".join(f"{k}={v}" for k, v in settings.items()))
    return images, lines


def grid(images: list[Image.Image]) -> Image.Image:
    """The images in rows of ceil(sqrt(n)) cells of the largest size, on white."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for k, image in enumerate(images):
        sheet.paste(image, (k % columns * w, k // columns * h))
    return sheet


def write_samples(run, prompts: list[SamplePrompt], folder: Path, step: int) -> Path:
    """Render in eval mode under no_grad (train mode and the global RNGs restored after); returns the grid's path."""
    modes = {name: module.training for name, module in run.model.modules().items()}
    devices = [run.device] if run.device.type == "cuda" else []
    try:
        for module in run.model.modules().values():
            module.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            images, lines = render(run, prompts)
    finally:
        for name, module in run.model.modules().items():
            module.train(modes[name])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.png"
    grid(images).save(path)
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
