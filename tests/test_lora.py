"""LoRA / LyCORIS loading: images equal to diffusers' `load_lora_weights` (kohya and PEFT files, UNet and both text
encoders, weights 1.0 and 0.6, two at once), the LyCORIS updates against their formulas written out, fused equal to
unfused, removal restoring the weights bit for bit, and files that do not fit refused with their keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from xldm.config import TINY_SD15, TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.lora import Adapter, LoraError, LoraSet, parse_lora_tags, read_lora
from xldm.lora.network import set_adapter
from xldm.pipeline import Pipeline
from xldm.request import GenerationRequest
from xldm.weights.io import open_checkpoint
from xldm.weights.save import save_diffusers

from lora_files import diffusers_path, random_lora, reference_update, save_kohya, save_peft
from tiny_models import random_components

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loader needs it

PIXEL_TOL = 2  # out of 255
LATENT_TOL = 1e-4
PROMPT = "a red apple on a wooden table"
SIZE = dict(width=96, height=64)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = random_components(TINY_SDXL_BASE, seed=0, scale=0.05)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(save_diffusers(base, root / "base"),
                                                              local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    files = {}
    for name, seed, alpha in (("one", 1, 2.0), ("two", 2, None)):
        lora = random_lora(TINY_SDXL_BASE, rank=4, seed=seed, alpha=alpha, scale=0.6)
        save_kohya(root / f"{name}.safetensors", TINY_SDXL_BASE, lora)
        save_peft(root / f"{name}_peft.safetensors", TINY_SDXL_BASE, lora, lora_alpha=alpha)
        files[name] = root / f"{name}.safetensors"
        files[f"{name}_peft"] = root / f"{name}_peft.safetensors"
    return base, ref, files, root


def ours(base, loras=(), **settings):
    request = GenerationRequest(prompt=PROMPT, steps=4, cfg=5.0, seed=3, loras=tuple(loras), **SIZE, **settings)
    return Pipeline(base, device="cpu", dtype=torch.float32).generate(request, output="latent").latents


def theirs(ref, files, weights):
    names = [f"a{i}" for i in range(len(files))]
    for name, path in zip(names, files):
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(names, weights)
    try:
        return ref(PROMPT, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                   generator=[torch.Generator().manual_seed(3)], **SIZE).images
    finally:
        ref.delete_adapters(names)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_one_file_matches_diffusers(setup, fmt, weight):
    base, ref, files, _ = setup
    path = files["one" if fmt == "kohya" else "one_peft"]
    expected = theirs(ref, [path], [weight])
    got = ours(base, [(path, weight)])
    plain = ours(base)
    assert (got - expected).abs().max().item() <= LATENT_TOL * max(1.0, expected.abs().max().item())
    assert (got - plain).abs().max().item() > 100 * LATENT_TOL  # the LoRA changed the result


def test_peft_rank_and_alpha_patterns_match_diffusers(setup, tmp_path):
    """peft `get_pattern_key`: each pattern matches the end of diffusers' module path, grouped (so `to_q|to_k` is
    one alternative), and the first matching pattern wins: a full path, an overlapping pair and an alternation."""
    base, ref, _, _ = setup
    lora = random_lora(TINY_SDXL_BASE, rank=4, seed=5, alpha=2.0, scale=0.6)
    module_of = {diffusers_path(TINY_SDXL_BASE, c, layer): (c, layer) for c, layer in lora}
    full = next(p for p in sorted(module_of) if p.startswith("down_blocks.") and p.endswith("attn1.to_q"))
    narrow = lora[module_of[full]]
    narrow["lora_down"], narrow["lora_up"] = narrow["lora_down"][:2], narrow["lora_up"][:, :2]
    path = tmp_path / "patterns.safetensors"
    save_peft(path, TINY_SDXL_BASE, lora, lora_alpha=2.0, metadata={
        "unet.rank_pattern": {full: 2},
        "unet.alpha_pattern": {full: 6.0, "attn1.to_q": 16.0, "to_q|to_k": 32.0, "to_k": 1.0}})
    ref.load_lora_weights(str(path), adapter_name="patterns")
    try:
        want = {p: ref.unet.get_submodule(p).scaling["patterns"] for p in module_of if module_of[p][0] == "unet"}
    finally:
        ref.delete_adapters("patterns")
    adapters = read_lora(path, TINY_SDXL_BASE).adapters
    got = {p: adapters[module_of[p]].scale for p in want}
    assert got == pytest.approx(want, rel=1e-6)
    assert got[full] == pytest.approx(3.0) and {round(v, 6) for v in got.values()} == {3.0, 4.0, 8.0, 0.5}
    expected = theirs(ref, [path], [1.0])
    assert (ours(base, [(path, 1.0)]) - expected).abs().max().item() <= LATENT_TOL * max(1.0, expected.abs().max())


def test_peft_metadata_without_lora_alpha_takes_peft_default(setup, tmp_path):
    """diffusers builds a LoraConfig from the metadata alone: without `lora_alpha` it is peft's default 8, not r."""
    base, ref, _, _ = setup
    lora = random_lora(TINY_SDXL_BASE, rank=4, seed=7, scale=0.6)
    save_peft(tmp_path / "full.safetensors", TINY_SDXL_BASE, lora, lora_alpha=2.0)
    ckpt = open_checkpoint(tmp_path / "full.safetensors")
    fields = {k: v for k, v in json.loads(ckpt.metadata["lora_adapter_metadata"]).items()
              if not k.endswith(".lora_alpha")}
    path = tmp_path / "no_alpha.safetensors"
    save_file(ckpt.tensors(), str(path), metadata={"lora_adapter_metadata": json.dumps(fields), "format": "pt"})
    ref.load_lora_weights(str(path), adapter_name="no_alpha")
    try:
        module_of = {diffusers_path(TINY_SDXL_BASE, c, layer): (c, layer) for c, layer in lora if c == "unet"}
        want = {p: ref.unet.get_submodule(p).scaling["no_alpha"] for p in module_of}
    finally:
        ref.delete_adapters("no_alpha")
    adapters = read_lora(path, TINY_SDXL_BASE).adapters
    assert {p: adapters[module_of[p]].scale for p in want} == pytest.approx(want, rel=1e-6)
    assert set(want.values()) == {2.0}  # 8 / 4


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_peft_dora_matches_diffusers_at_any_weight(setup, tmp_path, weight):
    """peft DoRA scales the update inside the norm (peft tuners/lora/dora.py, layer.py set_scale):
    W' = m (W + w s BA) / ||W + w s BA||, so weight 0 still rescales W to the magnitude m."""
    base, ref, _, _ = setup
    # (UNet only: diffusers with transformers 5 does not load the text encoders' magnitude vectors)
    lora = random_lora(TINY_SDXL_BASE, rank=4, seed=6, alpha=2.0, text=False, scale=0.6)
    g = torch.Generator().manual_seed(5)
    for (component, layer), tensors in lora.items():
        base_weight = ref.unet.get_submodule(diffusers_path(TINY_SDXL_BASE, component, layer)).weight.detach()
        norm = base_weight.flatten(1).norm(dim=1)
        magnitude = norm * (0.3 + 1.4 * torch.rand(norm.shape, generator=g))
        tensors["dora_scale"] = magnitude.reshape(1, -1, 1, 1) if base_weight.dim() == 4 else magnitude  # as peft
    path = tmp_path / "dora.safetensors"
    save_peft(path, TINY_SDXL_BASE, lora, lora_alpha=2.0, metadata={"unet.use_dora": True})
    expected = theirs(ref, [path], [weight])
    got = ours(base, [(path, weight)])
    assert (got - expected).abs().max().item() <= LATENT_TOL * max(1.0, expected.abs().max().item())
    assert (got - ours(base)).abs().max().item() > 10 * LATENT_TOL  # (the tiny model moves little)


