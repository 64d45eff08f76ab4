"""cortexbench.dashboard: the committed dashboard is what the command builds, and every panel's PromQL returns
data from a real Prometheus scraping a live stream run and a live gateway."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cortexbench import dashboard
from tests.test_metrics import DASHBOARD, PROMETHEUS, Prometheus, _free_port, _poll

# -- the committed file ---------------------------------------------------------------------------------------


def test_the_committed_dashboard_is_what_the_command_builds(capsys):
    assert DASHBOARD.read_text() == dashboard.render()
    assert dashboard.main(["--check"]) == 0
    assert "is up to date" in capsys.readouterr().out


def test_check_fails_in_one_line_when_the_file_differs_and_writing_makes_it_pass(tmp_path, capsys):
    out = tmp_path / "dash.json"
    out.write_text(DASHBOARD.read_text().replace("Images/s by tier", "Images per second"))
    assert dashboard.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"python -m cortexbench.dashboard: error: {out} differs from the dashboard the code builds; "
                   "regenerate it with python -m cortexbench.dashboard\n")
    assert dashboard.main(["--out", str(out)]) == 0
    assert out.read_text() == DASHBOARD.read_text()
    assert dashboard.main(["--check", "--out", str(out)]) == 0
    capsys.readouterr()
    nowhere = out / "dash.json"  # under a file: one line, no traceback
    assert dashboard.main(["--out", str(nowhere)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"python -m cortexbench.dashboard: error: cannot write {nowhere}: ") and err.count("\n") == 1


def test_the_dashboard_has_every_tier_stage_gateway_and_ray_panel():
    built = dashboard.build()
    assert [p["id"] for p in built["panels"]] == list(range(1, len(built["panels"]) + 1))
    rows = [p["title"] for p in built["panels"] if p["type"] == "row"]
    assert rows == [r.title for r in dashboard.ROWS]
    text = "\n".join(e for _, e in dashboard.exprs(built))
    for needed in ('mode!="cached"', "sum by (le, mode)", "cortexbench_stage_seconds_bucket",
                   "sum by (mode, stage)", "cortexbench_http_requests_total", "cortexbench_http_inflight",
                   "cortexbench_http_request_seconds_bucket", "ray_node_cpu_utilization", "ray_node_mem_used",
                   "ray_node_gpus_utilization", "ray_node_gram_used"):
        assert needed in text, needed


# -- every panel against a live run ----------------------------------------------------------------------------

# Targets that a CPU run on this machine cannot fill, and why.  Everything else must return data.
NOT_CHECKED = {
    "cortexbench_device_memory_bytes": "GPU workers only: a CPU run exports no device memory",
    # Ray's node metrics come from Ray's metrics agent, which only ray[default] (the dashboard and its
    # aiohttp) starts, and the stream starts its local Ray without the dashboard, so there is neither an
    # agent to scrape nor the service-discovery file that deploy/prometheus.yml reads.  Their queries are
    # still run (they must parse), but their data is not asserted.
    "ray_node_": "Ray's metrics agent needs ray[default] and a Ray started with its dashboard",
}
RATE_WINDOW = "1s"  # $__rate_interval: 5 scrapes at the test's 200 ms


def _unchecked(expr: str) -> str | None:
    return next((why for key, why in NOT_CHECKED.items() if key in expr), None)


def _finite(data: dict) -> bool:
    """Whether a query's result holds at least one series with a finite value."""
    for series in data["result"]:
        values = series.get("values") or [series["value"]]
        if any(math.isfinite(float(v)) for _, v in values):
            return True
    return False


@pytest.fixture
def gateway_url(model_dir: Path, image_dir: Path):
    """The serving gateway (its FastAPI app on a real uvicorn on 127.0.0.1) over one in-process null-model
    worker, as tests/test_serve.py serves it."""
    from cortexbench.gateway.app import make_app
    from cortexbench.gateway.pool import Gateway, LocalCaller
    from cortexbench.gateway.v2 import ModelInfo
    from cortexbench.images.dataset import list_images
    from cortexbench.models.registry import get_spec
    from cortexbench.worker import ModelWorker, WorkerSpec
    from tests.gateway_server import serving

    spec = get_spec("null")
    worker = ModelWorker(WorkerSpec(name="cpu0", device="cpu", backend="mxnet", model_dir=str(model_dir),
                                    models=("null",), images=tuple(str(p) for p in list_images(image_dir)),
                                    lanes=1, image_pool=2))
    worker.set_mode("cached")
    caller = LocalCaller([worker], threads=2)
    gateway = Gateway(caller, [ModelInfo("null", 0, tuple(spec.input_shape), spec.num_classes)], mode="cached",
                      host=socket.gethostname())
    gateway.ready = True
    try:
        with serving(make_app(gateway, max_body_bytes=1 << 20)) as url:
            yield url
    finally:
        caller.close()
        worker.close()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary on PATH (Debian: apt install prometheus)")
