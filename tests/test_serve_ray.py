"""``python -m cortexbench.serve`` as a process with its Ray workers (CPU, mxnet, tiny models), driven by
cortexbench's own HTTP target: the counts of a stream through the gateway add up and match the gateway's
/metrics; SIGTERM during a stream loses no accepted request and exits 0; the command's refusals."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cortexbench.serve import main as serve_main
from cortexbench.stream import main as stream_main

REPO = Path(__file__).resolve().parents[1]
STOP_LINE = re.compile(r"serve: stopped on SIGTERM: (\d+) requests accepted, (\d+) answered, (\d+) not answered; "
                       r"(\d+) inferences answered 200")


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    lines: queue.Queue
    gateway_urls: list[str]  # each gateway's own (--gateways N)

    def rest(self, timeout_s: float) -> list[str]:
        """The lines it writes until it exits (within ``timeout_s``)."""
        out = []
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                return out
            out.append(line)


@pytest.fixture
def served(model_dir: Path, image_dir: Path, tmp_path: Path) -> Iterator[Served]:
    yield from _serve(model_dir, image_dir, tmp_path, [])


@pytest.fixture
def served_twice(model_dir: Path, image_dir: Path, tmp_path: Path) -> Iterator[Served]:
    yield from _serve(model_dir, image_dir, tmp_path, ["--gateways", "2"])


def _serve(model_dir: Path, image_dir: Path, tmp_path: Path, extra: list[str]) -> Iterator[Served]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortexbench.serve", "--models", "null,mnist_cnn", "--backend", "mxnet",
         "--model-dir", str(model_dir), "--img-dir", str(image_dir), "--cpu-workers", "1", "--port", "0", *extra],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    url = None
    deadline = time.monotonic() + 180
    seen = []
    while url is None:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, f"serve exited before listening: {seen}"
        seen.append(line)
        m = re.search(r" on (http://127\.0\.0\.1:\d+) ", line)
        url = m.group(1) if m else None
    try:
        yield Served(proc, url, lines, re.findall(r"(http://127\.0\.0\.1:\d+)/metrics", seen[-1]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _results(result_dir: Path) -> dict:
    (run,) = list(result_dir.iterdir())
    return json.loads((run / "results.json").read_text())["modes"]["server"]["summary"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stream_through_the_gateway_adds_up_and_matches_its_metrics(served, image_dir, tmp_path):
    rc = stream_main(["--target", served.url, "--models", "null,mnist_cnn", "--images", "150", "--warmup", "10",
                      "--concurrency", "4", "--img-dir", str(image_dir), "--result-dir", str(tmp_path / "res"),
                      "--metrics-port", "0", "--quiet", "--records", "none"])
    assert rc == 0
    s = _results(tmp_path / "res")
    assert s["images_sent"] == 160 and s["ok"] == 160 and s["failed"] == 0 and s["counted_ok"] == 150
    text = httpx.get(served.url + "/metrics", timeout=10).text
    assert _metric(text, "cortexbench_images_total", outcome="ok") == 160
    assert _metric(text, "cortexbench_image_latency_seconds_count") == 160
    assert _metric(text, "cortexbench_http_requests_total", route="/v2/models/{name}/infer", code="200") == 160
    assert _metric(text, "cortexbench_images_total", model="mnist_cnn") + \
        _metric(text, "cortexbench_images_total", model="null") == 160
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_during_a_stream_loses_no_accepted_request(served, image_dir, tmp_path):
    stream = _stream(served.url, image_dir, tmp_path)
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=served.url, timeout=10) as client:
            while _metric(client.get("/metrics").text, "cortexbench_http_requests_total", code="200",
                          route="/v2/models/{name}/infer") < 50:
                assert time.monotonic() < deadline and stream.poll() is None
                time.sleep(0.05)  # polls the condition (the gateway's count) at a bounded pace
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(60) == 0
        last = [m for line in served.rest(10) if (m := STOP_LINE.search(line))]
        assert last, "no stop line"
        accepted, answered, lost, ok = (int(g) for g in last[0].groups())
        assert accepted == answered and lost == 0 and ok >= 50
        stream.communicate(timeout=120)  # the target waits for the gone server, then counts the rest
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait(30)
    s = _results(tmp_path / "res")
    # every inference the gateway answered reached the stream as ok; the rest never got in
    assert s["ok"] == ok
    assert s["by_outcome"]["error"] == 0 and s["by_outcome"]["input_error"] == 0
    assert sum(s["by_outcome"].values()) == s["images_sent"]


def _stream(url: str, image_dir: Path, tmp_path: Path) -> subprocess.Popen:
    """A long closed-loop stream through the gateway at ``url`` (stopped by the gateway's SIGTERM)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cortexbench.stream", "--target", url, "--models", "null,mnist_cnn",
         "--images", "100000", "--warmup", "0", "--concurrency", "4", "--img-dir", str(image_dir),
         "--result-dir", str(tmp_path / "res"), "--metrics-port", "0", "--quiet", "--records", "none"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)


