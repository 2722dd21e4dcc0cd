"""The emoji dataset the bundled default model trains on: Twemoji and Noto emoji with CLDR captions.

    python datasets/emoji.py OUT_DIR [--multi-aspect N] [--low-res N] [--seed S] [--cache DIR --offline] ...

`build_emoji_dataset` turns npm packages into a captioned image folder in the Hugging Face imagefolder layout
(images plus a `metadata.jsonl` of `{"file_name", "text", ...}`) that `xldm.train.data` reads:

* images: `emoji-datasource-twitter` (Twemoji) and `emoji-datasource-google` (Noto emoji), the per-emoji PNGs
  under `img/<set>/<px>/` (the largest `<px>` in the package; 64 in 16.0.0).  Each package also holds the
  `emoji.json` of `emoji-datasource` (unified code points, skin variations, `has_img_<set>` flags), so names
  and images always come from the same release.  Only glyphs with `has_img_<set>: true` are used: the
  per-emoji PNGs fill missing glyphs with another vendor's image (the package README, "sheets-clean").
* optional images (`--sources`, not in the default build): `fluent`, Microsoft's Fluent Emoji (flat, MIT), and
  `blob`, Noto Emoji v1 with Android's blob faces (Apache-2.0), both SVG in Iconify JSON packages
  (`@iconify-json/fluent-emoji-flat`, `@iconify-json/noto-v1`), matched to CLDR by code points (`chars.json`)
  or by the slugged CLDR name, rasterized once at 128 px with CairoSVG into the cache.  Every build writes a
  `NOTICE` with each source's attribution and licence.
* names: the CLDR short names (`label`) of `emojibase-data` `en/data.json`, matched by code points with the
  variation selector FE0F removed (emojibase drops it, emoji-datasource keeps it); when CLDR lacks an emoji,
  emoji-datasource's Unicode `name`, lower-cased, is used and counted as a fallback.
* captions: `"<CLDR name>[, <skin tone>...], <style> style"`, e.g. "waving hand, medium skin tone, twitter style".
  Skin tones are the CLDR names of the Fitzpatrick modifiers; a two-person emoji lists both tones, once
  when they are equal.  Multi-aspect samples off the centre append a position phrase ("..., at the top left").

Three kinds of sample, all RGB composited onto white (the sources are RGBA):

* `native`: every glyph, centred on a `size` x `size` canvas that it fills, resized with Lanczos (a 64 px
  source upscaled to 128 is soft; `source_px` in each record says so).
* `multi_aspect`: a glyph at a random scale (35-100 % of the short side) and offset on a non-square canvas from
  the small model's buckets (`xldm.buckets.buckets_for_area(128, 16)`), so crop and aspect conditioning carry
  information.
* `low_res`: a glyph stored small (32 or 48 px square canvases by default), so `original_size` really varies.

Packages are fetched with `npm pack NAME@VERSION` into a cache folder (never into the repository) and unpacked
with `tarfile`, refusing links, devices and members with absolute paths or `..`.  The build is deterministic
for a seed: every random choice is drawn in one `random.Random(seed)` before any image is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from xldm.buckets import buckets_for_area
from xldm.errors import UnsafePathError, XldmError


class EmojiDatasetError(XldmError):
    """The emoji dataset cannot be built (npm missing, a package absent offline, a malformed package)."""


@dataclass(frozen=True)
class EmojiSource:
    """One image set: the npm package that holds its images, and the licence terms of its graphics.

    `layout` "datasource": an emoji-datasource package (per-emoji PNGs under `img/<style>/<px>/`, its emoji.json);
    "iconify": an Iconify JSON icon set (`icons.json`, SVG bodies by name; `chars.json` maps code points to names
    where the set has one, else names are the CLDR names slugged), rasterized once into the cache (`SVG_PX`)."""

    style: str  # the caption's "<style> style" and the sample folder
    package: str
    version: str
    artwork: str  # the upstream artwork the package's images come from
    graphics_license: str
    attribution: str
    layout: str = "datasource"
    package_license: str = "MIT (Copyright (c) 2013 Cal Henderson)"  # of the package's code and data


# Pinned releases (`npm view NAME version`).  The emoji-datasource packages are MIT for their code and data
# (package.json, LICENSE "Copyright (c) 2013 Cal Henderson"); the graphics keep their own licences, stated in
# the package README under "Image Sources"/licensing and repeated here.
SOURCES: dict[str, EmojiSource] = {
    "twitter": EmojiSource(
        style="twitter",
        package="emoji-datasource-twitter",
        version="16.0.0",
        artwork="Twemoji (jdecked/twemoji fork) v16.0.1, https://github.com/jdecked/twemoji",
        graphics_license="CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
        attribution="Copyright 2020 Twitter, Inc and other contributors; graphics licensed under CC-BY 4.0",
    ),
    "google": EmojiSource(
        style="google",
        package="emoji-datasource-google",
        version="16.0.0",
        artwork="Noto Emoji v2.048, https://github.com/googlefonts/noto-emoji",
        graphics_license="Apache-2.0 (noto-emoji: most image resources are Apache-2.0, the flag images "
        "(third_party/region-flags) are public domain or otherwise exempt from copyright; the Noto Color Emoji "
        "font file, not used here, is SIL OFL 1.1)",
        attribution="Noto Emoji by Google (googlefonts/noto-emoji); images licensed under the Apache License 2.0",
    ),
    # Optional sets (--sources), SVG in Iconify JSON packages (`npm view NAME license`, and the set's info.json
    # "license"); never CC BY-SA sets (OpenMoji) or proprietary ones.
    "fluent": EmojiSource(
        style="fluent",
        package="@iconify-json/fluent-emoji-flat",
        version="1.2.6",
        artwork="Fluent Emoji (flat) by Microsoft, https://github.com/microsoft/fluentui-emoji",
        graphics_license="MIT (https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE)",
        attribution="Fluent Emoji, Copyright (c) Microsoft Corporation; graphics licensed under the MIT License",
        layout="iconify",
        package_license="MIT (Iconify JSON packaging, Vjacheslav Trushkin; icons.json info: MIT, Microsoft)",
    ),
    "blob": EmojiSource(
        style="blob",
        package="@iconify-json/noto-v1",
        version="1.2.5",
        artwork="Noto Emoji v1, the blob designs of Android up to 7.1, https://github.com/googlefonts/noto-emoji",
        graphics_license="Apache-2.0 (https://github.com/googlefonts/noto-emoji/blob/main/svg/LICENSE)",
        attribution="Noto Emoji (v1) by Google Inc; images licensed under the Apache License 2.0",
        layout="iconify",
        package_license="Apache-2.0 (Iconify JSON packaging; icons.json info: Apache-2.0, Google Inc)",
    ),
}
DEFAULT_SOURCES = ("twitter", "google")  # the bundled model's build; the others only when asked for (--sources)
SVG_PX = 128  # side an Iconify set's SVGs are rasterized at (the native sample size: no upscaling)
NAMES_PACKAGE = ("emojibase-data", "17.0.0")  # MIT; the names are Unicode CLDR annotations (Unicode License v3)

# CLDR names of the emoji modifiers U+1F3FB..U+1F3FF (Unicode emoji-test.txt, "skin-tone" subgroup).
SKIN_TONES: dict[str, str] = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}

# Position phrase of an off-centre multi-aspect sample, by the thirds its centre falls in: (row, column).
POSITION_PHRASES: dict[tuple[str, str], str | None] = {
    ("top", "left"): "at the top left", ("top", "center"): "at the top", ("top", "right"): "at the top right",
    ("middle", "left"): "on the left", ("middle", "center"): None, ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}
MULTI_ASPECT_MIN_SCALE = 0.35  # smallest glyph side as a fraction of the canvas's short side
MULTI_ASPECT_BUCKETS = (128, 16)  # buckets_for_area(base, step) of the small model (latent 16x16 at 128 px)


# ---------------------------------------------------------------------------------------------- fetching


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xldm" / "npm"


def tarball_name(package: str, version: str) -> str:
    """The file `npm pack` writes: `name-version.tgz`, `scope-name-version.tgz` for `@scope/name`."""
    return f"{package.removeprefix('@').replace('/', '-')}-{version}.tgz"


def npm_pack(package: str, version: str, cache_dir: Path, *, offline: bool = False) -> Path:
    """The tarball of `package@version` in `cache_dir`, fetched with `npm pack` unless it is already there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / tarball_name(package, version)
    if target.is_file():
        return target
    if offline:
        raise EmojiDatasetError(
            f"{target.name} is not in the cache {cache_dir} and --offline forbids fetching it; run once without "
            f"--offline, or put the output of `npm pack {package}@{version}` there"
        )
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiDatasetError(
            "npm is needed to fetch the emoji packages but was not found on PATH: install Node.js with npm "
            "(e.g. `apt-get install npm`, or https://nodejs.org), or fill --cache with the tarballs and use --offline"
        )
    # npm pack checks the download against the registry's integrity hash; nothing of the package is run.
    try:
        result = subprocess.run(
            [npm, "pack", f"{package}@{version}", "--ignore-scripts", "--silent"],
            cwd=cache_dir, capture_output=True, text=True, timeout=900,
        )
    except subprocess.TimeoutExpired:
        raise EmojiDatasetError(f"`npm pack {package}@{version}` took over 15 minutes; is the registry "
                                "reachable?") from None
    if result.returncode != 0 or not target.is_file():
        raise EmojiDatasetError(f"`npm pack {package}@{version}` failed ({result.returncode}): {result.stderr[-2000:]}")
    return target