def test_every_panel_returns_data_for_a_live_run_and_totals_agree_with_results(model_dir, image_dir, tmp_path,
                                                                               gateway_url):
    # The image set plus one file that does not decode: cold mode reads every image's file, so its images
    # of that file fail (input_error) and the failures series has data.
    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    (images / "zz_broken.jpg").write_bytes(b"not a jpeg")
    port = _free_port()
    modes = ("cached", "swap", "cold", "lru:1")
    results_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "cortexbench.stream", "--models", "null:0.002,digits_cnn", "--images", "200",
           "--warmup", "10", "--mode", ",".join(modes), "--cpu-workers", "1", "--metrics-port", str(port),
           "--linger", "60", "--quiet", "--result-dir", str(results_dir), "--model-dir", str(model_dir),
           "--img-dir", str(images)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    gateway = gateway_url.removeprefix("http://")
    with Prometheus(tmp_path / "prom", {"stream": f"127.0.0.1:{port}", "gateway": gateway}) as prom:
        started = time.time()
        log = (tmp_path / "stream.log").open("w")
        stream = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            def up(job: str) -> bool | None:
                assert stream.poll() is None, (tmp_path / "stream.log").read_text()[-3000:]
                r = prom.query(f'up{{job="{job}"}} == 1')["result"]
                return True if r else None

            # Gateway requests once Prometheus has scraped the gateway, so that rates see them.
            _poll(lambda: up("gateway"), 30.0, "a scrape of the gateway")
            with httpx.Client(base_url=gateway_url, timeout=30) as client:
                jpeg = sorted(image_dir.rglob("*.jpg"))[0].read_bytes()
                for _ in range(5):
                    assert client.post("/v1/models/null:predict", content=jpeg).status_code == 200
                assert client.post("/v1/models/nope:predict", content=jpeg).status_code == 404
                assert client.get("/v2/health/ready").status_code == 200

            def done() -> float | None:
                """The time of a scrape of the stream in phase done (its last), once its results.json is there."""
                assert stream.poll() is None, (tmp_path / "stream.log").read_text()[-3000:]
                if not prom.query('cortexbench_run_phase{job="stream", phase="done"} == 1')["result"] or \
                        not list(results_dir.glob("*-stream*/results.json")):
                    return None
                # timestamp() of a plain selector is its newest sample's scrape time (of an expression, it
                # would be the evaluation time).
                r = prom.query('timestamp(cortexbench_run_phase{job="stream", phase="done"})')["result"]
                return float(r[0]["value"][1]) if r else None   # none: the newest scrape failed (stale)

            # Queries are evaluated at that scrape's time: on a busy machine a later scrape may time out, and
            # Prometheus then marks the target's series stale.
            end = _poll(done, 100.0, "the stream's last scrape (phase done) and its results.json")
            (results_path,) = results_dir.glob("*-stream*/results.json")
            results = json.loads(results_path.read_text())
            assert list(results["modes"]) == list(modes)

            # Every target of every panel, with Grafana's variables given plain values: instant ones at the
            # end, range ones over the run.
            built = json.loads(DASHBOARD.read_text())
            checked, unchecked = [], []
            for panel in built["panels"]:
                for target in panel.get("targets", []):
                    expr = (target["expr"].replace("$__rate_interval", RATE_WINDOW)
                            .replace("$host", ".*"))
                    if target.get("instant"):
                        data = prom.query(expr, time=end)
                    else:
                        data = prom.query(expr, "query_range", start=started, end=end, step="0.2")
                    if _unchecked(expr):
                        unchecked.append(panel["title"])
                        continue
                    assert _finite(data), (panel["title"], expr, data)
                    checked.append(panel["title"])
            assert len(checked) >= 20
            assert set(unchecked) == {"Device and host memory per worker", "CPU utilisation per node",
                                      "Memory per node", "GPU utilisation", "GPU memory used"}

            # The whole-run totals against results.json (within 2%; they are the same counts).
            def by_mode(q: str) -> dict[str, float]:
                return {r["metric"]["mode"]: float(r["value"][1]) for r in prom.query(q, time=end)["result"]}

            measured = 'job="stream", phase="measured"'
            ok = by_mode(f'sum by (mode) (cortexbench_images_total{{{measured}, outcome="ok"}})')
            sent = by_mode(f"sum by (mode) (cortexbench_images_total{{{measured}}})")
            timed = by_mode(f"sum by (mode) (cortexbench_image_latency_seconds_count{{{measured}}})")
            hits = by_mode(f"sum by (mode) (cortexbench_cache_hits_total{{{measured}}})")
            for mode in modes:
                s = results["modes"][mode]["summary"]
                assert ok[mode] == pytest.approx(s["counted_ok"], rel=0.02), mode
                assert timed[mode] == pytest.approx(s["counted_ok"], rel=0.02), mode
                assert sent[mode] == pytest.approx(s["counted"], rel=0.02), mode
                assert hits.get(mode, 0.0) == pytest.approx(s["hits"], rel=0.02, abs=0.5), mode
            assert results["modes"]["cold"]["summary"]["counted_failed"] > 0   # the broken file's images
            codes = {r["metric"]["code"]: float(r["value"][1]) for r in prom.query(
                'sum by (code) (max_over_time(cortexbench_http_requests_total{job="gateway", '
                'route="/v1/models/{name}:predict"}[5m]))',
                time=end)["result"]}
            assert codes == {"200": 5.0, "404": 1.0}
        finally:
            if stream.poll() is None:
                # It lingers, its results written: SIGTERM ends the wait (exit 0).
                stream.send_signal(signal.SIGTERM)
                try:
                    stream.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    stream.kill()
                    stream.wait(timeout=10)
            log.close()
