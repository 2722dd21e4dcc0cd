"""ControlNet: the network against diffusers' ControlNetModel, the key maps, detection and loading, and generation
against diffusers' StableDiffusionXLControlNetPipeline on tiny random models (fp32, CPU, 2/255 per pixel)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from xldm.conditioning import vector_conditioning
from xldm.config import TINY_SD15, TINY_SDXL_BASE, TINY_SDXL_REFINER, UNetConfig
from xldm.controlnet import ControlUnit, control_image, parse_preprocess
from xldm.errors import ControlNetError, StateDictMismatchError, UnknownModelError
from xldm.models.controlnet import ControlNet, ControlNetConfig
from xldm.pipeline import Pipeline
from xldm.weights.detect import detect_controlnet
from xldm.weights.keys_controlnet import (controlnet_config_from_diffusers, controlnet_diffusers_config,
                                          controlnet_diffusers_to_original, controlnet_original_to_diffusers)
from xldm.weights.load import load_controlnet
from xldm.weights.save import save_diffusers

from tiny_models import random_components

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

PIXEL_TOL = 2  # out of 255, per pixel (the bound)
LATENT_TOL = 1e-4
PROMPT = "a red heart on a white table"
SEED = 4321
HINT = (8, 16, 24, 32)  # a small hint network (diffusers conditioning_embedding_out_channels)
# Widths that are no power of two, several heads per attention layer (48 / 12 = 4, 72 / 12 = 6).
ODD_UNET = UNetConfig(block_out_channels=(24, 48, 72), transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                      num_head_channels=12, norm_groups=8, context_dim=80, adm_in_channels=96)


def random_controlnet(cfg: ControlNetConfig, seed: int, scale: float = 0.05) -> ControlNet:
    """Every tensor random, the zero convolutions included (zeros would hide a wrong residual map)."""
    torch.manual_seed(seed)
    net = ControlNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return net.eval()


def as_diffusers(net: ControlNet, micro_dim: int = 8):
    ref = diffusers.ControlNetModel(**controlnet_diffusers_config(net.config, addition_time_embed_dim=micro_dim))
    ref.load_state_dict(controlnet_original_to_diffusers(net.state_dict(), net.config), strict=True)
    return ref.eval()


def shapes(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_residuals_match_diffusers_controlnet():
    cfg = ControlNetConfig(unet=ODD_UNET, hint_channels=HINT)
    ours = random_controlnet(cfg, seed=0)
    ref = as_diffusers(ours)
    torch.manual_seed(1)
    batch = 2
    x, hint = torch.randn(batch, 4, 8, 12), torch.rand(batch, 3, 64, 96)
    context, pooled = torch.randn(batch, 7, 80), torch.randn(batch, 48)
    ids = torch.tensor([[64.0, 96, 0, 0, 64, 96], [128, 192, 8, 4, 64, 96]])
    config = replace(TINY_SDXL_BASE, unet=ODD_UNET)
    t = torch.tensor([999.0, 321.0])
    with torch.no_grad():
        down, mid = ours(x, t, context, vector_conditioning(config, pooled, ids), hint, 0.7)
        ref_down, ref_mid = ref(x, t, context, controlnet_cond=hint, conditioning_scale=0.7, return_dict=False,
                                added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    assert len(down) == len(ref_down) == 1 + 3 * 2 + 2
    diff = max((a - b).abs().max().item() for a, b in zip(down + [mid], list(ref_down) + [ref_mid]))
    assert diff <= 1e-4, diff
    assert min(r.abs().max().item() for r in down) > 1e-2  # every residual carries signal


def test_key_maps_and_configs_round_trip():
    cfg = ControlNetConfig(unet=ODD_UNET, conditioning_channels=1, hint_channels=(4, 8))
    sd = ControlNet(cfg).state_dict()
    mapped = controlnet_original_to_diffusers(sd, cfg)
    assert "controlnet_cond_embedding.conv_out.weight" in mapped and "controlnet_mid_block.bias" in mapped
    assert controlnet_diffusers_to_original(mapped, cfg).keys() == sd.keys()
    assert controlnet_config_from_diffusers(controlnet_diffusers_config(cfg)) == cfg
    with pytest.raises(ValueError, match="global_pool_conditions"):
        controlnet_config_from_diffusers(controlnet_diffusers_config(cfg) | {"global_pool_conditions": True})


def test_detection_from_empty_state_dicts():
    """Shapes only (torch.empty), both layouts, the official layout's `control_model.` prefix too."""
    cfg = ControlNetConfig(unet=ODD_UNET, hint_channels=HINT)
    with torch.device("meta"):
        sd = ControlNet(cfg).state_dict()
    original = {k: torch.empty(v.shape) for k, v in sd.items()}
    found, layout, prefix = detect_controlnet(shapes(original), like=ODD_UNET)
    assert (found, layout, prefix) == (cfg, "original", "")
    prefixed = {"control_model." + k: v for k, v in shapes(original).items()}
    assert detect_controlnet(prefixed, like=ODD_UNET) == (cfg, "original", "control_model.")
    diffusers_sd = shapes(controlnet_original_to_diffusers(original, cfg))
    assert detect_controlnet(diffusers_sd, like=ODD_UNET) == (cfg, "diffusers", "")
    # The SDXL base itself, at full size, detected with the official 64-wide heads
    sdxl = ControlNetConfig(unet=replace(TINY_SDXL_BASE.unet, block_out_channels=(320, 640, 1280),
                                         transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                                         num_head_channels=64, context_dim=2048, adm_in_channels=2816))
    with torch.device("meta"):
        big = shapes(ControlNet(sdxl).state_dict())
    assert detect_controlnet(big)[0] == sdxl
    with pytest.raises(UnknownModelError, match="no ControlNet keys"):
        detect_controlnet({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})
    with pytest.raises(UnknownModelError, match="control-lora"):
        detect_controlnet({"input_hint_block.0.weight": (16, 3, 3, 3), "lora_controlnet": (0,)})


