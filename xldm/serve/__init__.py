"""`xldm serve`: AUTOMATIC1111's HTTP API (`/sdapi/v1/*`) and a web page (`static/`, no external resources), over
xldm's pipeline: the routes (`app`), the guard in front of them (`guard`), the server behind them (`server`), its
job queue and models (`jobs`), the request bodies (`schemas`), the command (`cli`).  Needs the `serve` extra
(`pip install xldm[serve]`): FastAPI, uvicorn."""

__all__ = ["create_app", "ServerConfig"]


def __getattr__(name: str):
    # Lazy, so that `xldm.serve.cli` (hooked into the `xldm` command) loads without FastAPI installed.
    if name in __all__:
        from xldm.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'xldm.serve' has no attribute {name!r}")
