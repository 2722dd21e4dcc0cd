"""The server behind the routes: settings and models (`Server`), each request checked and planned before it is
queued, the worker's generation, webui-style saving, and /sdapi/v1/memory."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from PIL import Image
from starlette.concurrency import run_in_threadpool

from xldm import __version__, hires
from xldm.buckets import scaled_buckets
from xldm.config import GENERATE_DEFAULTS
from xldm.diffusion.schedules import SAMPLER_NAMES
from xldm.lora import parse_lora_tags, read_lora
from xldm.pipeline import resolve_request
from xldm.request import MAX_SEED, GenerationRequest, Interrupted, request_loras
from xldm.pngmeta import (
    A1111_SAMPLER_NAMES,
    format_a1111_parameters,
    save_png,
)
from xldm.serve.guard import LOOPBACK_HOSTS
from xldm.serve.jobs import Job, JobQueue, ModelStore, OutOfMemory, QueueFull
from xldm.serve.networks import (
    find_controlnet,
    scan_controlnets,
    scan_loras,
    scan_vaes,
    vae_latent_channels,
)
from xldm.serve.schemas import (
    LIMITS,
    GenerationBase,
    Img2ImgRequest,
    Limits,
    ProgressResponse,
    ProgressState,
    SDModelItem,
    Settings,
    Txt2ImgRequest,
    decode_image,
    png_base64,
    resolve_sampler,
    sampler_fields,
    scheduler_spacing,
    unapplied_fields,
)
from xldm.speedups import model_preview_map

log = logging.getLogger("xldm.serve")

_OUTPUT_NAME = re.compile(r"^(\d{5})-")

@dataclass
class ServerConfig:
    """What `xldm serve` starts with.  `models[0]` is the first current checkpoint unless `model` names one."""

    models: list[Path]
    model: str | None = None
    refiner: str | None = None  # the refiner the page's switch uses
    api_key: str | None = None
    queue_size: int = 8
    outputs: Path | None = None
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS  # None: any Host header
    dtype: Any = None
    device: Any = None
    limits: Limits = field(default_factory=lambda: LIMITS)
    lora_dir: Path | None = None  # <lora:NAME:W> tags name *.safetensors files here
    vae_dir: Path | None = None  # the VAE files the sd_vae option chooses from
    embeddings_dir: Path | None = None  # listed by /sdapi/v1/embeddings
    controlnet_dir: Path | None = None  # the ControlNets units name (/controlnet/model_list)
    models_dir: Path | None = None  # rescanned by /sdapi/v1/refresh-checkpoints
    cors_allow_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any); () = none
    cmd_flags: dict[str, Any] = field(default_factory=dict)  # the command line, for /sdapi/v1/cmd-flags
    students: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (checkpoint, UNet file)


def _timestamp(seconds: float) -> str:  # the webui's job_timestamp
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds))


@dataclass
class Plan:
    """A validated generation, ready for the worker: `request` is resolved (its seed is the first image's)."""

    request: GenerationRequest
    model: str
    refiner: str | None
    n_iter: int
    save: bool
    settings: dict[str, Any] = field(default_factory=dict)  # override_settings the server keeps once queued
    vae: Path | None = None  # replaces the model's VAE (the sd_vae option)


@dataclass
class Outcome:
    images: list[Image.Image]
    params: list[dict[str, Any]]
    saved: list[str]


@contextmanager
def _unprocessable():
    """A ValueError (an invalid setting, pydantic's ValidationError) or KeyError (an unknown name) as a 422."""
    try:
        yield
    except (ValueError, KeyError) as e:
        detail = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
                           for err in e.errors()) if hasattr(e, "errors") else str(e)  # pydantic's ValidationError
        raise HTTPException(422, detail) from None


