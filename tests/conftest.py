"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: thread hand-offs cost more than they save (and the machine is shared).  Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six small captioned images (two aspect ratios) for short runs of the training presets."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("emoji")
    for i in range(6):
        img = Image.new("RGB", (128, 96 if i % 2 else 128), (255, 255, 255))
        img.paste(Image.new("RGB", (48, 48), (40 * i, 200 - 30 * i, 90)), (10 * i, 20))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"thing {i}, twitter style")
    return folder


def load_script(relative: str, name: str):
    """A script outside the package (datasets/, scripts/, benchmarks/), imported from its file."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def hash_cache(tmp_path_factory):
    """The model-hash cache (`xldm.hashes`) of the test run in a temporary folder, never the user's."""
    import os

    previous = os.environ.get("XLDM_CACHE_DIR")
    os.environ["XLDM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["XLDM_CACHE_DIR"]
    if previous is None:
        os.environ.pop("XLDM_CACHE_DIR", None)
    else:
        os.environ["XLDM_CACHE_DIR"] = previous
