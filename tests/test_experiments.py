"""``python -m cortexbench.experiments`` end to end at a tiny scale on the CPU: the real MXNet backend (and ONNX
Runtime as the engine where installed), the figures in results.json, report.md and the plots; bad input is one
line and exit 2; Ctrl-C keeps what was measured."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cortexbench import experiments
from cortexbench.models.backends import installed

pytestmark = pytest.mark.skipif(not installed("mxnet"), reason="the mxnet backend is not installed")
ROWS, BATCH = 1000, 384  # an epoch of 2 full batches and one of 232 rows
SIZES = (1, 4)
TINY = ["--rows", str(ROWS), "--batch-size", str(BATCH), "--batch-sizes", ",".join(map(str, SIZES)),
        "--max-seconds", "0.1", "--train-steps", "2", "--devices", "cpu", "--backend", "mxnet", "--quiet"]


def only_run_dir(result_dir: Path) -> Path:
    dirs = [d for d in result_dir.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_run(model_dir, tmp_path_factory):
    """All three experiments once, at the tiny scale, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("tiny")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(tmp)  # no ./config.json: the built-in defaults
        out = io.StringIO()
        mp.setattr(sys, "stdout", out)
        rc = experiments.main([*TINY, "--model-dir", str(model_dir), "--result-dir", str(tmp / "results")])
    finally:
        mp.undo()
    run_dir = only_run_dir(tmp / "results")
    return rc, out.getvalue(), run_dir, json.loads((run_dir / "results.json").read_text())


def columns(doc):
    return [(c["backend"], c["device"]) for c in doc["columns"]]


def test_the_run_succeeds_with_every_experiment_and_the_engine_beside_the_backend(tiny_run):
    rc, stdout, run_dir, doc = tiny_run
    assert rc == 0 and str(run_dir) in stdout
    assert doc["kind"] == "experiments" and doc["complete"] is True
    assert doc["experiments"] == ["mlp2", "mnist", "digits"]
    want = [("mxnet", "cpu")] + ([("onnxruntime", "cpu")] if installed("onnxruntime") else [])
    assert columns(doc) == want


def test_mlp2_has_an_inference_epoch_per_column_and_a_training_epoch_of_its_batches(tiny_run):
    _, _, _, doc = tiny_run
    infer = [r for r in doc["mlp2"] if r["what"] == "inference"]
    assert [(r["backend"], r["device"]) for r in infer] == columns(doc)
    for r in infer:
        assert r["rows"] == ROWS and r["batch_size"] == BATCH and r["batches"] == 3
        assert 0 < r["epoch_s"] < 10 and r["row_s"] == pytest.approx(r["epoch_s"] / ROWS)
    (train,) = [r for r in doc["mlp2"] if r["what"] == "training"]
    assert train["backend"] == "mxnet" and train["device"] == "cpu"
    assert set(train["step_s"]) == {"384", "232"}  # the epoch's full batches and the rest
    assert train["epoch_s"] == pytest.approx(2 * train["step_s"]["384"] + train["step_s"]["232"])
    assert train["row_s"] == pytest.approx(train["epoch_s"] / ROWS)


def test_mnist_has_inference_and_training_per_sample_at_each_batch_size(tiny_run):
    _, _, _, doc = tiny_run
    got = {(r["model"], r["what"], r["backend"], r["device"], r["batch_size"]) for r in doc["mnist"]}
    want = {(m, "inference", b, d, n) for m in ("mnist_mlp", "mnist_cnn") for b, d in columns(doc) for n in SIZES}
    want |= {(m, "training", "mxnet", "cpu", n) for m in ("mnist_mlp", "mnist_cnn") for n in SIZES}
    assert got == want and len(doc["mnist"]) == len(want)
    for r in doc["mnist"]:
        assert math.isfinite(r["sample_s"]) and r["sample_s"] > 0
        assert r["sample_s"] == pytest.approx(r["batch_s"] / r["batch_size"])


def test_digits_has_seconds_per_operator_type_at_each_batch_size(tiny_run):
    _, _, _, doc = tiny_run
    assert [(r["backend"], r["device"], r["batch_size"]) for r in doc["digits"]] == \
        [(*c, n) for c in columns(doc) for n in SIZES]
    for r in doc["digits"]:
        assert r["op_s"]["convolution"] > 0 and r["op_s"]["dense"] > 0
        assert r["op_total_s"] == pytest.approx(sum(r["op_s"].values()))
        assert r["sample_s"] == pytest.approx(r["batch_s"] / r["batch_size"])