def test_loads_folders_and_single_files_strictly(tmp_path):
    from safetensors.torch import save_file

    net = random_controlnet(ControlNetConfig(unet=TINY_SDXL_BASE.unet, hint_channels=HINT), seed=2)
    ref = as_diffusers(net)
    ref.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "diffusers.safetensors")
    save_file({"control_model." + k: v for k, v in net.state_dict().items()}, tmp_path / "original.safetensors")
    for source in ("folder", "diffusers.safetensors", "original.safetensors"):
        loaded = load_controlnet(tmp_path / source, TINY_SDXL_BASE)
        assert loaded.config == net.config, source
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("middle_block_out")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(StateDictMismatchError, match="ControlNet: 2 missing keys: middle_block_out"):
        load_controlnet(tmp_path / "partial.safetensors", TINY_SDXL_BASE)


def test_sd15_controlnet_is_refused_on_an_sdxl_base(tmp_path):
    from safetensors.torch import save_file

    sd15 = ControlNet(ControlNetConfig(unet=TINY_SD15.unet, hint_channels=HINT))
    save_file({"control_model." + k: v for k, v in sd15.state_dict().items()}, tmp_path / "sd15_canny.safetensors")
    with pytest.raises(ControlNetError, match=r"for SD 1\.x/2\.x \(text context 32, vector 0, .*"
                       r"the model is sdxl-base and expects one with text context 80, vector 96"):
        load_controlnet(tmp_path / "sd15_canny.safetensors", TINY_SDXL_BASE)