def _answered(urls: list[str]) -> list[float]:
    return [_metric(httpx.get(u + "/metrics", timeout=10).text, "cortexbench_http_requests_total", code="200",
                    route="/v2/models/{name}/infer") for u in urls]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_gateways_share_the_port_both_take_load_and_sigterm_drains_both(served_twice, image_dir, tmp_path):
    served = served_twice
    assert len(served.gateway_urls) == 2 and served.url not in served.gateway_urls
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}]}
    for _ in range(40):  # a connection each: the kernel spreads connections over the gateways' sockets
        with httpx.Client(base_url=served.url, timeout=30) as client:
            r = client.post("/v2/models/mnist_cnn/infer", json=body)
            assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 10]
    each = _answered(served.gateway_urls)
    assert sum(each) == 40 and min(each) > 0, each  # both took load (all 40 on one: odds 2 in 2**40)
    stream = _stream(served.url, image_dir, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while sum(_answered(served.gateway_urls)) < 90:
            assert time.monotonic() < deadline and stream.poll() is None
            time.sleep(0.05)  # polls the condition (the gateways' counts) at a bounded pace
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(90) == 0
        last = [m for line in served.rest(10) if (m := STOP_LINE.search(line))]
        assert last, "no stop line"
        accepted, answered, lost, ok = (int(g) for g in last[0].groups())
        assert accepted == answered and lost == 0 and ok >= 90
        stream.communicate(timeout=120)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait(30)
    s = _results(tmp_path / "res")
    assert s["ok"] == ok - 40  # every inference the gateways answered, but the first 40, reached the stream
    assert s["by_outcome"]["error"] == 0 and sum(s["by_outcome"].values()) == s["images_sent"]


def test_the_command_refuses_an_open_host_without_a_token_and_a_port_in_use(capsys, monkeypatch):
    monkeypatch.delenv("CORTEXBENCH_TOKEN", raising=False)
    assert serve_main(["--host", "0.0.0.0", "--models", "null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--host 0.0.0.0 opens the gateway" in err[0] and "--insecure" in err[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert serve_main(["--port", str(port), "--models", "null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--port {port}: the port is in use" in err[0]
    assert serve_main(["--mode", "hot", "--models", "null"]) == 2
    assert "unknown mode 'hot'" in capsys.readouterr().err
    assert serve_main(["--max-inflight", "0", "--models", "null"]) == 2
    assert "'serve.max_inflight' must be 1 or more" in capsys.readouterr().err


def test_serve_refuses_a_config_that_sets_the_stream_engine(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"models": ["null"], "stream": {"engine": "ort"}}))
    assert serve_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stream.engine is 'ort'" in err[0] and "serve runs the backend's own path" in err[0]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_local_worker_is_reached_over_its_channel_and_reopened_after_it_is_killed(ray_session, model_dir, image_dir):
    """``serve.channel`` socket on real Ray actors: a worker on this machine answers over its Unix socket
    (never the actor call), the same answer as the actor call; once its process is killed the next call is
    WorkerLostError, and after Ray restarts it the gateway reaches the new process over a new channel."""
    import asyncio

    import numpy as np

    from cortexbench import cluster
    from cortexbench.errors import WorkerLostError
    from cortexbench.gateway.pool import RayCaller
    from cortexbench.gateway.shm import SharedSlots
    from cortexbench.images.dataset import list_images
    from cortexbench.protocol import decode_tensor_result
    from cortexbench.worker import WorkerSpec

    spec = WorkerSpec(name="ch0", device="cpu", backend="mxnet", model_dir=str(model_dir), models=("null", "mnist_cnn"),
                      images=tuple(str(p) for p in list_images(image_dir)), lanes=1, image_pool=4)
    target = cluster.start_workers([spec], gpu=False, cpus_each=0.5, threads_each=1)
    x = np.random.default_rng(0).random((1, 1, 28, 28), np.float32)
    try:
        target.set_mode("cached")
        by_ray = RayCaller(target, "cached", SharedSlots(1 << 20, 4), [True])
        expected = decode_tensor_result(asyncio.run(by_ray.call(0, 0, 1, x, 30.0)))[1]
        by_ray.close()
        caller = RayCaller(target, "cached", SharedSlots(1 << 20, 4), [True], channel=True)
        actor_calls: list[int] = []
        real = target.infer_tensor

        async def counted(*args):
            actor_calls.append(1)
            return await real(*args)

        target.infer_tensor = counted  # type: ignore[method-assign]
        first = caller.channels[0].address

        async def run() -> list[np.ndarray]:
            outs = [await caller.call(0, 1, 1, x, 30.0)]
            target.kill(0)
            deadline = time.monotonic() + 60
            while True:  # ray.kill returns before the process is gone: the channel says when it is
                assert time.monotonic() < deadline, "the killed worker still answers on its channel"
                try:
                    await caller.call(0, 2, 1, x, 30.0)
                except WorkerLostError:
                    break
            await caller.recover(0)
            outs.append(await caller.call(0, 3, 1, x, 30.0))
            return [decode_tensor_result(o)[1] for o in outs]

        outs = asyncio.run(run())
        assert actor_calls == []  # every request went over the channel
        assert caller.channels[0] is not None and caller.channels[0].address.name != first.name  # the new process's
        for y in outs:
            assert np.array_equal(y, expected)
        caller.close()
    finally:
        target.close()
