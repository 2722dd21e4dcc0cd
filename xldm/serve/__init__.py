"""`xldm serve`: AUTOMATIC1111's HTTP API (`/sdapi/v1/*`) and a web page, over xldm's pipeline.

    app.py      the ASGI app: routes, the request guard (host, origin, API key, body), webui response shapes
    jobs.py     the bounded FIFO queue, its one worker thread, progress and preview, interrupt, the model store
    schemas.py  request/response bodies with the webui's field names, and every bound
    cli.py      the `xldm serve` command
    static/     the page at `/`: plain HTML, CSS and JavaScript, no external resources

Needs the `serve` extra (`pip install xldm[serve]`): FastAPI, uvicorn.
"""

__all__ = ["create_app", "ServerConfig"]


def __getattr__(name: str):
    # Lazy, so that `xldm.serve.cli` (hooked into the `xldm` command) loads without FastAPI installed.
    if name in __all__:
        from xldm.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'xldm.serve' has no attribute {name!r}")
