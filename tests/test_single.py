"""``python -m cortexbench.single`` end to end: the real MXNet backend on small models, the files it writes and
the figures in them; the exit status and the one-line message for bad input; partial results on Ctrl-C."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cortexbench import machine, single
from cortexbench.config import load_config
from cortexbench.images.dataset import list_images
from cortexbench.images.synth import synthesize
from cortexbench.models.backends import get_backend, installed
from cortexbench.models.registry import get_spec
from cortexbench.timing import TimingPolicy

needs_mxnet = pytest.mark.skipif(not installed("mxnet"), reason="the mxnet backend is not installed")
MODELS = ("mnist_cnn", "digits_cnn")
BATCHES = (1, 4)
NO_GPU = not machine.gpus()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images")
    synthesize(out, 6, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def run_single(argv, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./config.json: the built-in defaults, whatever the checkout holds
    return single.main([*argv, "--quiet"])


def only_run_dir(result_dir: Path) -> Path:
    dirs = [d for d in result_dir.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def basic_run(images, model_dir, tmp_path_factory):
    """One real sweep shared by the tests below: 2 models x 2 batch sizes on the CPU."""
    tmp = tmp_path_factory.mktemp("basic")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(tmp)
        out = io.StringIO()
        mp.setattr(sys, "stdout", out)
        rc = single.main(["--models", ",".join(MODELS), "--batch-sizes", ",".join(map(str, BATCHES)),
                          "--devices", "cpu", "--backend", "mxnet", "--max-seconds", "0.5",
                          "--img-dir", str(images), "--model-dir", str(model_dir),
                          "--result-dir", str(tmp / "results"), "--quiet"])
    finally:
        mp.undo()
    run_dir = only_run_dir(tmp / "results")
    return rc, out.getvalue(), run_dir, json.loads((run_dir / "results.json").read_text())


@needs_mxnet
def test_basic_run_succeeds_and_prints_the_summary_and_the_run_dir(basic_run):
    rc, stdout, run_dir, _ = basic_run
    assert rc == 0
    for m in MODELS:
        assert m in stdout
    assert "per image" in stdout and "throughput" in stdout
    assert str(run_dir) in stdout


@needs_mxnet
def test_results_json_has_one_point_per_model_batch_and_device(basic_run):
    _, _, _, doc = basic_run
    assert doc["kind"] == "single" and doc["complete"] is True
    assert doc["backend"] == "mxnet" and doc["devices"] == ["cpu"]
    assert "machine" in doc and "config" in doc
    keys = [(p["model"], p["batch_size"], p["device"]) for p in doc["points"]]
    assert sorted(keys) == sorted((m, b, "cpu") for m in MODELS for b in BATCHES)
    for p in doc["points"]:
        n = p["batch_size"]
        for key in ("mean", "p50", "p90", "p99"):
            for per in ("batch_latency_s", "image_latency_s"):
                assert math.isfinite(p[per][key]) and p[per][key] > 0
            assert p["image_latency_s"][key] == pytest.approx(p["batch_latency_s"][key] / n)
        assert p["batch_latency_s"]["p50"] <= p["batch_latency_s"]["p99"] <= p["batch_latency_s"]["max"]
        assert p["throughput_images_per_s"] == pytest.approx(n / p["batch_latency_s"]["mean"], rel=1e-12)
        assert p["runs"] >= doc["policy"]["min_runs"]  # 3 here: the built-in config's cpu_fallback
        assert p["stable"] == (p["rel_spread"] < 0.02)
        # stopped by the time bound (0.5 s): past it only by the call that crossed it, or to reach min_runs;
        # not a wall-clock guess (a loaded machine makes single calls slow, not the bound wrong)
        assert p["elapsed_s"] - p["batch_latency_s"]["max"] < 0.5 + 0.05 or p["runs"] == 5


@needs_mxnet
def test_best_batch_size_and_model_sizes_are_consistent_with_the_points(basic_run, model_dir):
    _, _, _, doc = basic_run
    for m in MODELS:
        mine = [p for p in doc["points"] if p["model"] == m]
        best = max(mine, key=lambda p: p["throughput_images_per_s"])
        assert doc["models"][m]["best_batch_size"] == {"cpu": best["batch_size"]}
        assert doc["models"][m]["best_throughput_images_per_s"]["cpu"] == best["throughput_images_per_s"]
        files = list((model_dir / "mxnet").glob(f"{m}-*"))
        assert doc["models"][m]["size_bytes"] == sum(f.stat().st_size for f in files)
    assert doc["models"]["mnist_cnn"]["param_count"] > doc["models"]["digits_cnn"]["param_count"] > 1000
    assert doc["speedups"] == []  # CPU only


@needs_mxnet
def test_results_csv_rows_match_results_json(basic_run):
    _, _, run_dir, doc = basic_run
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["points"])
    assert "image_mean_s" in rows[0] and "throughput_images_per_s" in rows[0] and "size_bytes" in rows[0]
    for row, p in zip(rows, doc["points"], strict=True):
        assert (row["model"], row["device"], int(row["batch_size"])) == (p["model"], p["device"], p["batch_size"])
        assert float(row["image_mean_s"]) == pytest.approx(p["image_latency_s"]["mean"])
        assert float(row["batch_p99_s"]) == pytest.approx(p["batch_latency_s"]["p99"])
        assert float(row["throughput_images_per_s"]) == pytest.approx(p["throughput_images_per_s"])
        assert int(row["runs"]) == p["runs"]
        assert int(row["param_count"]) == doc["models"][p["model"]]["param_count"]


@needs_mxnet
def test_report_md_names_every_model_and_has_its_sections(basic_run):
    _, _, run_dir, _ = basic_run
    text = (run_dir / "report.md").read_text()
    for m in MODELS:
        assert f"| {m} |" in text
    for heading in ("## Latency and throughput per point", "## Models: size and best batch size",
                    "## GPU speed-up over CPU", "## Plots"):
        assert heading in text
    assert "Operator profile" not in text and "## Training" not in text
    if NO_GPU:
        assert "no GPU on this machine" in text


@needs_mxnet
def test_plots_are_real_images(basic_run):
    import matplotlib.image as mpimg

    _, _, run_dir, _ = basic_run
    for name in ("model_size.png", "speed_comparison.png", "batch_scaling.png"):
        img = mpimg.imread(run_dir / name)
        assert img.ndim == 3 and img.shape[2] in (3, 4)
        assert img.shape[0] >= 300 and img.shape[1] >= 500, (name, img.shape)
        assert float(np.std(img[..., :3])) > 0.05  # not blank
    assert not (run_dir / "op_profile.png").exists()


@needs_mxnet
def test_profile_ops_and_train_add_their_sections(images, model_dir, monkeypatch, tmp_path, capsys):
    rc = run_single(["--models", "digits_cnn,null", "--batch-sizes", "1,2", "--devices", "cpu", "--backend",
                     "mxnet", "--max-seconds", "0.2", "--profile-ops", "--train", "--img-dir", str(images),
                     "--model-dir", str(model_dir), "--result-dir", str(tmp_path / "r")], monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert rc == 0
    run_dir = only_run_dir(tmp_path / "r")
    doc = json.loads((run_dir / "results.json").read_text())
    prof = [p for p in doc["op_profile"] if p["model"] == "digits_cnn"]
    assert sorted(p["batch_size"] for p in prof) == [1, 2]
    for p in prof:
        assert p["op_s"].get("convolution", 0) > 0
        assert p["total_s"] == pytest.approx(sum(p["op_s"].values()))
    train = doc["training"]
    assert sorted((t["model"], t["batch_size"]) for t in train) == [("digits_cnn", 1), ("digits_cnn", 2)]
    for t in train:
        assert t["step_s"] > 0 and t["sample_s"] == pytest.approx(t["step_s"] / t["batch_size"])
    assert [(s["what"], s["model"]) for s in doc["skipped"]] == [("train", "null")]
    text = (run_dir / "report.md").read_text()
    assert "## Operator profile" in text and "## Training" in text and "convolution" in text
    assert "Skipped null: " in text
    assert "Training" in out
    import matplotlib.image as mpimg

    img = mpimg.imread(run_dir / "op_profile.png")
    assert img.shape[0] >= 300 and img.shape[1] >= 500


def bad_input(argv, monkeypatch, tmp_path, capsys, *, needle: str) -> None:
    rc = run_single([*argv, "--result-dir", str(tmp_path / "r")], monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_unknown_model_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    bad_input(["--models", "mnist_cnnn"], monkeypatch, tmp_path, capsys, needle="mnist_cnnn")


def test_unknown_flag_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    bad_input(["--batchsizes", "1"], monkeypatch, tmp_path, capsys, needle="--batchsizes")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_a_gpu_this_machine_lacks_is_a_device_error(images, monkeypatch, tmp_path, capsys):
    bad_input(["--models", "null", "--devices", "cpu,gpu:0", "--img-dir", str(images)], monkeypatch, tmp_path,
              capsys, needle="gpu:0")


def test_a_missing_img_dir_given_on_the_command_line_is_an_error(monkeypatch, tmp_path, capsys):
    bad_input(["--models", "null", "--img-dir", str(tmp_path / "nowhere")], monkeypatch, tmp_path, capsys,
              needle="nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_the_default_img_dir_is_filled_with_synthetic_images(monkeypatch, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "models": ["null"], "batchsize": [1, 2], "img_dir": "imgs", "model_dir": "models", "result_dir": "res",
        "single": {"max_seconds": 0.05, "devices": ["auto"]}, "images": {"synth_count": 5}}))
    assert run_single([], monkeypatch, tmp_path) == 0
    assert len(list((tmp_path / "imgs").rglob("*.*"))) == 5
    doc = json.loads((only_run_dir(tmp_path / "res") / "results.json").read_text())
    assert "cpu" in doc["devices"] and len(doc["points"]) == 2 * len(doc["devices"])
    assert "scale up" in capsys.readouterr().out


def test_ctrl_c_writes_partial_results_and_exits_130(images, monkeypatch, tmp_path, capsys):
    real = single.measure_point
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(single, "measure_point", interrupt_second)
    rc = run_single(["--models", "null", "--batch-sizes", "1,2,4", "--devices", "cpu", "--max-seconds", "0.05",
                     "--img-dir", str(images), "--model-dir", str(tmp_path / "m"), "--result-dir",
                     str(tmp_path / "r")], monkeypatch, tmp_path)
    assert rc == 130
    err = capsys.readouterr().err
    assert "interrupted after 1 of 3 points" in err and "Traceback" not in err
    run_dir = only_run_dir(tmp_path / "r")
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["complete"] is False
    assert [p["batch_size"] for p in doc["points"]] == [1]
    assert "Incomplete run" in (run_dir / "report.md").read_text()
    assert len((run_dir / "results.csv").read_text().splitlines()) == 2


def test_batches_hold_distinct_images_cycling_and_bad_files_are_reported(images, tmp_path):
    for i, src in enumerate(list_images(images)[:3]):
        (tmp_path / f"{i}.jpg").write_bytes(src.read_bytes())
    (tmp_path / "3.jpg").write_bytes(b"not an image")
    cfg = load_config(None, {"img_dir": str(tmp_path)}, has_gpu=False)
    plan = single.Plan(cfg, "mxnet", ("digits_cnn",), ("cpu",), (1, 5), TimingPolicy())
    sweep = single.Sweep(plan)
    inputs = single.Inputs(sorted(tmp_path.glob("*.jpg")), 5, sweep)
    batch = inputs.batch(get_spec("digits_cnn"), 5)
    assert batch.shape == (5, 1, 8, 8) and batch.dtype == np.float32 and batch.flags.c_contiguous
    assert not np.array_equal(batch[0], batch[1]) and not np.array_equal(batch[1], batch[2])
    assert np.array_equal(batch[3], batch[0]) and np.array_equal(batch[4], batch[1])
    assert sweep.bad_images == [str(tmp_path / "3.jpg")]
    assert sweep.images_used == 3


def test_auto_devices_are_cpu_and_the_gpus_the_backend_sees():
    backend, devices, _ = single.resolve_devices(["auto"], "auto")
    assert devices[0] == "cpu"
    assert list(devices[1:]) == [d for d in get_backend(backend).devices() if d != "cpu"]


@needs_mxnet
@pytest.mark.parametrize(("devices", "says"), [
    ("cpu", "No GPU ran in this sweep"),
    ("gpu:0", "No CPU baseline was measured in this sweep (gpu:0 ran alone)"),
])
def test_the_speed_up_section_says_which_side_is_missing(basic_run, devices, says):
    """A GPU-only sweep (faked here by relabelling the CPU sweep's points: no GPU on this machine) has no
    CPU baseline; it must not claim that no GPU ran."""
    import copy

    from cortexbench.report.single_report import sections

    body = copy.deepcopy(basic_run[3])
    for p in body["points"]:
        p["device"] = devices
    for m in body["models"].values():
        m["best_batch_size"] = {devices: next(iter(m["best_batch_size"].values()))}
    body["speedups"] = []
    got = sections(body, wide=False)
    section = next((s for s in got if s.title.startswith("GPU speed-up over CPU")), None)
    assert section is not None, [s.title for s in got]
    assert says in section.text


# --- the engine axis (single --engines; the engines themselves: tests/models/test_engines.py) ---------

needs_engines = pytest.mark.skipif(not (installed("torch") and installed("onnxruntime")),
                                   reason="the engine axis needs torch (its reference) and onnxruntime")


@pytest.fixture(scope="module")
def engines_run(images, tmp_path_factory):
    """One real engine sweep: mlp2 on eager, ort and tensorrt (not installed here, or no GPU: skipped) at
    fp32 and int8, batches 1 and 2, on the CPU."""
    tmp = tmp_path_factory.mktemp("engines")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(tmp)
        out = io.StringIO()
        mp.setattr(sys, "stdout", out)
        rc = single.main(["--models", "mlp2", "--engines", "eager,ort,tensorrt", "--precisions", "fp32,int8",
                          "--batch-sizes", "1,2", "--devices", "cpu", "--max-seconds", "0.1",
                          "--img-dir", str(images), "--model-dir", str(tmp / "models"),
                          "--result-dir", str(tmp / "results"), "--quiet"])
    finally:
        mp.undo()
    run_dir = only_run_dir(tmp / "results")
    return rc, out.getvalue(), run_dir, json.loads((run_dir / "results.json").read_text())


@needs_engines
def test_an_engine_sweep_measures_each_engine_and_precision_with_its_fidelity(engines_run):
    from tests.report.runs import schema_errors

    rc, out, run_dir, doc = engines_run
    assert rc == 0
    assert schema_errors(doc) == []
    ran = {(p["engine"], p["precision"]) for p in doc["points"]}
    assert ran == {("eager", "fp32"), ("ort", "fp32"), ("ort", "int8")}
    assert sorted(p["batch_size"] for p in doc["points"] if p["engine"] == "ort") == [1, 1, 2, 2]
    fid = {(f["engine"], f["precision"]): f for f in doc["fidelity"]}
    assert set(fid) == ran
    assert fid["eager", "fp32"]["logits_mad"] == 0 and fid["ort", "fp32"]["top1_agreement"] == 1.0
    assert fid["ort", "int8"]["calibrated_on_fidelity_images"]  # 6 images: too few for a separate subset
    assert {f["images"] for f in fid.values()} == {6}  # the whole set of 6, in batches of the largest size
    skipped = {(s["engine"], s["precision"]): s["reason"] for s in doc["skipped"]}
    assert set(skipped) == {("eager", "int8"), ("tensorrt", "fp32"), ("tensorrt", "int8")}
    report = (run_dir / "report.md").read_text()
    assert "## Engines: speed and fidelity" in report and "| mlp2 | ort | int8 | cpu |" in report
    assert f"Skipped tensorrt fp32 on cpu, tensorrt int8 on cpu: {skipped['tensorrt', 'fp32']}" in report
    assert "Engines: speed and fidelity" in out
    import matplotlib.image as mpimg

    assert mpimg.imread(run_dir / "speed_fidelity.png").shape[1] >= 800


@needs_engines
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_asking_only_for_an_engine_that_is_not_installed_is_one_line_naming_the_extra(images, monkeypatch,
                                                                                      tmp_path, capsys):
    bad_input(["--models", "mlp2", "--engines", "tensorrt", "--devices", "cpu", "--img-dir", str(images),
               "--model-dir", str(tmp_path / "m")], monkeypatch, tmp_path, capsys,
              needle="engine 'tensorrt' needs the 'tensorrt' package, which is not installed: "
                     "pip install 'cortexbench[tensorrt]'")


@needs_engines
def test_asking_only_for_what_no_engine_can_run_here_is_one_line_with_the_reason(images, monkeypatch, tmp_path,
                                                                                capsys):
    bad_input(["--models", "mlp2", "--engines", "graphs", "--devices", "cpu", "--img-dir", str(images),
               "--model-dir", str(tmp_path / "m")], monkeypatch, tmp_path, capsys,
              needle="no engine x precision x device of this sweep can run here: graphs: CUDA graphs need a GPU")


@pytest.mark.parametrize(("argv", "says"), [
    (["--precisions", "int8"], "'single.precisions' takes effect with 'single.engines'"),
    (["--engines", "eager", "--backend", "torch"], "--backend and --engines do not mix"),
    (["--engines", "eagre"], "did you mean 'eager'"),
    (["--labels", "labels.csv"], "'single.labels' takes effect with 'single.engines'"),
    (["--engines", "ort", "--train"], "--profile-ops and --train measure the backend sweep, not --engines"),
])
def test_engine_flags_that_do_not_fit_are_one_line_and_exit_2(argv, says, monkeypatch, tmp_path, capsys):
    bad_input(["--models", "mlp2", "--devices", "cpu", *argv], monkeypatch, tmp_path, capsys, needle=says)


@needs_engines
def test_compare_keeps_each_engine_and_precision_apart(engines_run):
    from cortexbench.report.compare import figures

    doc = engines_run[3]
    keys = figures(doc)
    assert len(keys) == len(doc["points"]) == 6
    assert "mlp2 cpu ort int8 b2" in keys


@needs_engines
def test_labels_add_top1_accuracy_on_the_labelled_images(images, monkeypatch, tmp_path, capsys):
    """Labels made from the fp32 eager reference: 4 right, 1 wrong, 1 image unlabelled -> 80% for every fp32
    engine and the reference."""
    from cortexbench.images.dataset import load_batch
    from cortexbench.models.export import ensure_models

    models = tmp_path / "m"
    ensure_models(["digits_cnn"], "torch", models, seed=0, progress=False)
    spec = get_spec("digits_cnn")
    paths = list_images(images)
    x, bad = load_batch(paths, spec)
    assert not bad and len(paths) == 6
    ref = get_backend("torch").load(spec, models, "cpu")
    top = np.argmax(ref.predict(x), 1)
    ref.close()
    rows = ["image,label"] + [f"{p.name},{int(t)}" for p, t in zip(paths[:4], top[:4], strict=True)]
    rows.append(f"{paths[4].name},{(int(top[4]) + 1) % spec.num_classes}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    rc = run_single(["--models", "digits_cnn", "--engines", "eager,ort", "--batch-sizes", "2", "--devices", "cpu",
                     "--max-seconds", "0.05", "--labels", str(tmp_path / "labels.csv"), "--img-dir", str(images),
                     "--model-dir", str(models), "--result-dir", str(tmp_path / "r")], monkeypatch, tmp_path)
    assert rc == 0, capsys.readouterr().err
    run_dir = only_run_dir(tmp_path / "r")
    doc = json.loads((run_dir / "results.json").read_text())
    for f in doc["fidelity"]:
        assert (f["top1_accuracy"], f["reference_top1_accuracy"], f["labelled_images"]) == (0.8, 0.8, 5), f
    assert "top-1 accuracy" in (run_dir / "report.md").read_text()


@needs_engines
def test_labels_that_name_none_of_the_images_are_one_line(images, monkeypatch, tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("elsewhere.jpg,3\n")
    bad_input(["--models", "mlp2", "--engines", "eager", "--devices", "cpu", "--labels", str(tmp_path / "labels.csv"),
               "--batch-sizes", "16",
               "--img-dir", str(images), "--model-dir", str(tmp_path / "m")], monkeypatch, tmp_path, capsys,
              needle="labels none of the 16 images the engines are compared on")
