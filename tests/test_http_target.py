"""The HTTP target against a real Open Inference Protocol server (tests/v2_server.py: uvicorn on 127.0.0.1,
an ephemeral port): binary and JSON bodies, model discovery, every answer checked, server errors and
time-outs counted, a server that dies mid-run with every image accounted for."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from cortexbench import http_target
from cortexbench.driver import drive
from cortexbench.driver_types import DriverOptions, DriverResult, Progress, merge_results
from cortexbench.errors import ConfigError
from cortexbench.http_target import HttpTarget
from cortexbench.images.dataset import list_images, load_batch
from cortexbench.models.registry import get_spec
from cortexbench.schedule import make_schedule
from cortexbench.stream import main
from cortexbench.target import HandleOptions, ShardJob
from tests.v2_server import V2Server, reference_logits

MODELS = ("mnist_cnn", "digits_cnn")


@pytest.fixture(scope="module")
def images(image_dir: Path) -> list[str]:
    return [str(p) for p in list_images(image_dir)]


def _run(target: HttpTarget, count: int, concurrency: int = 4, on_progress=None) -> DriverResult:
    sched = make_schedule(count=count, models=target.models, n_images=len(target.images), seed=1)
    opts = DriverOptions(mode="server", concurrency=concurrency, max_group=1, depth=concurrency, retries=1,
                         fold_interval_s=0.02)
    handles = target.handles("server", HandleOptions("http", concurrency))
    return asyncio.run(drive(sched, handles, opts, balancer="round-robin", seed=0, on_progress=on_progress))


def _expected(images: list[str], model: str, file: int) -> np.ndarray:
    x, _ = load_batch([Path(images[file])], get_spec(model))
    return reference_logits(x)


@pytest.mark.parametrize("client", ["raw", "httpx"])
@pytest.mark.parametrize("protocol", ["v2", "v2-json"])
def test_every_image_is_sent_answered_and_checked(images, protocol, client):
    server = V2Server(MODELS, no_metadata=("digits_cnn",))
    said: list[str] = []
    with server.running():
        target = HttpTarget(server.url, MODELS, images, protocol=protocol, image_pool=8, client=client,
                            say=said.append)
        target.start()
        res = _run(target, 120)
    assert server.requests == 120 and server.binary_requests == (120 if protocol == "v2" else 0)
    assert res.sent == 120 and res.ledger.outcome_counts()["ok"] == 120
    res.ledger.check_complete(res.sent)
    assert target.inputs["mnist_cnn"].source == "server metadata" and target.inputs["mnist_cnn"].name == "x"
    assert target.inputs["digits_cnn"].source == "registry" and target.inputs["digits_cnn"].shape == (1, 8, 8)
    assert any("digits_cnn" in line and "registry" in line for line in said)
    c = res.ledger.columns()
    for m, file, top1, checksum in zip(c["model_idx"], c["input_idx"], c["top1"], c["checksum"], strict=True):
        y = _expected(images, MODELS[m], int(file))
        assert int(top1) == int(y.argmax()) and checksum == pytest.approx(float(y.sum()), rel=1e-5)
    lat = c["latency_s"]
    assert (lat > 0).all() and (lat < 30).all()  # on the driver's clock


def test_server_errors_and_time_outs_are_counted_by_kind(images, monkeypatch):
    server = V2Server(MODELS, fail_model="digits_cnn")
    with server.running():
        target = HttpTarget(server.url, MODELS, images, image_pool=4)
        target.start()
        res = _run(target, 60)
        counts = res.ledger.outcome_counts()
        per_model = np.bincount(res.ledger.column("model_idx"), minlength=2)
        assert counts["ok"] == per_model[0] and counts["error"] == per_model[1] > 0
        assert "HTTP 500" in res.error_samples["error"]
        slow = V2Server(MODELS, service_s=0.5)
    with slow.running():
        target = HttpTarget(slow.url, MODELS, images, image_pool=4, timeout_s=0.05)  # the raw client
        target.start()
        res = _run(target, 8)
    assert res.ledger.outcome_counts()["timeout"] == 8


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_a_server_that_dies_mid_run_leaves_every_image_accounted_for(images, monkeypatch, client):
    monkeypatch.setattr(http_target, "RECOVER_S", 0.5)
    server = V2Server(MODELS, service_s=0.002)
    stopped = []

    def stop_after_some(p: Progress) -> None:
        if p.done >= 40 and not stopped:
            stopped.append(p.done)
            server.stop()

    with server.running():
        target = HttpTarget(server.url, MODELS, images, image_pool=4, client=client)
        target.start()
        res = _run(target, 400, on_progress=stop_after_some)
    counts = res.ledger.outcome_counts()
    assert stopped and res.error is not None and "did not come back" in res.error
    assert res.sent + res.not_sent == 400 and len(res.ledger) == res.sent  # ok + failed + not sent = scheduled
    assert 40 <= counts["ok"] < 400 and counts["worker_died"] > 0
    res.ledger.check_complete(res.sent)


def test_the_command_line_streams_to_a_target_and_refuses_what_does_not_apply(images, tmp_path, capsys):
    server = V2Server(MODELS)
    img_dir = str(Path(images[0]).parent.parent)
    with server.running():
        args = ["--target", server.url, "--models", ",".join(MODELS), "--images", "60", "--warmup", "0",
                "--metrics-port", "0", "--result-dir", str(tmp_path), "--img-dir", img_dir, "--quiet"]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "server" in out and "results:" in out
        assert main([*args, "--drivers", "2", "--concurrency", "4"]) == 0
        run_dir = Path(capsys.readouterr().out.split("results:", 1)[1].strip())
        res = json.loads((run_dir / "results.json").read_text())
        summary = res["modes"]["server"]["summary"]
        assert res["run"]["drivers"] == 2 and res["complete"] is True
        assert summary["images_sent"] == summary["ok"] == 60 and server.requests == 120
        assert main([*args, "--drivers", "5", "--concurrency", "4"]) == 2
        assert "--drivers 4 or fewer" in capsys.readouterr().err
        assert main([*args, "--mode", "cold"]) == 2
        assert "--mode does not apply with --target" in capsys.readouterr().err
        assert main([*args[:3], "mnist_cnn,resnet152", *args[4:]]) == 2  # the server has no resnet152
        assert "no model 'resnet152'" in capsys.readouterr().err
    assert main(["--target", "ftp://x", "--metrics-port", "0"]) == 2
    assert "not an http:// or https:// address" in capsys.readouterr().err


def test_a_served_model_cortexbench_does_not_know_runs_from_its_metadata_or_flags(images, tmp_path, capsys):
    server = V2Server(("mnist_cnn", "my_model"))
    server._shape = lambda name: [-1, 1, 28, 28]  # type: ignore[method-assign]
    img_dir = str(Path(images[0]).parent.parent)
    with server.running():
        args = ["--target", server.url, "--models", "my_model", "--images", "20", "--warmup", "0",
                "--metrics-port", "0", "--result-dir", str(tmp_path), "--img-dir", img_dir, "--quiet"]
        assert main(args) == 0
        server.no_metadata = ("my_model",)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "lists no inputs" in err and "--input-shape" in err
        assert main([*args, "--input-shape", "1,28,28", "--input-name", "x"]) == 0
    assert server.requests == 40


def _shard_jobs(target: HttpTarget, count: int, shards: int = 2, concurrency: int = 2) -> list[ShardJob]:
    sched = make_schedule(count=count, models=target.models, n_images=len(target.images), seed=3)
    opts = DriverOptions(mode="server", concurrency=concurrency, max_group=1, depth=concurrency, retries=1,
                         fold_interval_s=0.05, drain_timeout_s=2.0)
    return [ShardJob(sched.shard(i, shards), (0,), "", opts, HandleOptions("http", concurrency), "round-robin", i,
                     None, 0.0) for i in range(shards)]


def _run_shards(target: HttpTarget, jobs: list[ShardJob], fold=None, stopping=None) -> list[DriverResult]:
    return asyncio.run(target.run_shards(jobs, fold or (lambda p, rows: None), stopping or (lambda: False)))


def test_two_driver_processes_send_every_image_once_and_their_ledgers_add_up(images):
    server = V2Server(MODELS)
    folded: list[int] = []
    with server.running():
        target = HttpTarget(server.url, MODELS, images, image_pool=8)
        target.start()
        jobs = _shard_jobs(target, 300)
        results = _run_shards(target, jobs, lambda p, rows: folded.extend(len(r) for r in rows))
    merged = merge_results(results)
    assert [r.sent for r in results] == [150, 150] and [r.not_sent for r in results] == [0, 0]
    assert merged.sent == 300 == server.requests and merged.error is None
    assert len(merged.ledger) == sum(len(r.ledger) for r in results) == sum(folded) == 300
    for job, r in zip(jobs, results, strict=True):
        r.ledger.check_complete(r.sent)
        assert sorted(r.ledger.column("item").tolist()) == sorted(job.schedule.item.tolist())
    merged.ledger.check_complete(merged.sent)
    assert merged.ledger.outcome_counts()["ok"] == 300
    c = merged.ledger.columns()
    for m, file, top1 in zip(c["model_idx"], c["input_idx"], c["top1"], strict=True):
        assert int(top1) == int(_expected(images, MODELS[m], int(file)).argmax())


def test_a_driver_process_killed_mid_run_leaves_every_image_accounted_for(images):
    server = V2Server(MODELS, service_s=0.003)
    killed: list[int] = []
    with server.running():
        target = HttpTarget(server.url, MODELS, images, image_pool=4)
        target.start()
        jobs = _shard_jobs(target, 1200)

        def kill_one(p: Progress, rows) -> None:
            if not killed and p.done >= 20:
                killed.append(p.done)
                target.kill_shard(1)

        results = _run_shards(target, jobs, kill_one)
    assert killed and results[0].error is None and "died (exit code -9)" in (results[1].error or "")
    for job, r in zip(jobs, results, strict=True):
        assert r.sent + r.not_sent == len(job.schedule) == 600  # ok + failed + not sent = scheduled
        r.ledger.check_complete(r.sent)
    assert results[0].sent == 600 and results[0].ledger.outcome_counts()["ok"] == 600
    assert results[1].not_sent > 0
    merged = merge_results(results)
    counts = merged.ledger.outcome_counts()
    assert counts["ok"] + (len(merged.ledger) - counts["ok"]) + merged.not_sent == 1200
    assert "shard 1: driver shard 1 died" in (merged.error or "")


def test_stopping_driver_processes_drains_and_counts_the_rest_as_not_sent(images):
    server = V2Server(MODELS, service_s=0.002)
    seen: list[int] = []
    with server.running():
        target = HttpTarget(server.url, MODELS, images, image_pool=4)
        target.start()
        jobs = _shard_jobs(target, 4000)
        results = _run_shards(target, jobs, lambda p, rows: seen.append(p.done), lambda: bool(seen))
    for job, r in zip(jobs, results, strict=True):
        assert r.error is None and r.stopped_early and r.not_sent > 0
        assert r.sent + r.not_sent == len(job.schedule)
        r.ledger.check_complete(r.sent)
    assert sum(r.sent for r in results) == server.requests


def test_bad_target_arguments_are_config_errors(images):
    with pytest.raises(ConfigError, match="--protocol"):
        HttpTarget("http://127.0.0.1:9", MODELS, images, protocol="grpc")
