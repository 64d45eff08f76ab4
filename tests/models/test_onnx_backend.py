"""The ONNX Runtime backend: every registered model exports from torch, reloads from disk and predicts
what the torch network of the same seed predicts; bad files and settings fail with one-line errors."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper  # noqa: E402

from cortexbench.errors import (  # noqa: E402
    BackendUnavailableError,
    ConfigError,
    DeviceError,
    ModelFileError,
    ModelNotFoundError,
)
from cortexbench.models.backends import get_backend, onnx_impl, torch_nets  # noqa: E402
from cortexbench.models.backends.base import OP_TYPES, Backend, ExportResult, LoadedModel, LoadOptions  # noqa: E402
from cortexbench.models.backends.onnx_impl import BACKEND, OnnxModel, aggregate_profile, op_category  # noqa: E402
from cortexbench.models.registry import GROUPS, REGISTRY, ModelSpec  # noqa: E402

SEED = 3
ALL = [pytest.param(n, marks=pytest.mark.slow) if REGISTRY[n].group == "imagenet" else n for n in REGISTRY]
PARAMS = {"vgg16": 138_357_544, "vgg19": 143_667_240, "squeezenet": 1_235_496, "resnet152": 60_192_808,
          "resnext101_64x4d": 83_455_272, "inception_v3": 23_834_568, "caffenet": 60_965_224, "nin": 7_595_176,
          "mlp2": 354, "mnist_mlp": 669_706, "mnist_cnn": 1_199_882, "digits_cnn": 6_122, "null": 0}


@dataclass
class Exported:
    spec: ModelSpec
    model_dir: Path
    x: np.ndarray
    ref: np.ndarray | None  # the torch network of the same seed
    result: ExportResult


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported once for the whole module; the reference is an independent torch build."""
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            spec = REGISTRY[name]
            x = np.random.default_rng(1).standard_normal((1 if spec.group == "imagenet" else 3, *spec.input_shape))
            x = x.astype(np.float32)
            model_dir = tmp_path_factory.mktemp(name)
            result = BACKEND.export(spec, model_dir, SEED)
            ref = None
            if not spec.is_null:
                net = torch_nets.build(spec, SEED)
                with torch.inference_mode():
                    ref = net(torch.from_numpy(x)).numpy().copy()
                del net
            cache[name] = Exported(spec, model_dir, x, ref, result)
        return cache[name]

    return get


def test_backend_protocol():
    assert isinstance(BACKEND, Backend)
    assert get_backend("onnxruntime") is BACKEND and BACKEND.name == "onnxruntime"
    assert BACKEND.devices()[0] == "cpu"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert BACKEND.devices() == ["cpu"]


@pytest.mark.parametrize("name", ALL)
def test_onnx_predicts_like_torch_of_the_same_seed(exported, name):
    e = exported(name)
    assert e.result.source == "random-init" and e.result.param_count == PARAMS[name]
    assert e.result.size_bytes == e.result.files[0].stat().st_size > 0
    model = BACKEND.load(e.spec, e.model_dir, "cpu", LoadOptions(lanes=2))
    assert isinstance(model, LoadedModel)
    y = model.predict(e.x, lane=1)
    if e.spec.is_null:
        assert y.shape == (len(e.x), 1)
        return
    assert isinstance(model, OnnxModel) and model.providers[0] == "CPUExecutionProvider"
    assert y.shape == (len(e.x), e.spec.num_classes) and y.dtype == np.float32
    scale = float(np.abs(e.ref).max())
    # Measured on x86 (2 and 16 cores): max |onnx - torch| / max |torch| is 3e-5 for inception_v3 (ONNX
    # Runtime folds batch norm into the convolutions), under 2e-6 for every other model.
    np.testing.assert_allclose(y, e.ref, rtol=1e-3, atol=1e-4 * max(1.0, scale))
    assert model.param_count == PARAMS[name] and model.size_bytes == e.result.size_bytes
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.predict(e.x)


