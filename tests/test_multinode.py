"""A stream over a Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``, each node one CPU
so that each of the two workers lands on its own node), and the loss of a whole node mid-stream: the
command joins the cluster with ``--address``, the driver retries the lost worker's images on the other
node, every image is accounted for, and when a new node joins, Ray restarts the worker there and it comes
back (the report says after how long)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import read_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PROGRESS = re.compile(r"^stream cached \[.*img/s")


@pytest.fixture
def two_nodes() -> Iterator[tuple[Any, Any]]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, second
    finally:
        cluster.shutdown()


def test_a_node_lost_mid_stream_has_its_images_retried_and_its_worker_comes_back_on_a_new_node(
        two_nodes, model_dir: Path, image_dir: Path, tmp_path: Path):
    cluster, second = two_nodes
    cmd = [sys.executable, "-m", "cortexbench.stream", "--address", cluster.address, "--cpu-workers", "2",
           "--models", "null:0.005", "--images", "5000", "--warmup", "20", "--mode", "cached", "--concurrency", "4",
           "--metrics-port", "0", "--records", "none", "--result-dir", str(tmp_path / "results"),
           "--model-dir", str(model_dir), "--img-dir", str(image_dir)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        seen = read_until(proc, PROGRESS, "progress")  # the stream is under way
        cluster.remove_node(second)  # the whole node: its raylet and the worker on it
        cluster.add_node(num_cpus=1)  # a new one: Ray restarts the lost worker there, and it rejoins
        _, rest = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(seen) + rest
    assert proc.returncode == 0, stderr[-3000:]
    run_dir = next((tmp_path / "results").glob("*-stream*"))
    results = json.loads((run_dir / "results.json").read_text())
    mode = results["modes"]["cached"]
    s = mode["summary"]
    assert s["images_sent"] == 5020 and s["not_sent"] == 0
    assert s["images_sent"] == s["ok"] + s["failed"] == s["rows"]
    assert sum(mode["worker_losses"].values()) >= 1 and s["retries"] >= 1  # the node's worker was lost
    assert s["ok"] == 5020  # two retries are plenty: the other node's worker takes them
    outages = mode["worker_outages"]
    assert outages and all(o["back_after_s"] is not None and o["back_after_s"] > 0 for o in outages), outages
    report = (run_dir / "report.md").read_text()
    assert "died and were replaced" in report and "s later" in report


@pytest.fixture
def fake_gpu_nodes() -> Iterator[tuple[Any, list[Any]]]:
    """A head without GPUs and two nodes of two fake GPUs each (Ray resources only; no device behind them)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, nodes
    finally:
        cluster.shutdown()


def test_workers_go_one_per_fake_gpu_across_nodes_and_driver_shards_run_on_their_workers_node(
        fake_gpu_nodes, model_dir: Path, image_dir: Path, tmp_path: Path):
    cluster, nodes = fake_gpu_nodes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    probe = subprocess.run([sys.executable, "-m", "tests.placement_probe", cluster.address, str(model_dir),
                            str(image_dir), "4", "2"], capture_output=True, text=True, env=env, timeout=240,
                           cwd=Path(__file__).resolve().parents[1])
    assert probe.returncode == 0, probe.stderr[-3000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    gpu_nodes = {n.node_id for n in nodes}
    on = [w["node_id"] for w in got["workers"]]
    assert set(on) == gpu_nodes and all(on.count(n) == 2 for n in gpu_nodes), got  # one per fake GPU, none on head
    assert all(len(w["gpu_ids"]) == 1 for w in got["workers"]), got
    for shard in got["shards"]:  # each shard's workers share a node, and the shard runs there
        assert {on[i] for i in shard["worker_ids"]} == {shard["planned_node"]} == {shard["ran_on"]}, got
    assert {s["ran_on"] for s in got["shards"]} == gpu_nodes

    # the command joins the cluster with --address: it asks for the 4 GPUs that only the cluster has (fake
    # ones: the null model runs on the CPU), and runs 2 driver shards on them
    cmd = [sys.executable, "-m", "cortexbench.stream", "--address", cluster.address, "--gpus", "4", "--drivers", "2",
           "--models", "null", "--backend", "onnxruntime", "--images", "400", "--warmup", "0", "--mode", "cached",
           "--concurrency", "8", "--metrics-port", "0", "--records", "none", "--quiet",
           "--result-dir", str(tmp_path / "results"), "--model-dir", str(model_dir), "--img-dir", str(image_dir)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    results = json.loads(next((tmp_path / "results").glob("*-stream*/results.json")).read_text())
    assert [w["device"] for w in results["workers"]] == ["gpu:0"] * 4
    s = results["modes"]["cached"]["summary"]
    assert s["images_sent"] == s["ok"] == s["rows"] == 400


def test_a_driver_shard_lost_with_its_node_has_its_images_accounted_and_the_run_says_so_in_one_line(
        fake_gpu_nodes, model_dir: Path, image_dir: Path, tmp_path: Path):
    cluster, nodes = fake_gpu_nodes
    cmd = [sys.executable, "-m", "cortexbench.stream", "--address", cluster.address, "--gpus", "4", "--drivers", "2",
           "--models", "null:0.005", "--backend", "onnxruntime", "--images", "6000", "--warmup", "0",
           "--mode", "cached", "--concurrency", "8", "--metrics-port", "0", "--records", "none",
           "--result-dir", str(tmp_path / "results"), "--model-dir", str(model_dir), "--img-dir", str(image_dir)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        seen = read_until(proc, PROGRESS, "progress")  # the stream is under way
        cluster.remove_node(nodes[1])  # a shard's node: the shard and its two workers die together
        _, rest = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(seen) + rest
    assert proc.returncode == 1, stderr[-3000:]  # WorkerError: the run could not send every image
    assert "Traceback" not in stderr, stderr[-3000:]
    (error,) = [line for line in stderr.splitlines() if "error:" in line]
    assert "driver shard" in error and "died with its node" in error and "partial results in" in error
    results = json.loads(next((tmp_path / "results").glob("*-stream*/results.json")).read_text())
    s = results["modes"]["cached"]["summary"]
    assert s["images_sent"] == s["ok"] + s["failed"] == s["rows"]  # every image sent has its row
    assert s["images_sent"] + s["not_sent"] == 6000 and s["not_sent"] > 0  # the lost shard's rest: not sent
    assert s["ok"] > 0
