"""The ASGI guard in front of the API (`RequestGuard`): host, origin, API key and body checks before any route.

Guards, outermost first (`RequestGuard`):
  1. Host: when listening on loopback, only `Host: 127.0.0.1 | localhost | [::1]` (or the address listened on) is
     served (no DNS rebinding);
  2. Origin: a browser request from another origin is refused (403): no web page uses the API behind a user's back,
     unless `--cors-allow-origins` lists that origin (CORS, Starlette's CORSMiddleware, answers its preflight);
  3. API key (when set): `Authorization: Bearer KEY`, or HTTP Basic with any user name and KEY as the password
     (the webui's `--api-auth` clients; browsers ask for it on the 401's Basic challenge);
  4. body: a generation while the queue is full is 503 before its body is read; more than `max_body_bytes` is 413,
     a body not arriving within `BODY_TIMEOUT` s is 408; JSON with NaN/Infinity, or that does not parse, is 400."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

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
                 queue_full: Callable[[], Exception | None] = lambda: None, body_timeout: float = BODY_TIMEOUT,
                 allowed_origins: tuple[str, ...] = ()) -> None:
        self.app, self.api_key, self.allowed_hosts, self.max_body = app, api_key, allowed_hosts, max_body
        self.queue_full, self.body_timeout = queue_full, body_timeout  # queue_full: a QueueFull, or None
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _host_only(host) not in self.allowed_hosts:
            return await _reply(scope, receive, send, 403, "this server answers to its loopback address only")
        origin = headers.get("origin")
        cross_origin = origin is not None and origin.split("://", 1)[-1].rstrip("/").lower() != host.lower()
        if cross_origin and not ({"*", origin.rstrip("/").lower()} & self.allowed_origins):
            return await _reply(scope, receive, send, 403, "cross-origin requests are refused (see "
                                                           "--cors-allow-origins)")
        if cross_origin and scope["method"] == "OPTIONS":  # a CORS preflight: answered by CORSMiddleware, no key
            return await self.app(scope, receive, send)
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

