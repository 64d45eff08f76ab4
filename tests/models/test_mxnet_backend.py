"""The MXNet backend: every registered model exports, reloads from disk and predicts exactly what the
in-memory network predicted; parameter counts match torchvision's; bad files fail with one-line errors.

Tolerance of the reload check: rtol 1e-5, atol 1e-6 (fp32 on one machine; in practice it is bit-exact)."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

from cortexbench.errors import ConfigError, DeviceError, ModelFileError, ModelNotFoundError  # noqa: E402
from cortexbench.models.backends import get_backend, mxnet_impl  # noqa: E402
from cortexbench.models.backends.base import (  # noqa: E402
    OP_TYPES,
    Backend,
    ExportResult,
    LoadedModel,
    LoadOptions,
    NullModel,
)
from cortexbench.models.backends.mxnet_impl import (  # noqa: E402
    BACKEND,
    MxnetModel,
    aggregate_by_type,
    build_net,
    op_type,
)
from cortexbench.models.registry import REGISTRY, ModelSpec, get_spec  # noqa: E402

SEED = 7
RTOL, ATOL = 1e-5, 1e-6
NETS = [pytest.param(n, marks=pytest.mark.slow) if s.group == "imagenet" else n
        for n, s in REGISTRY.items() if not s.is_null]
SMALL = [n for n, s in REGISTRY.items() if s.group == "small"]

# torchvision's figures (inception_v3 without its auxiliary classifier, which is training-only);
# CaffeNet is the classic 60,965,224; NIN and the small ones are what the same layers have in torch.
PARAMS = {"vgg16": 138_357_544, "vgg19": 143_667_240, "squeezenet": 1_235_496, "resnet152": 60_192_808,
          "resnext101_64x4d": 83_455_272, "inception_v3": 23_834_568, "caffenet": 60_965_224, "nin": 7_595_176,
          "mlp2": 354, "mnist_mlp": 669_706, "mnist_cnn": 1_199_882, "digits_cnn": 6_122}


@dataclass
class Exported:
    spec: ModelSpec
    model_dir: Path
    x: np.ndarray
    ref: np.ndarray  # the in-memory network's output before export
    result: ExportResult


def _input(spec: ModelSpec, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *spec.input_shape)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model built and exported once for the whole module (the big ones take seconds).

    The reference net and the exported one are two separate builds with the same seed, so the
    reload check also checks that building is deterministic."""
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            spec = REGISTRY[name]
            x = _input(spec, 1 if spec.group == "imagenet" else 3)
            net = build_net(spec, SEED)
            ref = net(mx.nd.array(x)).asnumpy()
            del net
            model_dir = tmp_path_factory.mktemp(name)
            cache[name] = Exported(spec, model_dir, x, ref, BACKEND.export(spec, model_dir, SEED))
        return cache[name]

    return get


def _files(spec: ModelSpec, model_dir: Path) -> tuple[Path, Path]:
    sym, params = BACKEND.model_files(spec, model_dir)
    return sym, params


# --- the interface ------------------------------------------------------------------------------


def test_backend_protocol():
    assert isinstance(BACKEND, Backend)
    assert get_backend("mxnet") is BACKEND
    assert BACKEND.devices()[0] == "cpu"
    assert BACKEND.devices()[1:] == [f"gpu:{i}" for i in range(mxnet_impl.num_gpus())]
    assert all(BACKEND.supports(s) for s in REGISTRY.values())


def test_model_files_layout(tmp_path):
    assert BACKEND.model_files(REGISTRY["vgg16"], tmp_path) == [
        tmp_path / "mxnet" / "vgg16-symbol.json", tmp_path / "mxnet" / "vgg16-0000.params"]
    assert BACKEND.model_files(get_spec("null:0.01"), tmp_path) == [tmp_path / "null" / "null.json"]


# --- every model: export, reload, predict -------------------------------------------------------


