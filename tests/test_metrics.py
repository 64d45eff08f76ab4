"""cortexbench.metrics: bucket semantics, merging shards, /metrics over HTTP, a real Prometheus, deploy/ files."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cortexbench.errors import ConfigError
from cortexbench.metrics import BUCKETS_S, METRIC_NAMES, STAGES, BucketCounts, MetricsState
from cortexbench.metrics_http import GATEWAY_METRIC_NAMES, MetricsServer, RequestCounts

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "cortexbench-dashboard.json"
MODELS = ("resnet", "vgg", "nin")
WORKERS = ("gpu:0", "gpu:1")
OUTCOMES = ("ok", "error")


def _columns(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    model = rng.integers(0, len(MODELS), n)
    worker = rng.integers(0, len(WORKERS), n)
    outcome = (rng.random(n) < 0.1).astype(np.int64)
    # Some latencies exactly on bucket bounds, some beyond the last bound.
    latency = rng.choice(np.array([*BUCKETS_S, 1e-6, 3e-3, 0.7, 42.0]), n)
    return model, worker, outcome, latency


def _state(cols: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], mode: str = "cached") -> MetricsState:
    s = MetricsState(run_id="run-1", mode=mode, backend="torch", progress_ratio=0.25)
    for m, w, o, lat in cols:
        s.record_images(mode, m, w, o, lat, models=MODELS, workers=WORKERS, outcomes=OUTCOMES)
    return s


def _scrape(url: str) -> dict[str, list]:
    text = httpx.get(url, timeout=5.0).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- BucketCounts ------------------------------------------------------------------------------------------

def test_bucket_counts_use_le_semantics_at_exact_bounds():
    h = BucketCounts()
    h.observe_many(np.array([50e-6, 50e-6, np.nextafter(50e-6, 1.0), 1.0, 30.0, 30.5, np.nan]))
    cum = h.cumulative()
    assert len(cum) == len(BUCKETS_S) + 1
    assert cum[0] == 2                          # le=5e-05 holds the two values equal to it
    assert cum[1] == 3                          # the value just above 50 us is in le=0.0001
    assert cum[BUCKETS_S.index(1.0)] == 4
    assert cum[BUCKETS_S.index(1.0) - 1] == 3
    assert cum[-2] == 5                         # le=30 holds 30.0 itself
    assert cum[-1] == h.count == 6              # +Inf holds 30.5; NaN is not counted
    assert h.sum_s == pytest.approx(2 * 50e-6 + np.nextafter(50e-6, 1.0) + 1.0 + 30.0 + 30.5)


def test_observe_one_at_a_time_equals_observe_many():
    values = np.array([1e-7, 50e-6, 2.5e-3, 0.1, 0.11, 10.0, 100.0])
    one, many = BucketCounts(), BucketCounts()
    for v in values:
        one.observe(float(v))
    many.observe_many(values)
    assert one == many
    assert pickle.loads(pickle.dumps(many)) == many


# -- MetricsState --------------------------------------------------------------------------------------------

def test_record_images_counts_every_image_and_times_only_ok():
    m, w, o, lat = _columns(0, 1000)
    s = _state([(m, w, o, lat)])
    assert s.images_total == 1000
    for mi, model in enumerate(MODELS):
        for wi, worker in enumerate(WORKERS):
            sel = (m == mi) & (w == wi)
            assert s.images[("cached", "measured", model, worker, "ok")] == int((sel & (o == 0)).sum())
            assert s.images[("cached", "measured", model, worker, "error")] == int((sel & (o == 1)).sum())
            expected = BucketCounts()
            expected.observe_many(lat[sel & (o == 0)])
            got = s.latency[("cached", "measured", model, worker)]
            assert np.array_equal(got.counts, expected.counts)
            assert got.count == expected.count
            assert got.sum_s == pytest.approx(expected.sum_s)


def test_record_images_accepts_names_instead_of_codes():
    m, w, o, lat = _columns(1, 300)
    by_code = _state([(m, w, o, lat)])
    by_name = MetricsState(run_id="run-1", mode="cached", backend="torch", progress_ratio=0.25)
    by_name.record_images("cached", np.array(MODELS)[m], np.array(WORKERS)[w], np.array(OUTCOMES)[o], lat)
    assert by_name.images == by_code.images
    assert by_name.latency.keys() == by_code.latency.keys()
    for k, h in by_code.latency.items():
        assert np.array_equal(by_name.latency[k].counts, h.counts)
    with pytest.raises(ValueError, match="model codes"):
        by_name.record_images("cached", [7], [0], [0], [0.1], models=MODELS, workers=WORKERS, outcomes=OUTCOMES)


def test_merge_of_shards_equals_one_state_of_all_values():
    a_cols, b_cols = _columns(2, 700), _columns(3, 500)
    shard_a, shard_b = _state([a_cols]), _state([b_cols])
    shard_a.record_stages("cached", {"infer": a_cols[3], "read": np.full(700, np.nan)})
    shard_b.record_stages("cached", {"infer": b_cols[3], "queue": b_cols[3] / 10})
    shard_a.add_model_loads("gpu:0", 3, mode="cached")
    shard_b.add_model_loads("gpu:0", 2, mode="cached")
    shard_b.add_cache_hits("gpu:1", 9, mode="cached")
    shard_a.set_inflight("gpu:0", 4)
    shard_b.set_inflight("gpu:1", 7)
    shard_a.set_device_memory("gpu:0", 1 << 30)

    whole = _state([a_cols, b_cols])
    whole.record_stages("cached", {"infer": np.concatenate([a_cols[3], b_cols[3]]), "queue": b_cols[3] / 10})
    merged = MetricsState.merged([pickle.loads(pickle.dumps(shard_a)), shard_b])

    assert merged.images == whole.images
    assert merged.images_total == 1200
    for table in ("latency", "stage"):
        got, want = getattr(merged, table), getattr(whole, table)
        assert got.keys() == want.keys()
        for k in want:
            assert np.array_equal(got[k].counts, want[k].counts), k
            assert got[k].count == want[k].count
            assert got[k].sum_s == pytest.approx(want[k].sum_s)
    assert ("cached", "measured", "read") not in merged.stage   # all-NaN stage: no empty series
    assert merged.model_loads == {("cached", "measured", "gpu:0"): 5}
    assert merged.cache_hits == {("cached", "measured", "gpu:1"): 9}
    assert merged.inflight == {"gpu:0": 4, "gpu:1": 7}
    assert merged.device_memory_bytes == {"gpu:0": 1 << 30}
    assert (merged.run_id, merged.mode, merged.backend) == ("run-1", "cached", "torch")
    # merging does not change the shards
    assert shard_a.model_loads == {("cached", "measured", "gpu:0"): 3}
    assert shard_a.latency[next(iter(shard_a.latency))] is not merged.latency[next(iter(shard_a.latency))]


def test_warmup_and_measured_images_are_separate_series():
    m, w, o, lat = _columns(6, 400)
    s = MetricsState()
    s.record_images("cold", m[:40], w[:40], o[:40], lat[:40], models=MODELS, workers=WORKERS, outcomes=OUTCOMES,
                    phase="warmup")
    s.record_images("cold", m[40:], w[40:], o[40:], lat[40:], models=MODELS, workers=WORKERS, outcomes=OUTCOMES)
    s.record_stages("cold", {"infer": lat[:40]}, phase="warmup")
    per_phase = {p: sum(n for k, n in s.images.items() if k[1] == p) for p in ("warmup", "measured")}
    assert per_phase == {"warmup": 40, "measured": 360}
    timed = {p: sum(h.count for k, h in s.latency.items() if k[1] == p) for p in ("warmup", "measured")}
    assert timed == {"warmup": int((o[:40] == 0).sum()), "measured": int((o[40:] == 0).sum())}
    assert set(s.stage) == {("cold", "warmup", "infer")}
    with pytest.raises(ValueError, match="unknown phase 'warm-up'"):
        s.record_images("cold", [0], [0], [0], [0.1], models=MODELS, workers=WORKERS, outcomes=OUTCOMES,
                        phase="warm-up")


def test_record_residency_counts_hits_and_loads_per_worker():
    s = MetricsState()
    s.record_residency("lru:1", [0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 1, -1], workers=WORKERS, phase="warmup")
    assert s.cache_hits == {("lru:1", "warmup", "gpu:0"): 1, ("lru:1", "warmup", "gpu:1"): 1}
    assert s.model_loads == {("lru:1", "warmup", "gpu:0"): 1, ("lru:1", "warmup", "gpu:1"): 2}  # -1: neither


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown stage 'infr'"):
        MetricsState().record_stages("cold", {"infr": [0.1]})


# -- MetricsServer over HTTP ---------------------------------------------------------------------------------

def test_scrape_shows_exact_counts_buckets_sums_and_labels():
    m, w, o, lat = _columns(4, 2000)
    state = _state([(m, w, o, lat)])
    state.record_stages("cached", {"decode": [50e-6, 1e-3, 1e-3], "infer": [0.02]})
    state.add_model_loads("gpu:0", 8, mode="cached", phase="setup")
    state.add_cache_hits("gpu:1", 1990, mode="cached")
    state.set_inflight("gpu:1", 3)
    state.set_device_memory("gpu:0", 123_456_789)
    state.set_host_memory("gpu:1", 987_654_321)
    state.host, state.phase, state.mode_progress_ratio = "node-a", "measuring", 0.75

    with MetricsServer(0) as server:
        assert server.port > 0
        server.update(state)
        fam = _scrape(f"http://127.0.0.1:{server.port}/metrics")

    sample_names = {s.name for samples in fam.values() for s in samples}
    for name in METRIC_NAMES:
        assert name in sample_names or f"{name}_count" in sample_names, name
    assert {s.labels["host"] for samples in fam.values() for s in samples} == {"node-a"}  # on every series
    images = {(s.labels["mode"], s.labels["phase"], s.labels["model"], s.labels["worker"], s.labels["outcome"]):
              s.value for s in fam["cortexbench_images"] if s.name == "cortexbench_images_total"}
    assert images == {k: float(v) for k, v in state.images.items()}
    assert sum(images.values()) == 2000

    # One latency series, checked bucket by bucket against a direct computation.
    sel = (m == 1) & (w == 0) & (o == 0)
    lat_samples = [s for s in fam["cortexbench_image_latency_seconds"]
                   if s.labels.get("model") == "vgg" and s.labels.get("worker") == "gpu:0"]
    buckets = {float(s.labels["le"]): s.value for s in lat_samples if s.name.endswith("_bucket")}
    assert len(buckets) == len(BUCKETS_S) + 1
    for bound in [*BUCKETS_S, float("inf")]:
        assert buckets[bound] == int((lat[sel] <= bound).sum()), bound
    count = next(s.value for s in lat_samples if s.name.endswith("_count"))
    total = next(s.value for s in lat_samples if s.name.endswith("_sum"))
    assert count == int(sel.sum())
    assert total == pytest.approx(float(lat[sel].sum()))
    assert {s.labels["mode"] for s in lat_samples} == {"cached"}

    decode = {float(s.labels["le"]): s.value for s in fam["cortexbench_stage_seconds"]
              if s.name.endswith("_bucket") and s.labels["stage"] == "decode"}
    assert decode[50e-6] == 1 and decode[0.0005] == 1 and decode[0.001] == 3 and decode[float("inf")] == 3
    assert {s.labels["stage"] for s in fam["cortexbench_stage_seconds"]} == {"decode", "infer"}
    assert set(STAGES) >= {"decode", "infer"}

    def one(name: str) -> dict[str, float]:
        return {s.labels.get("worker", ""): s.value for s in fam[name]}

    assert one("cortexbench_model_loads") == {"gpu:0": 8}
    assert [s.labels["phase"] for s in fam["cortexbench_model_loads"]] == ["setup"]
    assert one("cortexbench_cache_hits") == {"gpu:1": 1990}
    assert one("cortexbench_inflight") == {"gpu:1": 3}
    assert one("cortexbench_device_memory_bytes") == {"gpu:0": 123_456_789}
    assert one("cortexbench_host_memory_bytes") == {"gpu:1": 987_654_321}
    (info,) = fam["cortexbench_run_info"]
    assert info.labels == {"run_id": "run-1", "mode": "cached", "backend": "torch", "host": "node-a"}
    assert info.value == 1
    assert fam["cortexbench_run_progress_ratio"][0].value == 0.25
    (mode_progress,) = fam["cortexbench_mode_progress_ratio"]
    assert mode_progress.labels["mode"] == "cached" and mode_progress.value == 0.75
    assert {s.labels["phase"]: s.value for s in fam["cortexbench_run_phase"]} == {
        "preparing": 0, "warmup": 0, "measuring": 1, "done": 0}


def test_update_keeps_a_snapshot_and_can_be_replaced():
    state = MetricsState()
    state.record_group("cold", "nin", "cpu:0", [0.5, 0.6])
    with MetricsServer(0) as server:
        server.update(state)
        state.record_group("cold", "nin", "cpu:0", [0.5])       # after update: not shown
        url = f"http://127.0.0.1:{server.port}/metrics"
        (sample,) = [s for s in _scrape(url)["cortexbench_images"] if s.name == "cortexbench_images_total"]
        assert sample.value == 2
        server.update(state, copy=False)
        (sample,) = [s for s in _scrape(url)["cortexbench_images"] if s.name == "cortexbench_images_total"]
        assert sample.value == 3


def test_busy_port_is_a_config_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics port {port} is in use; pick another with --metrics-port"):
            MetricsServer(port).start()


def test_stop_frees_the_port_and_is_idempotent():
    server = MetricsServer(0)
    port = server.start()
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).status_code == 200
    server.stop()
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    with MetricsServer(port) as again:                  # the next run can take the same port
        assert again.port == port
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).status_code == 200


# -- deploy/ and docs/ ----------------------------------------------------------------------------------------

_HISTOGRAMS = ("cortexbench_image_latency_seconds", "cortexbench_stage_seconds", "cortexbench_http_request_seconds")
_EXPOSED = set(METRIC_NAMES) | set(GATEWAY_METRIC_NAMES) | {f"{n}_{s}" for n in _HISTOGRAMS
                                                            for s in ("bucket", "sum", "count")}


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in dash["templating"]["list"])
    exprs = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            exprs.append(t["expr"])
    return exprs


def test_dashboard_queries_only_metrics_that_are_exposed():
    exprs = _dashboard_exprs()
    assert len(exprs) >= 12
    used = {name for e in exprs for name in re.findall(r"\bcortexbench_[a-z_]+", e)}
    assert used <= _EXPOSED, used - _EXPOSED
    assert used >= ((set(METRIC_NAMES) | set(GATEWAY_METRIC_NAMES)) - set(_HISTOGRAMS)) | {
        "cortexbench_image_latency_seconds_bucket", "cortexbench_stage_seconds_sum",
        "cortexbench_stage_seconds_bucket", "cortexbench_http_request_seconds_bucket"}
    # The rendered exposition really has those sample names.
    state = MetricsState(run_id="r", mode="cold", backend="onnxruntime", progress_ratio=0.5)
    state.record_group("cold", "nin", "gpu:0", [0.1])
    state.record_stages("cold", {"read": [0.05]})
    state.add_model_loads("gpu:0", mode="cold")
    state.add_cache_hits("gpu:0", mode="cold")
    state.set_inflight("gpu:0", 1)
    state.set_device_memory("gpu:0", 1)
    state.set_host_memory("gpu:0", 1)
    state.mode_progress_ratio, state.phase = 0.5, "warmup"
    requests = RequestCounts()
    requests.record("POST", "/v2/models/{name}/infer", 200, 0.01)
    rendered = {s.name for f in [*state.families(), *requests.families("h")] for s in f.samples}
    assert used <= rendered, used - rendered


def test_dashboard_shows_measured_images_only_and_filters_by_host():
    """Warm-up images are left out of every per-image panel (as the report leaves them out), and every
    series is filtered by the dashboard's host variable, which lists the hosts of cortexbench_run_info."""
    per_image = ("cortexbench_image_latency_seconds", "cortexbench_images_total", "cortexbench_stage_seconds",
                 "cortexbench_cache_hits_total")
    selectors = [m for e in _dashboard_exprs() for m in re.finditer(r"\b(cortexbench_[a-z_]+)(\{[^}]*\})?", e)]
    assert selectors
    for m in selectors:
        assert m.group(2) and 'host=~"$host"' in m.group(2), m.group(0)
        if m.group(1).startswith(per_image):
            assert 'phase="measured"' in m.group(2), m.group(0)
    (host,) = [v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "host"]
    assert host["query"] == "label_values(cortexbench_run_info, host)" and host["includeAll"]


