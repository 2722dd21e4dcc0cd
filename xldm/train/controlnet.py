"""The ControlNet task (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a
ControlNet trained on a frozen latent model.

The ControlNet starts as a copy of the base UNet's encoder (time and vector embeddings, input blocks, middle block:
the paper's "trainable copy", Sec. 3.1) with its hint network and zero convolutions at zero, so step 0 changes
nothing.  Each step is the diffusion task's step (xldm.train.diffusion.loss: same data, noise draws, conditioning
dropout and loss) with the ControlNet's residuals added to the frozen UNet's skips and middle block; only the
ControlNet learns.  Control images are made on the fly from each training crop by `config.control` (the canny
preprocessor of generation, xldm.controlnet), so they are pixel-aligned with what the model sees and a resumed run
makes the same ones; or, with `control = "dir:FOLDER"`, read from files: FOLDER mirrors the image folder (image
`sub/a.jpg` -> control `FOLDER/sub/a.png`, any image extension; kohya sd-scripts' `conditioning_data_dir`
convention), each control file of its image's size and cropped with its image's crop
(xldm.train.data.control_files: a missing one stops the run before it starts, naming the file).  The paper
replaces 50 % of the prompts with empty strings so that the ControlNet learns to read the control image on its own
(Sec. 3.3); the presets set text_dropout 0.5.

Export: `final/controlnet/` (config.json + diffusion_pytorch_model.safetensors, the layout of the released SDXL
ControlNets), which `xldm generate --controlnet` and diffusers' `ControlNetModel.from_pretrained` load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from xldm.controlnet import canny, parse_preprocess
from xldm.diffusion.denoiser import Denoiser
from xldm.models.components import Components
from xldm.models.controlnet import ControlNet, ControlNetConfig
from xldm.train import parallel
from xldm.train.config import TrainConfig
from xldm.train.diffusion import loss
from xldm.train.run import Run, StepResult, make_optimizer, update


def controlnet_from_unet(unet, conditioning_channels: int = 3) -> ControlNet:
    """A ControlNet whose encoder is a copy of `unet`'s (strict: every encoder tensor copied) and whose hint
    network and zero convolutions are freshly initialised (the zero convs at zero)."""
    net = ControlNet(ControlNetConfig(unet=unet.config, conditioning_channels=conditioning_channels))
    encoder = {k: v for k, v in unet.state_dict().items()
               if k.split(".")[0] in ("time_embed", "label_emb", "input_blocks", "middle_block")}
    missing, unexpected = net.load_state_dict(encoder, strict=False)
    fresh = ("input_hint_block.", "zero_convs.", "middle_block_out.")
    if unexpected or any(not k.startswith(fresh) for k in missing):
        raise ValueError(f"the UNet's encoder does not fit the ControlNet: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return net


CONTROL_FILES = "dir:"  # config.control = "dir:FOLDER": control images read from FOLDER


def control_folder(spec: str) -> str | None:
    """The folder of `control = "dir:FOLDER"`, None for a preprocessor (canny)."""
    return spec[len(CONTROL_FILES):] if spec.startswith(CONTROL_FILES) else None


def batches(config: TrainConfig, procs: parallel.Processes):
    """The diffusion task's batches, with each image's control file (`control = "dir:FOLDER"`) as `control`."""
    from xldm.train import diffusion

    data = diffusion.batches(config, procs)
    folder = control_folder(config.control)
    if folder is not None:
        data.use_control_files(folder)
    return data


def control_images(pixels: Tensor, spec: str) -> Tensor:
    """Control images of a batch of training pixels in [-1, 1] (B, 3, H, W): the preprocessor's maps in [0, 1]."""
    _, (low, high) = parse_preprocess(spec)
    maps = []
    for image in ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8):
        edges = canny(Image.fromarray(image.permute(1, 2, 0).numpy()), low, high)
        maps.append(torch.from_numpy(np.asarray(edges, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(maps).to(pixels.device)


def build(config: TrainConfig, procs: parallel.Processes, model: Components | None = None) -> Run:
    """The frozen model of `--init` (or `model`), and a ControlNet from its UNet's encoder (trained)."""
    from xldm.train.diffusion import build_model

    if parallel.uses_fsdp(config, procs):
        raise NotImplementedError("parallel='fsdp' is not supported for ControlNet training; use parallel='ddp'")
    if model is None and not config.init:
        raise ValueError("ControlNet training (task 'controlnet') needs --init MODEL: the base it will steer")
    model = model or build_model(config)
    model.to(device=procs.device)
    for module in model.modules().values():
        module.requires_grad_(False).eval()
    torch.manual_seed(config.seed)
    net = controlnet_from_unet(model.unet).to(procs.device).requires_grad_(True).train()
    return Run(config=config, procs=procs, model=model, trainable={"controlnet": net},
               forward={"unet": model.unet, "controlnet": parallel.wrap_ddp(net, procs)},
               optimizer=make_optimizer(config, net.parameters()), denoiser=Denoiser(model.config.prediction_type),
               tokenizers=model.tokenizers())


def step(run: Run, batch: dict, step: int) -> StepResult:
    params = [p for _, p in run.named_trainable_parameters()]
    controlnet = run.forward["controlnet"]

    def control(noisy: Tensor, timesteps: Tensor, context: Tensor, vector: Tensor | None, pixels: Tensor):
        hint = (batch["control"].to(device=pixels.device, dtype=torch.float32) if "control" in batch
                else control_images(pixels, run.config.control))
        return controlnet(noisy, timesteps, context, vector, hint)

    return update(run, loss(run, batch, step, control=control), step, params)


def export(run: Run, data, final: Path, gathered: dict | None = None) -> Path:
    """The ControlNet's EMA weights (raw weights without EMA) as a diffusers folder `final/controlnet/`."""
    from safetensors.torch import save_file

    from xldm.weights.keys_controlnet import controlnet_diffusers_config, controlnet_original_to_diffusers

    net = run.averaged("controlnet")
    mc = run.model.config
    folder = final / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    settings = controlnet_diffusers_config(net.config, addition_time_embed_dim=mc.micro_conditioning_dim) | {
        "_class_name": "ControlNetModel"}
    (folder / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in controlnet_original_to_diffusers(net.state_dict(), net.config).items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"),
              metadata={"control": "files" if control_folder(run.config.control) is not None
                                   else run.config.control, "base": Path(run.config.init).name if run.config.init
                        else run.config.model, "steps": str(run.config.steps)})
    return folder