def test_report_and_plots_hold_a_table_per_experiment(tiny_run):
    _, stdout, run_dir, _ = tiny_run
    report = (run_dir / "report.md").read_text()
    for title in ("## mlp2: 1,000 rows in batches of 384", "## mnist_mlp:", "## mnist_cnn:",
                  "## digits_cnn per operator type, mxnet cpu"):
        assert title in report
    assert "mnist_cnn: seconds per sample" in stdout
    for png in ("mnist.png", "digits_ops.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report


def test_the_data_is_seeded_and_shaped_for_the_models():
    x, y = experiments.spirals(500, seed=3)
    assert x.shape == (500, 2) and x.dtype == np.float32 and set(np.unique(y)) == {0, 1}
    assert np.array_equal(x, experiments.spirals(500, seed=3)[0])
    images, digits = experiments.digit_images(20, 8, seed=3)
    assert images.shape == (20, 1, 8, 8) and 0 <= images.min() and images.max() <= 1 and images.max() > 0.5
    assert np.array_equal(images, experiments.digit_images(20, 8, seed=3)[0])
    assert len(set(digits.tolist())) > 3


@pytest.mark.parametrize("argv, says", [
    (["spirals"], "unknown experiment 'spirals'"),
    (["mnist", "--batch-sizes", "0,4"], "--batch-sizes"),
    (["mlp2", "--rows", "0"], "--rows"),
    (["mlp2", "--devices", "gpu:7"], "gpu:7"),
    (["mlp2", "--engine", "tensorrt"], "--engine"),
])
def test_bad_input_is_one_line_and_exit_2(argv, says, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert experiments.main([*argv, "--result-dir", str(tmp_path / "results"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_ctrl_c_writes_partial_results_and_exits_130(model_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    real = experiments.measure_point
    calls = []

    def interrupt_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # in mnist, after mlp2 is done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experiments, "measure_point", interrupt_third)
    argv = [*TINY, "--engine", "none", "mlp2", "mnist", "--model-dir", str(model_dir),
            "--result-dir", str(tmp_path / "results")]
    assert experiments.main(argv) == 130
    assert "interrupted after" in capsys.readouterr().err
    doc = json.loads((only_run_dir(tmp_path / "results") / "results.json").read_text())
    assert doc["complete"] is False
    assert [r["what"] for r in doc["mlp2"]] == ["inference", "training"]
    assert len(doc["mnist"]) == 1  # the first mnist point; the second was interrupted


def test_python_m_cortexbench_report_renders_the_same_report_again(tiny_run, capsys):
    from cortexbench.report import __main__ as report_main

    _, _, run_dir, _ = tiny_run
    written = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    assert report_main.main([str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == written


def test_an_engine_that_cannot_start_on_a_device_is_skipped_and_said(model_dir, monkeypatch, tmp_path, capsys):
    from cortexbench.errors import DeviceError
    from cortexbench.models.backends import get_backend

    if not installed("onnxruntime"):
        pytest.skip("onnxruntime is not installed")

    def no_cuda(*args, **kwargs):  # as ONNX Runtime whose CUDA provider is listed but cannot load CUDA
        raise DeviceError("onnxruntime could not start its CUDA provider")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(get_backend("onnxruntime"), "load", no_cuda)
    argv = [*TINY, "mlp2", "digits", "--model-dir", str(model_dir), "--result-dir", str(tmp_path / "results")]
    assert experiments.main(argv) == 0
    assert "onnxruntime on cpu was skipped: onnxruntime could not start" in capsys.readouterr().err
    doc = json.loads((only_run_dir(tmp_path / "results") / "results.json").read_text())
    assert {r["backend"] for r in doc["mlp2"] + doc["digits"]} == {"mxnet"}
    assert len(doc["digits"]) == len(SIZES)
    assert any("skipped" in n for n in doc["notes"])


def test_results_json_meets_the_schema(tiny_run):
    from tests.report.runs import schema_errors

    _, _, _, doc = tiny_run
    assert schema_errors(doc) == []