def check_member(member: tarfile.TarInfo) -> PurePosixPath:
    """The member's relative path; `UnsafePathError` for absolute paths, `..`, links and special files."""
    name = member.name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
        raise UnsafePathError(f"tar member {member.name!r} would be written outside the extraction folder")
    if not (member.isfile() or member.isdir()):
        raise UnsafePathError(
            f"tar member {member.name!r} is a link or special file; only files and folders are accepted"
        )
    return path


def safe_extract(tarball: Path, dest: Path, want: Callable[[PurePosixPath], bool] = lambda p: True) -> int:
    """Extract the regular files of `tarball` that `want` accepts into `dest`; returns how many.

    Every member is checked first (`check_member`), so a tarball with one bad member extracts nothing.
    Files are written by this function (never `TarFile.extract`), with default permissions.
    """
    with tarfile.open(tarball, "r:*") as tar:
        members = tar.getmembers()
        paths = [check_member(m) for m in members]
        root = dest.resolve()
        count = 0
        for member, path in zip(members, paths):
            if not member.isfile() or not want(path):
                continue
            out = (dest / path).resolve()
            if root not in out.parents:
                raise UnsafePathError(f"tar member {member.name!r} resolves outside {dest}")
            out.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has data
            with source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink)
            count += 1
    return count


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FetchedPackage:
    name: str
    version: str
    root: Path  # the unpacked `package/` folder
    sha256: str  # of the tarball