def test_two_files_at_once_match_set_adapters(setup):
    base, ref, files, _ = setup
    expected = theirs(ref, [files["one"], files["two_peft"]], [0.7, 0.4])
    got = ours(base, [(files["one"], 0.7), (files["two_peft"], 0.4)])
    assert (got - expected).abs().max().item() <= LATENT_TOL * max(1.0, expected.abs().max().item())


def test_images_match_diffusers_and_text_encoders_are_adapted(setup):
    base, ref, files, _ = setup
    ref.load_lora_weights(str(files["one"]), adapter_name="te")
    try:
        ref_embeds = ref.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        image = ref(PROMPT, num_inference_steps=4, guidance_scale=5.0, generator=[torch.Generator().manual_seed(3)],
                    **SIZE).images[0]
    finally:
        ref.delete_adapters("te")
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    pipe.load_lora(files["one"])
    got = pipe(PROMPT, steps=4, cfg=5.0, seed=3, **SIZE).images[0]
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(image, dtype=int)).max() <= PIXEL_TOL
    from xldm.conditioning import encode_prompts

    with torch.no_grad():
        adapted = encode_prompts(base.text_encoders, None, base.config, PROMPT)
        pipe.unload_loras()
        plain = encode_prompts(base.text_encoders, None, base.config, PROMPT)
    assert torch.allclose(adapted.context, ref_embeds[0], atol=LATENT_TOL)
    assert torch.allclose(adapted.pooled, ref_embeds[2], atol=LATENT_TOL)
    assert (adapted.context - plain.context).abs().max() > 1e-2 and (adapted.pooled - plain.pooled).abs().max() > 1e-2


