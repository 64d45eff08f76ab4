"""The HTTP target: any server that speaks the Open Inference Protocol (v2: Triton, KServe, ...).

``python -m cortexbench.stream --target http://HOST:PORT [--protocol v2|v2-json]`` sends the same seeded
stream as the Ray path (random model, batch size 1, closed or open loop) as ``POST /v2/models/{name}/infer``
requests.  Before the run the target waits for ``GET /v2/health/ready``, reads each model's metadata
(``GET /v2/models/{name}``: input name, shape, datatype) and, where a server lists no inputs, falls back to
``--input-name``/``--input-shape`` or to the registry's input for a model of that name, saying which it used.

Bodies: ``v2`` sends the tensor as raw little-endian bytes with the binary tensor extension (the JSON
header's ``binary_data_size``, ``Inference-Header-Content-Length``) and asks for binary outputs; ``v2-json``
sends and reads plain JSON.  Inputs are decoded and preprocessed before the run into a pool (as the Ray
workers' pool: image ``i`` uses entry ``i % len(pool)``), and every request body is built then, so the event
loop only sends.  The residency of the models is the server's business: the run has one pass, ``server``.

Per image the target records the outcome (2xx ok; 404 ``model_error``; other 4xx ``input_error``; 5xx
``error``, the status in the message; a time-out ``timeout``), the input file, and the answer's top-1 and
logit sum.  The server times no stages, so the whole latency is ``transport``.  A refused or broken
connection loses the call's images as a lost worker does (``WorkerLostError``: retried once the server is
ready again, or counted ``worker_died`` when it does not come back within ``RECOVER_S``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from cortexbench.driver_types import DriverResult
from cortexbench.errors import ConfigError, WorkerError, WorkerLostError
from cortexbench.http_client import HttpError, Pool, request_head
from cortexbench.ledger import OUTCOMES
from cortexbench.models.registry import REGISTRY, get_spec
from cortexbench.process_shards import ProcessShards
from cortexbench.protocol import (
    CHECKSUM,
    ERROR,
    INPUT_ERROR,
    INPUT_IDX,
    MODEL_ERROR,
    N_STAGES,
    OK,
    TOP1,
    RequestGroup,
    ResultGroup,
    WorkerState,
)
from cortexbench.target import FoldFn, HandleOptions, ShardJob, WorkerInfo

TIMEOUT = OUTCOMES.index("timeout")
HEADER = "Inference-Header-Content-Length"
READY_S = 60.0  # wait this long for /v2/health/ready before the run
RECOVER_S = 10.0  # and this long for a server that stopped answering
JSON_POOL = 32  # v2-json bodies are text: at most this many inputs per shape
_DTYPES = {"FP32": np.float32, "FP16": np.float16}


@dataclass(frozen=True)
class InputInfo:
    """One model's input on the server, and where cortexbench learnt it."""

    name: str
    shape: tuple[int, ...]  # one sample, without the batch axis
    datatype: str
    source: str  # 'server metadata', 'flags' or 'registry'