def unpack_package(package: str, version: str, cache_dir: Path, want: Callable[[PurePosixPath], bool],
                   *, offline: bool = False) -> FetchedPackage:
    """Fetch (or reuse) the tarball and unpack the wanted files once into `cache_dir/name-version/`."""
    tarball = npm_pack(package, version, cache_dir, offline=offline)
    digest = sha256_of(tarball)
    stem = tarball.name.removesuffix(".tgz")  # name-version (scope-name-version)
    folder = cache_dir / stem
    stamp = folder / ".unpacked"
    if not (stamp.is_file() and stamp.read_text() == digest):
        if folder.exists():
            shutil.rmtree(folder)
        partial = cache_dir / f".{stem}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        safe_extract(tarball, partial, want)
        partial.rename(folder)
        stamp.write_text(digest)
    root = folder / "package"
    if not root.is_dir():
        raise EmojiDatasetError(f"{tarball.name} has no package/ folder; is it an npm tarball?")
    return FetchedPackage(package, version, root, digest)


def _image_package_files(style: str) -> Callable[[PurePosixPath], bool]:
    def want(path: PurePosixPath) -> bool:
        parts = path.parts
        if parts[1:] in (("emoji.json",), ("package.json",), ("LICENSE",), ("README.md",)):
            return True
        # package/img/<style>/<px>/<glyph>.png; the sprite sheets (sheets*/) are not needed
        return len(parts) == 5 and parts[1:3] == ("img", style) and parts[3].isdigit() and parts[4].endswith(".png")
    return want


def _iconify_package_files(path: PurePosixPath) -> bool:
    return path.parts[1:] in (("icons.json",), ("chars.json",), ("info.json",), ("package.json",), ("LICENSE",),
                              ("README.md",))


def _names_package_files(path: PurePosixPath) -> bool:
    return path.parts[1:] in (("en", "data.json"), ("package.json",), ("LICENSE",))


# ---------------------------------------------------------------------------------------------- names


def normalize_hexcode(code: str) -> str:
    """Upper-case code points joined by '-', without the variation selector FE0F (emojibase's convention)."""
    return "-".join(p for p in code.upper().replace(" ", "-").split("-") if p and p != "FE0F")


def load_cldr_names(emojibase_root: Path) -> dict[str, str]:
    """Normalized hexcode -> CLDR short name, from emojibase-data `en/data.json` (skin variants included)."""
    entries = json.loads((emojibase_root / "en" / "data.json").read_text(encoding="utf-8"))
    names: dict[str, str] = {}
    for entry in entries:
        for item in [entry, *entry.get("skins", [])]:
            names[normalize_hexcode(item["hexcode"])] = item["label"]
    return names


# emojibase-data `group` numbers -> emoji-datasource's category names (both follow Unicode emoji-test.txt groups)
EMOJIBASE_GROUPS = ("Smileys & Emotion", "People & Body", "Component", "Animals & Nature", "Food & Drink",
                    "Travel & Places", "Activities", "Objects", "Symbols", "Flags")


def slug(name: str) -> str:
    """A CLDR name as Iconify names its emoji icons: lower case, apostrophes dropped, other runs of non-alphanumerics
    as one '-' ("thumbs up: medium skin tone" -> "thumbs-up-medium-skin-tone")."""
    cleaned = name.lower().replace("\u2019", "").replace("'", "")
    return "-".join(part for part in "".join(c if c.isascii() and c.isalnum() else " " for c in cleaned).split())


