"""The engines of ``single --engines`` (cortexbench.models.engines) on the CPU: every engine installed here
builds, runs the real images and stays within the stated fidelity bounds of fp32 eager; combinations an
engine cannot run are skipped with their reason; an engine not installed names its extra; a compiler that
fails is a skip, not a crash."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cortexbench.errors import BackendUnavailableError
from cortexbench.images.dataset import list_images, load_batch
from cortexbench.images.synth import synthesize
from cortexbench.models import engines as eng
from cortexbench.models.backends import get_backend, installed
from cortexbench.models.backends.base import LoadOptions
from cortexbench.models.export import ensure_models
from cortexbench.models.registry import get_spec
from cortexbench.single_engines import fidelity, predict_all, split_images

pytestmark = pytest.mark.skipif(not (installed("torch") and installed("onnxruntime")),
                                reason="the engines need torch (the reference) and onnxruntime")
MODEL = "digits_cnn"
N_FIDELITY, CHUNK = 32, 4
# The stated bounds (docs/usage.md): fp32 engines agree on every image and their logits differ from fp32
# eager by rounding only; bf16 and int8 (static QDQ on 16 calibration images) keep the top-1 class of at
# least 90% of the images of the synthetic set.
FP32_REL_MAD = 1e-5
REDUCED_FLOOR, REDUCED_REL_MAD = 0.90, 0.05


def _have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model_dir with the torch and ONNX files of MODEL, the fidelity and calibration images, and the
    fp32 eager CPU reference logits."""
    model_dir = tmp_path_factory.mktemp("engine-models")
    img_dir = tmp_path_factory.mktemp("engine-images")
    synthesize(img_dir, N_FIDELITY + 16, seed=3, progress=False)
    spec = get_spec(MODEL)
    ensure_models([MODEL], "torch", model_dir, seed=0, progress=False)
    ensure_models([MODEL], "onnxruntime", model_dir, seed=0, progress=False)
    images, bad = load_batch(list_images(img_dir), spec)
    assert not bad
    fid, calib, same = split_images(images, N_FIDELITY, CHUNK)
    assert len(fid) == N_FIDELITY and len(calib) == 16 and not same
    ref = get_backend("torch").load(spec, model_dir, "cpu", LoadOptions())
    reference = predict_all(ref.predict, fid, CHUNK)
    ref.close()
    return spec, model_dir, fid, calib, reference


CPU_POINTS = [("eager", "fp32"), ("eager", "bf16"), ("compile", "fp32"), ("ort", "fp32"), ("ort-basic", "fp32"),
              ("ort-none", "fp32"), ("ort", "int8"), ("openvino", "fp32"), ("openvino", "int8")]


@pytest.mark.parametrize(("engine", "precision"), CPU_POINTS, ids=[f"{e}-{p}" for e, p in CPU_POINTS])
def test_each_installed_cpu_engine_runs_within_its_fidelity_bounds(setup, engine, precision):
    spec, model_dir, fid, calib, reference = setup
    if eng.missing(engine):
        pytest.skip(eng.missing(engine))
    model = eng.load_engine(engine, precision, spec, model_dir, "cpu", calib, fid[:CHUNK])
    try:
        f = fidelity(predict_all(model.predict, fid, CHUNK), reference)
        assert model.param_count > 0 and model.size_bytes > 0
    finally:
        model.close()
    if precision == "fp32":
        assert f["top1_agreement"] == 1.0, f
        assert f["logits_rel_mad"] < FP32_REL_MAD, f
    else:
        assert f["top1_agreement"] >= REDUCED_FLOOR, f
        assert 0 < f["logits_rel_mad"] < REDUCED_REL_MAD, f  # really reduced: not the fp32 logits
    if precision == "int8":
        assert (model_dir / "onnx" / f"{MODEL}.int8.onnx").is_file()  # cached beside the original


def test_fidelity_counts_agreement_and_differences():
    ref = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    got = np.array([[1.0, 2.5, 0.0], [0.0, 3.5, 1.0]], dtype=np.float32)
    f = fidelity(got, ref)
    assert f["top1_agreement"] == 0.5
    assert f["logits_mad"] == pytest.approx(7.0 / 6)  # |diff|: 0, 0.5, 0, 3, 3.5, 0
    assert f["logits_max_abs_diff"] == pytest.approx(3.5)
    assert f["logits_rel_mad"] == pytest.approx((7.0 / 6) / (7.0 / 6))  # mean |ref| is 7/6 too