def test_docs_and_deploy_files_name_only_exposed_metrics():
    docs = (ROOT / "docs" / "metrics.md").read_text()
    named = set(re.findall(r"\bcortexbench_[a-z_]+", docs))
    assert named <= _EXPOSED, named - _EXPOSED
    assert set(METRIC_NAMES) <= named
    for stage in STAGES:
        assert f"`{stage}`" in docs
    yaml = pytest.importorskip("yaml")
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert list(jobs) == ["cortexbench", "cortexbench-gateway", "ray"]
    assert jobs["cortexbench"]["scrape_interval"] == "1s"
    assert jobs["cortexbench"]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    assert jobs["cortexbench-gateway"]["static_configs"][0]["targets"] == ["127.0.0.1:8080"]  # serve's port
    (ray_sd,) = jobs["ray"]["file_sd_configs"][0]["files"]
    assert ray_sd == "/tmp/ray/session_latest/prom_metrics_service_discovery.json"
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert "/tmp/ray:/tmp/ray:ro" in compose["services"]["prometheus"]["volumes"]  # where ray_sd is read
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "cortexbench.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus"
    assert yaml.safe_load((prov / "dashboards" / "cortexbench.yml").read_text())["providers"][0]["type"] == "file"


# -- a real Prometheus ----------------------------------------------------------------------------------------

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


