"""AUTOMATIC1111-style prompt weighting: "(word:1.2)", "(word)", "[word]", escapes, BREAK.

Syntax (the stable-diffusion-webui "attention/emphasis" rules, `modules/prompt_parser.py`):

* `(text)` multiplies the weight of `text` by 1.1, `[text]` by 1/1.1; they nest: `((a))` = 1.1 * 1.1.
* `(text:w)` multiplies by `w` instead (`[+-]?[.0-9]+`, spaces allowed around it, e.g. `(a : 0.5 )`); a `w` that
  reads as inf, or weights whose product is beyond float32, are a ValueError (they would make NaN images).
* `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a lone backslash is dropped (as the webui does).
* A `)` or `]` with nothing open is literal text; brackets still open at the end apply to the rest of the prompt.
* The word `BREAK` (upper case, on word boundaries) ends the current 75-token chunk (see `xldm.conditioning`).
* Empty pieces are dropped, neighbouring pieces with equal weights merged; an empty prompt gives `[("", 1.0)]`.

The weights act on the text encoder's output, not its input: every token's hidden state is multiplied by its
weight, then the whole chunk is rescaled so that its mean is what it was before weighting (`apply_token_weights`).
That keeps the overall magnitude of the context, so "(cat:1.5)" shifts emphasis rather than loudness."""

from __future__ import annotations

import math
import re

import torch

# Weight factors of the webui (prompt_parser.py: round_bracket_multiplier, square_bracket_multiplier).
ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1

# A chunk break, as the parser returns it (same encoding as the webui: text "BREAK", weight -1).
BREAK: tuple[str, float] = ("BREAK", -1.0)

_WEIGHT_THEN_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_PLAIN_TEXT = re.compile(r"[^\\()\[\]:]+")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPABLE = "()[]\\"
FLOAT32_MAX = torch.finfo(torch.float32).max  # the weights multiply the encoder's output in float32


def parse_weighted_prompt(prompt: str) -> list[tuple[str, float]]:
    """Split `prompt` into `(text, weight)` pieces, with `BREAK` entries where the prompt says BREAK.

    >>> parse_weighted_prompt("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]"""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    pieces: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []  # index into `pieces` where each open "(" starts
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    def add_text(text: str) -> None:
        for k, part in enumerate(_BREAK_WORD.split(text)):
            if k > 0:
                pieces.append([BREAK[0], BREAK[1], True])
            pieces.append([part, 1.0, False])

    i, n = 0, len(prompt)
    while i < n:
        c = prompt[i]
        i += 1  # past `c`; the branches below that read more move `i` on themselves
        if c == "\\":
            if i < n and prompt[i] in _ESCAPABLE:
                pieces.append([prompt[i], 1.0, False])
                i += 1
            # else: a lone backslash is dropped
        elif c == "(":
            round_open.append(len(pieces))
        elif c == "[":
            square_open.append(len(pieces))
        elif c == ")" and round_open:
            scale_from(round_open.pop(), ROUND_BRACKET_FACTOR)
        elif c == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_BRACKET_FACTOR)
        elif c == ":":
            match = _WEIGHT_THEN_CLOSE.match(prompt, i - 1)
            weight = _parse_float(match.group(1)) if match and round_open else None
            if weight is not None:
                scale_from(round_open.pop(), weight)
                i = match.end()
            else:
                add_text(":")  # an ordinary colon (or a weight with no "(" open: literal text)
        elif c in ")]":
            add_text(c)  # closes nothing: literal
        else:
            match = _PLAIN_TEXT.match(prompt, i - 1)
            add_text(match.group(0))
            i = match.end()

    # Brackets left open weight everything after them (round first, then square, in opening order).
    for start in round_open:
        scale_from(start, ROUND_BRACKET_FACTOR)
    for start in square_open:
        scale_from(start, SQUARE_BRACKET_FACTOR)

    merged: list[list] = []
    for piece in pieces:
        if not piece[2] and not piece[0]:
            continue  # empty text carries no tokens
        if merged and not piece[2] and not merged[-1][2] and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    if not merged:
        return [("", 1.0)]
    for text, weight, _ in merged:  # nested weights multiply: the product must fit the float32 encoder output
        if abs(weight) > FLOAT32_MAX:
            raise ValueError(f"prompt weight of {text[:40]!r} is {weight:g}, beyond float32 (at most "
                             f"{FLOAT32_MAX:.3g} in magnitude)")
    return [(text, float(weight)) for text, weight, _ in merged]


def _parse_float(text: str) -> float | None:
    try:
        weight = float(text)
    except ValueError:  # e.g. "1.2.3" or "." (the webui would raise here; we keep it as text)
        return None
    if not math.isfinite(weight):  # "9" * 400 reads as inf, which would make a NaN image
        raise ValueError(f"prompt weight {text if len(text) <= 20 else text[:20] + '...'!r} is not a finite number")
    return weight


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weight each token's features and restore each row's mean (the webui's emphasis, per prompt and chunk).

    `hidden` (N, L, D) is one encoder's output for N chunks, `weights` (N, L); each row becomes
    `hidden * w * (mean(hidden) / mean(hidden * w))`, means over (L, D) in float32.  The webui takes the means
    over the whole batch; per row, a prompt's embedding does not depend on the other prompts in its batch."""
    if hidden.ndim != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(f"weights must have shape {tuple(hidden.shape[:2])} (chunks, tokens) to match hidden states "
                         f"{tuple(hidden.shape)}, found {tuple(weights.shape)}")
    h = hidden.float()
    original_mean = h.mean(dim=(1, 2), keepdim=True)
    weighted = h * weights.to(device=h.device, dtype=torch.float32)[:, :, None]
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # A row whose weighted mean is exactly 0 cannot be rescaled; it keeps the plain weighted values.
    ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    return (weighted * ratio).to(hidden.dtype)
