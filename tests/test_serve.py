"""The serving gateway (``cortexbench.serve``, ``cortexbench.gateway``) on a real uvicorn server on 127.0.0.1:
every endpoint, every bad input with its status and body, the token, the size limit, worker failures and
back-pressure.  These run the workers in process (``LocalCaller``: real ModelWorkers with the mxnet
backend) or a fake caller; tests/test_serve_ray.py runs the command with Ray."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import cv2
import httpx
import numpy as np
import pytest

from cortexbench.errors import WorkerError, WorkerLostError
from cortexbench.gateway.app import make_app
from cortexbench.gateway.pool import Gateway, LocalCaller, RayCaller
from cortexbench.gateway.shm import SharedSlots, SlotReader, remove_slots
from cortexbench.gateway.v2 import HEADER, ModelInfo
from cortexbench.images.dataset import list_images, load_input
from cortexbench.models.registry import get_spec
from cortexbench.protocol import (
    BLANK_ROW,
    ERROR,
    OK,
    ONE_ROW,
    decode_tensor_request,
    decode_tensor_result,
    encode_result,
    encode_tensor_result,
    write_tensor_request,
)
from cortexbench.worker import ModelWorker, WorkerSpec
from tests.gateway_server import serving

MODELS = ("null", "mnist_cnn", "digits_cnn")


def _infos(models=MODELS) -> list[ModelInfo]:
    return [ModelInfo(m, i, tuple(get_spec(m).input_shape), get_spec(m).num_classes) for i, m in enumerate(models)]


@pytest.fixture(scope="module")
def images(image_dir: Path) -> list[Path]:
    return list_images(image_dir)


@pytest.fixture(scope="module")
def workers(model_dir: Path, images: list[Path]):
    out = []
    for i in range(2):
        spec = WorkerSpec(name=f"cpu{i}", device="cpu", backend="mxnet", model_dir=str(model_dir), models=MODELS,
                          images=tuple(str(p) for p in images), lanes=2, image_pool=4)
        w = ModelWorker(spec)
        w.set_mode("cached")
        out.append(w)
    yield out
    for w in out:
        w.close()


def _gateway(caller, **kw) -> Gateway:
    g = Gateway(caller, _infos(), mode="cached", **kw)
    g.ready = True
    return g


@pytest.fixture(scope="module")
def served(workers):
    caller = LocalCaller(workers, threads=4)
    gateway = _gateway(caller)
    with serving(make_app(gateway, max_body_bytes=1 << 20)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, gateway
    caller.close()


def _json_body(x: np.ndarray, name: str = "input", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}],
            **extra}


def _binary_body(x: np.ndarray, size: int | None = None, binary_out: bool = True) -> tuple[bytes, dict]:
    raw = x.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw) if size is None else size}}],
                       "parameters": {"binary_data_output": binary_out}}).encode()
    return head + raw, {"content-type": "application/octet-stream", HEADER: str(len(head))}


def _read_binary(r: httpx.Response) -> np.ndarray:
    n = int(r.headers[HEADER])
    head = json.loads(r.content[:n])
    out = head["outputs"][0]
    return np.frombuffer(r.content[n:n + out["parameters"]["binary_data_size"]], "<f4").reshape(out["shape"])


# --- every endpoint ----------------------------------------------------------------------------------


def test_health_server_and_model_metadata(served):
    client, _ = served
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "cortexbench" and "binary_tensor_data" in meta["extensions"]
    m = client.get("/v2/models/mnist_cnn").json()
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert m["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get("/v2/models/digits_cnn/ready").json() == {"name": "digits_cnn", "ready": True}


def test_json_and_binary_inference_agree_with_the_model(served, images, workers):
    client, _ = served
    x = load_input(images[0], get_spec("mnist_cnn"))[None]
    rj = client.post("/v2/models/mnist_cnn/infer", json=_json_body(x, id="req-1"))
    assert rj.status_code == 200, rj.text
    body = rj.json()
    assert body["model_name"] == "mnist_cnn" and body["id"] == "req-1" and body["outputs"][0]["shape"] == [1, 10]
    yj = np.asarray(body["outputs"][0]["data"], np.float32)
    content, headers = _binary_body(x)
    rb = client.post("/v2/models/mnist_cnn/infer", content=content, headers=headers)
    assert rb.status_code == 200 and rb.headers["content-type"] == "application/octet-stream"
    yb = _read_binary(rb)
    # the same answer both ways, and the model's own answer for that input
    expected = workers[0].models.held["mnist_cnn"].model.predict(x, 0)
    np.testing.assert_allclose(yj, yb.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(yb.reshape(-1), expected.reshape(-1), rtol=1e-5, atol=1e-6)


def test_the_shape_without_the_batch_axis_and_other_float_types_are_accepted(served):
    client, _ = served
    x = np.random.default_rng(0).random((1, 8, 8), np.float32)
    r = client.post("/v2/models/digits_cnn/infer", json=_json_body(x))
    assert r.status_code == 200, r.text
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP16",
                        "data": x.astype(np.float16).reshape(-1).tolist()}]}
    assert client.post("/v2/models/digits_cnn/infer", json=body).status_code == 200


def test_v1_predict_takes_a_jpeg_or_png_and_answers_the_top5(served, images):
    client, _ = served
    data = images[1].read_bytes()
    r = client.post("/v1/models/mnist_cnn:predict", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 5 and [p["logit"] for p in preds] == sorted((p["logit"] for p in preds), reverse=True)
    x = load_input(images[1], get_spec("mnist_cnn"))[None]
    y = np.asarray(client.post("/v2/models/mnist_cnn/infer", json=_json_body(x)).json()["outputs"][0]["data"])
    assert preds[0]["class"] == int(y.argmax()) and 0 < preds[0]["score"] <= 1
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    png = cv2.imencode(".png", img)[1].tobytes()
    r2 = client.post("/v1/models/mnist_cnn:predict", content=png, headers={"content-type": "image/png"})
    assert r2.status_code == 200 and r2.json()["predictions"][0]["class"] == preds[0]["class"]
    null = client.post("/v1/models/null:predict", content=data).json()["predictions"]
    assert len(null) == 1  # the null model has one class


def _declaring(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG or PNG whose header claims another size (a decompression bomb is just that)."""
    out = bytearray(data)
    if data.startswith(b"\x89PNG"):
        out[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        return bytes(out)
    sof = data.index(b"\xff\xc0")
    out[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


@pytest.mark.parametrize("fmt", [".jpg", ".png"])
def test_an_image_declaring_too_many_pixels_is_413_before_it_is_decoded(served, fmt):
    client, _ = served
    small = cv2.imencode(fmt, np.zeros((20, 30, 3), np.uint8))[1].tobytes()
    bomb = _declaring(small, 60_000, 60_000)  # 3.6 G pixels: 10.8 GB once decoded
    r = client.post("/v1/models/mnist_cnn:predict", content=bomb)
    assert r.status_code == 413 and "60000 x 60000 pixels, over the limit" in r.json()["error"]
    assert client.post("/v1/models/mnist_cnn:predict", content=small).status_code == 200


def test_metrics_count_requests_by_route_and_code_and_images(served):
    client, _ = served
    client.get("/v2/models/nope")
    client.post("/v1/models/digits_cnn:predict", content=b"")
    text = client.get("/metrics").text
    assert 'cortexbench_http_requests_total{code="404",host="",method="GET",route="/v2/models/{name}"}' in text
    assert 'code="400"' in text and 'route="/v1/models/{name}:predict"' in text
    assert "cortexbench_image_latency_seconds_bucket" in text and 'outcome="ok"' in text
    assert 'cortexbench_stage_seconds_count{host="",mode="cached",phase="measured",stage="infer"}' in text
    assert "cortexbench_http_inflight" in text


# --- bad input: never a 500 ----------------------------------------------------------------------------

_X = np.zeros((1, 1, 8, 8), np.float32)
_GOOD = _json_body(_X)
_RAW = _X.tobytes()


def _with(**inp) -> dict:
    return {"inputs": [{**_GOOD["inputs"][0], **inp}]}


def _head(obj: dict) -> tuple[bytes, dict]:
    head = json.dumps(obj).encode()
    return head, {HEADER: str(len(head)), "content-type": "application/octet-stream"}


def _bin(size: int, raw: bytes = _RAW) -> tuple[bytes, dict]:
    head, headers = _head({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "parameters": {"binary_data_size": size}}]})
    return head + raw, headers