def test_metadata_and_graph_names(exported):
    e = exported("mnist_cnn")
    model = onnx.load(str(e.result.files[0]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["model"] == "mnist_cnn" and meta["seed"] == str(SEED) and meta["params"] == str(PARAMS["mnist_cnn"])
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == ["output"]
    assert model.opset_import[0].version == onnx_impl.OPSET
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch axis


@pytest.mark.slow
def test_caffenet_lrn_is_one_onnx_node(exported):
    model = onnx.load(str(exported("caffenet").result.files[0]), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LRN") == 2 and "AveragePool" not in ops


def test_user_files_are_kept_unless_forced(tmp_path):
    spec = REGISTRY["mlp2"]
    first = BACKEND.export(spec, tmp_path, 0)
    data = first.files[0].read_bytes()
    kept = BACKEND.export(spec, tmp_path, 1)
    assert kept.source == "user" and kept.seed == 0 and kept.param_count == 354
    assert first.files[0].read_bytes() == data
    forced = BACKEND.export(spec, tmp_path, 1, force=True)
    assert forced.source == "random-init" and forced.seed == 1 and first.files[0].read_bytes() != data
    assert not [p for p in first.files[0].parent.iterdir() if p.name.endswith(".tmp")]


def _write(model_dir: Path, name: str, data: bytes) -> Path:
    path = model_dir / "onnx" / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tiny_model(classes: int, features: int = 2, meta: dict[str, str] | None = None) -> bytes:
    """data (N, features) -> MatMul -> output (N, classes), built by hand like a user's file."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [features, classes], np.ones(features * classes).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["data", "w"], ["output"])], "tiny",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model.SerializeToString()


def test_a_user_file_without_metadata_loads(tmp_path):
    _write(tmp_path, "mlp2", _tiny_model(2))
    model = BACKEND.load(REGISTRY["mlp2"], tmp_path, "cpu")
    np.testing.assert_allclose(model.predict(np.array([[1.0, 2.0]], np.float32)), [[3.0, 3.0]])
    assert model.param_count == 4  # counted from the initializers, after the load
    assert BACKEND.export(REGISTRY["mlp2"], tmp_path, 0).source == "user"


@pytest.mark.parametrize("how, match", [
    ("truncated", "cannot load"), ("garbage", "cannot load"), ("empty", "cannot load"),
    ("wrong_classes", "3 classes|shape"), ("wrong_input", "input"), ("other_model", "holds model 'mnist_mlp'"),
])
def test_bad_files_raise_model_file_error(exported, tmp_path, how, match):
    good = exported("mlp2").result.files[0].read_bytes()
    data = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x08\x07not an onnx file at all" * 7,
        "empty": b"",
        "wrong_classes": _tiny_model(3),
        "wrong_input": _tiny_model(2, features=5),
        "other_model": _tiny_model(2, meta={"model": "mnist_mlp"}),
    }[how]
    path = _write(tmp_path, "mlp2", data)
    with pytest.raises(ModelFileError, match=match) as err:
        BACKEND.load(REGISTRY["mlp2"], tmp_path, "cpu")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="--backend onnxruntime"):
        BACKEND.load(REGISTRY["mnist_mlp"], tmp_path, "cpu")


def test_fp16_and_bad_devices(exported):
    e = exported("mlp2")
    with pytest.raises(ConfigError, match="use the torch backend for fp16"):
        BACKEND.load(e.spec, e.model_dir, "cpu", LoadOptions(precision="fp16"))
    with pytest.raises(DeviceError, match="gpu:99"):
        BACKEND.load(e.spec, e.model_dir, "gpu:99")
    model = BACKEND.load(e.spec, e.model_dir, "cpu")
    with pytest.raises(ValueError, match="takes"):
        model.predict(np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("name, must", [("mnist_cnn", ("convolution", "dense", "pooling")),
                                        pytest.param("caffenet", ("convolution", "normalization", "dense"),
                                                     marks=pytest.mark.slow),
                                        ("digits_cnn", ("convolution", "pooling"))])
def test_profile_ops(exported, name, must):
    e = exported(name)
    model = BACKEND.load(e.spec, e.model_dir, "cpu")
    profile = BACKEND.profile_ops(model, e.x[:1], runs=3)
    assert set(profile) == set(OP_TYPES) and all(v >= 0 for v in profile.values())
    for op in must:
        assert profile[op] > 0, (op, profile)


def test_profile_aggregation_skips_warm_up():
    def node(op, ts, dur):
        return {"cat": "Node", "name": f"{op}_{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 50},
              node("Conv", 1, 1000), node("Relu", 2, 1000),
              {"cat": "Session", "name": "model_run", "ts": 100, "dur": 50},
              node("Conv", 101, 30), node("LRN", 102, 10), node("Gemm", 103, 4),
              {"cat": "Node", "name": "Conv_fence_before", "ts": 104, "dur": 7, "args": {"op_name": "Conv"}},
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50},
              node("Conv", 201, 10), node("MysteryOp", 202, 6)]
    out = aggregate_profile(events, runs=2, skip_runs=1)
    assert out["convolution"] == pytest.approx(20e-6) and out["normalization"] == pytest.approx(5e-6)
    assert out["dense"] == pytest.approx(2e-6) and out["other"] == pytest.approx(3e-6)
    assert out["activation"] == 0


def test_op_categories():
    assert [op_category(o) for o in ("Conv", "FusedConv", "Relu", "GlobalAveragePool", "BatchNormalization", "LRN",
                                     "Gemm", "Concat", "Add", "Softmax", "Dropout", "Flatten", "ReorderOutput",
                                     "Shape")] == \
        ["convolution", "convolution", "activation", "pooling", "batch_norm", "normalization", "dense", "concat",
         "elementwise", "softmax", "dropout", "reshape", "copy", "other"]


@pytest.mark.parametrize("name", [*GROUPS["small"], "vgg16"])
def test_train_step_is_not_implemented(name):
    with pytest.raises(NotImplementedError, match="--backend torch or mxnet"):
        BACKEND.train_step_s(REGISTRY[name], "cpu", 8, 2, 0)


def test_export_without_torch_or_mxnet_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_impl, "_have", lambda module: False)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'cortexbench\[torch\]'"):
        BACKEND.export(REGISTRY["mlp2"], tmp_path, 0)


@pytest.mark.skipif(importlib.util.find_spec("mxnet") is None, reason="mxnet is not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # mxnet's own, on import
@pytest.mark.parametrize("name", ["mlp2", "digits_cnn"])
def test_export_through_mxnet_without_torch(tmp_path, monkeypatch, name):
    try:
        mxnet_backend = get_backend("mxnet")
    except Exception as e:  # the MXNet backend itself is another module's business
        pytest.skip(f"mxnet backend unavailable: {e}")
    monkeypatch.setattr(onnx_impl, "_have", lambda module: module != "torch")
    spec = REGISTRY[name]
    result = BACKEND.export(spec, tmp_path, 0)
    assert result.source == "random-init" and result.param_count == PARAMS[name]
    assert all(f.exists() for f in mxnet_backend.model_files(spec, tmp_path))  # made on the way
    x = np.random.default_rng(0).standard_normal((2, *spec.input_shape)).astype(np.float32)
    y = BACKEND.load(spec, tmp_path, "cpu").predict(x)
    np.testing.assert_allclose(y, mxnet_backend.load(spec, tmp_path, "cpu").predict(x), rtol=1e-4, atol=1e-5)
    shim = sys.modules.get("onnx.mapping")
    assert shim is None or getattr(shim, "__file__", None)  # the compatibility shim was taken away again


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_gpu_session(exported):
    e = exported("mnist_cnn")
    assert "gpu:0" in BACKEND.devices()
    model = BACKEND.load(e.spec, e.model_dir, "gpu:0")
    assert model.providers[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(model.predict(e.x), e.ref, rtol=1e-3, atol=1e-4)
    assert BACKEND.profile_ops(model, e.x, runs=2)["convolution"] > 0