def test_separate_text_weight_and_prompt_tags(setup):
    base, _, files, root = setup
    pipe = Pipeline(base, device="cpu", dtype=torch.float32, lora_dir=root)
    tagged = pipe(f"{PROMPT} <lora:one:0.3:0.8>", steps=2, seed=3, **SIZE)
    explicit = pipe(PROMPT, steps=2, seed=3, loras=[(files["one"], 0.8, 0.3)], **SIZE)
    assert np.array_equal(np.asarray(tagged.images[0]), np.asarray(explicit.images[0]))
    params = tagged.params[0]
    assert params["prompt"] == f"{PROMPT} <lora:one:0.3:0.8>"  # the infotext keeps the tag, as A1111's
    assert params["loras"] == [("one.safetensors", 0.8, 0.3)]
    assert params["lora_hashes"] == f"one: {read_lora(files['one'], TINY_SDXL_BASE).short_hash}"
    with pytest.raises(ValueError, match="no missing.safetensors"):
        pipe.resolve(GenerationRequest(prompt="x <lora:missing:1>"))


def test_parse_lora_tags_follows_a1111():
    text, tags = parse_lora_tags("a <lora:a:0.5> b <lora:b:0.3:0.9>, <lora:c:te=0.2:unet=0.7> <lyco:d> <lora:e>")
    assert text == "a  b ,   "
    assert tags == [("a", 0.5, None), ("b", 0.9, 0.3), ("c", 0.7, 0.2), ("d", 1.0, None), ("e", 1.0, None)]
    with pytest.raises(ValueError, match="must be numbers"):
        parse_lora_tags("<lora:a:strong>")


