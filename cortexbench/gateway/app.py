"""The gateway's FastAPI app: the v2 protocol, ``/v1/models/{name}:predict``, ``/metrics``.

``make_app(gateway, ...)`` builds it; ``cortexbench.serve`` runs it under uvicorn.  What it guarantees:

- bad input is never a 500: an unknown model 404, a body that cannot be read 400, one that does not fit the
  model 422 (``v2.parse_infer``), an image that does not decode 422, each with a JSON ``{"error": ...}``;
- a body larger than ``max_body_bytes`` is answered 413 as soon as its Content-Length says so, or as soon
  as that many bytes have come (a chunked body), never read whole;
- with a ``token``, inference calls need ``Authorization: Bearer <token>`` (compared in constant time; 401);
- a worker that failed, was lost or did not answer in time: 503 with Retry-After; so is a request over the
  ``max_inflight`` bound (back-pressure) and any request before the workers are ready;
- every request is counted by method, route and status code (``/metrics``, with the stream's per-image
  metrics from the gateway's ``MetricsState``).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cortexbench import __version__
from cortexbench.errors import ImageDecodeError, RequestError, WorkerError
from cortexbench.gateway.pool import Gateway
from cortexbench.gateway.v2 import HEADER, ModelInfo, encode_infer, parse_infer, top_k
from cortexbench.metrics_http import exposition

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                           "datatype": {"type": "string"},
                           "parameters": {"type": "object"},
                           "data": {"type": "array"}}}},
        "parameters": {"type": "object"}, "outputs": {"type": "array"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}}}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": why, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
    for code, why in ((400, "a body that cannot be read"), (401, "no or wrong bearer token"),
                      (404, "unknown model"), (413, "body over the size limit"),
                      (422, "a body that does not fit the model"), (503, "workers failed, busy or not ready"))}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class CountRequests:
    """ASGI middleware: counts each HTTP request by method, route template and status code, and the
    requests begun and answered whole (``Gateway.accepted`` / ``answered``)."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        g = self.gateway
        g.accepted += 1
        t0 = time.perf_counter()
        status = [500]

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                g.answered += 1

        try:
            await self.app(scope, receive, counted_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            g.requests.record(scope.get("method", ""), path, status[0], time.perf_counter() - t0)


def _refusal_headers(e: RequestError) -> dict[str, str]:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.status == 413:
        headers["Connection"] = "close"  # the rest of the body is not read
    return headers


INFER_ROUTE = "/v2/models/{name}/infer"


class _Route:
    """What ``CountRequests`` reads of a route: its template."""

    path = INFER_ROUTE


class Disconnected(Exception):
    """The client went away before its body came whole."""


class FastInfer:
    """ASGI: ``POST /v2/models/{name}/infer`` straight to ``handler`` (``make_app``'s ``fast_infer``), the rest
    to the FastAPI app."""

    def __init__(self, app: ASGIApp, handler: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                name = path[11:-6]
                if name and "/" not in name:
                    scope["route"] = _Route
                    await self.handler(scope, receive, send, name)
                    return
        await self.app(scope, receive, send)


async def _send(send: Callable[[Message], Awaitable[None]], status: int, content: bytes,
                headers: dict[str, str]) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


async def _send_json(send: Callable[[Message], Awaitable[None]], status: int, data: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    await _send(send, status, json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode(),
                {"content-type": "application/json", **(headers or {})})


def _declared_length(length: str | None, limit: int) -> None:
    """RequestError 400 / 413 for a Content-Length that is not a number or is over ``limit``."""
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length must be an integer, not {length[:40]!r}") from None
        if n > limit:
            raise RequestError(413, f"the body of {n} bytes is over the limit of {limit} bytes")


async def receive_body(receive: Callable[[], Awaitable[Message]], length: str | None, limit: int) -> bytes:
    """``read_body`` on the bare ASGI ``receive``; Disconnected when the client goes first."""
    _declared_length(length, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise Disconnected
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes: RequestError 413 as soon as Content-Length or the bytes that came
    say it is larger."""
    _declared_length(request.headers.get("content-length"), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(gateway: Gateway, *, token: str | None = None, max_body_bytes: int = 32 << 20,
             retry_after_s: int = 1, platform: str = "cortexbench") -> Any:
    """The ASGI app (FastAPI, wrapped in the request counter)."""
    app = FastAPI(title="cortexbench gateway", version=__version__,
                  description="cortexbench's workers behind the Open Inference Protocol (v2)")
    retry = {"Retry-After": str(retry_after_s)}
    secret = token.encode() if token else None

    def check_token(got: str | None) -> None:
        if secret is None:
            return
        got = got or ""
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), secret):
            raise RequestError(401, "this gateway needs 'Authorization: Bearer <token>' (--token)")

    def model_of(name: str) -> ModelInfo:
        model = gateway.models.get(name)
        if model is None:
            raise RequestError(404, f"unknown model '{name[:80]}' (served: {', '.join(gateway.models)})")
        return model

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError) -> Response:
        return error(e.status, str(e), _refusal_headers(e))

    @app.exception_handler(WorkerError)
    async def _failed(request: Request, e: WorkerError) -> Response:
        return error(503, str(e), retry)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        return error(e.status_code, str(e.detail), dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> Response:  # a bug; still JSON, still counted
        return error(500, f"internal error: {type(e).__name__}")

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", responses={503: _ERRORS[503]})
    async def ready() -> Response:
        ok = gateway.ready and gateway.live_workers() > 0
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503, headers=None if ok else retry)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "cortexbench", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}", responses={404: _ERRORS[404]})
    async def model_metadata(name: str) -> dict[str, Any]:
        return model_of(name).metadata(platform)

    @app.get("/v2/models/{name}/ready", responses={404: _ERRORS[404], 503: _ERRORS[503]})
    async def model_ready(name: str) -> Response:
        model_of(name)
        ok = gateway.ready and gateway.live_workers() > 0
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503,
                            headers=None if ok else retry)

    async def infer_answer(name: str, header: Callable[[str], str | None], body: Callable[[], Awaitable[bytes]],
                           arrived: float) -> tuple[bytes, dict[str, str]]:
        """``POST /v2/models/{name}/infer`` once admitted: the answer's bytes and headers; every refusal
        raised (RequestError, WorkerError).  ``header``: a request header by lower-case name."""
        check_token(header("authorization"))
        model = model_of(name)
        if not gateway.ready:
            raise WorkerError("the workers are not ready yet")
        req = parse_infer(await body(), header(HEADER.lower()), model)
        answer = await gateway.infer(model, req.x, arrived)
        return encode_infer(model, req, answer.output, {"worker": answer.worker})

    async def fast_infer(scope: Scope, receive: Callable[[], Awaitable[Message]],
                         send: Callable[[Message], Awaitable[None]], name: str) -> None:
        """The infer route as a bare ASGI handler (no Starlette request, router or middleware: 0.7 ms of a
        request at concurrency 1 on the 2-core machine); the same answers as the FastAPI route below."""
        arrived = time.perf_counter()
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        if not gateway.admit():
            await _send_json(send, 503, {"error": f"busy: {gateway.max_inflight} requests in flight; "
                                                   "retry later"}, retry)
            return
        try:
            content, out_headers = await infer_answer(name, headers.get,
                                                      lambda: receive_body(receive, headers.get("content-length"),
                                                                           max_body_bytes), arrived)
        except RequestError as e:
            await _send_json(send, e.status, {"error": str(e)}, _refusal_headers(e))
            return
        except WorkerError as e:
            await _send_json(send, 503, {"error": str(e)}, retry)
            return
        except Disconnected:
            return
        except Exception as e:  # a bug; still JSON, still counted
            await _send_json(send, 500, {"error": f"internal error: {type(e).__name__}"})
            return
        finally:
            gateway.release()
        await _send(send, 200, content, out_headers)

    async def admitted(request: Request, name: str) -> tuple[ModelInfo, bytes, float]:
        arrived = time.perf_counter()
        check_token(request.headers.get("authorization"))
        model = model_of(name)
        if not gateway.ready:
            raise WorkerError("the workers are not ready yet")
        return model, await read_body(request, max_body_bytes), arrived

    @app.post("/v2/models/{name}/infer", openapi_extra=_INFER_BODY,
              responses={200: {"description": f"the output tensor (JSON, or binary with {HEADER})",
                               "content": {"application/json": {"schema": {"type": "object"}},
                                           "application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}},
                         **_ERRORS})
    async def infer(name: str, request: Request) -> Response:
        # served by fast_infer; this route gives the OpenAPI schema and answers alike if ever reached
        arrived = time.perf_counter()
        if not gateway.admit():
            return error(503, f"busy: {gateway.max_inflight} requests in flight; retry later", retry)
        try:
            content, headers = await infer_answer(name, request.headers.get,
                                                  lambda: read_body(request, max_body_bytes), arrived)
        finally:
            gateway.release()
        return Response(content, headers=headers)

    @app.post("/v1/models/{name}:predict", openapi_extra=_IMAGE_BODY,
              responses={200: {"description": "the top-5 classes"}, **_ERRORS})
    async def predict(name: str, request: Request) -> Response:
        if not gateway.admit():
            return error(503, f"busy: {gateway.max_inflight} requests in flight; retry later", retry)
        try:
            model, body, arrived = await admitted(request, name)
            x = await run_in_threadpool(decode_image, body, model)
            answer = await gateway.infer(model, x, arrived)
        finally:
            gateway.release()
        return JSONResponse({"model_name": model.name, "worker": answer.worker,
                             "predictions": top_k(answer.output, 5)})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        data, content_type = exposition([*gateway.metrics.families(), *gateway.requests.families(gateway.metrics.host)])
        return Response(data, media_type=content_type)

    return CountRequests(FastInfer(app, fast_infer), gateway)


MAX_IMAGE_PIXELS = 64_000_000  # a larger picture is refused before it is decoded (a decompression bomb)


def decode_image(data: bytes, model: ModelInfo) -> np.ndarray:
    """A JPEG or PNG body as the model's input (the stream's preprocessing): float32 (1, *input_shape);
    RequestError 422 when it does not decode, 413 when its header declares more than ``MAX_IMAGE_PIXELS``."""
    from cortexbench.images.dataset import decode, image_size, preprocess
    from cortexbench.models.registry import get_spec

    if not data:
        raise RequestError(400, "the body is empty: send the JPEG or PNG file's bytes")
    size = image_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise RequestError(413, f"the image is {size[0]} x {size[1]} pixels, over the limit of "
                                f"{MAX_IMAGE_PIXELS:,} pixels")
    try:
        return preprocess(decode(data, "<body>"), get_spec(model.name))[None]
    except ImageDecodeError as e:
        raise RequestError(422, str(e).replace("; delete or replace the file", "")) from None
