"""A small Open Inference Protocol (v2) server for the HTTP target's tests: a real uvicorn server on
127.0.0.1 with an ephemeral port, in a thread of the test process.

It serves the registry's small models (or any name it is given) with a fixed service time: the logits of
an image are a deterministic function of its input (``reference_logits``), so a test can check every
answer.  JSON tensors and the binary tensor extension both work, as in Triton and KServe.  Knobs for the
fault tests: ``no_metadata`` (models whose metadata lists no inputs, as some real servers do), ``fail_model``
(its inferences answer 500), ``service_s``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cortexbench.models.registry import get_spec

CLASSES = 10
HEADER = "Inference-Header-Content-Length"


def reference_logits(x: np.ndarray) -> np.ndarray:
    """(1, CLASSES) float32: what the server answers for input ``x`` (any shape, batch 1)."""
    flat = np.asarray(x, np.float32).reshape(-1)
    k = np.arange(CLASSES, dtype=np.float32)
    return (np.cos(k * 0.37) * float(flat.mean()) + np.sin(k) * float(flat.std()))[None].astype(np.float32)


@dataclass
class V2Server:
    models: Sequence[str]
    service_s: float = 0.0
    no_metadata: Sequence[str] = ()
    fail_model: str | None = None
    requests: int = 0
    binary_requests: int = 0
    url: str = ""
    _server: uvicorn.Server | None = field(default=None, repr=False)

    def _shape(self, name: str) -> list[int]:
        return [-1, *get_spec(name).input_shape]

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200)

    async def metadata(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.models:
            return JSONResponse({"error": f"unknown model '{name}'"}, status_code=404)
        inputs = [] if name in self.no_metadata else [{"name": "x", "datatype": "FP32", "shape": self._shape(name)}]
        return JSONResponse({"name": name, "versions": ["1"], "platform": "test", "inputs": inputs,
                             "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}]})

    async def infer(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.requests += 1
        if name not in self.models:
            return JSONResponse({"error": f"unknown model '{name}'"}, status_code=404)
        body = await request.body()
        head_len = request.headers.get(HEADER)
        try:
            if head_len is not None:
                self.binary_requests += 1
                n = int(head_len)
                head = json.loads(body[:n])
                (inp,) = head["inputs"]
                size = int(inp["parameters"]["binary_data_size"])
                raw = body[n:n + size]
                if len(raw) != size:
                    raise ValueError("binary data shorter than binary_data_size")
                x = np.frombuffer(raw, np.float32).reshape(inp["shape"])
            else:
                head = json.loads(body)
                (inp,) = head["inputs"]
                x = np.asarray(inp["data"], np.float32).reshape(inp["shape"])
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
        if self.service_s:
            await asyncio.sleep(self.service_s)
        if name == self.fail_model:
            return JSONResponse({"error": "the model failed"}, status_code=500)
        y = reference_logits(x)
        wants_binary = bool((head.get("parameters") or {}).get("binary_data_output")) or any(
            (o.get("parameters") or {}).get("binary_data") for o in head.get("outputs") or [])
        out = {"name": "logits", "datatype": "FP32", "shape": list(y.shape)}
        if wants_binary:
            data = y.tobytes()
            out["parameters"] = {"binary_data_size": len(data)}
            text = json.dumps({"model_name": name, "outputs": [out]}).encode()
            return Response(text + data, media_type="application/octet-stream", headers={HEADER: str(len(text))})
        out["data"] = y.reshape(-1).tolist()
        return JSONResponse({"model_name": name, "outputs": [out]})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v2/health/ready", self.ready),
            Route("/v2/models/{name}", self.metadata),
            Route("/v2/models/{name}/infer", self.infer, methods=["POST"]),
        ])

    @contextmanager
    def running(self) -> Iterator[V2Server]:
        """Serve on 127.0.0.1 on a free port until the block ends (``url`` is set meanwhile)."""
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
        # Nagle holds each answer's body behind its headers for a delayed ACK (about 40 ms a request)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level="error", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        started = threading.Event()
        thread = threading.Thread(target=self._serve, args=(sock, started), daemon=True)
        thread.start()
        if not started.wait(30):
            raise RuntimeError("the v2 test server did not start")
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            self.stop()
            thread.join(30)

    def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        assert self._server is not None
        server = self._server

        async def main() -> None:
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            while not server.started and not task.done():
                await asyncio.sleep(0.005)  # polls uvicorn's own flag: there is no event to wait on
            started.set()
            await task

        asyncio.run(main())

    def stop(self) -> None:
        """Stop serving (a server that dies mid-run, for the fault tests)."""
        if self._server is not None:
            self._server.should_exit = True


def main() -> None:
    """``python -m tests.v2_server --port P [--service-ms S] [--models A,B]``: serve on 127.0.0.1 until
    killed (bench/http_driver.py runs it in its own process, on its own core)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--service-ms", type=float, default=0.0)
    ap.add_argument("--models", default="mnist_cnn")
    args = ap.parse_args()
    server = V2Server(args.models.split(","), service_s=args.service_ms / 1e3)
    uvicorn.run(server.app(), host="127.0.0.1", port=args.port, log_level="error", access_log=False,
                lifespan="off")


if __name__ == "__main__":
    main()