class Server:
    def __init__(self, config: ServerConfig, store: ModelStore | None = None) -> None:
        self.limits = config.limits
        self.store = store or ModelStore(config.models, dtype=config.dtype, device=config.device,
                                         students=config.students)
        mains = [e.name for e in self.store.entries.values() if not e.is_refiner]
        if not mains:
            raise ValueError("no main model: every checkpoint given is a refiner; give a base model too")
        first = config.model or mains[0]  # a named model must be there: KeyError
        if self.store.lookup(first).is_refiner:
            raise ValueError(f"{first} is a refiner: it can only take over from a base model (refiner_checkpoint)")
        self.options: dict[str, Any] = {  # webui settings (modules/shared_options.py), the SDXL ones xldm's defaults
            "sd_model_checkpoint": self.store.lookup(first).name, "samples_save": True, "samples_format": "png",
            "sdxl_crop_top": GenerationRequest.crop_top_left[0], "sdxl_crop_left": GenerationRequest.crop_top_left[1],
            "sdxl_refiner_high_aesthetic_score": GenerationRequest.aesthetic_score,
            "sdxl_refiner_low_aesthetic_score": GenerationRequest.negative_aesthetic_score,
            "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
            # more of what webui clients read (modules/shared_options.py), at the values xldm works with
            "sd_model_checkpoint_hash": None, "sd_checkpoint_hash": None, "sd_vae_as_default": True,
            "samples_filename_pattern": "", "save_to_dirs": False, "grid_save": False, "jpeg_quality": 80,
            "export_for_4chan": False, "enable_pnginfo": True, "save_txt": False, "outdir_samples": "",
            "show_progress_every_n_steps": 1, "live_previews_enable": True, "eta_ancestral": 1.0, "eta_ddim": 0.0,
            "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "sd_checkpoints_limit": 1,
            "sdxl_refiner_checkpoint": self.store.lookup(config.refiner).name if config.refiner else None,
            "img2img_fix_steps": False, "enable_emphasis": True, "comma_padding_backtrack": 0,
            "control_net_unit_count": 3,
        }
        self.options_fixed = frozenset(k for k in self.options if k not in Settings.model_fields)
        self.lora_dir, self.vae_dir, self.embeddings_dir = config.lora_dir, config.vae_dir, config.embeddings_dir
        self.loras = scan_loras(self.lora_dir)  # rescanned by /sdapi/v1/refresh-loras
        self.controlnet_dir = config.controlnet_dir
        self.controlnets = scan_controlnets(self.controlnet_dir)  # rescanned by /sdapi/v1/refresh-checkpoints
        self._controlnet_checked: set[tuple] = set()  # (model, file, size, mtime) of the ControlNets that fit
        self.cmd_flags = dict(config.cmd_flags)
        self.models_dir = config.models_dir
        self._lora_checked: set[tuple] = set()  # (model, file, size, mtime) of the files that fit
        self.refiner = self.store.lookup(config.refiner).name if config.refiner else None
        self.queue = JobQueue(config.queue_size)
        self.outputs = config.outputs.resolve() if config.outputs else None
        used = []
        if self.outputs is not None:
            self.outputs.mkdir(parents=True, exist_ok=True)
            used = [int(m.group(1)) for p in self.outputs.iterdir() if (m := _OUTPUT_NAME.match(p.name))]
        self._indices = itertools.count(max(used, default=-1) + 1)  # taken on the worker thread only

    def model_name(self, name: str, *, main: bool = False, refiner: bool = False) -> str:
        """A model's name; `main`: it must be a base model (a refiner only finishes a base model's latents),
        `refiner`: it must be a refiner."""
        try:
            entry = self.store.lookup(name)
        except KeyError:
            raise HTTPException(422, f"model {name!r} not found; see /sdapi/v1/sd-models") from None
        if main and entry.is_refiner:
            raise HTTPException(422, f"sd_model_checkpoint {entry.name!r} is a refiner: it only finishes a base "
                                     f"model's latents and makes noise from an empty start; give it as "
                                     f"refiner_checkpoint and choose a base model")
        if refiner and not entry.is_refiner:
            raise HTTPException(422, f"refiner_checkpoint {entry.name!r} is no refiner ({entry.kind})")
        return entry.name

    def model_items(self) -> list[dict[str, Any]]:
        from xldm.hashes import SHORT_HASH_LENGTH, file_sha256

        items = []
        for entry in list(self.store.entries.values()):
            file = entry.unet or entry.path  # (the bundled turbo student: its UNet file is what differs)
            sha = file_sha256(file) if file.is_file() else None  # a diffusers folder has no one file
            short = sha[:SHORT_HASH_LENGTH] if sha else None
            items.append(SDModelItem(title=f"{entry.name} [{short}]" if short else entry.name,
                                     model_name=Path(entry.name).stem, hash=short, sha256=sha, filename=entry.name,
                                     kind="refiner" if entry.is_refiner else "base").model_dump())
        return items

    def refresh_checkpoints(self) -> None:
        """--models-dir scanned again: new checkpoints registered, vanished ones dropped (but the current one);
        and the ControlNets of --controlnet-dir."""
        from xldm.serve.jobs import find_models

        if self.models_dir is not None and self.models_dir.is_dir():
            found = find_models(self.models_dir)
            for path in found:
                self.store.register(path)
            current = {self.options["sd_model_checkpoint"], self.refiner}
            for name, entry in list(self.store.entries.items()):
                if name not in current and entry.unet is None and not entry.path.exists():
                    del self.store.entries[name]
        self.controlnets = scan_controlnets(self.controlnet_dir)

    def vae_name(self, name: str) -> str:
        """An sd_vae value: "Automatic" / "None" (the model's own VAE, as A1111 `sd_vae.py` without a
        checkpoint-named VAE file), or a file name of /sdapi/v1/sd-vae."""
        if name in ("Automatic", "None"):
            return name
        path = scan_vaes(self.vae_dir).get(name)
        if path is None:
            raise HTTPException(422, f"sd_vae {name!r} not found; use 'Automatic', 'None' or a model_name from "
                                     f"/sdapi/v1/sd-vae")
        try:
            vae_latent_channels(path)
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            raise HTTPException(422, f"sd_vae {name!r}: {self.hide_folders(str(e))}") from None
        return name

    def hide_folders(self, message: str) -> str:
        """An error message with the server's folders replaced by what they are."""
        for folder, what in ((self.lora_dir, "the LoRA folder"), (self.vae_dir, "the VAE folder"),
                             (self.controlnet_dir, "the ControlNet folder")):
            if folder is not None:
                for form in {str(folder.resolve()), str(folder)}:
                    message = message.replace(form + "/", "").replace(form, what)
        return message

    def check_loras(self, plan: Plan) -> None:
        """Every `<lora:...>` file of the prompt read and checked against the model (a thread of the pool, before
        queueing): a missing name, a bad weight or a file that does not fit is a 422 naming it."""
        try:
            for use in request_loras(plan.request, self.lora_dir):  # weights checked there
                stat = use.path.stat()
                key = (plan.model, use.path.resolve(), stat.st_size, stat.st_mtime_ns)
                if key not in self._lora_checked:  # read and dropped: the worker's pipeline keeps its own copy
                    read_lora(use.path, self.store.entries[plan.model].config)
                    self._lora_checked.add(key)
        except (ValueError, OSError) as e:  # LoraError is a ValueError
            raise HTTPException(422, self.hide_folders(str(e))) from None

    def apply_settings(self, data: dict[str, Any], *targets: dict[str, Any]) -> None:
        """Validate webui settings (`Settings`) and set them in each of `targets`."""
        fixed = sorted(k for k, v in data.items() if k in self.options_fixed and v != self.options[k])
        if fixed:
            raise HTTPException(422, f"{', '.join(fixed)}: fixed in xldm (see GET /sdapi/v1/options for the values)")
        unknown = sorted(k for k in data if k not in self.options_fixed and k not in Settings.model_fields)
        if unknown:
            raise HTTPException(422, f"{', '.join(map(str, unknown))}: not a setting xldm applies; see GET "
                                     f"/sdapi/v1/options")
        data = {k: v for k, v in data.items() if k not in self.options_fixed}
        with _unprocessable():
            settings = Settings.model_validate(data)
        for key, value in settings.model_dump(exclude_none=True).items():
            value = self.model_name(value, main=True) if key == "sd_model_checkpoint" else value
            value = self.vae_name(value) if key == "sd_vae" else value
            for target in targets:
                target[key] = value

    def plan(self, body: GenerationBase, init_image: Image.Image | None = None,
             mask: Image.Image | None = None) -> Plan:
        options, keep = dict(self.options), {}
        if body.override_settings:  # kept by the server only once the job is queued (`generate`)
            self.apply_settings(body.override_settings, options,
                                *(() if body.override_settings_restore_afterwards else (keep,)))
        model = options["sd_model_checkpoint"]
        refiner = self.model_name(body.refiner_checkpoint, refiner=True) if body.refiner_checkpoint not in (None, "", "None") \
            else None
        total = body.batch_size * body.n_iter  # n_iter is the server's: resolve_request sees one batch
        seed = body.seed if body.seed != -1 else random.randint(0, MAX_SEED - total + 1)
        if seed + total - 1 > MAX_SEED:
            raise HTTPException(422, f"seed {seed} + {total} images exceeds {MAX_SEED}")

        def pair(value):
            return None if value is None else tuple(value)

        def given(value, setting: str):
            return float(options[setting] if value is None else value)

        with _unprocessable():
            sampler = resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler)
        if problems := unapplied_fields(body, sampler):
            raise HTTPException(422, f"not applied by xldm: {'; '.join(problems)}")
        with _unprocessable():
            request = resolve_request(GenerationRequest(
                prompt=parse_lora_tags(body.prompt)[0] if body.disable_extra_networks else body.prompt,
                negative_prompt=body.negative_prompt or None, width=body.width,
                height=body.height, steps=body.steps, cfg=float(body.cfg_scale), seed=seed, batch=body.batch_size,
                sampler=sampler, init_image=init_image, mask=mask,
                strength=float(body.denoising_strength) if init_image is not None else None,
                refiner_start=body.refiner_switch_at if refiner else None, original_size=pair(body.original_size),
                crop_top_left=pair(body.crop_top_left) or (options["sdxl_crop_top"], options["sdxl_crop_left"]),
                target_size=pair(body.target_size), negative_original_size=pair(body.negative_original_size),
                negative_target_size=pair(body.negative_target_size),
                aesthetic_score=given(body.aesthetic_score, "sdxl_refiner_high_aesthetic_score"),
                negative_aesthetic_score=given(body.negative_aesthetic_score, "sdxl_refiner_low_aesthetic_score"),
                **({} if body.prompt_weighting else {"long_prompts": "truncate", "weighting": False}),
                cache_interval=body.deep_cache, cache_branch=body.cache_branch, cfg_end=float(body.cfg_end),
                clip_skip=None if options["CLIP_stop_at_last_layers"] == 1 else options["CLIP_stop_at_last_layers"],
                **(body.hires_fields() if isinstance(body, Txt2ImgRequest) else {}), **sampler_fields(body, sampler),
                **({"timestep_spacing": spacing} if (spacing := scheduler_spacing(body.scheduler)) else {}),
            ), default_size=self.store.lookup(model).default_size, has_refiner=refiner is not None)
        low, high = self.limits.min_side, self.limits.max_side
        if not (low <= request.width <= high and low <= request.height <= high):  # e.g. an init image's own size
            raise HTTPException(422, f"size {request.width}x{request.height} is outside the allowed sides "
                                     f"[{low}, {high}]; give width and height to resize the image")
        target = hires.hires_target(request) if hires.hires_enabled(request) else None
        if target is not None and max(target) > high:
            raise HTTPException(422, f"hires size {target[0]}x{target[1]} is beyond the largest allowed side {high}; "
                                     "lower hr_scale or hr_resize_x / hr_resize_y")
        with _unprocessable():
            units = self.control_units(body, request.width, request.height)
        if units:
            request = replace(request, controlnets=units)
        save = bool(body.save_images and not body.do_not_save_samples and options["samples_save"])
        vae = None
        if options["sd_vae"] not in ("Automatic", "None"):
            vae = scan_vaes(self.vae_dir)[self.vae_name(options["sd_vae"])]  # still there, still a VAE
            channels, wanted = vae_latent_channels(vae), self.store.entries[model].config.latent_channels
            if channels != wanted:
                raise HTTPException(422, f"sd_vae {vae.name} makes {channels}-channel latents, the model {model} "
                                         f"takes {wanted}")
        return Plan(request, model, refiner, body.n_iter, save and self.outputs is not None, keep, vae)

    def control_units(self, body: GenerationBase, width: int, height: int) -> tuple:
        """sd-webui-controlnet's units (`alwayson_scripts.controlnet.args`) as `xldm.controlnet.ControlUnit`s on
        files of --controlnet-dir; ValueError naming the unit and what is wrong."""
        from xldm.controlnet import CANNY_DEFAULTS, ControlUnit, check_unit

        units = []
        for index, unit in body.control_units():
            where = f"alwayson_scripts.controlnet.args[{index}]"
            if problems := unit.unapplied():
                raise ValueError(f"{where}: not applied by xldm: {'; '.join(problems)}")
            module = unit.module.strip().lower()
            if module in ("none", ""):
                preprocess = None
            elif module == "canny":  # the extension's canny: threshold_a = low, threshold_b = high (-1: defaults)
                low, high = (CANNY_DEFAULTS[k] if value < 0 else int(round(value))
                             for k, value in enumerate((unit.threshold_a, unit.threshold_b)))
                preprocess = f"canny:{low},{high}"
            else:
                raise ValueError(f"{where}: module {unit.module!r} is not available; expected one of "
                                 f"{', '.join(CONTROL_MODULES)} (see /controlnet/module_list)")
            try:
                entry = find_controlnet(self.controlnets, unit.model)
            except KeyError:
                raise ValueError(f"{where}: model {unit.model!r} not found; see /controlnet/model_list") from None
            text = unit.image_text()
            if text is None:
                raise ValueError(f"{where}: no control image; send image (or input_image), base64-encoded")
            image = decode_image(text, f"{where}.image", self.limits)
            if unit.resize() == 1:
                image = crop_to_aspect(image, width, height)
            control = ControlUnit(entry.path, image, float(unit.weight), float(unit.guidance_start),
                                  float(unit.guidance_end), preprocess)
            try:
                check_unit(control, index)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            units.append(control)
        return tuple(units)

    def check_controlnets(self, plan: Plan) -> None:
        """Every unit's ControlNet read and checked against the model (a thread of the pool, before queueing):
        a file that does not fit (another base, a broken file) is a 422 naming it."""
        from xldm.weights.load import load_controlnet

        for index, unit in enumerate(plan.request.controlnets):
            path = Path(unit.model)
            try:
                stat = path.stat()
                key = (plan.model, path.resolve(), stat.st_size, stat.st_mtime_ns)
                if key not in self._controlnet_checked:  # read and dropped: the worker's pipeline loads its own
                    load_controlnet(path, self.store.entries[plan.model].config, device="cpu")
                    self._controlnet_checked.add(key)
            except (ValueError, OSError) as e:
                raise HTTPException(422, f"alwayson_scripts.controlnet.args[{index}]: ControlNet {path.name}: "
                                         f"{self.hide_folders(str(e))}") from None

    def execute(self, plan: Plan, job: Job) -> Outcome:
        folders = {name: value for name, value in (("vae", plan.vae), ("lora_dir", self.lora_dir)) if value}
        pipe = self.store.pipeline(plan.model, plan.refiner, **folders)
        try:  # fitted once per loaded VAE (kept by xldm.speedups); without one, progress has no image
            job.preview_map = model_preview_map(pipe.model)
        except (ValueError, RuntimeError) as e:
            log.warning("no progress previews for %s: %s", pipe.model.name, e)
            job.preview_map = None
        request = plan.request
        split = request.refiner_start if plan.refiner else None
        stages = {"base": (0.0, split), "refiner": (split, 1.0 - split)} if split else {"base": (0.0, 1.0)}
        if hires.hires_enabled(request):
            stages = hires.progress_stages(request, plan.refiner is not None)
        outcome = Outcome(images=[], params=[], saved=[])
        for iteration in range(plan.n_iter):
            job.begin_iteration(iteration, stages)
            try:
                result = pipe.run(replace(request, seed=request.seed + iteration * request.batch),
                                  callback=job.step_callback)
            except Interrupted:
                if job.skipped and not job.interrupted:  # /sdapi/v1/skip: on with the next batch
                    continue
                break
            for image, params in zip(result.images, result.params):
                params = dict(params, model=plan.model, **({"refiner": plan.refiner} if plan.refiner else {}))
                outcome.images.append(image)
                outcome.params.append(params)
                if plan.save:  # under --outputs only, named by the server as the webui does ("00012-SEED.png")
                    outcome.saved.append(f"{next(self._indices):05d}-{int(params['seed'])}.png")
                    save_png(image, self.outputs / outcome.saved[-1], params)
        return outcome

    async def generate(self, body: GenerationBase, init_image=None, mask=None) -> dict[str, Any]:
        if (full := self.queue.full()) is not None:  # before any work (the guard checked before the body came)
            raise HTTPException(503, str(full), headers={"Retry-After": str(full.retry_after)})
        plan = await run_in_threadpool(self.plan, body, init_image, mask)  # control images decoded there
        await run_in_threadpool(self.check_loras, plan)
        await run_in_threadpool(self.check_controlnets, plan)
        try:
            job = self.queue.submit(lambda job: self.execute(plan, job), n_iter=plan.n_iter,
                                    description="img2img" if init_image is not None else "txt2img")
        except QueueFull as e:
            raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        self.options.update(plan.settings)
        try:
            with _unprocessable():
                outcome: Outcome = await asyncio.wrap_future(job.future)
        except OutOfMemory as e:
            raise HTTPException(500, str(e)) from None
        return await run_in_threadpool(self._response, body, plan, job, outcome)

    def _response(self, body: GenerationBase, plan: Plan, job: Job, outcome: Outcome) -> dict[str, Any]:
        infotexts = [format_a1111_parameters(p) for p in outcome.params]
        images = [png_base64(img, p) for img, p in zip(outcome.images, outcome.params)] if body.send_images else []
        req = plan.request
        total = body.batch_size * body.n_iter
        info = {  # the fields of the webui's `Processed.js` (modules/processing.py), in its order
            "prompt": body.prompt, "all_prompts": [body.prompt] * total, "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * total, "seed": req.seed,
            "all_seeds": [req.seed + k for k in range(total)], "subseed": -1, "all_subseeds": [-1] * total,
            "subseed_strength": 0, "width": req.width, "height": req.height,
            "sampler_name": A1111_SAMPLER_NAMES[req.sampler], "cfg_scale": body.cfg_scale, "steps": body.steps,
            "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": Path(plan.model).stem,
            "sd_model_hash": outcome.params[0].get("model_hash") if outcome.params else None,
            "sd_vae_name": plan.vae.name if plan.vae else None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": req.hires_strength if hires.hires_enabled(req) else req.strength,
            "extra_generation_params": ({"Refiner": plan.refiner, "Refiner switch at": req.refiner_start}
                                        if plan.refiner else {}) | hires.extra_generation_params(req),
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": _timestamp(job.started_at or time.time()), "clip_skip": req.clip_skip or 1,
            "is_using_inpainting_conditioning": bool(req.mask is not None), "version": f"xldm {__version__}",
            "xldm": {"job": job.id, "queued_at": job.queued_at, "started_at": job.started_at,
                     "finished_at": job.finished_at, "interrupted": job.interrupted, "steps_done": job.steps_done,
                     "interrupt_steps_done": job.interrupt_steps_done, "images_done": len(outcome.images),
                     "saved": outcome.saved},
        }
        parameters = body.model_dump()
        if isinstance(body, Img2ImgRequest) and not body.include_init_images:
            parameters["init_images"], parameters["mask"] = None, None
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        job = self.queue.running
        if job is None or job.started_at is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState(queued=self.queue.waiting),
                                    textinfo="Waiting...").model_dump()
        progress = job.progress
        elapsed = time.time() - job.started_at
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        state = ProgressState(
            interrupted=job.interrupted, job=f"{job.description} {job.id}", job_count=job.n_iter,
            job_timestamp=_timestamp(job.started_at), job_no=job.iteration,
            sampling_step=job.step, sampling_steps=job.stage_steps, queued=self.queue.waiting)
        preview = None if skip_current_image else self.queue.preview_png(job)
        text = f"{job.stage or 'starting'}: step {job.step}/{job.stage_steps}, batch {job.iteration + 1}/{job.n_iter}"
        return ProgressResponse(progress=round(progress, 4), eta_relative=round(max(eta, 0.0), 2), state=state,
                                current_image=preview, textinfo=text, current_task=f"job {job.id}").model_dump()

    def page_config(self) -> dict[str, Any]:
        """What the page needs: the aspect buckets scaled to the current model's native size, and more."""
        entry = self.store.entries[self.options["sd_model_checkpoint"]]
        sizes = [list(size) for size in scaled_buckets(entry.default_size)]
        return {
            "version": __version__, "model": entry.name,
            "models": [e.name for e in self.store.entries.values() if not e.is_refiner],
            "refiners": [e.name for e in self.store.entries.values() if e.is_refiner],
            "refiner": self.refiner, "default_size": [entry.default_size, entry.default_size], "sizes": sizes,
            "samplers": [A1111_SAMPLER_NAMES[s] for s in SAMPLER_NAMES], "outputs": self.outputs is not None,
            "defaults": {"sampler": A1111_SAMPLER_NAMES[GENERATE_DEFAULTS["sampler"]],
                         "steps": GENERATE_DEFAULTS["steps"], "cfg_scale": GENERATE_DEFAULTS["cfg"]},
            "limits": {name: getattr(self.limits, name)
                       for name in ("max_steps", "max_batch_size", "max_n_iter", "max_cfg", "max_prompt_chars")},
        }


