"""``stream --engine``: cached mode's models built by an engine (``models.engines``) instead of the backend.

A CPU ModelWorker in cached mode with 3 lanes runs a group of images through ``ort``, ``ort-none``,
``compile`` and ``openvino`` and answers as fp32 eager torch does (top-1 and logit sum); the engine's model
(ORT: at the engine's optimisation level) is what the worker holds, and OpenVINO's lanes each have their own
infer request.  One short run of the real command
through Ray with ``--engine ort`` writes the engine into results.json and the report.  (The refusals, exit 2
with one line, are test_stream_cli.py's bad inputs.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cortexbench.images.dataset import list_images
from cortexbench.models import engines
from cortexbench.models.backends import installed
from cortexbench.models.export import ensure_models
from cortexbench.protocol import CHECKSUM, TOP1, RequestGroup
from cortexbench.worker import ModelWorker, WorkerSpec

pytestmark = pytest.mark.skipif(not (installed("torch") and installed("onnxruntime")),
                                reason="the engines need torch (the reference) and onnxruntime")
MODELS = ("digits_cnn", "mnist_cnn")
LANES = 3
N = 48
# fp32 engines differ from eager by rounding: ORT and OpenVINO reorder sums, inductor fuses and vectorises
SUM_TOL = {"ort": 1e-3, "ort-none": 1e-3, "openvino": 1e-3, "compile": 1e-2}
HELD_TYPE = {"ort": "OnnxModel", "ort-none": "OnnxModel", "openvino": "OpenVinoModel", "compile": "CompiledModel"}


@pytest.fixture(scope="module")
def engine_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODELS' torch and ONNX files (the same seeded weights)."""
    out = tmp_path_factory.mktemp("engine-models")
    for backend in ("torch", "onnxruntime"):
        ensure_models(list(MODELS), backend, out, seed=0, progress=False)
    return out


def _worker(model_dir: Path, images: list[Path], backend: str, engine: str = "") -> ModelWorker:
    spec = WorkerSpec(name="w0", device="cpu", backend=backend, model_dir=str(model_dir), models=MODELS,
                      images=tuple(str(p) for p in images), lanes=LANES, image_pool=8, engine=engine)
    return ModelWorker(spec)


def _answers(worker: ModelWorker) -> np.ndarray:
    rng = np.random.default_rng(5)
    group = RequestGroup.of(np.arange(N), rng.integers(0, len(MODELS), N), rng.integers(0, 8, N))
    worker.set_mode("cached")
    res = worker.submit(group).result(timeout=120)
    assert not res.errors, res.errors
    return res.rows[:, [TOP1, CHECKSUM]]


@pytest.fixture(scope="module")
def eager(engine_models: Path, image_dir: Path) -> np.ndarray:
    """The fp32 eager torch backend's answers to the group."""
    w = _worker(engine_models, list_images(image_dir), "torch")
    try:
        return _answers(w)
    finally:
        w.close()


def _compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.parametrize("engine", ["ort", "ort-none", "openvino", "compile"])
def test_a_cached_cpu_worker_with_an_engine_answers_as_eager_on_every_lane(engine_models, image_dir, eager, engine):
    if engines.missing(engine):
        pytest.skip(engines.missing(engine))
    if engine == "compile" and _compiler() is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler, and none is installed here")
    w = _worker(engine_models, list_images(image_dir), engines.framework(engine), engine)
    try:
        got = _answers(w)
        held = {name: h.model for name, h in w.models.held.items()}
        assert {type(m).__name__ for m in held.values()} == {HELD_TYPE[engine]}  # the engine's, not the backend's
        if engine.startswith("ort"):  # the engine's session, at its optimisation level (ort-none: the graph as is)
            from cortexbench.models.engines.ort_engines import LEVELS

            for m in held.values():
                assert m.session.get_session_options().graph_optimization_level == LEVELS[engine]  # type: ignore[attr-defined]
        if engine == "openvino":  # warmed on every lane: a request per lane, never one shared
            for m in held.values():
                assert sorted(m._requests) == list(range(LANES))  # type: ignore[attr-defined]
                assert len({id(r) for _, r in m._requests.values()}) == LANES  # type: ignore[attr-defined]
        assert w.lanes.n == LANES
    finally:
        w.close()
    np.testing.assert_array_equal(got[:, 0], eager[:, 0])  # top-1
    np.testing.assert_allclose(got[:, 1], eager[:, 1], rtol=SUM_TOL[engine], atol=SUM_TOL[engine])


@pytest.mark.ray
def test_stream_engine_ort_cached_runs_end_to_end_and_says_the_engine(engine_models, image_dir, tmp_path):
    from tests.report.runs import schema_errors

    result_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "cortexbench.stream", "--engine", "ort", "--mode", "cached", "--models",
           ",".join(MODELS), "--images", "200", "--warmup", "10", "--metrics-port", "0", "--cpu-workers", "1",
           "--lanes", "2", "--result-dir", str(result_dir), "--model-dir", str(engine_models), "--img-dir",
           str(image_dir), "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = result_dir.glob("*-stream*")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] is True and schema_errors(results) == []
    assert results["config"]["stream"]["engine"] == "ort"
    assert results["run"]["engine"] == "ort" and results["run"]["backend"] == "onnxruntime"
    s = results["modes"]["cached"]["summary"]
    assert s["ok"] == s["images_sent"] == 210 and s["hit_ratio"] == 1.0
    assert ", backend onnxruntime, engine ort (cached)" in (run_dir / "report.md").read_text()