BAD = [
    # (what, path, body bytes, headers, status, words in the error)
    ("unknown model", "/v2/models/resnet9/infer", json.dumps(_GOOD).encode(), {}, 404, "unknown model 'resnet9'"),
    ("not JSON", "/v2/models/digits_cnn/infer", b"{inputs: [", {}, 400, "not valid JSON"),
    ("not UTF-8", "/v2/models/digits_cnn/infer", b"\xff\xfe\x00", {}, 400, "not valid JSON"),
    ("a JSON list", "/v2/models/digits_cnn/infer", b"[1, 2]", {}, 400, "JSON object"),
    ("no inputs", "/v2/models/digits_cnn/infer", b"{}", {}, 400, "'inputs'"),
    ("two inputs", "/v2/models/digits_cnn/infer", json.dumps({"inputs": _GOOD["inputs"] * 2}).encode(), {}, 422,
     "takes 1 input"),
    ("shape not a list", "/v2/models/digits_cnn/infer", json.dumps(_with(shape="1,1,8,8")).encode(), {}, 400, "shape"),
    ("negative dim", "/v2/models/digits_cnn/infer", json.dumps(_with(shape=[1, -1, 8, 8])).encode(), {}, 400, "shape"),
    ("wrong shape", "/v2/models/digits_cnn/infer", json.dumps(_with(shape=[1, 1, 28, 28])).encode(), {}, 422,
     "does not fit model 'digits_cnn'"),
    ("batch of 2", "/v2/models/digits_cnn/infer", json.dumps(_with(shape=[2, 1, 8, 8])).encode(), {}, 422,
     "batch size 1"),
    ("wrong datatype", "/v2/models/digits_cnn/infer", json.dumps(_with(datatype="INT8")).encode(), {}, 422,
     "datatype INT8 is not supported"),
    ("wrong input name", "/v2/models/digits_cnn/infer", json.dumps(_with(name="x")).encode(), {}, 422,
     "no input 'x'"),
    ("too few values", "/v2/models/digits_cnn/infer", json.dumps(_with(data=[0.0] * 63)).encode(), {}, 422,
     "has 63 values"),
    ("strings as data", "/v2/models/digits_cnn/infer", json.dumps(_with(data=["a"] * 64)).encode(), {}, 422,
     "numbers only"),
    ("ragged data", "/v2/models/digits_cnn/infer", json.dumps(_with(data=[[0.0], [0.0, 1.0]])).encode(), {}, 422,
     "numbers only"),
    ("no data", "/v2/models/digits_cnn/infer", json.dumps(_with(data=None)).encode(), {}, 400, "'inputs[0].data'"),
    ("binary size too small", "/v2/models/digits_cnn/infer", *_bin(255), 400,
     "binary_data_size 255 does not match shape"),
    ("binary part short", "/v2/models/digits_cnn/infer", *_bin(256, _RAW[:100]), 400, "binary part has 100 bytes"),
    ("binary part long", "/v2/models/digits_cnn/infer", *_bin(256, _RAW + b"x"), 400, "binary part has 257 bytes"),
    ("header length not a number", "/v2/models/digits_cnn/infer", _bin(256)[0],
     {HEADER: "ten", "content-type": "application/octet-stream"}, 400, "must be an integer"),
    ("header length past the body", "/v2/models/digits_cnn/infer", _bin(256)[0],
     {HEADER: "100000", "content-type": "application/octet-stream"}, 400, "outside the body"),
    ("binary bytes without a size", "/v2/models/digits_cnn/infer",
     _head(_GOOD)[0] + b"1234", _head(_GOOD)[1], 400, "no binary_data_size"),
    ("empty image", "/v1/models/digits_cnn:predict", b"", {}, 400, "body is empty"),
    ("not an image", "/v1/models/digits_cnn:predict", b"hello, world", {}, 422, "does not decode"),
    ("truncated JPEG", "/v1/models/digits_cnn:predict", None, {}, 422, "truncated JPEG"),
    ("unknown model, v1", "/v1/models/nope:predict", b"x", {}, 404, "unknown model 'nope'"),
]