@pytest.mark.parametrize("name", NETS)
def test_export_reload_predicts_like_the_built_network(exported, name):
    e = exported(name)
    spec = e.spec
    assert e.result.source == "random-init" and e.result.seed == SEED
    assert e.result.param_count == PARAMS[name]
    sym, params = _files(spec, e.model_dir)
    assert e.result.files == (sym, params)
    assert e.result.size_bytes == sym.stat().st_size + params.stat().st_size
    assert params.stat().st_size >= 4 * PARAMS[name]  # fp32 weights, plus BatchNorm statistics
    assert set(sym.parent.iterdir()) == {sym, params}  # no temporary files left

    model = BACKEND.load(spec, e.model_dir, "cpu")
    try:
        assert isinstance(model, LoadedModel)
        assert model.param_count == PARAMS[name]
        assert model.size_bytes == e.result.size_bytes
        out = model.predict(e.x)
    finally:
        model.close()
    assert out.shape == (len(e.x), spec.num_classes) and out.dtype == np.float32
    np.testing.assert_allclose(out, e.ref, rtol=RTOL, atol=ATOL)
    # Random weights that keep activations sane: finite, varied, far from fp16's limit.
    assert np.isfinite(out).all()
    assert out.std() > 1e-3
    assert np.abs(out).max() < 1e4


@pytest.mark.parametrize("name", [*SMALL, pytest.param("squeezenet", marks=pytest.mark.slow)])
def test_same_seed_same_bytes_other_seed_other_weights(exported, tmp_path, name):
    spec = REGISTRY[name]
    e = exported(name)
    again = BACKEND.export(spec, tmp_path / "a", SEED)
    other = BACKEND.export(spec, tmp_path / "b", SEED + 1)
    for f_ref, f_again in zip(_files(spec, e.model_dir), again.files, strict=True):
        assert f_ref.read_bytes() == f_again.read_bytes()
    assert _files(spec, e.model_dir)[1].read_bytes() != other.files[1].read_bytes()
    assert other.param_count == again.param_count == PARAMS[name]


def test_export_keeps_existing_files_unless_forced(tmp_path):
    spec = REGISTRY["mnist_cnn"]
    first = BACKEND.export(spec, tmp_path, 1)
    before = [f.read_bytes() for f in first.files]
    kept = BACKEND.export(spec, tmp_path, 2)
    assert kept.source == "user" and kept.seed is None
    assert kept.param_count == PARAMS["mnist_cnn"] and kept.size_bytes == first.size_bytes
    assert [f.read_bytes() for f in kept.files] == before
    forced = BACKEND.export(spec, tmp_path, 2, force=True)
    assert forced.source == "random-init" and forced.seed == 2
    assert forced.files[1].read_bytes() != before[1]


def test_export_redoes_a_model_with_only_one_file(tmp_path):
    spec = REGISTRY["mlp2"]
    params = BACKEND.export(spec, tmp_path, 1).files[1]
    params.unlink()
    again = BACKEND.export(spec, tmp_path, 1)
    assert again.source == "random-init" and params.exists()