def _poll(fn, deadline_s: float, what: str):
    """Call fn every 100 ms until it returns something not None; fail after deadline_s."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            got = fn()
        except httpx.TransportError:
            got = None
        if got is not None:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(0.1)


class Prometheus:
    """A real Prometheus (Debian's binary) on 127.0.0.1 with an ephemeral port and a temporary store,
    scraping ``jobs`` (job name -> 'host:port') every ``interval``; ``with`` waits until it is ready."""

    def __init__(self, tmp_path: Path, jobs: dict[str, str], interval: str = "200ms") -> None:
        assert PROMETHEUS is not None
        self.tmp_path = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config = tmp_path / "prometheus.yml"
        self.config.write_text(
            f"global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\nscrape_configs:\n"
            + "".join(f"  - job_name: {name}\n    static_configs:\n      - targets: ['{target}']\n"
                      for name, target in jobs.items()))
        self.api = f"http://127.0.0.1:{_free_port()}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        self._log = (self.tmp_path / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.tmp_path / 'tsdb'}",
             f"--web.listen-address={self.api.removeprefix('http://')}"], stdout=self._log, stderr=subprocess.STDOUT)

        def ready() -> bool | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited {self.proc.returncode}: "
                            f"{(self.tmp_path / 'prometheus.log').read_text()[-2000:]}")
            return True if httpx.get(f"{self.api}/-/ready", timeout=2.0).status_code == 200 else None

        _poll(ready, 30.0, "prometheus /-/ready")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()

    def query(self, q: str, endpoint: str = "query", **params: object) -> dict:
        """``/api/v1/<endpoint>`` of PromQL ``q``: its data (the query must succeed)."""
        r = httpx.get(f"{self.api}/api/v1/{endpoint}", params={"query": q, **params}, timeout=10.0).json()
        assert r["status"] == "success", (q, r)
        return r["data"]


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary on PATH (Debian: apt install prometheus)")
def test_real_prometheus_scrapes_the_state_and_accepts_the_dashboard_queries(tmp_path):
    m, w, o, lat = _columns(5, 5000)
    state = _state([(m, w, o, lat)])
    state.record_stages("cached", {s: lat / 8 for s in STAGES})
    with MetricsServer(0) as server, Prometheus(tmp_path, {"cortexbench": f"127.0.0.1:{server.port}"}) as prom:
        server.update(state)

        def total() -> float | None:
            result = prom.query("sum(cortexbench_images_total)")["result"]
            return float(result[0]["value"][1]) if result else None

        assert _poll(total, 30.0, "sum(cortexbench_images_total) in prometheus") == state.images_total == 5000
        ok = prom.query('sum(cortexbench_images_total{outcome="ok"})')["result"]
        assert float(ok[0]["value"][1]) == int((o == 0).sum())
        quantile = prom.query('histogram_quantile(1, sum by (le) (cortexbench_image_latency_seconds_bucket))')
        assert float(quantile["result"][0]["value"][1]) == 30.0   # 42 s lies beyond the last bound
        # Every dashboard expression parses and runs (Grafana's variables given plain values).
        for expr in _dashboard_exprs():
            prom.query(expr.replace("$__rate_interval", "30s").replace("$__interval", "1s").replace("$host", ".*"))
