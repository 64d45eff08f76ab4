"""``python -m cortexbench.stream`` end to end, as a user runs it: a subprocess with a Ray of its own.

A small run of every mode writes complete results; bad input exits 2 with one line before anything runs;
Ctrl-C stops a long run, writes what was measured and exits 130.  The bad-input commands run side by side
(most fail before Ray starts), so the whole file costs about three Ray starts.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cortexbench.models.backends import get_backend
from cortexbench.models.registry import get_spec
from tests.procs import read_until
from tests.test_metrics import _free_port

pytestmark = pytest.mark.ray

MODES = ("cached", "cold", "lru:1")
PROG = "python -m cortexbench.stream"
PROGRESS = re.compile(r"^stream (\S+) \[")
LINGER = re.compile(r"^metrics stay up for")
PNG = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _cmd(model_dir: Path, image_dir: Path, result_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cortexbench.stream", "--models", "null,digits_cnn", "--images", "200",
            "--warmup", "10", "--mode", ",".join(MODES), "--metrics-port", "0", "--cpu-workers", "1",
            "--result-dir", str(result_dir), "--model-dir", str(model_dir), "--img-dir", str(image_dir), *extra]


def _run_dir(result_dir: Path) -> Path:
    runs = sorted(result_dir.glob("*-stream*"))
    assert len(runs) == 1, runs
    return runs[0]


def _csv_rows(path: Path) -> int:
    with gzip.open(path, "rt") as f:
        return sum(1 for _ in f) - 1


def _check_accounting(results: dict[str, Any], run_dir: Path) -> None:
    for mode, m in results["modes"].items():
        s = m["summary"]
        assert s["images_sent"] == s["ok"] + s["failed"] == s["rows"], (mode, s)
        assert sum(s["by_outcome"].values()) == s["rows"]
        assert _csv_rows(run_dir / f"records-{mode.replace(':', '')}.csv.gz") == s["images_sent"]


def test_a_small_run_of_every_mode_writes_complete_results(model_dir, image_dir, tmp_path):
    proc = subprocess.run(_cmd(model_dir, image_dir, tmp_path / "results"), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = _run_dir(tmp_path / "results")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] is True
    assert list(results["modes"]) == list(MODES)
    _check_accounting(results, run_dir)
    for m in results["modes"].values():
        s = m["summary"]
        assert s["images_sent"] == 210 and s["ok"] == 210 and s["not_sent"] == 0
        assert 0.0 <= s["late_share"] <= 1.0
    assert results["modes"]["cached"]["summary"]["hit_ratio"] == 1.0
    assert results["modes"]["cold"]["summary"]["hit_ratio"] == 0.0
    assert results["modes"]["cold"]["summary"]["loads"] == 210
    report = (run_dir / "report.md").read_text()
    for mode in MODES:
        assert f"| {mode} |" in report
    import cv2

    pngs = sorted(run_dir.glob("*.png"))
    assert len(pngs) >= 5
    for png in pngs:
        assert png.read_bytes()[:8] == PNG
        img = cv2.imread(str(png))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
    assert f"results: {run_dir}" in proc.stdout
    # no config.json in the working directory: the built-in default, said first
    assert proc.stderr.startswith(f"config: the built-in default ({Path(__file__).parents[1] / 'cortexbench'}")


def test_from_a_directory_without_config_json_quiet_runs_the_built_in_cpu_default(tmp_path):
    """What an installed ``cortexbench stream`` does anywhere: the packaged config.json with its CPU fallback
    (4 small models, exported to ./data/models; 200 synthetic images in ./data/images; results in
    ./results), and --quiet drops the progress only: the summary and the results path are printed."""
    cmd = [sys.executable, "-m", "cortexbench.stream", "--images", "20", "--warmup", "4", "--mode", "cached",
           "--metrics-port", "0", "--quiet"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]  # no progress, no plan line
    run_dir = _run_dir(tmp_path / "results")
    assert f"results: {run_dir}" in proc.stdout and proc.stdout.splitlines()[2].startswith("cached ")
    results = json.loads((run_dir / "results.json").read_text())
    cfg = results["config"]
    assert cfg["models"] == ["squeezenet", "nin", "mnist_cnn", "digits_cnn"]  # cpu_fallback, not the 8 ImageNet
    assert (cfg["stream"]["concurrency"], cfg["stream"]["image_pool"], cfg["times"]) == (4, 64, 20)
    assert cfg["img_dir"] == str(tmp_path / "data" / "images")
    assert len(list((tmp_path / "data" / "images").rglob("*.jpg"))) == 200
    assert {p.name.split("-")[0] for p in (tmp_path / "data" / "models").rglob("*-symbol.json")} == {
        "squeezenet", "nin", "mnist_cnn", "digits_cnn"}


# --- bad input: exit 2, one line, no traceback, nothing run ------------------------------------------

BAD = {
    "unknown-model": ("--models", "null,resnet9000"),
    "lru-0": ("--mode", "lru:0"),
    "balancer": ("--balancer", "fastest"),
    "empty-img-dir": ("--img-dir", "{empty}"),
    "gpus": ("--gpus", "3"),
    "corrupt-model": ("--model-dir", "{corrupt}"),
    "fp16-on-cpu": ("--precision", "fp16"),
    "inputs": ("--inputs", "bmp"),
    "decode-gpu-pool": ("--decode", "gpu"),
    "arrivals": ("--arrivals", "weibull:2"),
    "arrivals-gamma-0": ("--arrivals", "gamma:0"),
    "slo": ("--slo", "p99=20"),
    "slo-without-find-peak": ("--slo", "p99=20ms"),
    "sweep": ("--sweep", "lru:0,2"),
    "engine-not-cached": ("--engine", "ort"),  # with MODES: cached, cold, lru:1
    "engine-graphs-on-cpu": ("--engine", "graphs"),
}
EXPECT = {
    "unknown-model": "resnet9000",
    "lru-0": "lru:0",
    "balancer": "fastest",
    "empty-img-dir": "no images",
    "gpus": "--gpus 3",
    "corrupt-model": "digits_cnn",
    "fp16-on-cpu": "'precision' fp16 needs GPU workers",
    "inputs": "'stream.inputs' must be 'pool' or 'jpeg', not \"bmp\"",
    "decode-gpu-pool": "--decode gpu decodes JPEG inputs: add --inputs jpeg",
    "arrivals": "--arrivals: 'stream.arrivals': unknown arrivals 'weibull:2': use 'poisson', 'gamma:CV' "
                "(CV > 0, as in 'gamma:2') or 'trace:FILE'",
    "arrivals-gamma-0": "'stream.arrivals': 'gamma:0' needs a coefficient of variation above 0, as in 'gamma:2'",
    "slo": "--slo: 'stream.slo': 'p99=20' is not an SLO: use STAT=LIMIT with STAT mean or pQ (0 < Q < 100)",
    "slo-without-find-peak": "'stream.slo' applies to the peak search: add --find-peak",
    "sweep": "--sweep: 'stream.sweep': 'lru:0,2' is not a sweep: use lru:K,K,...",
    "engine-not-cached": "--engine ort applies to cached mode only (the engine builds each model once, before the "
                         "run), and this run has cold, lru:1; use --mode cached",
    "engine-graphs-on-cpu": "--engine graphs --precision fp32 on CPU workers: graphs: CUDA graphs need a GPU",
}


@pytest.fixture(scope="module")
def bad_runs(model_dir, image_dir, tmp_path_factory) -> dict[str, tuple[int, str, str, Path]]:
    """Every bad command at once (they are independent); name -> (exit code, stdout, stderr, result dir)."""
    base = tmp_path_factory.mktemp("bad")
    empty = base / "empty"
    empty.mkdir()
    corrupt = base / "corrupt-models"
    shutil.copytree(model_dir, corrupt)
    get_backend("mxnet").model_files(get_spec("digits_cnn"), corrupt)[1].write_bytes(b"not a params file\n" * 8)
    procs = {}
    for name, (flag, value) in BAD.items():
        value = value.format(empty=empty, corrupt=corrupt)
        cmd = [*_cmd(model_dir, image_dir, base / name), "--quiet"]
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
        procs[name] = subprocess.Popen(cmd, cwd=base, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        out[name] = (p.returncode, stdout, stderr, base / name)
    return out


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_with_one_line_and_runs_nothing(bad_runs, name):
    rc, stdout, stderr, result_dir = bad_runs[name]
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr[-2000:]
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith(f"{PROG}: error: ") and EXPECT[name] in lines[0]
    assert "Traceback" not in stdout and stdout == ""
    assert not list(result_dir.glob("*-stream*"))  # no run folder: nothing ran


def test_a_corrupt_model_message_names_the_cause_not_a_traceback(bad_runs):
    _rc, _stdout, stderr, _ = bad_runs["corrupt-model"]
    assert "Traceback" not in stderr and "Invalid NDArray file format" in stderr


# --- Ctrl-C ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code", "said"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_writes_partial_results_accounts_for_every_image_and_exits(model_dir, image_dir, tmp_path,
                                                                                     sig, code, said):
    cmd = _cmd(model_dir, image_dir, tmp_path / "results")
    cmd[cmd.index("--images") + 1] = "100000"
    cmd[cmd.index("--models") + 1] = "null:0.005"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = read_until(proc, PROGRESS, "progress")  # the run is under way
        proc.send_signal(sig)
        stdout, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(seen) + rest
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "logging.cc" not in stderr and "*** SIG" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"{PROG}: error: {said}: ")
    assert sum(said in line for line in stderr.splitlines()) == 1
    run_dir = _run_dir(tmp_path / "results")
    assert str(run_dir) in last
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] is False and results["run"]["interrupted"] is True
    assert list(results["modes"]) == ["cached"]  # stopped in the first mode; the others never ran
    _check_accounting(results, run_dir)
    s = results["modes"]["cached"]["summary"]
    assert 0 < s["images_sent"] < 100_010 and s["not_sent"] == 100_010 - s["images_sent"]
    assert f"{said}: {s['images_sent']} images sent" in last
    assert "cached" in stdout


def test_sigterm_during_linger_ends_it_and_exits_0_with_the_results_complete(model_dir, image_dir, tmp_path):
    """A finished run that keeps its metrics up (--linger) is ended by SIGTERM, as Kubernetes ends a pod:
    exit 0 at once, the results complete (the handler was once left ignoring SIGTERM, so the pod
    waited out the whole linger and was killed)."""
    cmd = _cmd(model_dir, image_dir, tmp_path / "results", "--linger", "300")
    cmd[cmd.index("--mode") + 1] = "cached"
    cmd[cmd.index("--metrics-port") + 1] = str(_free_port())
    cmd[cmd.index("--models") + 1] = "null"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = read_until(proc, LINGER, "linger")  # the run is over and lingers
        proc.send_signal(signal.SIGTERM)
        _stdout, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(seen) + rest
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "linger ended early" in stderr
    results = json.loads((_run_dir(tmp_path / "results") / "results.json").read_text())
    assert results["complete"] is True