def test_control_images_resized_preprocessed_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8))
    t = control_image(image, 64, 48)
    assert t.shape == (1, 3, 48, 64) and 0 <= t.min() and t.max() <= 1
    expected = np.asarray(image.resize((64, 48), Image.Resampling.LANCZOS)).astype(np.float32) / 255
    assert np.array_equal(t[0].permute(1, 2, 0).numpy(), expected)
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    edges = control_image(Image.fromarray(square), 64, 64, "canny:50,150")[0, 0]
    assert set(edges.unique().tolist()) == {0.0, 1.0} and 60 < int(edges.sum()) < 200  # the square's outline
    assert parse_preprocess("canny") == ("canny", (100, 200))
    with pytest.raises(ValueError, match="unknown control preprocessor"):
        parse_preprocess("depth")
    with pytest.raises(ControlNetError, match="PIL image or an image file, got ndarray"):
        control_image(square, 64, 64)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ControlNetError, match="cannot read this image"):
        control_image(tmp_path / "notes.txt", 64, 64)


# --- generation against diffusers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    base = random_components(TINY_SDXL_BASE, seed=0)
    refiner = random_components(TINY_SDXL_REFINER, seed=1)
    base_dir, refiner_dir = save_diffusers(base, root / "base"), save_diffusers(refiner, root / "refiner")
    cfg = ControlNetConfig(unet=TINY_SDXL_BASE.unet, hint_channels=HINT)
    paths = []
    for i in range(2):
        path = root / f"cn{i}"
        as_diffusers(random_controlnet(cfg, seed=10 + i, scale=0.05)).save_pretrained(path)
        paths.append(path)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)) for _ in range(2)]  # resized
    ours = Pipeline(base, refiner=None, device="cpu", dtype=torch.float32)
    with_refiner = Pipeline(base, refiner, device="cpu", dtype=torch.float32)
    return dict(base_dir=base_dir, refiner_dir=refiner_dir, paths=paths, images=images, ours=ours,
                with_refiner=with_refiner)


def reference(setup, count: int):
    nets = [diffusers.ControlNetModel.from_pretrained(p) for p in setup["paths"][:count]]
    return diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        setup["base_dir"], controlnet=nets if count > 1 else nets[0], local_files_only=True)


def generators(batch: int = 2) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]


def decode(pipe, latents):
    """diffusers' decode at the end of its SDXL pipelines (fp32: no upcasting), as PIL images."""
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def max_diff(ours, theirs) -> int:
    a = np.stack([np.asarray(im.convert("RGB"), np.int16) for im in ours])
    b = np.stack([np.asarray(im.convert("RGB"), np.int16) for im in theirs])
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