def skin_tone_phrase(key: str) -> str:
    """'1F3FB-1F3FD' -> 'light skin tone, medium skin tone'; equal tones are named once."""
    tones = [SKIN_TONES[p] for p in key.upper().split("-")]
    return tones[0] if len(set(tones)) == 1 else ", ".join(tones)


@dataclass(frozen=True)
class Glyph:
    """One emoji image of one set, with its caption parts."""

    style: str
    hexcode: str  # emoji-datasource `unified`
    image: Path
    name: str  # CLDR short name (or the fallback)
    name_source: str  # "cldr" | "fallback"
    skin_tone: str | None
    category: str
    source_px: int  # side of the source PNG

    @property
    def caption(self) -> str:
        parts = [self.name] + ([self.skin_tone] if self.skin_tone else []) + [f"{self.style} style"]
        return ", ".join(parts)

    @property
    def emoji(self) -> str:
        return "".join(chr(int(p, 16)) for p in self.hexcode.split("-"))


def image_folder(package_root: Path, style: str) -> tuple[Path, int]:
    """`img/<style>/<px>/` with the largest `<px>` the package holds."""
    base = package_root / "img" / style
    sizes = sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()) if base.is_dir() else []
    if not sizes:
        raise EmojiDatasetError(f"{base} holds no per-emoji image folder (img/{style}/<px>/)")
    return base / str(sizes[-1]), sizes[-1]


def list_glyphs(package_root: Path, style: str, cldr: dict[str, str], limit: int | None, stats: Counter) -> list[Glyph]:
    """Every glyph of the set that has its own image, in emoji-datasource's `sort_order` (CLDR order)."""
    folder, px = image_folder(package_root, style)
    entries = json.loads((package_root / "emoji.json").read_text(encoding="utf-8"))
    entries.sort(key=lambda e: (e.get("sort_order", 0), e["unified"]))
    if limit is not None:
        entries = entries[:limit]
    flag = f"has_img_{style}"
    glyphs: list[Glyph] = []
    for entry in entries:
        base_name = cldr.get(normalize_hexcode(entry["unified"]))
        name_source = "cldr" if base_name is not None else "fallback"
        if base_name is None:
            base_name = entry["name"].lower()
        variants = [(entry, None)] + [(v, k) for k, v in sorted((entry.get("skin_variations") or {}).items())]
        for item, tone_key in variants:
            image = folder / item["image"]
            if not item.get(flag, False):
                stats[f"{style}: no {style} image (skipped)"] += 1
                continue
            if not image.is_file():
                stats[f"{style}: image file missing (skipped)"] += 1
                continue
            glyphs.append(Glyph(style, item["unified"], image, base_name, name_source,
                                skin_tone_phrase(tone_key) if tone_key else None, entry.get("category", ""), px))
    return glyphs


def _svg_document(icon: dict, default: dict, px: int) -> str:
    """An Iconify icon (its `body`, and `left`/`top`/`width`/`height` over the set's defaults) as an SVG of px^2."""
    box = [icon.get(k, default.get(k, d)) for k, d in (("left", 0), ("top", 0), ("width", 16), ("height", 16))]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{px}" '
            f'height="{px}" viewBox="{" ".join(map(str, box))}">{icon["body"]}</svg>')