def test_interrupted_export_leaves_no_file(tmp_path, monkeypatch):
    spec = REGISTRY["mnist_mlp"]

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(mxnet_impl.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        BACKEND.export(spec, tmp_path, 0)
    assert list((tmp_path / "mxnet").iterdir()) == []


# --- bad and missing files ----------------------------------------------------------------------


def test_missing_file_names_the_export_command(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        BACKEND.load(REGISTRY["mnist_cnn"], tmp_path, "cpu")
    msg = str(err.value)
    assert "mnist_cnn-symbol.json" in msg
    assert "python -m cortexbench.models export --models mnist_cnn --backend mxnet" in msg


@pytest.mark.parametrize("which", ["params", "symbol"])
def test_truncated_file_is_a_model_file_error(tmp_path, which):
    spec = REGISTRY["mnist_cnn"]
    sym, params = BACKEND.export(spec, tmp_path, 0).files
    victim = params if which == "params" else sym
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as err:
        BACKEND.load(spec, tmp_path, "cpu")
    assert victim.name in str(err.value) and "--force" in str(err.value)
    assert "\n" not in str(err.value)


def test_garbage_params_file_is_a_model_file_error(tmp_path):
    spec = REGISTRY["digits_cnn"]
    _, params = BACKEND.export(spec, tmp_path, 0).files
    params.write_bytes(b"\x00not an mxnet file" * 100)
    with pytest.raises(ModelFileError, match=r"digits_cnn-0000\.params"):
        BACKEND.load(spec, tmp_path, "cpu")


def _copy_as(src: ModelSpec, dst: ModelSpec, model_dir: Path) -> None:
    """Export ``src`` and put its files under ``dst``'s names."""
    for a, b in zip(BACKEND.export(src, model_dir / "src", 0).files, _files(dst, model_dir), strict=True):
        b.parent.mkdir(parents=True, exist_ok=True)
        b.write_bytes(a.read_bytes())


def test_file_of_another_model_is_a_model_file_error(tmp_path):
    digits = REGISTRY["digits_cnn"]
    # mnist_mlp under digits_cnn's names: 10 classes too, but its weights need 784 inputs, not 1x8x8.
    _copy_as(REGISTRY["mnist_mlp"], digits, tmp_path / "a")
    with pytest.raises(ModelFileError, match=r"input \(1, 8, 8\)"):
        BACKEND.load(digits, tmp_path / "a", "cpu")
    # mlp2 under digits_cnn's names: 2 classes, not 10.
    _copy_as(REGISTRY["mlp2"], digits, tmp_path / "b")
    with pytest.raises(ModelFileError, match="output shape"):
        BACKEND.load(digits, tmp_path / "b", "cpu")
    # A symbol that does not take the input at all (a 2-D convolution fed with flat vectors).
    _copy_as(digits, REGISTRY["mnist_mlp"], tmp_path / "c")
    with pytest.raises(ModelFileError, match="not a network of input"):
        BACKEND.load(REGISTRY["mnist_mlp"], tmp_path / "c", "cpu")
    # The right input but another number of classes than the spec says.
    BACKEND.export(REGISTRY["mnist_mlp"], tmp_path / "d", 0)
    five = dataclasses.replace(REGISTRY["mnist_mlp"], num_classes=5)
    with pytest.raises(ModelFileError, match="output shape"):
        BACKEND.load(five, tmp_path / "d", "cpu")


def test_params_of_another_model_is_a_model_file_error(tmp_path):
    cnn, digits = REGISTRY["mnist_cnn"], REGISTRY["digits_cnn"]
    BACKEND.export(cnn, tmp_path, 0)
    other_params = BACKEND.export(digits, tmp_path / "d", 0).files[1]
    _files(cnn, tmp_path)[1].write_bytes(other_params.read_bytes())
    with pytest.raises(ModelFileError, match=r"mnist_cnn-0000\.params"):
        BACKEND.load(cnn, tmp_path, "cpu")


# --- devices, precision, lanes ------------------------------------------------------------------


def test_fp16_on_cpu_is_a_config_error(exported):
    e = exported("mnist_cnn")
    with pytest.raises(ConfigError, match="fp16"):
        BACKEND.load(e.spec, e.model_dir, "cpu", LoadOptions(precision="fp16"))


def test_unknown_device_is_a_device_error(exported):
    e = exported("mnist_cnn")
    with pytest.raises(DeviceError):
        BACKEND.load(e.spec, e.model_dir, f"gpu:{mxnet_impl.num_gpus()}")
    with pytest.raises(DeviceError):
        BACKEND.load(e.spec, e.model_dir, "tpu")


def test_lanes_from_threads_give_the_serial_answers(exported):
    e = exported("mnist_cnn")
    model = BACKEND.load(e.spec, e.model_dir, "cpu", LoadOptions(lanes=4))
    batches = [_input(e.spec, 2, seed=i) for i in range(8)]
    serial = [model.predict(b) for b in batches]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def lane(i: int) -> None:
        try:
            for j in range(i, len(batches), 4):
                results[j] = model.predict(batches[j], lane=i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for j, want in enumerate(serial):
        np.testing.assert_array_equal(results[j], want)
    with pytest.raises(ValueError, match="lane"):
        model.predict(batches[0], lane=4)
    model.close()


def test_close_frees_the_model(exported):
    e = exported("mlp2")
    model = BACKEND.load(e.spec, e.model_dir, "cpu")
    assert isinstance(model, MxnetModel)
    model.close()
    model.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        model.predict(e.x)


def test_wrong_batch_shape_is_refused(exported):
    e = exported("mlp2")
    model = BACKEND.load(e.spec, e.model_dir, "cpu")
    with pytest.raises(ValueError, match="takes"):
        model.predict(np.zeros((1, 3), np.float32))
    model.close()


# --- profiling and training ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist_cnn", pytest.param("squeezenet", marks=pytest.mark.slow)])
def test_profile_ops_reports_convolution_time(exported, name):
    e = exported(name)
    model = BACKEND.load(e.spec, e.model_dir, "cpu")
    for _ in range(2):  # the profiler can be used again
        ops = BACKEND.profile_ops(model, e.x[:1], runs=3)
        assert set(ops) <= set(OP_TYPES)
        assert ops["convolution"] > 0
        assert all(v > 0 for v in ops.values())
        assert ops["convolution"] < 10.0  # seconds per batch, not milliseconds or a sum of runs
    model.close()


def test_op_type_mapping():
    cases = {"Convolution": "convolution", "_sg_mkldnn_conv": "convolution", "Activation": "activation",
             "relu": "activation", "LeakyReLU": "activation", "Pooling": "pooling", "BatchNorm": "batch_norm",
             "LRN": "normalization", "FullyConnected": "dense", "Concat": "concat", "elemwise_add": "elementwise",
             "_plus": "elementwise", "broadcast_mul": "elementwise", "softmax": "softmax",
             "SoftmaxActivation": "softmax", "Dropout": "dropout", "Flatten": "reshape", "Reshape": "reshape",
             "_copyto": "copy", "CopyCPU2GPU": "copy", "DeleteVariable": "other", "Cast": "other"}
    assert {k: op_type(k) for k in cases} == cases
    assert set(cases.values()) <= set(OP_TYPES)


def test_aggregate_by_type_sums_and_divides_by_runs():
    stats = ('{"Time": {"operator": {"Convolution": {"Total": 30.0}, "_sg_mkldnn_conv": {"Total": 10.0}, '
             '"Activation": {"Total": 2.0}, "DeleteVariable": {"Total": 1.0}, "WaitForVar": {"Total": 40.0}}, '
             '"MXNET_C_API": {"MXNDArraySyncCopyToCPU": {"Total": 99.0}}}, "Unit": {"Time": "ms"}}')
    assert aggregate_by_type(stats, runs=2) == pytest.approx({"convolution": 0.02, "activation": 0.001})


@pytest.mark.parametrize("name", ["mlp2", "mnist_cnn", "digits_cnn"])
def test_train_step_small_model(name):
    assert BACKEND.train_step_s(REGISTRY[name], "cpu", batch_size=8, steps=3, seed=0) > 0


def test_train_step_refuses_imagenet_model():
    with pytest.raises(NotImplementedError, match="small"):
        BACKEND.train_step_s(REGISTRY["vgg16"], "cpu", batch_size=1, steps=1, seed=0)


# --- the null model -----------------------------------------------------------------------------


def test_null_model(tmp_path):
    spec = get_spec("null:0")
    with pytest.raises(ModelNotFoundError, match="export --models null"):
        BACKEND.load(spec, tmp_path, "cpu")
    made = BACKEND.export(spec, tmp_path, 0)
    assert made.source == "random-init" and made.param_count == 0 and made.files == (tmp_path / "null" / "null.json",)
    assert BACKEND.export(spec, tmp_path, 0).source == "user"
    model = BACKEND.load(spec, tmp_path, "cpu")
    assert isinstance(model, NullModel) and model.size_bytes == made.size_bytes > 0
    out = model.predict(np.zeros((5, *spec.input_shape), np.float32))
    assert out.shape == (5, 1) and not out.any()
    assert BACKEND.profile_ops(model, np.zeros((1, *spec.input_shape), np.float32), 2) == {}
    with pytest.raises(NotImplementedError):
        BACKEND.train_step_s(spec, "cpu", 1, 1, 0)
    (tmp_path / "null" / "null.json").write_text("{not json")
    with pytest.raises(ModelFileError):
        BACKEND.load(spec, tmp_path, "cpu")