@pytest.mark.parametrize(("what", "path", "body", "headers", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_answered_4xx_with_a_json_error(served, images, what, path, body, headers, status, words):
    client, _ = served
    if body is None:
        body = images[0].read_bytes()[:600]
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and words in r.json()["error"]


def test_a_body_over_the_limit_is_413_before_it_is_read_whole(served):
    client, _ = served
    big = b"0" * ((1 << 20) + 1)
    r = client.post("/v2/models/digits_cnn/infer", content=big)
    assert r.status_code == 413 and "over the limit of 1048576 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is found while reading
        for _ in range(40):
            yield b"0" * 65536

    r = client.post("/v1/models/digits_cnn:predict", content=chunks())
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert client.get("/v2/health/live").status_code == 200  # the server is fine afterwards


def test_unknown_routes_and_methods_answer_json_errors(served):
    client, _ = served
    assert client.get("/v3/nothing").json() == {"error": "Not Found"}
    r = client.get("/v2/models/digits_cnn/infer")
    assert r.status_code == 405 and "error" in r.json()


# --- the token ----------------------------------------------------------------------------------------


def test_the_token_is_needed_on_inference_calls_only(workers):
    caller = LocalCaller(workers[:1], threads=2)
    with serving(make_app(_gateway(caller), token="s3cret")) as url, httpx.Client(base_url=url) as client:
        body = _GOOD
        r = client.post("/v2/models/digits_cnn/infer", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "Bearer" in r.json()["error"]
        bad = client.post("/v2/models/digits_cnn/infer", json=body, headers={"authorization": "Bearer s3cre"})
        assert bad.status_code == 401
        assert client.post("/v1/models/digits_cnn:predict", content=b"x").status_code == 401
        ok = client.post("/v2/models/digits_cnn/infer", json=body, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/v2/health/ready").status_code == 200 and client.get("/metrics").status_code == 200
    caller.close()


@pytest.mark.parametrize("token", ["s3cret", None])
def test_the_http_target_sends_the_token_so_a_guarded_gateway_can_be_load_tested(workers, images, token):
    """``stream --target`` against ``serve --token``: with CORTEXBENCH_TOKEN every image is answered;
    without it every image fails as input_error with a message that says what to set."""
    import asyncio

    from cortexbench.driver import DriverOptions, drive
    from cortexbench.http_target import HttpTarget
    from cortexbench.schedule import make_schedule
    from cortexbench.target import HandleOptions

    caller = LocalCaller(workers[:1], threads=2)
    with serving(make_app(_gateway(caller), token="s3cret")) as url:
        target = HttpTarget(url, ("digits_cnn",), [str(p) for p in images], image_pool=4, token=token)
        target.start()
        sched = make_schedule(count=20, models=target.models, n_images=len(target.images), seed=1)
        opts = DriverOptions(mode="server", concurrency=2, max_group=1, depth=2, retries=0, fold_interval_s=0.02)
        res = asyncio.run(drive(sched, target.handles("server", HandleOptions("http", 2)), opts,
                                balancer="round-robin", seed=0))
    caller.close()
    counts = res.ledger.outcome_counts()
    if token:
        assert counts["ok"] == 20
    else:
        assert counts["input_error"] == 20 and "set CORTEXBENCH_TOKEN" in res.error_samples["input_error"]


# --- workers that fail, and back-pressure ---------------------------------------------------------


class FakeCaller:
    """One fake worker: answers with ``outcome``, raises ``lose`` first, or blocks until released."""

    def __init__(self, outcome: int = OK, lose: bool = False, block: bool = False) -> None:
        self.names = ["f0"]
        self.outcome, self.lose, self.block = outcome, lose, block
        self.entered = 0
        self.two_in = threading.Event()
        self.release: asyncio.Event | None = None
        self.recovered = threading.Event()

    async def call(self, index: int, item: int, model_idx: int, x: np.ndarray, timeout_s: float) -> bytes:
        if self.lose:
            self.lose = False
            raise WorkerLostError("worker f0 is gone (ActorDiedError)")
        if self.block:
            if self.release is None:
                self.release = asyncio.Event()
                self.loop = asyncio.get_running_loop()  # the server's
            self.entered += 1
            if self.entered == 2:
                self.two_in.set()
            await self.release.wait()
        row = [0.0, *BLANK_ROW]
        row[1] = self.outcome
        errors = {0: "RuntimeError: the framework fell over"} if self.outcome != OK else {}
        result = encode_result(1, ONE_ROW.pack(*row), errors, (0,) * 8)
        return encode_tensor_result(result, np.zeros(10, np.float32) if self.outcome == OK else None)

    async def recover(self, index: int) -> None:
        self.recovered.set()


def test_a_lost_worker_is_503_with_retry_after_and_is_recovered():
    caller = FakeCaller(lose=True)
    gateway = _gateway(caller)
    with serving(make_app(gateway, retry_after_s=3)) as url, httpx.Client(base_url=url) as client:
        r = client.post("/v2/models/digits_cnn/infer", json=_GOOD)
        assert r.status_code == 503 and r.headers["retry-after"] == "3" and "gone" in r.json()["error"]
        assert caller.recovered.wait(10)
        assert client.post("/v2/models/digits_cnn/infer", json=_GOOD).status_code == 200
        assert 'outcome="worker_died"' in client.get("/metrics").text


def test_a_model_that_fails_is_503_with_retry_after():
    gateway = _gateway(FakeCaller(outcome=ERROR))
    with serving(make_app(gateway)) as url, httpx.Client(base_url=url) as client:
        r = client.post("/v2/models/digits_cnn/infer", json=_GOOD)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "the framework fell over" in r.json()["error"]


def test_not_ready_is_503():
    gateway = Gateway(FakeCaller(), _infos(), mode="cached")
    with serving(make_app(gateway)) as url, httpx.Client(base_url=url) as client:
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/null/ready").status_code == 503
        assert client.post("/v2/models/digits_cnn/infer", json=_GOOD).status_code == 503


def test_requests_over_the_in_flight_bound_are_503_at_once():
    caller = FakeCaller(block=True)
    gateway = _gateway(caller, max_inflight=2)
    with serving(make_app(gateway)) as url:
        async def main() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                held = [asyncio.ensure_future(client.post("/v2/models/digits_cnn/infer", json=_GOOD))
                        for _ in range(2)]
                assert await asyncio.to_thread(caller.two_in.wait, 10)
                r = await client.post("/v2/models/digits_cnn/infer", json=_GOOD)
                assert r.status_code == 503 and "busy: 2 requests in flight" in r.json()["error"]
                assert r.headers["retry-after"] == "1"
                assert caller.release is not None
                caller.loop.call_soon_threadsafe(caller.release.set)
                return [(await h).status_code for h in held]

        assert asyncio.run(main()) == [200, 200]
    assert gateway.inflight == 0


def test_docs_config_lists_every_key():
    from cortexbench.config import Config, keys_of

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    missing = [k for k in keys_of(Config) if f"| `{k}` |" not in text]
    assert missing == []


# --- requests in shared memory (gateway/shm.py, RayCaller) ----------------------------------------------


def test_shared_slots_are_reused_capped_retired_and_unlinked():
    slots = SharedSlots(4096, max_slots=2)
    try:
        a, b = slots.acquire(), slots.acquire()
        assert a is not None and b is not None and a.path != b.path and os.path.exists(a.path)
        assert slots.acquire() is None  # two in flight: the third request goes with the call
        slots.release(a)
        assert slots.acquire() is a  # a free slot carries the next request
        slots.retire(b)  # its call timed out: the worker may still read it
        assert not os.path.exists(b.path) and slots.slots == 1
        c = slots.acquire()
        assert c is not None and c.path not in (a.path, b.path)
        x = np.arange(12, dtype=np.float16).reshape(1, 3, 4)
        n = write_tensor_request(memoryview(c.buf), 5, 1, x)
        item, model, y = decode_tensor_request(SlotReader().view(c.path, n))
        assert (item, model) == (5, 1) and y.dtype == np.float32 and np.array_equal(y, x)
    finally:
        slots.close()
    assert not os.path.exists(a.path) and not os.path.exists(c.path)
    with pytest.raises(ValueError):
        SlotReader().view("/etc/passwd", 4)
    killed = SharedSlots(4096, max_slots=2, prefix="cortexbench-gw-test")  # its process never closes it
    paths = [s.path for s in (killed.acquire(), killed.acquire()) if s is not None]
    assert len(paths) == 2 and all(os.path.exists(p) for p in paths)
    assert remove_slots("cortexbench-gw-test") == 2 and not any(os.path.exists(p) for p in paths)


class TwinTarget:
    """``cluster.RayTarget.infer_tensor``'s two ways to a worker, in process: a slot's path (read as
    ``WorkerActor.infer_tensor_shm`` reads it) or the request's bytes; ``fail`` raises once, after the read."""

    def __init__(self, workers) -> None:
        self.runs = workers
        self.workers = [SimpleNamespace(name=w.spec.name) for w in workers]
        self.reader = SlotReader()
        self.got: list[str] = []
        self.fail = False

    async def infer_tensor(self, index: int, data, timeout_s: float) -> bytes:
        self.got.append("slot" if isinstance(data, tuple) else "bytes")
        out = self.runs[index].run_tensor(self.reader.view(*data) if isinstance(data, tuple) else data)
        if self.fail:
            self.fail = False
            raise WorkerError("worker cpu0 did not answer within 1 s")
        return out


def test_ray_caller_sends_a_local_workers_requests_through_shared_memory(workers):
    target = TwinTarget(workers)
    caller = RayCaller(target, "cached", SharedSlots(1 << 20, 4), [True, False])
    x = np.random.default_rng(0).random((1, 1, 28, 28), np.float32)

    async def run() -> list[np.ndarray]:
        outs = [decode_tensor_result(await caller.call(i, 0, 1, x, 5.0))[1] for i in (0, 1, 0)]
        target.fail = True
        with pytest.raises(WorkerError):
            await caller.call(0, 1, 1, x, 5.0)
        return outs

    try:
        outs = asyncio.run(run())
        assert target.got == ["slot", "bytes", "slot", "slot"]  # worker 1 is on another machine
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])  # the same answer either way
        assert caller.slots.slots == 0  # the slot of the failed call was retired, not reused
    finally:
        caller.close()


def test_a_worker_that_cannot_open_its_channel_is_reached_by_the_actor_call(workers):
    """``WorkerActor.open_channel`` answers None where it cannot listen: that worker keeps the call."""
    target = TwinTarget(workers)
    target.open_channels = lambda indices: [None] * len(indices)
    caller = RayCaller(target, "cached", SharedSlots(1 << 20, 4), [True, False], channel=True)
    x = np.random.default_rng(0).random((1, 1, 28, 28), np.float32)
    try:
        assert caller.channels == [None, None]
        decode_tensor_result(asyncio.run(caller.call(0, 0, 1, x, 5.0)))
        assert target.got == ["slot"]
    finally:
        caller.close()