def rasterize_iconify(package_root: Path, names: Sequence[str], px: int = SVG_PX) -> Path:
    """`<name>.png` (RGBA, px^2) for each icon of `names`, written once into `package_root/../png<px>/` (the cache,
    keyed by the tarball's digest through `unpack_package`); returns that folder.  Rasterized with CairoSVG."""
    folder = package_root.parent / f"png{px}"
    todo = [n for n in names if not (folder / f"{n}.png").is_file()]
    if not todo:
        return folder
    try:
        import cairosvg
    except (ImportError, OSError) as e:
        raise EmojiDatasetError(f"the {package_root.parent.name} images are SVG; rasterizing them needs the Python "
                                f"package cairosvg and the Cairo library (pip install cairosvg): {e}") from None
    icons = json.loads((package_root / "icons.json").read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    for name in todo:
        png = cairosvg.svg2png(bytestring=_svg_document(icons["icons"][name], icons, px).encode(),
                               output_width=px, output_height=px)
        partial = folder / f".{name}.png.partial"
        partial.write_bytes(png)
        partial.replace(folder / f"{name}.png")
    return folder


def list_iconify_glyphs(package_root: Path, style: str, emojibase_root: Path, limit: int | None,
                        stats: Counter) -> list[Glyph]:
    """Every emoji (and skin variant) of emojibase-data, in CLDR order, that the Iconify set draws: found through
    the set's `chars.json` (code points -> icon name) where it has one, else by the slugged CLDR name."""
    icons = json.loads((package_root / "icons.json").read_text(encoding="utf-8"))["icons"]
    chars_file = package_root / "chars.json"
    by_code: dict[str, str] | None = None  # None: the set has no chars.json, names are matched instead
    if chars_file.is_file():
        by_code = {}
        for code, name in json.loads(chars_file.read_text(encoding="utf-8")).items():
            if name in icons:
                by_code.setdefault(normalize_hexcode(code), name)
            else:  # an alias or a removed icon: counted
                stats[f"{style}: chars.json entries naming no icon of the set"] += 1
        if not by_code:  # an empty code-point list (the Noto v1 set's): matched by name, and the summary says so
            stats[f"{style}: chars.json maps no code point to an icon, so icons are matched by CLDR name"] += 1
            by_code = None
    entries = json.loads((emojibase_root / "en" / "data.json").read_text(encoding="utf-8"))
    entries.sort(key=lambda e: (e.get("order", math.inf), e["hexcode"]))  # CLDR order (the unordered last)
    if limit is not None:
        entries = entries[:limit]
    found: list[tuple[dict, dict, str]] = []
    used: set[str] = set()
    for entry in entries:
        for item in [entry, *entry.get("skins", [])]:
            code = normalize_hexcode(item["hexcode"])
            name = by_code.get(code) if by_code is not None else slug(item["label"])
            if name is None or name not in icons or name in used:
                stats[f"{style}: no {style} image (skipped)"] += 1
                continue
            used.add(name)
            found.append((entry, item, name))
    folder = rasterize_iconify(package_root, [name for _, _, name in found])
    stats[f"{style}: icons of the set never matched to an emoji"] += len(icons) - len(used)
    glyphs = []
    for entry, item, name in found:
        code = normalize_hexcode(item["hexcode"])
        tones = "-".join(p for p in code.split("-") if p in SKIN_TONES)
        group = entry.get("group")
        glyphs.append(Glyph(style, code, folder / f"{name}.png", entry["label"], "cldr",
                            skin_tone_phrase(tones) if tones else None,
                            EMOJIBASE_GROUPS[group] if isinstance(group, int) and group < len(EMOJIBASE_GROUPS)
                            else "", SVG_PX))
    return glyphs


# ---------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Sample:
    """One output image: a glyph placed as a `side` x `side` box at (left, top) on a white width x height canvas."""

    kind: str  # "native" | "multi_aspect" | "low_res"
    file_name: str
    glyph: Glyph
    width: int
    height: int
    left: int
    top: int
    side: int
    position: str | None = None  # phrase appended to the caption (multi-aspect, off centre)

    @property
    def caption(self) -> str:
        return self.glyph.caption + (f", {self.position}" if self.position else "")

    def record(self) -> dict:
        g = self.glyph
        record = {
            "file_name": self.file_name, "text": self.caption,
            "original_size": [self.height, self.width],  # (height, width): SDXL's c_size order
            "kind": self.kind, "style": g.style, "source": f"{SOURCES[g.style].package}@{SOURCES[g.style].version}",
            "emoji": g.emoji, "hexcode": g.hexcode, "name": g.name, "name_source": g.name_source,
            "skin_tone": g.skin_tone, "category": g.category, "source_px": g.source_px,
        }
        if self.kind == "multi_aspect":
            record["placement"] = {"left": self.left, "top": self.top, "side": self.side}
            record["position"] = self.position
        return record


def render(sample: Sample, out_dir: Path) -> None:
    """Resize the RGBA glyph with Lanczos (Pillow premultiplies alpha), composite it onto white, save RGB PNG."""
    from PIL import Image

    with Image.open(sample.glyph.image) as source:
        glyph = source.convert("RGBA")
    # fit a non-square source into the box, keeping its aspect ratio, centred
    scale = sample.side / max(glyph.size)
    w, h = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
    if (w, h) != glyph.size:
        glyph = glyph.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (sample.width, sample.height), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, (sample.left + (sample.side - w) // 2, sample.top + (sample.side - h) // 2))
    path = out_dir / sample.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert("RGB").save(path, format="PNG")


def position_phrase(width: int, height: int, left: int, top: int, side: int) -> str | None:
    """Where the glyph's centre falls, by thirds of the canvas; None in the central third of both axes."""
    def third(center: float, extent: int, names: tuple[str, str, str]) -> str:
        return names[min(2, int(3 * center / extent))]

    col = third(left + side / 2, width, ("left", "center", "right"))
    row = third(top + side / 2, height, ("top", "middle", "bottom"))
    return POSITION_PHRASES[(row, col)]


def plan_samples(glyphs: Sequence[Glyph], *, size: int, multi_aspect: int, low_res: int,
                 low_res_sizes: Sequence[int], seed: int, position_phrases: bool = True) -> list[Sample]:
    """Every sample to write, with all random choices drawn here from one `random.Random(seed)`."""
    samples = [Sample("native", f"{g.style}/{g.hexcode.lower()}.png", g, size, size, 0, 0, size) for g in glyphs]
    rng = random.Random(seed)

    def pick(count: int) -> list[Glyph]:
        return rng.sample(list(glyphs), count) if count <= len(glyphs) else rng.choices(glyphs, k=count)

    if multi_aspect and glyphs:
        canvases = [wh for wh in buckets_for_area(*MULTI_ASPECT_BUCKETS) if wh[0] != wh[1]]
        for i, g in enumerate(pick(multi_aspect)):
            width, height = rng.choice(canvases)
            short = min(width, height)
            side = rng.randint(math.ceil(MULTI_ASPECT_MIN_SCALE * short), short)
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
            phrase = position_phrase(width, height, left, top, side) if position_phrases else None
            samples.append(Sample("multi_aspect", f"multi_aspect/{i:05d}_{g.style}_{g.hexcode.lower()}.png",
                                  g, width, height, left, top, side, phrase))
    if low_res and glyphs:
        for i, g in enumerate(pick(low_res)):
            px = rng.choice(list(low_res_sizes))
            samples.append(Sample("low_res", f"low_res/{i:05d}_{g.style}_{g.hexcode.lower()}.png", g, px, px, 0, 0, px))
    return samples


# ---------------------------------------------------------------------------------------------- building


@dataclass
class BuildOptions:
    out_dir: Path
    sources: Sequence[str] = DEFAULT_SOURCES
    size: int = 128
    multi_aspect: int = 0
    low_res: int = 0
    low_res_sizes: Sequence[int] = (32, 48)
    seed: int = 0
    cache_dir: Path | None = None
    limit: int | None = None  # first N emoji (with their skin variants) of each set, in CLDR order
    offline: bool = False
    position_phrases: bool = True
    workers: int = 2
    command: str = ""  # recorded in the README

    def check(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise EmojiDatasetError(f"--sources must be a comma list of {', '.join(SOURCES)}; got {list(self.sources)}")
        if self.size < 8 or any(s < 1 for s in self.low_res_sizes) or not self.low_res_sizes:
            raise EmojiDatasetError(
                f"sizes must be >= 8 (size) and >= 1 (low-res), got {self.size}, {list(self.low_res_sizes)}"
            )
        if self.multi_aspect < 0 or self.low_res < 0 or (self.limit is not None and self.limit < 1):
            raise EmojiDatasetError("--multi-aspect and --low-res must be >= 0 and --limit >= 1")


@dataclass
class BuildSummary:
    out_dir: Path
    samples: list[Sample]
    packages: list[FetchedPackage]
    stats: Counter = field(default_factory=Counter)

    def counts(self) -> dict[str, int]:
        c: Counter = Counter({"native names from cldr": 0, "native names from fallback": 0})
        for s in self.samples:
            c["total"] += 1
            c[f"{s.kind}"] += 1
            c[f"{s.kind} / {s.glyph.style} style"] += 1
            if s.glyph.skin_tone:
                c[f"{s.kind} with a skin tone"] += 1
            if s.kind == "native":
                c[f"native names from {s.glyph.name_source}"] += 1
            if s.position:
                c["multi_aspect with a position phrase"] += 1
        return dict(sorted(c.items()))


README_TITLE = "# Emoji dataset for xldm's default model"
OUTPUT_FOLDERS = ("metadata.jsonl", "README.md", "NOTICE", "multi_aspect", "low_res", *SOURCES)


def prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir`, or clear a previous emoji build there; refuse any other non-empty folder."""
    if out_dir.exists() and any(out_dir.iterdir()):
        readme = out_dir / "README.md"
        if not (readme.is_file() and readme.read_text(encoding="utf-8").startswith(README_TITLE)):
            raise EmojiDatasetError(f"{out_dir} is not empty and holds no earlier emoji dataset; choose a new folder")
        for name in OUTPUT_FOLDERS:  # only what a build writes, so stale samples cannot linger
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def build_emoji_dataset(options: BuildOptions, log: Callable[[str], None] = lambda _: None) -> BuildSummary:
    """Fetch the packages, plan and render every sample, write `metadata.jsonl` and `README.md`."""
    options.check()
    cache = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    out_dir = Path(options.out_dir)
    names = unpack_package(*NAMES_PACKAGE, cache, _names_package_files, offline=options.offline)
    cldr = load_cldr_names(names.root)
    packages, glyphs, stats = [names], [], Counter()
    for style in options.sources:
        src = SOURCES[style]
        log(f"fetching {src.package}@{src.version}")
        if src.layout == "iconify":
            pkg = unpack_package(src.package, src.version, cache, _iconify_package_files, offline=options.offline)
            glyphs += list_iconify_glyphs(pkg.root, style, names.root, options.limit, stats)
        else:
            pkg = unpack_package(src.package, src.version, cache, _image_package_files(style), offline=options.offline)
            glyphs += list_glyphs(pkg.root, style, cldr, options.limit, stats)
        packages.append(pkg)
    samples = plan_samples(glyphs, size=options.size, multi_aspect=options.multi_aspect, low_res=options.low_res,
                           low_res_sizes=options.low_res_sizes, seed=options.seed,
                           position_phrases=options.position_phrases)
    log(f"rendering {len(samples)} images into {out_dir}")
    prepare_out_dir(out_dir)
    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:  # Pillow releases the GIL in C code
        for _ in pool.map(lambda s: render(s, out_dir), samples, chunksize=64):
            pass
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for s in samples:
            f.write(json.dumps(s.record(), ensure_ascii=False) + "\n")
    summary = BuildSummary(out_dir, samples, packages, stats)
    (out_dir / "README.md").write_text(dataset_readme(summary, options), encoding="utf-8")
    (out_dir / "NOTICE").write_text(notice_text(options.sources), encoding="utf-8")
    return summary


def notice_text(sources: Sequence[str]) -> str:
    """The NOTICE of a build (and the lines a model trained on it lists in its own): each image set's artwork,
    attribution, licence and package, and the names' source."""
    lines = ["Images of this dataset (datasets/emoji.py) come from the following sources.", ""]
    for style in sources:
        src = SOURCES[style]
        lines += [f"- {src.artwork}", f"  {src.attribution}.", f"  Graphics licence: {src.graphics_license}.",
                  f"  Used as \"{style} style\" images, via the npm package {src.package} {src.version} "
                  f"(package licence: {src.package_license}).", ""]
    lines += ["- Emoji names: Unicode CLDR annotations (Unicode License v3, https://www.unicode.org/license.txt) via "
              f"the npm package {NAMES_PACKAGE[0]} {NAMES_PACKAGE[1]} (MIT).", ""]
    return "\n".join(lines)


def dataset_readme(summary: BuildSummary, options: BuildOptions) -> str:
    """The dataset card: sources, versions, licences, attributions, counts and the command."""
    source_px = ", ".join(str(px) for px in sorted({s.glyph.source_px for s in summary.samples})) or "-"
    lines = [
        README_TITLE,
        "",
        "Captioned emoji images built by `python datasets/emoji.py` (xldm) from npm packages (fetched with `npm pack`, "
        "never committed). Layout: Hugging Face imagefolder: images plus `metadata.jsonl` with one record per "
        "image: `file_name`, `text` (the caption), `original_size` as [height, width] (SDXL's c_size order), "
        "`kind`, `style`, `source`, `emoji`, `hexcode`, `name`, `name_source`, `skin_tone`, `category`, "
        "`source_px`, and for multi-aspect samples `placement` {left, top, side} and `position`.",
        "",
        "## Sources and licences",
        "",
        "| package | version | tarball sha256 | contents | licence |",
        "|---|---|---|---|---|",
    ]
    for pkg in summary.packages:
        src = next((s for s in SOURCES.values() if s.package == pkg.name), None)
        if src is None:
            what = "CLDR short names (en/data.json `label`)"
            lic = "MIT (package); names: Unicode CLDR, Unicode License v3"
        else:
            what = (f"{src.artwork}: `img/{src.style}/` PNGs and emoji.json" if src.layout == "datasource" else
                    f"{src.artwork}: SVGs of icons.json, rasterized at {SVG_PX} px")
            lic = f"graphics: {src.graphics_license}; package code and data: {src.package_license}"
        lines.append(f"| `{pkg.name}` | {pkg.version} | `{pkg.sha256}` | {what} | {lic} |")
    lines += ["", "Attributions:", ""]
    lines += [f"* {SOURCES[s].style} style: {SOURCES[s].artwork}. {SOURCES[s].attribution}." for s in options.sources]
    lines += [
        "* Emoji names: Unicode CLDR annotations via emojibase-data (MIT); image metadata: emoji-datasource "
        "(iamcal/emoji-data, MIT). The file NOTICE lists every source and licence.",
        "",
        "Not included: OpenMoji (CC BY-SA), the Apple and Facebook sets. Only glyphs with `has_img_<set>: true` "
        "are used, so no other vendor's fallback image enters a set.",
        "",
        "## Samples",
        "",
        f"* `native`: every glyph centred on a white {options.size}x{options.size} canvas that it fills, resized "
        f"with Lanczos from the source PNG (`source_px`: {source_px} px here), so upscaled images are soft.",
        f"* `multi_aspect`: a glyph at a random side of {int(MULTI_ASPECT_MIN_SCALE * 100)}-100 % of the canvas's "
        f"short side and a random offset, on a non-square canvas from `buckets_for_area{MULTI_ASPECT_BUCKETS}`. "
        + ("When the glyph's centre is outside the middle third of either axis the caption ends with a position "
           "phrase: at the top left / at the top / at the top right / on the left / on the right / at the bottom "
           "left / at the bottom / at the bottom right." if options.position_phrases
           else "Captions carry no position phrase."),
        f"* `low_res`: a glyph centred on a white square canvas of {', '.join(map(str, options.low_res_sizes))} px, "
        "downsampled with Lanczos: genuinely small originals, so `original_size` varies.",
        "* Captions: `<CLDR name>[, <skin tone>[, <skin tone>]], <style> style`, e.g. "
        "\"waving hand, medium skin tone, twitter style\". All images are RGB, composited onto white.",
        "",
        "## Counts",
        "",
        "| what | count |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in summary.counts().items()]
    lines += [f"| {k} | {v} |" for k, v in sorted(summary.stats.items())]
    lines += [
        "",
        "(`native names from cldr/fallback`: captions whose name is the CLDR short name, or emoji-datasource's "
        "Unicode name lower-cased where CLDR has none.)",
        "",
        "## Command",
        "",
        "```",
        options.command or "(built from Python: build_emoji_dataset)",
        "```",
        "",
        "(`--cache`, `--offline` and `--workers` do not change the output and are left out.)",
        "",
        f"Deterministic: the same command (seed {options.seed}) and package versions give byte-identical files.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,48, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    emoji = argparse.ArgumentParser(
        prog="datasets/emoji.py",
        description="Build a captioned emoji image folder (metadata.jsonl + README.md) from the npm packages "
        "emoji-datasource-twitter / emoji-datasource-google (images; optionally the Iconify sets of Fluent Emoji "
        "and Noto Emoji v1) and emojibase-data (CLDR names). "
        "Needs npm unless --offline with a filled --cache.",
    )
    emoji.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created)")
    emoji.add_argument("--sources", type=_names, default=list(DEFAULT_SOURCES), metavar="LIST",
                       help=f"comma list of image sets: {', '.join(SOURCES)} (default: {','.join(DEFAULT_SOURCES)}; "
                       "fluent (MIT) and blob (Apache-2.0) are SVG and need the Python package cairosvg)")
    emoji.add_argument("--size", type=int, default=128, help="side of the native square samples (default 128)")
    emoji.add_argument("--multi-aspect", type=int, default=0, metavar="N",
                       help="N extra samples placed at a random scale and offset on non-square bucket canvases")
    emoji.add_argument("--low-res", type=int, default=0, metavar="N", help="N extra samples stored small")
    emoji.add_argument("--low-res-sizes", type=_int_list, default=[32, 48], metavar="LIST",
                       help="canvas sides of the low-res samples (default 32,48)")
    emoji.add_argument("--seed", type=int, default=0)
    emoji.add_argument("--cache", default=None, metavar="DIR",
                       help="where npm tarballs are kept and unpacked (default ~/.cache/xldm/npm)")
    emoji.add_argument("--offline", action="store_true", help="use only tarballs already in --cache; never run npm")
    emoji.add_argument("--limit", type=int, default=None, metavar="N",
                       help="only the first N emoji of each set (with their skin variants), for quick tests")
    emoji.add_argument("--no-position-phrase", action="store_true",
                       help="do not append 'at the top left' etc. to off-centre multi-aspect captions")
    emoji.add_argument("--workers", type=int, default=2, help="rendering threads (default 2)")
    return emoji


def _command_line(args: argparse.Namespace) -> str:
    """The full command with every option explicit, so the README records exactly what was built."""
    words = ["python", "datasets/emoji.py", args.out_dir, "--sources", ",".join(args.sources),
             "--size", str(args.size), "--multi-aspect", str(args.multi_aspect), "--low-res", str(args.low_res),
             "--low-res-sizes", ",".join(map(str, args.low_res_sizes)), "--seed", str(args.seed)]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    if args.no_position_phrase:
        words.append("--no-position-phrase")
    return shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = BuildOptions(
        out_dir=Path(args.out_dir), sources=args.sources, size=args.size, multi_aspect=args.multi_aspect,
        low_res=args.low_res, low_res_sizes=args.low_res_sizes, seed=args.seed,
        cache_dir=Path(args.cache) if args.cache else None, limit=args.limit, offline=args.offline,
        position_phrases=not args.no_position_phrase, workers=args.workers, command=_command_line(args),
    )
    start = time.perf_counter()
    summary = build_emoji_dataset(options, log=print)
    for key, value in summary.counts().items():
        print(f"  {key}: {value}")
    for key, value in sorted(summary.stats.items()):
        print(f"  {key}: {value}")
    print(f"wrote {len(summary.samples)} images, metadata.jsonl and README.md to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # EmojiDatasetError and UnsafePathError are ValueErrors
        print(f"datasets/emoji.py: error: {e}", file=sys.stderr)
        sys.exit(2)