CONTROL_MODULES = ("none", "canny")
# sd-webui-controlnet's `module_detail` shape (its api.py / preprocessor sliders); canny's thresholds are its
# threshold_a / threshold_b, OpenCV's defaults of the diffusers ControlNet docs (xldm.controlnet.CANNY_DEFAULTS)
CONTROL_MODULE_DETAIL = {
    "none": {"model_free": False, "sliders": []},
    "canny": {"model_free": False, "sliders": [
        {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]},
}


def _proc_meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux); {} elsewhere."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    info = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return info


def memory_report() -> dict[str, Any]:
    """A1111 `api.py` get_memory's shape: ram {free, used (this process), total} and cuda {system, active,
    allocated, reserved, inactive, events} or cuda {error}."""
    import resource

    import torch

    info = _proc_meminfo()
    used = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                used = int(line.split()[1]) * 1024
    except OSError:
        pass
    if used is None:  # peak, in KiB on Linux (getrusage(2))
        used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ram = {"free": info.get("MemAvailable", info.get("MemFree")), "used": used, "total": info.get("MemTotal")}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "CUDA is not available"}}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {"ram": ram, "cuda": {
        "system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}}


def crop_to_aspect(image: Image.Image, width: int, height: int) -> Image.Image:
    """The centre of `image` with the aspect of width x height (sd-webui-controlnet's "Crop and Resize"; the
    pipeline then resizes it to the output size)."""
    w, h = image.size
    if w * height > h * width:  # wider than the output: crop the sides
        new_w = max(1, round(h * width / height))
        left = (w - new_w) // 2
        return image.crop((left, 0, left + new_w, h))
    new_h = max(1, round(w * height / width))
    top = (h - new_h) // 2
    return image.crop((0, top, w, top + new_h))


def decode_or_422(text: str | None, what: str, limits: Limits) -> Image.Image | None:
    if text is None:
        return None
    with _unprocessable():
        return decode_image(text, what, limits)