def check_target(url: str, protocol: str) -> Any:
    """The parsed ``url``; ConfigError naming the flag when it or ``protocol`` cannot be used."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ConfigError(f"--target: '{url}' is not an http:// or https:// address (as in http://127.0.0.1:8000)")
    if protocol not in ("v2", "v2-json"):
        raise ConfigError(f"--protocol: '{protocol}' is not a protocol (valid: v2, v2-json)")
    return u


def _quiet(line: str) -> None:
    """The default ``say``: nothing."""


class HttpTarget:
    """See the module docstring.  With ``--drivers N`` its shards are processes of this host
    (``process_shards.py``): the target pickles (bodies and all) and each shard makes its own handles."""

    shards_supported = True

    def __init__(self, url: str, models: Sequence[str], images: Sequence[str], *, protocol: str = "v2",
                 image_pool: int = 64, timeout_s: float = 30.0, input_name: str | None = None,
                 input_shape: Sequence[int] = (), client: str = "raw", token: str | None = None,
                 say: Callable[[str], None] = _quiet) -> None:
        """``token``: a bearer token sent with every request (``CORTEXBENCH_TOKEN``, as ``serve`` reads it)."""
        u = check_target(url, protocol)
        if client not in ("raw", "httpx"):
            raise ConfigError(f"--http-client: '{client}' is not a client (valid: raw, httpx)")
        self.client = "httpx" if u.scheme == "https" else client  # the raw client speaks plain HTTP only
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)
        self.url = url.rstrip("/")
        self.models = tuple(models)
        self.images = tuple(images)
        self.protocol = protocol
        self.image_pool = image_pool
        self.timeout_s = timeout_s
        self.input_name, self.input_shape = input_name, tuple(input_shape)
        self.say = say
        self.auth = {"authorization": f"Bearer {token}"} if token else {}
        self.inputs: dict[str, InputInfo] = {}
        self.bodies: dict[str, list[tuple[bytes, dict[str, str], int]]] = {}  # per model: body, headers, file
        self.heads: dict[str, list[bytes]] = {}  # per model, per body: the raw client's request head
        self.workers = (WorkerInfo("server", device=self.url, node=u.hostname, host=u.hostname),)
        self._shards: ProcessShards | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What a driver shard process needs: everything but the console and the running shards."""
        return {k: v for k, v in self.__dict__.items() if k not in ("say", "_shards")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.say = _quiet
        self._shards = None

    # --- before the run ----------------------------------------------------------------------------

    def start(self) -> None:
        """Wait until the server is ready, learn each model's input, build every request body."""
        with httpx.Client(timeout=self.timeout_s, headers=self.auth) as client:
            self._wait_ready(client, READY_S)
            for name in self.models:
                self.inputs[name] = self._discover(client, name)
        for name, info in self.inputs.items():
            if info.source != "server metadata":
                self.say(f"target: model '{name}' lists no inputs; using {info.source}: {info.name} "
                         f"{list(info.shape)} {info.datatype}")
        self._build_bodies()

    def _wait_ready(self, client: httpx.Client, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        last = ""
        while True:
            try:
                r = client.get(f"{self.url}/v2/health/ready")
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = type(e).__name__
            if time.monotonic() >= deadline:
                raise WorkerError(f"--target {self.url}: not ready within {within_s:g} s ({last} from "
                                  "/v2/health/ready); is the server up and does it speak the v2 protocol?")
            time.sleep(0.2)  # the server's own start: poll its readiness endpoint at a bounded pace

    def _discover(self, client: httpx.Client, name: str) -> InputInfo:
        r = client.get(f"{self.url}/v2/models/{name}")
        if r.status_code == 404:
            raise ConfigError(f"--target {self.url}: the server has no model '{name}' (GET /v2/models/{name}: 404)")
        if r.status_code != 200:
            raise WorkerError(f"--target {self.url}: GET /v2/models/{name} answered HTTP {r.status_code}")
        inputs = (r.json() or {}).get("inputs") or []
        if inputs:
            first = inputs[0]
            shape = tuple(int(d) for d in first.get("shape") or [])
            if shape and shape[0] in (-1, 1) and len(shape) > 1:
                shape = shape[1:]  # the batch axis
            return InputInfo(str(first["name"]), shape, str(first.get("datatype", "FP32")), "server metadata")
        if self.input_shape:
            return InputInfo(self.input_name or "input", self.input_shape, "FP32", "flags")
        if name in REGISTRY:
            return InputInfo(self.input_name or "input", tuple(get_spec(name).input_shape), "FP32", "registry")
        raise ConfigError(f"--target {self.url}: model '{name}' lists no inputs and cortexbench does not know it; "
                          "give --input-shape (and --input-name)")

    def _build_bodies(self) -> None:
        from cortexbench.images.dataset import load_batch

        n = min(self.image_pool, len(self.images), JSON_POOL if self.protocol == "v2-json" else self.image_pool)
        paths = [Path(p) for p in self.images[:n]]
        cache: dict[tuple[Any, ...], list[tuple[bytes, dict[str, str], int]]] = {}
        for name, info in self.inputs.items():
            key = (info.name, info.shape, info.datatype)
            if key not in cache:
                spec = get_spec(name) if name in REGISTRY and tuple(get_spec(name).input_shape) == info.shape \
                    else _shaped_spec(info.shape)
                batch, bad = load_batch(paths, spec)
                files = [i for i, p in enumerate(paths) if p not in set(bad)]
                dtype = _DTYPES.get(info.datatype)
                if dtype is None:
                    raise ConfigError(f"model '{name}': input datatype {info.datatype} is not supported "
                                      f"(valid: {', '.join(_DTYPES)})")
                cache[key] = [(*self._body(info, batch[k:k + 1].astype(dtype)), files[k]) for k in range(len(batch))]
            self.bodies[name] = cache[key]
            self.heads[name] = [request_head("POST", f"{self.host}:{self.port}", f"/v2/models/{name}/infer", h, len(b))
                                for b, h, _ in cache[key]]

    def _body(self, info: InputInfo, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        tensor: dict[str, Any] = {"name": info.name, "shape": list(x.shape), "datatype": info.datatype}
        if self.protocol == "v2-json":
            tensor["data"] = x.reshape(-1).tolist()
            return json.dumps({"inputs": [tensor]}).encode(), {"content-type": "application/json", **self.auth}
        raw = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
        head_b = head.encode()
        return head_b + raw, {"content-type": "application/octet-stream", HEADER: str(len(head_b)), **self.auth}

    # --- the Target protocol ------------------------------------------------------------------------

    def set_mode(self, mode: str) -> list[dict[str, float]]:
        return [{}]  # the server decides what stays loaded

    def handles(self, mode: str, options: HandleOptions, ids: Sequence[int] | None = None) -> list[HttpHandle]:
        return [HttpHandle(self, max(1, options.depth))]

    async def run_shards(self, jobs: Sequence[ShardJob], fold: FoldFn,
                         stopping: Callable[[], bool]) -> list[DriverResult]:
        """One driver process per job (``process_shards.py``), each with its own connection pool."""
        self._shards = ProcessShards(self, jobs, [w.name for w in self.workers])
        try:
            return await self._shards.run(fold, stopping)
        finally:
            self._shards = None

    def stop_shards(self) -> None:
        if self._shards is not None:
            self._shards.stop()

    def kill_shard(self, index: int) -> None:
        """Kill one driver shard's process (fault tests)."""
        if self._shards is not None:
            self._shards.kill(index)

    def close(self) -> None:
        pass


def _shaped_spec(shape: tuple[int, ...]) -> Any:
    """A stand-in ModelSpec for images.dataset: what a model with this input shape would take."""
    from dataclasses import replace

    base = get_spec("squeezenet")
    return replace(base, name="input", input_shape=shape)


class HttpHandle:
    """One keep-alive connection pool to the server, ``depth`` requests in flight at most."""

    def __init__(self, target: HttpTarget, depth: int) -> None:
        self.name = target.workers[0].name
        self.target = target
        self.depth = depth
        self.client: httpx.AsyncClient | None = None
        self.pool: Pool | None = None
        self.inflight = 0

    async def start(self) -> None:
        t = self.target
        if t.client == "raw":
            self.pool = Pool(t.host, t.port, self.depth, t.timeout_s)
        else:
            limits = httpx.Limits(max_connections=self.depth, max_keepalive_connections=self.depth)
            self.client = httpx.AsyncClient(limits=limits, timeout=t.timeout_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    def submit(self, group: RequestGroup) -> asyncio.Future[tuple[ResultGroup, float]]:
        return asyncio.ensure_future(self._call(group))

    async def _call(self, group: RequestGroup) -> tuple[ResultGroup, float]:
        rows = group.rows.tolist()
        self.inflight += len(rows)
        try:
            if len(rows) == 1:  # the usual case (one image per call): no gather, no task per image
                answers = [await self._one(rows[0][1], rows[0][2])]
            else:
                answers = await asyncio.gather(*[self._one(model, image) for _, model, image in rows])
        finally:
            self.inflight -= len(rows)
        out = np.full((len(rows), 3 + N_STAGES + 3), math.nan)
        errors: dict[int, str] = {}
        for i, ((item, _, _), (outcome, file, top1, checksum, msg)) in enumerate(zip(rows, answers, strict=True)):
            out[i, 0], out[i, 1], out[i, 2] = item, outcome, -1
            out[i, INPUT_IDX], out[i, TOP1], out[i, CHECKSUM] = file, top1, checksum
            if msg:
                errors[i] = msg
        return ResultGroup(out, errors, WorkerState(inflight=self.inflight)), time.monotonic()

    async def _one(self, model_idx: int, image_idx: int) -> tuple[int, int, float, float, str]:
        t = self.target
        name = t.models[model_idx]
        bodies = t.bodies[name]
        k = image_idx % len(bodies)
        body, headers, file = bodies[k]
        try:
            if self.pool is not None:
                r = await self.pool.request(t.heads[name][k], body)
                status, r_headers, content = r.status, r.headers, r.body
            else:
                assert self.client is not None
                hr = await self.client.post(f"{t.url}/v2/models/{name}/infer", content=body, headers=headers)
                status, r_headers, content = hr.status_code, {k.lower(): v for k, v in hr.headers.items()}, hr.content
        except (httpx.TimeoutException, asyncio.TimeoutError):
            return TIMEOUT, file, -1, math.nan, f"no answer within {t.timeout_s:g} s"
        except (httpx.TransportError, HttpError, OSError) as e:  # refused, reset, closed: the server is gone
            raise WorkerLostError(f"{t.url}: {type(e).__name__}") from None
        if status != 200:
            kind = MODEL_ERROR if status == 404 else INPUT_ERROR if status < 500 else ERROR
            hint = " (the server wants a token: set CORTEXBENCH_TOKEN)" if status in (401, 403) else ""
            return kind, file, -1, math.nan, \
                f"HTTP {status} from {name}{hint}: {content[:200].decode('utf-8', 'replace')}"
        try:
            y = _logits(r_headers, content)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return ERROR, file, -1, math.nan, f"{name}: cannot read the answer: {e}"
        return OK, file, int(y.argmax()), float(y.sum(dtype=np.float64)), ""

    async def replace(self) -> None:
        """A server that stopped answering cannot be ended from here: wait until it is ready again."""
        await self.recover()

    async def recover(self) -> None:
        """Wait until the server is ready again (``RECOVER_S`` at most)."""
        deadline = time.monotonic() + RECOVER_S
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(f"{self.target.url}/v2/health/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)  # poll the readiness endpoint at a bounded pace
        raise WorkerError(f"the server at {self.target.url} did not come back within {RECOVER_S:g} s")


def _logits(headers: dict[str, str], content: bytes) -> np.ndarray:
    """The first output of a v2 answer, binary or JSON, as a flat float array (``headers``: lower-case)."""
    head_len = headers.get(HEADER.lower())
    if head_len is not None:
        n = int(head_len)
        head = json.loads(content[:n])
        out = head["outputs"][0]
        size = int(out["parameters"]["binary_data_size"])
        dtype = _DTYPES.get(out.get("datatype", "FP32"), np.float32)
        return np.frombuffer(content[n:n + size], dtype).astype(np.float32)
    out = json.loads(content)["outputs"][0]
    return np.asarray(out["data"], np.float32)