@pytest.mark.parametrize(("engine", "precision", "says"), [
    ("graphs", "fp32", "CUDA graphs need a GPU"),
    ("eager", "fp16", "use bf16 on the CPU"),
    ("eager", "int8", "int8 runs in ort and openvino"),
    ("ort", "bf16", "not offered"),
    ("openvino", "fp16", "not a CPU precision"),
])
def test_a_combination_an_engine_cannot_run_is_a_skip_with_its_reason(setup, engine, precision, says):
    spec, model_dir, fid, calib, _ = setup
    if eng.missing(engine):
        pytest.skip(eng.missing(engine))
    with pytest.raises(eng.EngineSkip, match=says):
        eng.load_engine(engine, precision, spec, model_dir, "cpu", calib, fid[:CHUNK])


@pytest.mark.skipif(_have("tensorrt"), reason="tensorrt is installed here")
def test_an_engine_that_is_not_installed_names_its_extra(setup):
    spec, model_dir, fid, calib, _ = setup
    with pytest.raises(BackendUnavailableError) as e:
        eng.load_engine("tensorrt", "fp32", spec, model_dir, "gpu:0", calib, fid[:CHUNK])
    assert str(e.value) == ("engine 'tensorrt' needs the 'tensorrt' package, which is not installed: "
                            "pip install 'cortexbench[tensorrt]'")


def test_a_compiler_that_fails_is_a_skip_not_a_crash(setup):
    """torch.compile on the CPU needs a C++ compiler; one that is not there fails the first call (the
    build's warm-up), which is a skip with the reason.  (inductor's own ``patch``, not monkeypatch: undoing
    monkeypatch's setattr on inductor's config deleted ``fx_graph_cache``, and every later compile failed.)"""
    import torch._inductor.config as inductor

    spec, model_dir, fid, calib, _ = setup
    with inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        with pytest.raises(eng.EngineSkip, match="compile fp32 failed to build or run on cpu"):
            eng.load_engine("compile", "fp32", spec, model_dir, "cpu", calib, fid[:CHUNK + 1])
    assert inductor.fx_graph_cache is not None  # still there


def test_the_onnx_and_torch_files_hold_the_same_weights(setup):
    """Fidelity depends on it: ort-none fp32 (the graph as exported) matches eager to rounding."""
    spec, model_dir, fid, calib, reference = setup
    model = eng.load_engine("ort-none", "fp32", spec, model_dir, "cpu", calib, fid[:CHUNK])
    try:
        assert np.allclose(predict_all(model.predict, fid, CHUNK), reference, rtol=1e-4, atol=1e-5)
    finally:
        model.close()



def test_a_runtime_that_cannot_use_the_device_is_a_skip(setup):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    spec, model_dir, fid, calib, _ = setup
    with pytest.raises(eng.EngineSkip, match="has no CUDA provider"):
        eng.load_engine("ort", "fp32", spec, model_dir, "gpu:0", calib, fid[:CHUNK])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


GPU_POINTS = [(e, p) for e in ("eager", "graphs", "compile") for p in ("fp32", "fp16", "bf16")]


@pytest.mark.gpu
@pytest.mark.parametrize(("engine", "precision"), GPU_POINTS, ids=[f"{e}-{p}" for e, p in GPU_POINTS])
def test_each_torch_engine_on_a_gpu_runs_within_its_fidelity_bounds(setup, engine, precision):
    """On a GPU fp32 is IEEE fp32 (TF32 off), so it stays within 1e-4 of the CPU reference (other kernels'
    rounding); fp16 and bf16 within the reduced bounds."""
    if not _cuda():
        pytest.skip("needs a CUDA GPU (the lead's H200 runs these)")
    spec, model_dir, fid, calib, reference = setup
    model = eng.load_engine(engine, precision, spec, model_dir, "gpu:0", calib, fid[:CHUNK])
    try:
        f = fidelity(predict_all(model.predict, fid, CHUNK), reference)
    finally:
        model.close()
    if precision == "fp32":
        assert f["top1_agreement"] == 1.0 and f["logits_rel_mad"] < 1e-4, f
    else:
        assert f["top1_agreement"] >= REDUCED_FLOOR and 0 < f["logits_rel_mad"] < REDUCED_REL_MAD, f
