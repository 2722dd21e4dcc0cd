"""The ASGI app: AUTOMATIC1111's `/sdapi/v1/*` API over xldm's pipeline, and the web page at `/`.

Routes (webui shapes, `modules/api/api.py`): POST `txt2img`, `img2img`, `png-info`, `interrupt`; GET `progress`,
`sd-models`, `samplers`, `sd-vae`, `embeddings`; GET/POST `options`; the Lora extension's GET `loras` and POST
`refresh-loras` (`extensions-builtin/Lora/lora_script.py`).  `<lora:NAME:WEIGHT>` prompt tags name files of
`--lora-dir`; a missing or unfitting file is a 422 before the job is queued.  Options `sd_vae` and
`CLIP_stop_at_last_layers` (clip skip) apply to later generations, or to one through `override_settings`.
xldm's own: GET `/xldm/v1/config` (what the page needs), `/` and `/static/*` (the page), `/openapi.json`; FastAPI's
`/docs` pages are off (they load from a CDN).

Semantics as in the webui: `seed` -1 = random; `n_iter` batches of `batch_size` images; image k (over all batches)
uses `seed + k`, so any image is made again alone from its recorded seed; prompts use the webui's "(word:1.2)"
weighting, BREAK and 75-token chunks unless `prompt_weighting` is false; sampler, steps and CFG scale default to
`xldm.config.GENERATE_DEFAULTS`: the same pixels as `xldm generate` and the Python API with the same settings.

Guards, outermost first (`RequestGuard`):
  1. Host: when listening on loopback, only `Host: 127.0.0.1 | localhost | [::1]` (or the address listened on) is
     served (no DNS rebinding);
  2. Origin: a browser request from another origin is refused (403): no web page uses the API behind a user's back;
  3. API key (when set): `Authorization: Bearer KEY`, or HTTP Basic with any user name and KEY as the password
     (the webui's `--api-auth` clients; browsers ask for it on the 401's Basic challenge);
  4. body: a generation while the queue is full is 503 before its body is read; more than `max_body_bytes` is 413,
     a body not arriving within `BODY_TIMEOUT` s is 408; JSON with NaN/Infinity, or that does not parse, is 400.
Then each field's type and range (schemas.py), and the request as the pipeline resolves it
(`xldm.pipeline.resolve_request`), are checked before any work: 422."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool

from xldm import __version__
from xldm.buckets import scaled_buckets
from xldm.config import GENERATE_DEFAULTS
from xldm.diffusion.schedules import SAMPLER_NAMES
from xldm.lora import parse_lora_tags, read_lora
from xldm.pipeline import MAX_SEED, GenerationRequest, Interrupted, request_loras, resolve_request
from xldm.pngmeta import (A1111_CHUNK, A1111_SAMPLER_NAMES, format_a1111_parameters, image_text,
                          parse_a1111_parameters, save_png)
from xldm.serve.jobs import Job, JobQueue, ModelStore, OutOfMemory, QueueFull
from xldm import hires
from xldm.serve.schemas import LatentUpscalerModeItem, UpscalerItem
from xldm.serve.networks import list_embeddings, scan_loras, scan_vaes, vae_latent_channels
from xldm.serve.schemas import (
    LIMITS, GenerationBase, GenerationResponse, Img2ImgRequest, Limits, LoraItem, PngInfoRequest, PngInfoResponse,
    ProgressResponse, ProgressState, SamplerItem, SDModelItem, SDVaeItem, Settings, Txt2ImgRequest, decode_image,
    png_base64, resolve_sampler, sampler_aliases,
)

log = logging.getLogger("xldm.serve")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
STATIC_DIR = Path(str(resources.files("xldm.serve") / "static"))
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
    students: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (checkpoint, UNet file)


def _timestamp(seconds: float) -> str:  # the webui's job_timestamp
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _host_only(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:7860
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


MAX_JSON_DEPTH = 64
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive, each part
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def _json_problem(value: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why a parsed JSON body is refused (nested too deep, a string that is no valid UTF-8), or None."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone surrogate (\\ud800-\\udfff), not valid UTF-8"
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


class RequestGuard:
    """Pure ASGI middleware: host, origin, API key and body checks before the app sees a request."""

    def __init__(self, app, *, api_key: str | None, allowed_hosts: frozenset[str] | None, max_body: int,
                 queue_full: Callable[[], Exception | None] = lambda: None, body_timeout: float = BODY_TIMEOUT) -> None:
        self.app, self.api_key, self.allowed_hosts, self.max_body = app, api_key, allowed_hosts, max_body
        self.queue_full, self.body_timeout = queue_full, body_timeout  # queue_full: a QueueFull, or None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _host_only(host) not in self.allowed_hosts:
            return await _reply(scope, receive, send, 403, "this server answers to its loopback address only")
        origin = headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1].rstrip("/").lower() != host.lower():
            return await _reply(scope, receive, send, 403, "cross-origin requests are refused")
        if self.api_key is not None and not self._authorized(headers.get("authorization", "")):
            return await _reply(scope, receive, send, 401, "missing or wrong API key",
                                {"WWW-Authenticate": 'Basic realm="xldm", charset="UTF-8"'})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared, too_big = headers.get("content-length", "0"), f"the body is over {self.max_body} bytes"
            if not declared.isdigit() or int(declared) > self.max_body:
                return await _reply(scope, receive, send, 413, too_big)
            if scope["path"] in GENERATION_PATHS and (full := self.queue_full()) is not None:  # before the body
                return await _reply(scope, receive, send, 503, str(full), {"Retry-After": str(full.retry_after)})
            body = bytearray()
            while True:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:
                    return await _reply(scope, receive, send, 408,
                                        f"the request body did not arrive within {self.body_timeout:g} s")
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > self.max_body:
                    return await _reply(scope, receive, send, 413, too_big)
                if not message.get("more_body", False):
                    break
            content_type = headers.get("content-type", "")
            if body and ("json" in content_type or not content_type):
                try:
                    parsed = json.loads(body, parse_constant=_refuse_constant)
                except (ValueError, RecursionError) as e:
                    return await _reply(scope, receive, send, 400, f"malformed JSON: {str(e)[:200]}")
                if (problem := _json_problem(parsed)) is not None:
                    return await _reply(scope, receive, send, 400, f"malformed JSON: {problem}")
            unread = [{"type": "http.request", "body": bytes(body), "more_body": False}]

            async def replay():  # the body once, then whatever the server sends next (a disconnect)
                return unread.pop() if unread else await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    def _authorized(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        return hmac.compare_digest(given.encode(), self.api_key.encode())


async def _reply(scope, receive, send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


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
        first = config.model or next(iter(self.store.entries))  # a named model must be there: KeyError
        self.options: dict[str, Any] = {  # webui settings (modules/shared_options.py), the SDXL ones xldm's defaults
            "sd_model_checkpoint": self.store.lookup(first).name, "samples_save": True, "samples_format": "png",
            "sdxl_crop_top": GenerationRequest.crop_top_left[0], "sdxl_crop_left": GenerationRequest.crop_top_left[1],
            "sdxl_refiner_high_aesthetic_score": GenerationRequest.aesthetic_score,
            "sdxl_refiner_low_aesthetic_score": GenerationRequest.negative_aesthetic_score,
            "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
        }
        self.lora_dir, self.vae_dir, self.embeddings_dir = config.lora_dir, config.vae_dir, config.embeddings_dir
        self.loras = scan_loras(self.lora_dir)  # rescanned by /sdapi/v1/refresh-loras
        self._lora_checked: set[tuple] = set()  # (model, file, size, mtime) of the files that fit
        self.refiner = self.store.lookup(config.refiner).name if config.refiner else None
        self.queue = JobQueue(config.queue_size)
        self.outputs = config.outputs.resolve() if config.outputs else None
        used = []
        if self.outputs is not None:
            self.outputs.mkdir(parents=True, exist_ok=True)
            used = [int(m.group(1)) for p in self.outputs.iterdir() if (m := _OUTPUT_NAME.match(p.name))]
        self._indices = itertools.count(max(used, default=-1) + 1)  # taken on the worker thread only

    def model_name(self, name: str) -> str:
        try:
            return self.store.lookup(name).name
        except KeyError:
            raise HTTPException(422, f"model {name!r} not found; see /sdapi/v1/sd-models") from None

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
        for folder, what in ((self.lora_dir, "the LoRA folder"), (self.vae_dir, "the VAE folder")):
            if folder is not None:
                for form in {str(folder.resolve()), str(folder)}:
                    message = message.replace(form + "/", "").replace(form, what)
        return message

    def check_loras(self, plan: Plan) -> None:
        """Every `<lora:...>` file of the prompt read and checked against the model (a thread of the pool, before
        queueing): a missing name, a bad weight or a file that does not fit is a 422 naming it."""
        try:
            for use in request_loras(plan.request, self.lora_dir):
                if not all(math.isfinite(w) for w in (use.weight, use.text_weight or 0.0)):
                    raise ValueError(f"<lora:{use.path.stem}>: weights must be finite numbers")
                stat = use.path.stat()
                key = (plan.model, use.path.resolve(), stat.st_size, stat.st_mtime_ns)
                if key not in self._lora_checked:  # read and dropped: the worker's pipeline keeps its own copy
                    read_lora(use.path, self.store.entries[plan.model].config)
                    self._lora_checked.add(key)
        except (ValueError, OSError) as e:  # LoraError is a ValueError
            raise HTTPException(422, self.hide_folders(str(e))) from None

    def apply_settings(self, data: dict[str, Any], *targets: dict[str, Any]) -> None:
        """Validate webui settings (`Settings`) and set them in each of `targets`."""
        with _unprocessable():
            settings = Settings.model_validate(data)
        for key, value in settings.model_dump(exclude_none=True).items():
            value = self.model_name(value) if key == "sd_model_checkpoint" else value
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
        refiner = self.model_name(body.refiner_checkpoint) if body.refiner_checkpoint not in (None, "", "None") \
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
            request = resolve_request(GenerationRequest(
                prompt=parse_lora_tags(body.prompt)[0] if body.disable_extra_networks else body.prompt,
                negative_prompt=body.negative_prompt or None, width=body.width,
                height=body.height, steps=body.steps, cfg=float(body.cfg_scale), seed=seed, batch=body.batch_size,
                sampler=resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler),
                init_image=init_image, mask=mask,
                strength=float(body.denoising_strength) if init_image is not None else None,
                refiner_start=body.refiner_switch_at if refiner else None, original_size=pair(body.original_size),
                crop_top_left=pair(body.crop_top_left) or (options["sdxl_crop_top"], options["sdxl_crop_left"]),
                target_size=pair(body.target_size), negative_original_size=pair(body.negative_original_size),
                negative_target_size=pair(body.negative_target_size),
                aesthetic_score=given(body.aesthetic_score, "sdxl_refiner_high_aesthetic_score"),
                negative_aesthetic_score=given(body.negative_aesthetic_score, "sdxl_refiner_low_aesthetic_score"),
                **({} if body.prompt_weighting else {"long_prompts": "truncate", "weighting": False}),
                clip_skip=None if options["CLIP_stop_at_last_layers"] == 1 else options["CLIP_stop_at_last_layers"],
                **(body.hires_fields() if isinstance(body, Txt2ImgRequest) else {}),
            ), default_size=self.store.lookup(model).default_size, has_refiner=refiner is not None)
        low, high = self.limits.min_side, self.limits.max_side
        if not (low <= request.width <= high and low <= request.height <= high):  # e.g. an init image's own size
            raise HTTPException(422, f"size {request.width}x{request.height} is outside the allowed sides "
                                     f"[{low}, {high}]; give width and height to resize the image")
        if hires.hires_enabled(request) and max(hires.hires_target(request)) > high:
            raise HTTPException(422, "hires size {}x{} is beyond the largest allowed side {}; lower hr_scale or "
                                     "hr_resize_x / hr_resize_y".format(*hires.hires_target(request), high))
        save = bool(body.save_images and not body.do_not_save_samples and options["samples_save"])
        vae = None
        if options["sd_vae"] not in ("Automatic", "None"):
            vae = scan_vaes(self.vae_dir)[self.vae_name(options["sd_vae"])]  # still there, still a VAE
            channels, wanted = vae_latent_channels(vae), self.store.entries[model].config.latent_channels
            if channels != wanted:
                raise HTTPException(422, f"sd_vae {vae.name} makes {channels}-channel latents, the model {model} "
                                         f"takes {wanted}")
        return Plan(request, model, refiner, body.n_iter, save and self.outputs is not None, keep, vae)

    def execute(self, plan: Plan, job: Job) -> Outcome:
        folders = {name: value for name, value in (("vae", plan.vae), ("lora_dir", self.lora_dir)) if value}
        pipe = self.store.pipeline(plan.model, plan.refiner, **folders)
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
        plan = self.plan(body, init_image, mask)
        await run_in_threadpool(self.check_loras, plan)
        try:
            job = self.queue.submit(lambda job: self.execute(plan, job), n_iter=plan.n_iter,
                                    description="img2img" if init_image is not None else "txt2img",
                                    preview_kind=self.store.entries[plan.model].kind)
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


def _decode(text: str | None, what: str, limits: Limits) -> Image.Image | None:
    if text is None:
        return None
    with _unprocessable():
        return decode_image(text, what, limits)


def create_app(config: ServerConfig, store: ModelStore | None = None) -> FastAPI:
    server = Server(config, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(server.queue.stop)  # waiting jobs fail, the running one is interrupted

    app = FastAPI(title="xldm", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Stable Diffusion XL with AUTOMATIC1111's /sdapi/v1 API (see xldm/serve/app.py)")
    app.state.server = server
    app.add_middleware(RequestGuard, api_key=config.api_key, allowed_hosts=config.allowed_hosts,
                       max_body=config.limits.max_body_bytes, queue_full=server.queue.full)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The errors without their "input" (which may be a 20 MB image) and without exception objects.
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse, tags=["sdapi"])
    async def txt2img(body: Txt2ImgRequest) -> dict[str, Any]:
        """Text to image; webui semantics (seed -1 = random, n_iter x batch_size images)."""
        return await server.generate(body)

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse, tags=["sdapi"])
    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        """Image to image (SDEdit) and, with `mask`, inpainting (white = repaint)."""
        init = await run_in_threadpool(_decode, body.init_images[0], "init_images[0]", server.limits)
        mask = await run_in_threadpool(_decode, body.mask, "mask", server.limits)
        if mask is not None and body.inpainting_mask_invert:
            mask = ImageOps.invert(mask.convert("L"))
        return await server.generate(body, init, mask)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=["sdapi"])
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        """The running job: progress 0..1, eta_relative seconds, state, and a cheap preview (base64 PNG)."""
        return await run_in_threadpool(server.progress, skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    async def interrupt() -> dict[str, Any]:
        """Stop the running job after its current sampler step."""
        server.queue.interrupt()
        return {}

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], tags=["sdapi"])
    async def sd_models() -> list[dict[str, Any]]:
        return [SDModelItem(title=e.name, model_name=Path(e.name).stem, filename=e.name).model_dump()
                for e in server.store.entries.values()]

    @app.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem], tags=["sdapi"])
    async def upscalers() -> list[dict[str, Any]]:
        return hires.upscaler_items()

    @app.get("/sdapi/v1/latent-upscale-modes", response_model=list[LatentUpscalerModeItem], tags=["sdapi"])
    async def latent_upscale_modes() -> list[dict[str, Any]]:
        return hires.latent_mode_items()

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem], tags=["sdapi"])
    async def samplers() -> list[dict[str, Any]]:
        return [SamplerItem(name=A1111_SAMPLER_NAMES[s], aliases=sampler_aliases(s)).model_dump()
                for s in SAMPLER_NAMES]

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def get_options() -> dict[str, Any]:
        return dict(server.options)

    @app.post("/sdapi/v1/options", tags=["sdapi"])
    async def set_options(body: dict[str, Any]) -> None:
        """Change settings; `sd_model_checkpoint` takes a name from /sdapi/v1/sd-models (loaded on next use)."""
        server.apply_settings(body, server.options)

    @app.get("/sdapi/v1/sd-vae", response_model=list[SDVaeItem], tags=["sdapi"])
    async def sd_vae() -> list[dict[str, Any]]:
        """The VAE files of --vae-dir; a model_name is a value of the sd_vae option."""
        return [SDVaeItem(model_name=name, filename=name).model_dump() for name in scan_vaes(server.vae_dir)]

    @app.get("/sdapi/v1/loras", response_model=list[LoraItem], tags=["sdapi"])
    async def loras() -> list[dict[str, Any]]:
        """The LoRA files of --lora-dir as last scanned (A1111's Lora extension), with their safetensors metadata."""
        return [entry.api_json() for entry in server.loras.values()]

    @app.post("/sdapi/v1/refresh-loras", tags=["sdapi"])
    async def refresh_loras() -> None:
        """Scan --lora-dir again."""
        server.loras = await run_in_threadpool(scan_loras, server.lora_dir)

    @app.get("/sdapi/v1/embeddings", tags=["sdapi"])
    async def embeddings() -> dict[str, Any]:
        """The embedding files of --embeddings-dir, their shapes read from the safetensors header."""
        return await run_in_threadpool(list_embeddings, server.embeddings_dir)

    @app.post("/sdapi/v1/png-info", response_model=PngInfoResponse, tags=["sdapi"])
    async def png_info(body: PngInfoRequest) -> dict[str, Any]:
        """The generation parameters stored in an image (the webui's `parameters` PNG text chunk, or the EXIF
        UserComment of a JPEG / WebP)."""
        image = await run_in_threadpool(_decode, body.image, "image", server.limits)
        chunks = image_text(image)
        text = chunks.pop(A1111_CHUNK, "")
        parameters: dict[str, Any] = parse_a1111_parameters(text) if text else {}
        if "Size" in parameters and "x" in parameters["Size"]:  # the webui also splits the size
            parameters["Size-1"], parameters["Size-2"] = parameters["Size"].split("x", 1)
        return {"info": text, "items": chunks, "parameters": parameters}

    @app.get("/xldm/v1/config", tags=["xldm"])
    async def page_config() -> dict[str, Any]:
        return server.page_config()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=False), name="static")
    return app
