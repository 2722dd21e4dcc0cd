"""The emoji dataset builder (datasets/emoji.py), offline: fake npm tarballs are built here, nothing is downloaded."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script
from xldm.buckets import buckets_for_area
from xldm.errors import UnsafePathError


emoji_mod = load_script("datasets/emoji.py", "emoji_dataset")
SOURCES, BuildOptions, EmojiDatasetError = emoji_mod.SOURCES, emoji_mod.BuildOptions, emoji_mod.EmojiDatasetError
build_emoji_dataset, position_phrase, safe_extract = (emoji_mod.build_emoji_dataset, emoji_mod.position_phrase,
                                                      emoji_mod.safe_extract)

GLYPH_PX = 16  # side of the fake source PNGs (the real packages hold 64 px)
RED = (220, 20, 30)


def _glyph_png(color: tuple[int, int, int]) -> bytes:
    """A GLYPH_PX square: transparent everywhere except an opaque square of `color` in the middle."""
    pixels = np.zeros((GLYPH_PX, GLYPH_PX, 4), dtype=np.uint8)
    pixels[4:12, 4:12] = (*color, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# A slice of emoji-datasource's emoji.json: a plain emoji, one with skin tones (one- and two-tone keys),
# one CLDR does not know (name fallback), and one without a glyph in the google set.
EMOJI_JSON = [
    {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "sort_order": 2, "category": "Food & Drink",
     "has_img_twitter": True, "has_img_google": True},
    {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png", "sort_order": 1,
     "category": "People & Body", "has_img_twitter": True, "has_img_google": True,
     "skin_variations": {
         "1F3FD": {"unified": "1F44B-1F3FD", "image": "1f44b-1f3fd.png",
                   "has_img_twitter": True, "has_img_google": True},
         "1F3FB-1F3FF": {"unified": "1F44B-1F3FB-1F3FF", "image": "1f44b-1f3fb-1f3ff.png",
                         "has_img_twitter": True, "has_img_google": True},
         "1F3FB-1F3FB": {"unified": "1F44B-1F3FB-1F3FB", "image": "1f44b-1f3fb-1f3fb.png",
                         "has_img_twitter": True, "has_img_google": True},
     }},
    {"name": "SNOWMAN WITHOUT SNOW", "unified": "26C4-FE0F", "image": "26c4-fe0f.png", "sort_order": 3,
     "category": "Travel & Places", "has_img_twitter": True, "has_img_google": True},
    {"name": "ZEBRA FACE", "unified": "1F993", "image": "1f993.png", "sort_order": 4, "category": "Animals & Nature",
     "has_img_twitter": True, "has_img_google": False},
]
EMOJIBASE = [  # emojibase-data en/data.json: hexcodes without FE0F, skins nested
    {"label": "red apple", "hexcode": "1F34E"},
    {"label": "waving hand", "hexcode": "1F44B",
     "skins": [{"label": "waving hand: medium skin tone", "hexcode": "1F44B-1F3FD"}]},
    {"label": "zebra", "hexcode": "1F993"},
]


# An Iconify set: the fluent one maps code points with chars.json (FE0F kept, as the real file has it), the blob one
# is matched by slugged CLDR names; one icon each that is no emoji of the names package.
ICON = {"body": '<path fill="#dc141e" d="M4 4h8v8H4z"/>'}


def _fake_iconify(cache: Path, src) -> None:
    icons = {"red-apple": ICON, "waving-hand": ICON, "waving-hand-medium-skin-tone": ICON, "not-an-emoji": ICON}
    with tarfile.open(cache / emoji_mod.tarball_name(src.package, src.version), "w:gz") as tar:
        _add(tar, "package/package.json", json.dumps({"name": src.package, "license": "MIT"}).encode())
        _add(tar, "package/icons.json", json.dumps({"prefix": src.style, "width": 16, "height": 16,
                                                    "icons": icons}).encode())
        if src.style == "fluent":
            chars = {"1f34e": "red-apple", "1f44b-fe0f": "waving-hand", "1f44b-1f3fd": "waving-hand-medium-skin-tone"}
            _add(tar, "package/chars.json", json.dumps(chars).encode())


def _fake_cache(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    for style in SOURCES:
        src = SOURCES[style]
        if src.layout == "iconify":
            _fake_iconify(cache, src)
            continue
        with tarfile.open(cache / emoji_mod.tarball_name(src.package, src.version), "w:gz") as tar:
            _add(tar, "package/package.json", json.dumps({"name": src.package, "license": "MIT"}).encode())
            _add(tar, "package/emoji.json", json.dumps(EMOJI_JSON).encode())
            _add(tar, f"package/img/{style}/sheets/16.png", _glyph_png((0, 0, 255)))  # sprite sheet: not used
            for entry in EMOJI_JSON:
                items = [entry, *entry.get("skin_variations", {}).values()]
                for item in items:
                    _add(tar, f"package/img/{style}/{GLYPH_PX}/{item['image']}", _glyph_png(RED))
                    _add(tar, f"package/img/{style}/8/{item['image']}", b"smaller size: not used")
    name, version = emoji_mod.NAMES_PACKAGE
    with tarfile.open(cache / f"{name}-{version}.tgz", "w:gz") as tar:
        _add(tar, "package/en/data.json", json.dumps(EMOJIBASE).encode())
    return cache


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    def no_network(*args, **kwargs):
        raise AssertionError("the tests must not run npm")

    monkeypatch.setattr(emoji_mod.subprocess, "run", no_network)
    return _fake_cache(tmp_path / "cache")


def _build(out: Path, cache: Path, **kw) -> emoji_mod.BuildSummary:
    options = BuildOptions(out_dir=out, cache_dir=cache, offline=True, **kw)
    return build_emoji_dataset(options)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def test_captions_names_and_skin_tones(tmp_path: Path, cache: Path) -> None:
    summary = _build(tmp_path / "ds", cache, size=32)
    texts = [r["text"] for r in _records(tmp_path / "ds")]
    # twitter: 1 + 3 waving hands, apple, snowman, zebra = 7; google lacks the zebra = 6; sort_order puts the
    # hand first, its skin variations follow in key order
    assert texts == [
        "waving hand, twitter style",
        "waving hand, light skin tone, twitter style",  # "1F3FB-1F3FB": equal tones named once
        "waving hand, light skin tone, dark skin tone, twitter style",  # two-tone key
        "waving hand, medium skin tone, twitter style",
        "red apple, twitter style",
        "snowman without snow, twitter style",  # not in the fake CLDR: emoji-datasource name, lower-cased
        "zebra, twitter style",
        "waving hand, google style",
        "waving hand, light skin tone, google style",
        "waving hand, light skin tone, dark skin tone, google style",
        "waving hand, medium skin tone, google style",
        "red apple, google style",
        "snowman without snow, google style",
    ]
    counts = summary.counts()
    assert counts["native names from fallback"] == 2 and counts["native names from cldr"] == 11
    assert counts["native with a skin tone"] == 6
    assert summary.stats["google: no google image (skipped)"] == 1
    apple = next(r for r in _records(tmp_path / "ds") if r["text"] == "red apple, google style")
    assert apple["emoji"] == "\U0001F34E" and apple["source"] == "emoji-datasource-google@16.0.0"
    assert apple["source_px"] == GLYPH_PX and apple["file_name"] == "google/1f34e.png"


def test_native_images_are_rgb_on_white(tmp_path: Path, cache: Path) -> None:
    _build(tmp_path / "ds", cache, sources=["twitter"], size=64)
    for record in _records(tmp_path / "ds"):
        image = Image.open(tmp_path / "ds" / record["file_name"])
        assert image.mode == "RGB" and image.size == (64, 64) and record["original_size"] == [64, 64]
        pixels = np.asarray(image).astype(int)
        # the source's transparent corner becomes exactly white; its opaque middle keeps the colour (+-2 levels)
        assert (pixels[:8, :8] == 255).all()
        assert np.abs(pixels[28:36, 28:36] - np.array(RED)).max() <= 2
        # red over white is (255, 255 - a*(255-20), 255 - a*(255-30)): no dark fringe at the glyph's edge
        # (Pillow resizes RGBA premultiplied); tolerance 8 levels for Lanczos ringing
        assert pixels[..., 0].min() >= RED[0] - 8


def test_multi_aspect_and_low_res(tmp_path: Path, cache: Path) -> None:
    summary = _build(tmp_path / "ds", cache, multi_aspect=30, low_res=10, low_res_sizes=(12, 24))
    records = _records(tmp_path / "ds")
    buckets = {wh for wh in buckets_for_area(128, 16) if wh[0] != wh[1]}
    multi = [r for r in records if r["kind"] == "multi_aspect"]
    low = [r for r in records if r["kind"] == "low_res"]
    assert len(multi) == 30 and len(low) == 10 and summary.counts()["total"] == 13 + 40
    for r in records:  # original_size is the stored image's (height, width)
        w, h = Image.open(tmp_path / "ds" / r["file_name"]).size
        assert r["original_size"] == [h, w]
    for r in multi:
        h, w = r["original_size"]
        assert (w, h) in buckets
        p = r["placement"]
        assert 0 <= p["left"] <= w - p["side"] and 0 <= p["top"] <= h - p["side"]
        assert 0.35 * min(w, h) - 1 <= p["side"] <= min(w, h)
        pixels = np.asarray(Image.open(tmp_path / "ds" / r["file_name"])).astype(int)
        cy, cx = p["top"] + p["side"] // 2, p["left"] + p["side"] // 2
        assert np.abs(pixels[cy, cx] - np.array(RED)).max() <= 2  # glyph where the record says
        assert (pixels[:, : p["left"]] == 255).all() and (pixels[:, p["left"] + p["side"]:] == 255).all()
        assert r["position"] == position_phrase(w, h, p["left"], p["top"], p["side"])
        base = r["text"] if r["position"] is None else r["text"][: -len(r["position"]) - 2]
        assert base.endswith(f"{r['style']} style")
        assert base.split(", ")[0] in {"waving hand", "red apple", "snowman without snow", "zebra"}
    assert {tuple(r["original_size"]) for r in low} <= {(12, 12), (24, 24)}
    assert any(r["position"] for r in multi) and any(r["position"] is None for r in multi)


def test_position_phrase_by_thirds() -> None:
    assert position_phrase(240, 64, 0, 0, 64) == "on the left"  # vertically centred: no row word
    assert position_phrase(240, 64, 88, 0, 64) is None  # centre 120 of 240
    assert position_phrase(64, 256, 0, 0, 30) == "at the top left"
    assert position_phrase(64, 256, 34, 220, 30) == "at the bottom right"
    assert position_phrase(64, 256, 17, 0, 30) == "at the top"


def test_deterministic_for_a_seed(tmp_path: Path, cache: Path) -> None:
    kw = dict(multi_aspect=12, low_res=5, seed=7)
    _build(tmp_path / "a", cache, **kw)
    _build(tmp_path / "b", cache, workers=1, **kw)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 13 + 17 + 3  # + metadata.jsonl, README.md, NOTICE
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    _build(tmp_path / "c", cache, multi_aspect=12, low_res=5, seed=8)
    assert _records(tmp_path / "c") != _records(tmp_path / "a")
    # rebuilding into an earlier build clears it (no stale samples); any other non-empty folder is refused
    _build(tmp_path / "a", cache, multi_aspect=2, seed=7)
    assert len(list((tmp_path / "a" / "multi_aspect").iterdir())) == 2 and not (tmp_path / "a" / "low_res").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(EmojiDatasetError, match="not empty"):
        _build(tmp_path / "other", cache)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_readme_sources_licenses_counts_command(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "ds"
    assert emoji_mod.main([str(out), "--cache", str(cache), "--offline", "--size", "32",
                           "--multi-aspect", "4", "--low-res", "3", "--seed", "5", "--limit", "2"]) == 0
    readme = (out / "README.md").read_text(encoding="utf-8")
    for text in ["emoji-datasource-twitter` | 16.0.0", "emoji-datasource-google` | 16.0.0", "emojibase-data` | 17.0.0",
                 "Copyright 2020 Twitter, Inc and other contributors; graphics licensed under CC-BY 4.0",
                 "Apache-2.0", "MIT", "| native / twitter style | 5 |", "| native / google style | 5 |",
                 "| multi_aspect | 4 |", "| low_res | 3 |", "| native names from cldr | 10 |",
                 "| native names from fallback | 0 |",
                 "| native with a skin tone | 6 |",
                 f"python datasets/emoji.py {out} --sources twitter,google --size 32 "
                 "--multi-aspect 4 --low-res 3 --low-res-sizes 32,48 --seed 5 --limit 2"]:
        assert text in readme, text
    assert len(_records(out)) == 5 + 5 + 4 + 3  # --limit 2: the hand (with 3 tones) and the apple, per set


@pytest.mark.parametrize("bad", ["../evil.txt", "/abs/evil.txt", "package/../../evil.txt", "link"])
def test_unsafe_tar_members_are_refused(tmp_path: Path, bad: str) -> None:
    tarball = tmp_path / "bad.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        _add(tar, "package/ok.txt", b"fine")
        if bad == "link":
            info = tarfile.TarInfo("package/link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            _add(tar, bad, b"evil")
    dest = tmp_path / "x" / "dest"
    with pytest.raises(UnsafePathError):
        safe_extract(tarball, dest)
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil.txt").exists()  # nothing at all was written


def test_offline_missing_package_and_missing_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmojiDatasetError, match="npm pack emojibase-data@17.0.0"):
        _build(tmp_path / "ds", tmp_path / "empty")
    monkeypatch.setattr(emoji_mod.shutil, "which", lambda name: None)
    with pytest.raises(EmojiDatasetError, match="install Node.js with npm"):
        build_emoji_dataset(BuildOptions(out_dir=tmp_path / "ds", cache_dir=tmp_path / "empty"))
    with pytest.raises(EmojiDatasetError, match="--sources"):
        build_emoji_dataset(BuildOptions(out_dir=tmp_path / "ds", sources=["apple"], cache_dir=tmp_path / "empty"))


class _FakeCairoSVG:
    """Stands in for cairosvg (not a test dependency): checks the SVG document and draws a red square."""

    calls: list[str] = []

    @classmethod
    def svg2png(cls, bytestring: bytes, output_width: int, output_height: int) -> bytes:
        svg = bytestring.decode()
        assert svg.startswith("<svg ") and 'viewBox="0 0 16 16"' in svg and ICON["body"] in svg
        cls.calls.append(svg)
        pixels = np.zeros((output_height, output_width, 4), dtype=np.uint8)
        pixels[output_height // 4: 3 * output_height // 4, output_width // 4: 3 * output_width // 4] = (*RED, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
        return buffer.getvalue()


def test_optional_iconify_sources(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cairosvg", _FakeCairoSVG)
    _FakeCairoSVG.calls.clear()
    summary = _build(tmp_path / "ds", cache, sources=["fluent", "blob"], size=32)
    records = [json.loads(line) for line in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in records) == sorted(
        f"{name}, {style} style" for style in ("fluent", "blob")
        for name in ("red apple", "waving hand", "waving hand, medium skin tone"))
    fluent = next(r for r in records if r["style"] == "fluent" and r["hexcode"] == "1F44B-1F3FD")
    assert fluent["source"] == "@iconify-json/fluent-emoji-flat@1.2.6" and fluent["skin_tone"] == "medium skin tone"
    assert fluent["source_px"] == emoji_mod.SVG_PX and len(_FakeCairoSVG.calls) == 6
    with Image.open(tmp_path / "ds" / fluent["file_name"]) as im:
        assert im.mode == "RGB" and im.size == (32, 32) and im.getpixel((16, 16))[0] > 200 and im.getpixel((1, 1)) == (
            255, 255, 255)
    assert summary.stats["fluent: icons of the set never matched to an emoji"] == 1
    assert summary.stats["blob: no blob image (skipped)"] == 1  # zebra
    notice = (tmp_path / "ds" / "NOTICE").read_text()
    for needle in ("Microsoft Corporation", "MIT", "Noto Emoji (v1) by Google Inc", "Apache License 2.0",
                   "@iconify-json/noto-v1 1.2.5", "emojibase-data 17.0.0"):
        assert needle in notice
    assert "Twemoji" not in notice
    readme = (tmp_path / "ds" / "README.md").read_text()
    assert "`@iconify-json/fluent-emoji-flat` | 1.2.6" in readme and "rasterized at 128 px" in readme
    _build(tmp_path / "ds2", cache, sources=["fluent"], size=32)  # rasterized once, into the cache
    assert len(_FakeCairoSVG.calls) == 6


def test_default_build_is_unchanged_by_the_optional_sources() -> None:
    assert emoji_mod.DEFAULT_SOURCES == ("twitter", "google") == tuple(BuildOptions(out_dir=Path("x")).sources)
    assert emoji_mod.build_parser().parse_args(["out"]).sources == ["twitter", "google"]
    assert emoji_mod.tarball_name("@iconify-json/noto-v1", "1.2.5") == "iconify-json-noto-v1-1.2.5.tgz"
    assert emoji_mod.slug("Thumbs up: medium skin tone") == "thumbs-up-medium-skin-tone"
    assert emoji_mod.slug("man’s shoe") == "mans-shoe"