def test_fused_equals_unfused_and_removal_restores_bits(setup):
    base, _, files, _ = setup
    before = {k: v.clone() for m in base.modules().values() for k, v in m.state_dict().items()}
    loras = LoraSet(TINY_SDXL_BASE)
    loras.set([(files["one"], 0.8), (files["two"], -0.5, 0.25)])
    loras.sync(base)
    x = torch.randn(1, 4, 8, 12)
    context = torch.randn(1, 77, TINY_SDXL_BASE.unet.context_dim)
    vector = torch.randn(1, TINY_SDXL_BASE.unet.adm_in_channels)
    t = torch.tensor([500])
    with torch.no_grad():
        a = base.unet(x, t, context, vector)
        loras.fused = True
        loras.sync(base)
        b = base.unet(x, t, context, vector)
        changed = any(not torch.equal(before[k], v) for k, v in base.unet.state_dict().items())
        loras.clear(base)
        c = base.unet(x, t, context, vector)
    assert changed and torch.allclose(a, b, atol=1e-5) and (a - c).abs().max() > 1e-3
    after = {k: v for m in base.modules().values() for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("_adapter_patch" in m.__dict__ for m in base.unet.modules())


def _check_adapter(tensors, layer):
    """Adapter.update against the formula, and the unfused hook against the layer with W + update."""
    adapter = Adapter(tensors)
    expected = reference_update(tensors, layer.weight)
    assert torch.allclose(adapter.update(layer.weight).double(), expected, atol=1e-5)
    x = (torch.randn(2, layer.weight.shape[1], 5, 7) if layer.weight.dim() == 4
         else torch.randn(3, layer.weight.shape[1]))
    with torch.no_grad():
        weight = layer.weight + 0.7 * expected.float()
        want = (F.conv2d(x, weight, layer.bias, layer.stride, layer.padding) if layer.weight.dim() == 4
                else F.linear(x, weight, layer.bias))
        set_adapter(layer, "k", adapter, 0.7)
        got = layer(x)
        set_adapter(layer, "k", adapter, 0.7, fused=True)
        fused = layer(x)
        set_adapter(layer, "k", None)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(fused, want, atol=1e-5)


def test_locon_loha_lokr_match_their_formulas():
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(12, 10), torch.nn.Conv2d(6, 8, 3, padding=1)
    r = 3
    _check_adapter({"lora_down": torch.randn(r, 6, 3, 3), "lora_up": torch.randn(8, r, 1, 1),
                    "alpha": torch.tensor(1.5)}, conv)  # LoCon 3x3
    _check_adapter({"lora_down": torch.randn(r, 12), "lora_up": torch.randn(10, r)}, linear)  # no alpha: alpha = r
    _check_adapter({"hada_w1_a": torch.randn(10, r), "hada_w1_b": torch.randn(r, 12), "hada_w2_a": torch.randn(10, r),
                    "hada_w2_b": torch.randn(r, 12), "alpha": torch.tensor(2.0)}, linear)
    _check_adapter({"hada_w1_a": torch.randn(8, r), "hada_w1_b": torch.randn(r, 54), "hada_w2_a": torch.randn(8, r),
                    "hada_w2_b": torch.randn(r, 54), "alpha": torch.tensor(1.0)}, conv)  # LoHa on a 3x3 conv
    _check_adapter({"lokr_w1": torch.randn(2, 3), "lokr_w2_a": torch.randn(5, 2), "lokr_w2_b": torch.randn(2, 4),
                    "alpha": torch.tensor(1.0)}, linear)  # LoKr: kron((2,3), (5,4)) = (10, 12)


def test_tucker_locon_equals_its_three_convolutions_and_tucker_loha_its_formula():
    """LyCORIS `use_tucker`: LoCon's down (1x1) -> lora_mid (3x3) -> up (1x1) chain run as three convolutions
    against the composed update; LoHa's halves rebuilt from hada_t1/t2 (r, r, 3, 3), hada_w*_a (r, out) and
    hada_w*_b (r, in), written here as a matrix product per kernel tap."""
    torch.manual_seed(2)
    conv, r = torch.nn.Conv2d(6, 8, 3, padding=1, stride=2), 3
    down, mid, up = torch.randn(r, 6, 1, 1), torch.randn(r, r, 3, 3), torch.randn(8, r, 1, 1)
    adapter = Adapter({"lora_down": down, "lora_mid": mid, "lora_up": up, "alpha": torch.tensor(1.5)})
    adapter.check_shape(tuple(conv.weight.shape))
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, stride=2, padding=1), up) * (1.5 / r)
        want = conv(x) + 0.7 * chain
        set_adapter(conv, "k", adapter, 0.7)
        got = conv(x)
        set_adapter(conv, "k", adapter, 0.7, fused=True)
        fused = conv(x)
        set_adapter(conv, "k", None)
    assert (got - want).abs().max() <= 1e-4 and (fused - want).abs().max() <= 1e-4

    def rebuilt(core, a, b):  # W[:, :, k, l] = a^T @ core[:, :, k, l] @ b
        return (a.double().t() @ core.double().permute(2, 3, 0, 1) @ b.double()).permute(2, 3, 0, 1)

    tensors = {"hada_t1": torch.randn(r, r, 3, 3), "hada_w1_a": torch.randn(r, 8), "hada_w1_b": torch.randn(r, 6),
               "hada_t2": torch.randn(r, r, 3, 3), "hada_w2_a": torch.randn(r, 8), "hada_w2_b": torch.randn(r, 6),
               "alpha": torch.tensor(2.0)}
    want = (rebuilt(tensors["hada_t1"], tensors["hada_w1_a"], tensors["hada_w1_b"])
            * rebuilt(tensors["hada_t2"], tensors["hada_w2_a"], tensors["hada_w2_b"]) * (2.0 / r))
    assert (Adapter(tensors).update(conv.weight).double() - want).abs().max() <= 1e-4


def test_dora_rescales_to_the_stored_magnitude():
    torch.manual_seed(1)
    layer = torch.nn.Linear(12, 10)
    down, up = torch.randn(3, 12), torch.randn(10, 3)
    for magnitude in (torch.rand(10) + 0.5, torch.rand(1, 12) + 0.5):  # per output row, per input column
        adapter = Adapter({"lora_down": down, "lora_up": up, "alpha": torch.tensor(3.0), "dora_scale": magnitude})
        merged = layer.weight.double() + up.double() @ down.double()
        if magnitude.numel() == 10:
            want = merged * (magnitude.double()[:, None] / merged.norm(dim=1, keepdim=True))
        else:
            want = merged * (magnitude.double() / merged.norm(dim=0, keepdim=True))
        got = layer.weight.double() + adapter.update(layer.weight).double()
        assert torch.allclose(got, want, atol=1e-5)
        assert not adapter.low_rank
        # kohya / LyCORIS dora_scale, as A1111 and ComfyUI: a weight scales W_dora - W
        assert torch.allclose(adapter.update(layer.weight, 0.5).double(), 0.5 * (want - layer.weight.double()),
                              atol=1e-5)
        assert not adapter.active_at(0.0)


