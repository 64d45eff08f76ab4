"""StreamRun without Ray: fake workers behind the handles, to see how a run ends when it cannot go on."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from cortexbench import coordinator, stream_plan, stream_results
from cortexbench.config import Config, StreamConfig
from cortexbench.coordinator import StreamPlan, StreamRun
from cortexbench.errors import ConfigError
from cortexbench.live import LiveView
from cortexbench.schedule import make_schedule
from cortexbench.worker import WorkerSpec
from tests.fakes import FakeTarget, FakeWorkerHandle

MODELS = ("null",)
MODES = ("cached", "cold", "lru:1")


def _run(handles: dict[str, FakeWorkerHandle], on_set_mode: Any = None, drivers: int = 1,
         modes: tuple[str, ...] = MODES, count: int = 200) -> tuple[StreamRun, FakeTarget]:
    cfg = Config(models=MODELS, times=count, stream=StreamConfig(modes=modes, concurrency=4, warmup=0, retries=1))
    sched = make_schedule(count=count, models=MODELS, n_images=4, seed=0)
    workers = tuple(WorkerSpec(n, "cpu", "mxnet", "models", MODELS, ("a.jpg",)) for n in handles)
    plan = StreamPlan(cfg, "mxnet", MODELS, ("a.jpg",), workers, False, 1.0, 1, "grouped", drivers, 1, 4, sched)
    target = FakeTarget(handles)
    run = StreamRun(plan, target, LiveView(MODELS, list(handles), server=None, run_id="t", backend="x", quiet=True))
    if on_set_mode is not None:
        target.on_set_mode = lambda: on_set_mode(run)
    asyncio.run(run.run())
    return run, target


def test_a_run_whose_workers_are_all_gone_stops_and_keeps_what_was_measured(tmp_path):
    handles = {"w0": FakeWorkerHandle("w0", service_s=0.001, die_at_call=30, down_s=None)}
    run, target = _run(handles)
    assert target.modes == ["cached"]  # the modes after it were not tried on dead workers
    assert run.error is not None and "every worker is gone" in run.error
    m = run.modes["cached"]
    m.result.ledger.check_complete(m.result.sent)
    assert m.summary["error"] and 0 < m.result.sent < 200
    results = stream_results.make_results(run.plan, target, run, None, time.time())
    assert results["complete"] is False and "every worker is gone" in results["run"]["error"]
    assert [w["name"] for w in results["workers"]] == ["w0"]


def test_ctrl_c_while_workers_set_up_runs_no_more_of_the_mode(tmp_path: Path):
    handles = {"w0": FakeWorkerHandle("w0", service_s=0.001), "w1": FakeWorkerHandle("w1", service_s=0.001)}
    calls = []

    def ctrl_c_on_second_mode(run: StreamRun) -> None:
        calls.append(1)
        if len(calls) == 2:
            run.interrupt()

    run, target = _run(handles, ctrl_c_on_second_mode)
    assert target.modes == ["cached", "cold"]
    assert list(run.modes) == ["cached"] and run.interrupted
    assert sum(h.images for h in handles.values()) == 200  # cold sent nothing
    results = stream_results.make_results(run.plan, target, run, None, time.time())
    assert results["complete"] is False
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stream_results.write_results(run_dir, results, run)
    assert json.loads((run_dir / "results.json").read_text())["complete"] is False
    assert (run_dir / "records-cached.csv.gz").is_file() and not (run_dir / "records-cold.csv.gz").exists()


@pytest.mark.parametrize("drivers", [1, 2])
def test_a_stream_against_the_fake_target_accounts_for_every_image_with_one_driver_or_shards(drivers):
    """The coordinator reaches workers only through the Target protocol: one driver of its own, or driver
    shards that the target runs (each with its workers, grouped by node), merged into one ledger."""
    handles = {f"w{i}": FakeWorkerHandle(f"w{i}", service_s=0.001, lanes=2) for i in range(4)}
    run, target = _run(handles, drivers=drivers, modes=("cached", "cold"), count=300)
    assert target.modes == ["cached", "cold"] and not run.error and not run.interrupted
    for mode in ("cached", "cold"):
        m = run.modes[mode]
        m.result.ledger.check_complete(m.result.sent)
        assert m.result.sent == 300 and m.summary["summary"]["counted_ok"] == 300
        assert set(m.result.ledger.workers) == set(handles)
    assert all(h.started == h.closed == 2 for h in handles.values())  # once per mode, by one driver
    if drivers > 1:
        jobs = target.shard_jobs
        assert len(jobs) == 2 and sorted(i for j in jobs for i in j.worker_ids) == [0, 1, 2, 3]
        assert all(len({target.workers[i].node_id for i in j.worker_ids}) == 1 for j in jobs)  # one node each
        assert sum(len(j.schedule) for j in jobs) == 300


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_served_before_ray_models_and_images_are_prepared(monkeypatch, tmp_path):
    """The server is up, phase 'preparing', when planning starts (exporting models, synthesising images,
    then Ray), so a dashboard shows the run from its first second; on --metrics-host, with the host label."""
    import socket

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from cortexbench.errors import ConfigError

    port = _free_port()
    seen: list[dict[str, float]] = []

    def plan_stream(cfg: Config, resources: dict[str, float], *, quiet: bool = False) -> Any:
        text = httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=5.0).text
        (fam,) = [f for f in text_string_to_metric_families(text) if f.name == "cortexbench_run_phase"]
        seen.append({s.labels["phase"]: s.value for s in fam.samples})
        assert {s.labels["host"] for s in fam.samples} == {socket.gethostname()}
        raise ConfigError("stop here")

    monkeypatch.setattr(coordinator, "plan_stream", plan_stream)
    from cortexbench import cluster  # the coordinator imports it for a run on Ray workers only

    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: {"CPU": 2.0})
    cfg = Config(result_dir=tmp_path, stream=StreamConfig(metrics_port=port, metrics_host="127.0.0.2"))
    with pytest.raises(ConfigError, match="stop here"):
        coordinator.run_stream(cfg, quiet=True)
    assert seen == [{"preparing": 1.0, "warmup": 0.0, "measuring": 0.0, "done": 0.0}]
    with pytest.raises(httpx.ConnectError):  # and stopped when the run ended
        httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=5.0)


def test_fp16_without_gpu_workers_is_refused_before_anything_starts(monkeypatch, tmp_path):
    from cortexbench.errors import DeviceError

    def no(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("started something before checking the precision")

    monkeypatch.setattr(stream_plan, "ensure_models", no)
    monkeypatch.setattr(stream_plan, "ensure_images", no)
    cfg = Config(models=MODELS, precision="fp16", gpu_num=0, model_dir=tmp_path / "m", img_dir=tmp_path / "i")
    with pytest.raises(DeviceError, match="'precision' fp16 needs GPU workers"):
        stream_plan.plan_stream(cfg, {"CPU": 2.0, "GPU": 0.0})
    cfg = Config(models=MODELS, precision="fp16", backend="onnxruntime", model_dir=tmp_path / "m",
                 img_dir=tmp_path / "i")
    with pytest.raises(DeviceError, match="onnxruntime backend runs fp32 only"):
        stream_plan.plan_stream(cfg, {"CPU": 2.0, "GPU": 1.0})


@pytest.mark.parametrize(("inputs", "gpus", "backend", "expect"), [
    ("pool", 0, "auto", "add --inputs jpeg"),
    ("jpeg", 0, "auto", "needs GPU workers with the torch backend (this run: CPU workers"),
    ("jpeg", 1, "onnxruntime", "needs GPU workers with the torch backend (this run: GPU workers, onnxruntime)"),
])
def test_gpu_decoding_is_refused_where_it_cannot_run_before_anything_starts(monkeypatch, tmp_path, inputs, gpus,
                                                                            backend, expect):
    def no(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("started something before checking --decode")

    monkeypatch.setattr(stream_plan, "ensure_models", no)
    monkeypatch.setattr(stream_plan, "ensure_images", no)
    cfg = Config(models=MODELS, gpu_num=gpus, backend=backend, model_dir=tmp_path / "m", img_dir=tmp_path / "i",
                 stream=StreamConfig(inputs=inputs, decode="gpu"))
    with pytest.raises(ConfigError, match=re.escape(expect)):
        stream_plan.plan_stream(cfg, {"CPU": 2.0, "GPU": float(gpus)})
