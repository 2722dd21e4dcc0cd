"""The ASGI app: AUTOMATIC1111's `/sdapi/v1/*` API over xldm's pipeline, and the web page at `/`.

Routes (webui shapes, `modules/api/api.py`): POST `txt2img`, `img2img`, `png-info`, `interrupt`, `skip`,
`refresh-checkpoints`, `extra-single-image` (refused: xldm has no upscalers of its own); GET `progress`,
`sd-models`, `samplers`, `schedulers`, `sd-vae`, `embeddings`, `memory`, `cmd-flags`; GET/POST `options`; the Lora
extension's GET `loras` and POST `refresh-loras` (`extensions-builtin/Lora/lora_script.py`); sd-webui-controlnet's
GET `/controlnet/model_list`, `/controlnet/module_list`, `/controlnet/version` and its units in
`alwayson_scripts.controlnet.args` (`--controlnet-dir`).  `<lora:NAME:WEIGHT>` prompt tags name files of
`--lora-dir`, units name files of `--controlnet-dir`; a missing or unfitting file is a 422 before the job is
queued.  Options `sd_vae` and `CLIP_stop_at_last_layers` (clip skip) apply to later generations, or to one through
`override_settings`; a refiner is never the main model (`sd_model_checkpoint` naming one is a 422).  xldm's own:
GET `/xldm/v1/config` (what the page needs), `/` and `/static/*` (the page), `/openapi.json`, and `/docs`: a plain
list of the routes built from the OpenAPI schema (FastAPI's Swagger page loads scripts from a CDN, so it is off).

Semantics as in the webui: `seed` -1 = random; `n_iter` batches of `batch_size` images; image k (over all batches)
uses `seed + k`, so any image is made again alone from its recorded seed; prompts use the webui's "(word:1.2)"
weighting, BREAK and 75-token chunks unless `prompt_weighting` is false; sampler, steps and CFG scale default to
`xldm.config.GENERATE_DEFAULTS`: the same pixels as `xldm generate` and the Python API with the same settings.

The guards in front of the routes: `xldm.serve.guard`; the server behind them: `xldm.serve.server`.
Each field's type and range (schemas.py), and the request as the pipeline resolves it
(`xldm.pipeline.resolve_request`), are checked before any work: 422."""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import ImageOps
from starlette.concurrency import run_in_threadpool

from xldm import __version__, hires
from xldm.diffusion.schedules import SAMPLER_NAMES
from xldm.pngmeta import (
    A1111_CHUNK,
    A1111_SAMPLER_NAMES,
    image_text,
    parse_a1111_parameters,
)
from xldm.serve.guard import RequestGuard
from xldm.serve.jobs import ModelStore
from xldm.serve.networks import (
    list_embeddings,
    scan_controlnets,
    scan_loras,
    scan_vaes,
)
from xldm.serve.schemas import (
    GenerationResponse,
    Img2ImgRequest,
    LatentUpscalerModeItem,
    LoraItem,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    SamplerItem,
    SDModelItem,
    SDVaeItem,
    Txt2ImgRequest,
    UpscalerItem,
    sampler_aliases,
    sampler_options,
)
from xldm.serve.server import (CONTROL_MODULE_DETAIL, CONTROL_MODULES, Server, ServerConfig, decode_or_422,
                               memory_report)


STATIC_DIR = Path(str(resources.files("xldm.serve") / "static"))