def _file(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_files_that_do_not_fit_are_refused_with_their_keys(tmp_path, setup):
    base = setup[0]
    sd15 = tmp_path / "sd15.safetensors"
    save_kohya(sd15, TINY_SD15, random_lora(TINY_SD15, rank=2))
    with pytest.raises(LoraError, match=r"SD 1.x/2.x.*lora_te_text_model"):
        read_lora(sd15, TINY_SDXL_BASE)
    refiner = tmp_path / "refiner.safetensors"
    save_kohya(refiner, TINY_SDXL_REFINER, random_lora(TINY_SDXL_REFINER, rank=2))
    with pytest.raises(LoraError, match="does not fit the sdxl-base model") as info:
        read_lora(refiner, TINY_SDXL_BASE)
    assert "lora_" in str(info.value) and "nothing was applied" in str(info.value)
    # one unknown layer among good ones: the whole file is refused and the model is untouched
    good = random_lora(TINY_SDXL_BASE, rank=2, text=False)
    partial = tmp_path / "partial.safetensors"
    save_kohya(partial, TINY_SDXL_BASE, good)
    tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(partial)))
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    _file(partial, tensors)
    before = ours(base)
    with pytest.raises(LoraError, match="lora_unet_no_such_layer"):
        ours(base, [(partial, 1.0)])
    assert torch.equal(ours(base), before)


def test_nan_and_foreign_files_are_refused(tmp_path):
    lora = random_lora(TINY_SDXL_BASE, rank=2, text=False)
    path = tmp_path / "nan.safetensors"
    first = next(iter(lora))
    lora[first]["lora_up"][0, 0] = float("nan")
    save_kohya(path, TINY_SDXL_BASE, lora)
    with pytest.raises(LoraError, match="NaN"):
        read_lora(path, TINY_SDXL_BASE)
    with pytest.raises(LoraError, match="no adapter format"):
        read_lora(_file(tmp_path / "model.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(4)}),
                  TINY_SDXL_BASE)


def test_lycoris_files_load_onto_the_right_layers(tmp_path):
    """A kohya-named file mixing LoCon (3x3 resblock conv), LoHa, LoKr and a full diff: each layer's output is the
    base layer with the update written out in tests/lora_files.py."""
    model = random_components(TINY_SDXL_BASE, seed=4)
    conv = "input_blocks.1.0.in_layers.2"
    linear = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    ff = "input_blocks.4.1.transformer_blocks.0.ff.net.2"
    full = "input_blocks.4.1.proj_in"
    unet = model.unet
    g = torch.Generator().manual_seed(0)
    w_conv, w_lin, w_ff, w_full = (unet.get_submodule(p).weight for p in (conv, linear, ff, full))
    r = 2
    parts = {
        conv: {"lora_down": torch.randn(r, *w_conv.shape[1:], generator=g),
               "lora_up": torch.randn(w_conv.shape[0], r, 1, 1, generator=g), "alpha": torch.tensor(1.0)},
        linear: {"hada_w1_a": torch.randn(w_lin.shape[0], r, generator=g),
                 "hada_w1_b": torch.randn(r, w_lin.shape[1], generator=g),
                 "hada_w2_a": torch.randn(w_lin.shape[0], r, generator=g),
                 "hada_w2_b": torch.randn(r, w_lin.shape[1], generator=g), "alpha": torch.tensor(1.0)},
        ff: {"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2_a": torch.randn(w_ff.shape[0] // 2, r, generator=g),
             "lokr_w2_b": torch.randn(r, w_ff.shape[1] // 2, generator=g), "alpha": torch.tensor(1.0)},
        full: {"diff": torch.randn(w_full.shape, generator=g) * 0.1},
    }
    tensors = {}
    for layer, values in parts.items():
        name = "lora_unet_" + layer.replace(".", "_")
        for key, value in values.items():
            tensors[f"{name}.{key}" + (".weight" if key in ("lora_down", "lora_up") else "")] = value
    path = _file(tmp_path / "lycoris.safetensors", tensors)
    loras = LoraSet(TINY_SDXL_BASE)
    loras.set([(path, 0.5)])
    loras.sync(model)
    for layer, values in parts.items():
        module = unet.get_submodule(layer)
        update = values["diff"].double() if "diff" in values else reference_update(values, module.weight)
        weight = (module.weight.double() + 0.5 * update).float()
        x = (torch.randn(2, module.weight.shape[1], 6, 6) if module.weight.dim() == 4
             else torch.randn(3, module.weight.shape[1]))
        with torch.no_grad():
            want = (F.conv2d(x, weight, module.bias, module.stride, module.padding) if x.dim() == 4
                    else F.linear(x, weight, module.bias))
            assert torch.allclose(module(x), want, atol=1e-4), layer
    loras.clear(model)
