"""`xldm generate` with adapters: --lora FILE:W, <lora:NAME:W> tags from --lora-dir, --embedding, --vae and
--clip-skip give the Python API's image and write A1111's infotext fields; files that do not fit are refused
before the model is loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from xldm.cli import main as cli_main
from xldm.config import TINY_SD15, TINY_SDXL_BASE
from xldm.lora import read_lora
from xldm.models.vae import AutoencoderKL
from xldm.pipeline import Pipeline
from xldm.pngmeta import parse_a1111_parameters
from xldm.weights.save import save_single_file

from lora_files import random_lora, save_kohya
from tiny_models import random_components

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = ["--steps", "3", "--width", "64", "--height", "64", "--seed", "4", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = save_single_file(random_components(TINY_SDXL_BASE, seed=0), root / "base.safetensors")
    (root / "loras").mkdir()
    save_kohya(root / "loras" / "style.safetensors", TINY_SDXL_BASE, random_lora(TINY_SDXL_BASE, seed=1, scale=0.6))
    save_kohya(root / "other.safetensors", TINY_SDXL_BASE, random_lora(TINY_SDXL_BASE, seed=2, scale=0.6))
    torch.manual_seed(3)
    widths = [te.width for te in TINY_SDXL_BASE.text_encoders]
    save_file({"clip_l": torch.randn(2, widths[0]), "clip_g": torch.randn(2, widths[1])},
              str(root / "mytoken.safetensors"))
    vae = AutoencoderKL(TINY_SDXL_BASE.vae)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / "fixvae.safetensors"))
    return root, model


def test_every_adapter_flag_gives_the_api_image_and_infotext(files, tmp_path, monkeypatch):
    import xldm.lora.apply

    root, model = files
    out = tmp_path / "x.png"
    prompt = "a mytoken apple <lora:style:0.7>"
    reads = []
    monkeypatch.setattr(xldm.lora.apply, "read_lora", lambda path, config: reads.append(Path(path).name)
                        or read_lora(path, config))
    assert cli_main(["generate", prompt, "--model", str(model), *FLAGS, "--lora", f"{root / 'other.safetensors'}:0.5",
                     "--lora-dir", str(root / "loras"), "--embedding", str(root / "mytoken.safetensors"),
                     "--vae", str(root / "fixvae.safetensors"), "--clip-skip", "2", "--out", str(out)]) == 0
    assert sorted(reads) == ["other.safetensors", "style.safetensors"]  # each read once: checked, then applied
    monkeypatch.undo()
    pipe = Pipeline(model, device="cpu", dtype=torch.float32, vae=root / "fixvae.safetensors",
                    lora_dir=root / "loras", embeddings=[root / "mytoken.safetensors"])
    api = pipe(prompt, steps=3, width=64, height=64, seed=4, clip_skip=2,
               loras=[(root / "other.safetensors", 0.5)]).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))
    info = parse_a1111_parameters(Image.open(out).info["parameters"])
    hashes = {name: read_lora(root / path, TINY_SDXL_BASE).short_hash
              for name, path in (("other", "other.safetensors"), ("style", "loras/style.safetensors"))}
    assert info["Prompt"] == prompt and info["Clip skip"] == "2" and info["VAE"] == "fixvae.safetensors"
    assert info["Lora hashes"] == f"other: {hashes['other']}, style: {hashes['style']}"
    ti_hash = hashlib.sha256((root / "mytoken.safetensors").read_bytes()).hexdigest()[:12]
    assert info["TI hashes"] == f"mytoken: {ti_hash}"


def test_each_setting_changes_the_image(files):
    root, model = files
    settings = dict(steps=3, width=64, height=64, seed=4)

    def run(pipe, prompt="a mytoken apple", **extra):
        return pipe.generate(pipe.resolve(__import__("xldm.pipeline", fromlist=["GenerationRequest"])
                                          .GenerationRequest(prompt=prompt, **settings, **extra)), output="latent")

    plain_pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    plain = run(plain_pipe).latents
    ti_pipe = Pipeline(model, device="cpu", dtype=torch.float32, embeddings=[root / "mytoken.safetensors"])
    assert (run(ti_pipe).latents - plain).abs().max() > 1e-5  # (the tiny random UNet barely listens to the text)
    from xldm.conditioning import encode_prompts

    with ti_pipe.model.use("text_encoders") as with_ti, plain_pipe.model.use("text_encoders") as without:
        a, b = (encode_prompts(m.text_encoders, m.tokenizers(), m.config, "a mytoken apple").context
                for m in (with_ti, without))
    assert (a - b).abs().max() > 1e-2
    assert (run(plain_pipe, clip_skip=2).latents - plain).abs().max() > 1e-4
    assert torch.equal(run(plain_pipe, clip_skip=1).latents, plain)  # A1111's 1 = no skip
    vae_pipe = Pipeline(model, device="cpu", dtype=torch.float32, vae=root / "fixvae.safetensors")
    ours, theirs = vae_pipe("a", **settings).images[0], plain_pipe("a", **settings).images[0]
    assert not np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_files_for_another_model_are_refused_before_loading(files, tmp_path, capsys):
    root, model = files
    sd15 = tmp_path / "sd15.safetensors"
    save_kohya(sd15, TINY_SD15, random_lora(TINY_SD15, rank=2))
    out = tmp_path / "x.png"
    assert cli_main(["generate", "a", "--model", str(model), *FLAGS, "--lora", str(sd15), "--out", str(out)]) == 2
    assert "does not fit the sdxl-base model" in capsys.readouterr().err and not out.exists()
    assert cli_main(["generate", "a <lora:nothere>", "--model", str(model), *FLAGS, "--lora-dir", str(root / "loras"),
                     "--out", str(out)]) == 2
    assert "no nothere.safetensors" in capsys.readouterr().err
    assert cli_main(["generate", "a <lora:style>", "--model", str(model), *FLAGS, "--out", str(out)]) == 2
    assert "--lora-dir" in capsys.readouterr().err
    one_width = tmp_path / "sd1emb.safetensors"
    save_file({"emb_params": torch.randn(1, TINY_SD15.text_encoders[0].width + 1)}, str(one_width))
    assert cli_main(["generate", "a", "--model", str(model), *FLAGS, "--embedding", str(one_width),
                     "--out", str(out)]) == 2
    assert "it is for another model" in capsys.readouterr().err
    assert cli_main(["generate", "a", "--model", str(model), *FLAGS, "--clip-skip", "0", "--out", str(out)]) == 2
    assert "clip_skip must be an integer >= 1" in capsys.readouterr().err


def test_info_describes_an_adapter_file_from_its_header(files, capsys):
    root, _ = files
    assert cli_main(["info", str(root / "other.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "adapter file: LoRA" in out and "(te1, te2, unet)" in out and "ranks [4]" in out
    assert "kohya layout" in out and f"cross-attention width {TINY_SDXL_BASE.unet.context_dim}" in out


def test_unet_override_gives_the_other_models_unet(files, tmp_path):
    from xldm.models.components import Components

    root, model = files
    other = random_components(TINY_SDXL_BASE, seed=9)
    unet_file = save_single_file(Components(config=TINY_SDXL_BASE, unet=other.unet), tmp_path / "student.safetensors")
    out = tmp_path / "x.png"
    assert cli_main(["generate", "a", "--model", str(model), *FLAGS, "--unet", str(unet_file), "--out", str(out)]) == 0
    base = random_components(TINY_SDXL_BASE, seed=0)
    swapped = Components(config=TINY_SDXL_BASE, unet=other.unet, vae=base.vae, text_encoders=base.text_encoders)
    api = Pipeline(swapped, device="cpu", dtype=torch.float32)("a", steps=3, width=64, height=64, seed=4).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))


def test_default_turbo_samples_in_four_trailing_steps(tmp_path):
    from xldm.config import DEFAULT_TURBO_UNET_PATH
    from xldm.pngmeta import read_png_params

    if not DEFAULT_TURBO_UNET_PATH.exists():
        pytest.skip("the bundled turbo student is not in this copy")
    out = tmp_path / "heart.png"
    assert cli_main(["generate", "red heart", "--model", "default-turbo", "--seed", "0", "--out", str(out)]) == 0
    params = read_png_params(out)
    assert (params["steps"], params["cfg"], params["sampler"]) == (4, 1.0, "euler_a")
    assert params["timestep_spacing"] == "trailing" and params["model"] == "turbo.safetensors"


def test_server_offers_a_student_beside_its_checkpoint(files, tmp_path):
    from xldm.models.components import Components
    from xldm.serve.jobs import ModelStore

    _, model = files
    other = random_components(TINY_SDXL_BASE, seed=9)
    unet_file = save_single_file(Components(config=TINY_SDXL_BASE, unet=other.unet), tmp_path / "student.safetensors")
    store = ModelStore([model], dtype=torch.float32, device="cpu", students={"tiny-turbo": (model, unet_file)})
    assert set(store.entries) == {"base.safetensors", "tiny-turbo"}
    pipe = store.pipeline("tiny-turbo", None)
    got = dict(pipe.model.loaded.unet.state_dict())
    assert all(torch.equal(got[k], v) for k, v in other.unet.state_dict().items())