def routes_page(spec: dict[str, Any]) -> str:
    """A plain HTML list of the API's routes (method, path, summary) and a link to /openapi.json."""
    from html import escape

    rows = []
    for path, methods in sorted(spec.get("paths", {}).items()):
        for method, op in methods.items():
            text = op.get("description") or op.get("summary") or ""
            rows.append(f"<tr><td>{escape(method.upper())}</td><td><code>{escape(path)}</code></td>"
                        f"<td>{escape(text.splitlines()[0] if text else '')}</td></tr>")
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>xldm API</title></head><body>"
            f"<h1>xldm {escape(str(spec.get('info', {}).get('version', '')))} API</h1>"
            "<p>The full schema: <a href=\"/openapi.json\">/openapi.json</a>.</p>"
            "<table><tr><th>Method</th><th>Path</th><th>What it does</th></tr>" + "".join(rows) +
            "</table></body></html>")


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
                       max_body=config.limits.max_body_bytes, queue_full=server.queue.full,
                       allowed_origins=tuple(config.cors_allow_origins))
    if config.cors_allow_origins:  # outermost: answers preflights, adds the CORS headers to every answer
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in config.cors_allow_origins)

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
        init = await run_in_threadpool(decode_or_422, body.init_images[0], "init_images[0]", server.limits)
        mask = await run_in_threadpool(decode_or_422, body.mask, "mask", server.limits)
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

    @app.post("/sdapi/v1/skip", tags=["sdapi"])
    async def skip() -> dict[str, Any]:
        """Drop the running job's current image batch after its current step; it goes on with the next."""
        server.queue.skip()
        return {}

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], tags=["sdapi"])
    async def sd_models() -> list[dict[str, Any]]:
        """The checkpoints, with A1111's title "file [sha256[:10]]" and the file's SHA-256 (xldm.hashes, cached);
        `kind` says which are refiners (usable as refiner_checkpoint only, never as sd_model_checkpoint)."""
        return await run_in_threadpool(server.model_items)

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["sdapi"])
    async def refresh_checkpoints() -> None:
        """Scan --models-dir and --controlnet-dir again (files added are offered, files gone are dropped)."""
        await run_in_threadpool(server.refresh_checkpoints)

    @app.get("/sdapi/v1/schedulers", tags=["sdapi"])
    async def schedulers() -> list[dict[str, Any]]:
        """The noise schedules the `scheduler` field takes (A1111 >= 1.9 `modules/sd_schedulers.py` shape)."""
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,  # Karras et al. 2022
                 "need_inner_model": False},
                {"name": "sgm_uniform", "label": "SGM Uniform", "aliases": ["SGMUniform"], "default_rho": -1,
                 "need_inner_model": True}]  # = diffusers' "trailing" timestep spacing

    @app.get("/sdapi/v1/memory", tags=["sdapi"])
    async def memory() -> dict[str, Any]:
        """RAM (this process and the machine, from /proc) and CUDA memory (torch.cuda), in A1111's shape."""
        return await run_in_threadpool(memory_report)

    @app.get("/sdapi/v1/cmd-flags", tags=["sdapi"])
    async def cmd_flags() -> dict[str, Any]:
        """The `xldm serve` options it was started with; folders and files show only whether they were given,
        the API key never."""
        return dict(server.cmd_flags)

    @app.post("/sdapi/v1/extra-single-image", tags=["sdapi"])
    async def extra_single_image(request: Request) -> None:
        """Not available: xldm has no upscaler or face-restoration models for the webui's "Extras"."""
        raise HTTPException(422, "extras (upscaling, face restoration) are not available in xldm: it has no "
                                 "upscaler models; to make a larger image, run img2img with a larger width/height")

    @app.post("/sdapi/v1/extra-batch-images", tags=["sdapi"])
    async def extra_batch_images(request: Request) -> None:
        """Not available (see extra-single-image)."""
        raise HTTPException(422, "extras (upscaling, face restoration) are not available in xldm: it has no "
                                 "upscaler models")

    @app.get("/sdapi/v1/face-restorers", tags=["sdapi"])
    async def face_restorers() -> list[dict[str, Any]]:
        return []  # none: restore_faces is refused

    @app.get("/sdapi/v1/prompt-styles", tags=["sdapi"])
    async def prompt_styles() -> list[dict[str, Any]]:
        return []  # none: only styles [] is accepted

    @app.get("/sdapi/v1/hypernetworks", tags=["sdapi"])
    async def hypernetworks() -> list[dict[str, Any]]:
        return []  # xldm loads no hypernetworks

    @app.get("/sdapi/v1/scripts", tags=["sdapi"])
    async def scripts() -> dict[str, Any]:
        return {"txt2img": [], "img2img": []}  # no scripts; the ControlNet extension is an always-on script

    @app.get("/controlnet/version", tags=["controlnet"])
    async def controlnet_version() -> dict[str, Any]:
        """sd-webui-controlnet's API version (its `api.py` answers {"version": 2})."""
        return {"version": 2}

    @app.get("/controlnet/model_list", tags=["controlnet"])
    async def controlnet_model_list(update: bool = True) -> dict[str, Any]:
        """The ControlNets of --controlnet-dir as "name [hash]" (sd-webui-controlnet's names); `update` rescans."""
        if update:
            server.controlnets = await run_in_threadpool(scan_controlnets, server.controlnet_dir)
        return {"model_list": [entry.title for entry in server.controlnets.values()]}

    @app.get("/controlnet/module_list", tags=["controlnet"])
    async def controlnet_module_list(alias_names: bool = False) -> dict[str, Any]:
        """The preprocessors: "none" (the image is the control map) and "canny" (OpenCV; threshold_a / b)."""
        return {"module_list": list(CONTROL_MODULES), "module_detail": CONTROL_MODULE_DETAIL}

    @app.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem], tags=["sdapi"])
    async def upscalers() -> list[dict[str, Any]]:
        return hires.upscaler_items()

    @app.get("/sdapi/v1/latent-upscale-modes", response_model=list[LatentUpscalerModeItem], tags=["sdapi"])
    async def latent_upscale_modes() -> list[dict[str, Any]]:
        return hires.latent_mode_items()

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem], tags=["sdapi"])
    async def samplers() -> list[dict[str, Any]]:
        return [SamplerItem(name=A1111_SAMPLER_NAMES[s], aliases=sampler_aliases(s),
                            options=sampler_options(s)).model_dump()
                for s in SAMPLER_NAMES]

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def get_options() -> dict[str, Any]:
        return dict(server.options)

    @app.post("/sdapi/v1/options", tags=["sdapi"])
    async def set_options(body: dict[str, Any]) -> None:
        """Change settings; `sd_model_checkpoint` takes a base model's name from /sdapi/v1/sd-models (loaded on next
        use; a refiner is refused).  The other settings GET shows are fixed: sending another value is a 422."""
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
        image = await run_in_threadpool(decode_or_422, body.image, "image", server.limits)
        chunks = image_text(image)
        text = chunks.pop(A1111_CHUNK, "")
        parameters: dict[str, Any] = parse_a1111_parameters(text) if text else {}
        if "Size" in parameters and "x" in parameters["Size"]:  # the webui also splits the size
            parameters["Size-1"], parameters["Size-2"] = parameters["Size"].split("x", 1)
        return {"info": text, "items": chunks, "parameters": parameters}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The routes, from the OpenAPI schema, as a page with no scripts and no external resources."""
        return HTMLResponse(routes_page(app.openapi()))

    @app.get("/xldm/v1/config", tags=["xldm"])
    async def page_config() -> dict[str, Any]:
        return server.page_config()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=False), name="static")
    return app