CASES = {  # name: (units as (scale, start, end), )
    "scale 1.0": [(1.0, 0.0, 1.0)],
    "scale 0.5": [(0.5, 0.0, 1.0)],
    "window 0-0.5": [(1.0, 0.0, 0.5)],
    "two ControlNets": [(1.0, 0.0, 1.0), (0.7, 0.2, 1.0)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_generation_matches_diffusers(setup, case):
    settings = CASES[case]
    units = tuple(ControlUnit(setup["paths"][i], setup["images"][i], s, a, b) for i, (s, a, b) in enumerate(settings))
    ours = setup["ours"](PROMPT, steps=5, width=64, height=64, seed=SEED, batch=2, controlnets=units)
    plain = setup["ours"](PROMPT, steps=5, width=64, height=64, seed=SEED, batch=2)
    pipe = reference(setup, len(settings))
    many = len(settings) > 1
    pick = (lambda values: values) if many else (lambda values: values[0])
    latents = pipe(PROMPT, image=pick([setup["images"][i] for i in range(len(settings))]), num_inference_steps=5,
                   width=64, height=64, generator=generators(), num_images_per_prompt=2, guidance_scale=5.0,
                   controlnet_conditioning_scale=pick([s for s, _, _ in settings]),
                   control_guidance_start=pick([a for _, a, _ in settings]),
                   control_guidance_end=pick([b for _, _, b in settings]), output_type="latent").images
    diff = max_diff(ours.images, decode(pipe, latents))
    latent_diff = (ours.latents - latents).abs().max().item()
    effect = (ours.latents - plain.latents).abs().max().item()
    print(f"{case}: pixels {diff}/255, latents {latent_diff:.2e}, control effect on latents {effect:.2f}")
    assert diff <= PIXEL_TOL, f"{case}: max pixel difference {diff}/255"
    assert latent_diff <= LATENT_TOL, f"{case}: max latent difference {latent_diff}"
    assert effect > 100 * LATENT_TOL  # the control changed the sample (the tiny random VAE decodes nearly flat)
    assert ours.params[0]["controlnet_infotext"][0] == (
        f"Module: none, Model: cn0, Weight: {settings[0][0]:g}, Guidance Start: {settings[0][1]:g}, "
        f"Guidance End: {settings[0][2]:g}")


def test_base_to_refiner_handoff_matches_diffusers(setup):
    unit = ControlUnit(setup["paths"][0], setup["images"][0], 1.0)
    ours = setup["with_refiner"](PROMPT, steps=10, width=64, height=64, seed=SEED, batch=2, refiner_start=0.8,
                                 controlnets=(unit,)).images
    gens = generators()
    latents = reference(setup, 1)(PROMPT, image=setup["images"][0], num_inference_steps=10, denoising_end=0.8,
                                  width=64, height=64, generator=gens, num_images_per_prompt=2,
                                  output_type="latent").images
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(setup["refiner_dir"], local_files_only=True)
    theirs = refiner([PROMPT] * 2, image=latents, num_inference_steps=10, denoising_start=0.8, generator=gens).images
    diff = max_diff(ours, theirs)
    print(f"refiner hand-off: pixels {diff}/255")
    assert diff <= PIXEL_TOL, f"refiner hand-off: max pixel difference {diff}/255"


def test_scale_zero_is_the_image_without_controlnet(setup):
    common = dict(steps=3, width=64, height=64, seed=SEED, batch=2)
    zero = ControlUnit(setup["paths"][0], setup["images"][0], 0.0)
    with_zero = setup["ours"](PROMPT, controlnets=(zero,), **common)
    without = setup["ours"](PROMPT, **common)
    assert torch.equal(with_zero.latents, without.latents)
    assert max_diff(with_zero.images, without.images) == 0


def test_cli_generate_with_repeatable_controlnet_flags(setup, tmp_path, capsys):
    from safetensors.torch import save_file

    from xldm.cli import main as cli_main
    from xldm.pngmeta import parse_a1111_parameters, read_png_params, read_png_text
    from xldm.weights.save import save_single_file

    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), tmp_path / "base.safetensors")
    original = tmp_path / "canny_original.safetensors"
    net = load_controlnet(setup["paths"][1], TINY_SDXL_BASE)
    save_file({"control_model." + k: v for k, v in net.state_dict().items()}, original)
    sketch = tmp_path / "sketch.png"
    square = np.zeros((96, 80, 3), np.uint8)
    square[20:70, 15:60] = 255
    Image.fromarray(square).save(sketch)
    setup["images"][0].save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    args = ["generate", PROMPT, "--model", str(base), "--steps", "3", "--width", "64", "--height", "64",
            "--seed", "5", "--dtype", "fp32", "--out", str(out),
            "--controlnet", str(setup["paths"][0]), "--control-image", str(tmp_path / "map.png"),
            "--control-scale", "0.8", "--control-start", "0", "--control-end", "0.6",
            "--controlnet", str(original), "--control-image", str(sketch), "--control-scale", "1.5",
            "--control-start", "0.1", "--control-end", "1", "--control-preprocess", "none",
            "--control-preprocess", "canny:50,150"]
    assert cli_main(args) == 0
    infotext = parse_a1111_parameters(read_png_text(out)["parameters"])
    assert infotext["ControlNet 0"] == "Module: none, Model: cn0, Weight: 0.8, Guidance Start: 0, Guidance End: 0.6"
    assert infotext["ControlNet 1"] == ("Module: canny, Model: canny_original.safetensors, Weight: 1.5, "
                                        "Guidance Start: 0.1, Guidance End: 1")
    params = read_png_params(out)
    assert [c["scale"] for c in params["controlnets"]] == [0.8, 1.5]
    # the same request through the library gives the same pixels
    units = (ControlUnit(setup["paths"][0], tmp_path / "map.png", 0.8, 0.0, 0.6),
             ControlUnit(original, sketch, 1.5, 0.1, 1.0, "canny:50,150"))
    ours = Pipeline(base, device="cpu", dtype=torch.float32)(PROMPT, steps=3, width=64, height=64, seed=5,
                                                              controlnets=units)
    assert max_diff(ours.images, [Image.open(out)]) == 0
    with pytest.raises(SystemExit, match="every ControlNet needs its control image"):
        cli_main(args[:args.index("--control-image")] + ["--controlnet", str(original), "--force"])
    with pytest.raises(SystemExit, match="2 --control-scale for 1 --controlnet"):
        cli_main(["generate", PROMPT, "--model", str(base), "--out", str(tmp_path / "x.png"), "--controlnet",
                  str(original), "--control-image", str(sketch), "--control-scale", "1", "--control-scale", "2", "--force"])


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpainting_match_diffusers(setup, mode):
    rng = np.random.default_rng(5)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    mask = Image.fromarray(mask) if mode == "inpaint" else None
    strength = 0.6
    # (inpainting at batch 1: a batch of 2 differs from diffusers' inpaint pipeline with or without a ControlNet,
    # a difference of the inpainting path itself, outside ControlNet)
    batch = 2 if mask is None else 1
    unit = ControlUnit(setup["paths"][0], setup["images"][0], 1.0, 0.0, 0.8)
    ours = setup["ours"](PROMPT, steps=6, seed=SEED, batch=batch, init_image=init, mask=mask, strength=strength,
                         controlnets=(unit,))
    cls = (diffusers.StableDiffusionXLControlNetImg2ImgPipeline if mode == "img2img"
           else diffusers.StableDiffusionXLControlNetInpaintPipeline)
    pipe = cls.from_pretrained(setup["base_dir"], controlnet=diffusers.ControlNetModel.from_pretrained(
        setup["paths"][0]), local_files_only=True)
    extra = {} if mask is None else {"mask_image": mask}
    theirs = pipe(PROMPT, image=init, control_image=setup["images"][0], strength=strength, num_inference_steps=6,
                  generator=generators(batch), num_images_per_prompt=batch, control_guidance_end=0.8, width=64,
                  height=64, **extra).images
    diff = max_diff(ours.images, theirs)
    print(f"{mode}: pixels {diff}/255")
    assert diff <= PIXEL_TOL, f"{mode}: max pixel difference {diff}/255"



def test_control_image_features_are_computed_once_per_generation(setup, monkeypatch):
    """The hint network (cldm input_hint_block) runs once per unit and generation, not once per step, and the
    latents are bit for bit those of features computed from the control image at every step."""
    from xldm.controlnet import ControlStack
    from xldm.models.controlnet import ControlNet

    unit = ControlUnit(setup["paths"][0], setup["images"][0], 1.0)
    common = dict(steps=4, width=64, height=64, seed=SEED, batch=2, controlnets=(unit,))
    calls = []
    real = ControlNet.hint_features
    monkeypatch.setattr(ControlNet, "hint_features", lambda self, hint: calls.append(1) or real(self, hint))
    cached = setup["ours"](PROMPT, **common)
    assert len(calls) == 1
    calls.clear()

    def every_step(self, index, rows, device):
        net, hint, _ = self.units[index]
        return net.hint_features(hint.repeat(rows, 1, 1, 1).to(device))

    monkeypatch.setattr(ControlStack, "features", every_step)
    recomputed = setup["ours"](PROMPT, **common)
    assert len(calls) == 4
    assert torch.equal(cached.latents, recomputed.latents)
