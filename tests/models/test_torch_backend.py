"""The torch backend: every registered model exports, reloads from disk and predicts what the in-memory
network predicted; parameter counts match torchvision's; bad files fail with one-line errors."""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402

from cortexbench.errors import ConfigError, DeviceError, ModelFileError, ModelNotFoundError  # noqa: E402
from cortexbench.models.backends import get_backend, torch_nets  # noqa: E402
from cortexbench.models.backends.base import OP_TYPES, Backend, ExportResult, LoadedModel, LoadOptions  # noqa: E402
from cortexbench.models.backends.torch_impl import BACKEND, TorchModel, read_state_dict  # noqa: E402
from cortexbench.models.backends.torch_profile import attribute_events, op_category  # noqa: E402
from cortexbench.models.registry import GROUPS, REGISTRY, ModelSpec  # noqa: E402

SEED = 7
ALL = [pytest.param(n, marks=pytest.mark.slow) if REGISTRY[n].group == "imagenet" else n for n in REGISTRY]
NETS = [p for p in ALL if not REGISTRY[getattr(p, "values", [p])[0]].is_null]

# torchvision's figures (its model docs); CaffeNet is the classic 60,965,224; the rest are ours.
PARAMS = {"vgg16": 138_357_544, "vgg19": 143_667_240, "squeezenet": 1_235_496, "resnet152": 60_192_808,
          "resnext101_64x4d": 83_455_272, "inception_v3": 23_834_568, "caffenet": 60_965_224, "nin": 7_595_176,
          "mlp2": 354, "mnist_mlp": 669_706, "mnist_cnn": 1_199_882, "digits_cnn": 6_122, "null": 0}


@dataclass
class Exported:
    spec: ModelSpec
    model_dir: Path
    x: np.ndarray
    ref: np.ndarray | None  # the in-memory network's output before export
    result: ExportResult


def _input(spec: ModelSpec, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *spec.input_shape)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model built and exported once for the whole module (the big ones take seconds)."""
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            spec = REGISTRY[name]
            x = _input(spec, 1 if spec.group == "imagenet" else 3)
            ref = None
            if not spec.is_null:
                net = torch_nets.build(spec, SEED)
                with torch.inference_mode():
                    ref = net(torch.from_numpy(x)).numpy().copy()
                del net
            model_dir = tmp_path_factory.mktemp(name)
            cache[name] = Exported(spec, model_dir, x, ref, BACKEND.export(spec, model_dir, SEED))
        return cache[name]

    return get


def test_backend_protocol():
    assert isinstance(BACKEND, Backend)
    assert get_backend("torch") is BACKEND
    assert BACKEND.devices()[0] == "cpu"
    assert all(BACKEND.supports(s) for s in REGISTRY.values())


@pytest.mark.parametrize("name", ALL)
def test_export_reload_predicts_like_the_in_memory_network(exported, name):
    e = exported(name)
    assert e.result.source == "random-init" and e.result.backend == "torch"
    assert e.result.files == tuple(BACKEND.model_files(e.spec, e.model_dir))
    assert e.result.size_bytes == e.result.files[0].stat().st_size > 0
    model = BACKEND.load(e.spec, e.model_dir, "cpu")
    assert isinstance(model, LoadedModel)
    y = model.predict(e.x)
    if e.spec.is_null:
        assert y.shape == (len(e.x), 1)
        return
    assert isinstance(model, TorchModel)
    assert y.shape == (len(e.x), e.spec.num_classes) and y.dtype == np.float32
    assert np.isfinite(y).all()
    scale = float(np.abs(e.ref).max())
    assert scale > 0 and float(np.ptp(y)) > 1e-3 * scale  # not a constant output
    np.testing.assert_allclose(y, e.ref, rtol=1e-5, atol=1e-5 * scale)
    assert model.size_bytes == e.result.size_bytes
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.predict(e.x)


@pytest.mark.parametrize("name", ALL)
def test_param_counts_match_known_figures(exported, name):
    e = exported(name)
    assert e.result.param_count == PARAMS[name]
    if not e.spec.is_null:
        with torch.device("meta"):
            net = torch_nets.make(e.spec)
        assert sum(p.numel() for p in net.parameters()) == PARAMS[name]
        assert BACKEND.load(e.spec, e.model_dir, "cpu").param_count == PARAMS[name]


@pytest.mark.parametrize("name", NETS)
def test_same_seed_same_weights(exported, name):
    e = exported(name)
    on_disk, meta = read_state_dict(e.result.files[0])
    assert meta == {"model": name, "seed": str(SEED), "format": "pt"}
    again = torch_nets.build(e.spec, SEED).state_dict()
    assert on_disk.keys() == again.keys()
    for key, value in again.items():
        assert torch.equal(on_disk[key], value), key
    if e.spec.group == "small":  # another seed gives other weights (cheap to check on the small ones)
        other = torch_nets.build(e.spec, SEED + 1).state_dict()
        assert not all(torch.equal(other[k], v) for k, v in again.items() if v.is_floating_point())


def test_user_files_are_kept_unless_forced(tmp_path):
    spec = REGISTRY["mlp2"]
    first = BACKEND.export(spec, tmp_path, 0)
    data = first.files[0].read_bytes()
    kept = BACKEND.export(spec, tmp_path, 1)
    assert kept.source == "user" and kept.seed == 0 and kept.param_count == 354
    assert first.files[0].read_bytes() == data
    forced = BACKEND.export(spec, tmp_path, 1, force=True)
    assert forced.source == "random-init" and forced.seed == 1
    assert first.files[0].read_bytes() != data
    assert not [p for p in first.files[0].parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_inception_file_with_aux_logits_loads(exported, tmp_path):
    """A torchvision checkpoint of inception_v3 has AuxLogits.*: they are ignored, not an error."""
    e = exported("inception_v3")
    state, _ = read_state_dict(e.result.files[0])
    state = {k: v.clone() for k, v in state.items()}
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    state["AuxLogits.conv0.bn.running_var"] = torch.ones(128)
    (tmp_path / "torch").mkdir()
    save_file(state, str(tmp_path / "torch" / "inception_v3.safetensors"))  # no metadata, like a user file
    kept = BACKEND.export(e.spec, tmp_path, 0)
    assert kept.source == "user" and kept.seed is None and kept.param_count == PARAMS["inception_v3"]
    y = BACKEND.load(e.spec, tmp_path, "cpu").predict(e.x)
    np.testing.assert_allclose(y, e.ref, rtol=1e-5, atol=1e-5 * float(np.abs(e.ref).max()))


def _bad_file(exported, tmp_path, mutate) -> Path:
    e = exported("mnist_cnn")
    target = tmp_path / "torch" / "mnist_cnn.safetensors"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(mutate(e.result.files[0].read_bytes(), exported))
    return target


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "other_model", "wrong_shape", "other_keys",
                                 "bad_header"])
def test_bad_files_raise_model_file_error(exported, tmp_path, how):
    def other(name):
        return lambda data, ex: ex(name).result.files[0].read_bytes()

    mutations = {
        "truncated": lambda data, ex: data[: len(data) // 2],
        "garbage": lambda data, ex: b"\x00\x01not a safetensors file" * 10,
        "empty": lambda data, ex: b"",
        "other_model": other("mnist_mlp"),
        "wrong_shape": lambda data, ex: _wrong_shape(ex("mnist_cnn").result.files[0], tmp_path),
        "other_keys": lambda data, ex: ex("digits_cnn").result.files[0].read_bytes().replace(
            b'"model":"digits_cnn"', b'"model":"mnist_cnn" '),
        "bad_header": lambda data, ex: data[:8] + b"{not json" + data[17:],
    }
    path = _bad_file(exported, tmp_path, mutations[how])
    with pytest.raises(ModelFileError) as err:
        BACKEND.load(REGISTRY["mnist_cnn"], tmp_path, "cpu")
    message = str(err.value)
    assert str(path) in message and "\n" not in message and "--force" in message


def _wrong_shape(path: Path, tmp_path: Path) -> bytes:
    """mnist_cnn's tensors with a last layer of 5 classes instead of 10."""
    state, _ = read_state_dict(path)
    state = {k: v.clone() for k, v in state.items()}
    state["fc2.weight"], state["fc2.bias"] = torch.zeros(5, 128), torch.zeros(5)
    out = tmp_path / "wrong.safetensors"
    save_file(state, str(out), metadata={"model": "mnist_cnn"})
    return out.read_bytes()


def test_missing_file_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="export --models mlp2 --backend torch"):
        BACKEND.load(REGISTRY["mlp2"], tmp_path, "cpu")
    with pytest.raises(ModelNotFoundError):
        BACKEND.load(REGISTRY["null"], tmp_path, "cpu")


def test_fp16_on_cpu_is_a_config_error(exported):
    e = exported("mlp2")
    with pytest.raises(ConfigError, match="fp16"):
        BACKEND.load(e.spec, e.model_dir, "cpu", LoadOptions(precision="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_gpu_without_cuda_is_a_device_error(exported):
    e = exported("mlp2")
    with pytest.raises(DeviceError, match="gpu:0"):
        BACKEND.load(e.spec, e.model_dir, "gpu:0")


def test_bad_input_and_lane(exported):
    e = exported("mnist_cnn")
    model = BACKEND.load(e.spec, e.model_dir, "cpu", LoadOptions(lanes=2))
    with pytest.raises(ValueError, match="takes"):
        model.predict(np.zeros((1, 784), np.float32))
    with pytest.raises(ValueError, match="lane 2"):
        model.predict(e.x, lane=2)


def test_lanes_predict_concurrently_on_cpu(exported):
    e = exported("mnist_cnn")
    model = BACKEND.load(e.spec, e.model_dir, "cpu", LoadOptions(lanes=4))
    batches = [_input(e.spec, 2, seed) for seed in range(4)]
    expected = [model.predict(b) for b in batches]
    results: dict[int, list[np.ndarray]] = {}

    def lane(i: int) -> None:
        results[i] = [model.predict(batches[i], lane=i) for _ in range(20)]

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for y in results[i]:
            np.testing.assert_allclose(y, expected[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, must", [("mnist_cnn", ("convolution", "dense", "pooling")),
                                        pytest.param("caffenet", ("convolution", "normalization", "dense"),
                                                     marks=pytest.mark.slow),
                                        ("digits_cnn", ("convolution", "batch_norm"))])
def test_profile_ops(exported, name, must):
    e = exported(name)
    model = BACKEND.load(e.spec, e.model_dir, "cpu")
    profile = BACKEND.profile_ops(model, e.x[:1], runs=3)
    assert set(profile) == set(OP_TYPES)
    assert all(v >= 0 for v in profile.values())
    for op in must:
        assert profile[op] > 0, (op, profile)
    assert not any(m.annotate for m in model.net.modules() if isinstance(m, torch_nets.LRN))


def test_profile_of_null_model(exported):
    e = exported("null")
    profile = BACKEND.profile_ops(BACKEND.load(e.spec, e.model_dir, "cpu"), e.x, runs=2)
    assert set(profile) == set(OP_TYPES) and sum(profile.values()) == 0


def test_op_categories():
    cases = {"aten::conv2d": "convolution", "aten::mkldnn_convolution": "convolution",
             "aten::cudnn_convolution": "convolution", "aten::relu_": "activation", "aten::clamp_min": "activation",
             "aten::max_pool2d_with_indices": "pooling", "aten::adaptive_avg_pool2d": "pooling",
             "aten::native_batch_norm": "batch_norm", "aten::cudnn_batch_norm": "batch_norm",
             "cortexbench::lrn": "normalization", "aten::addmm": "dense", "aten::linear": "dense",
             "aten::cat": "concat", "aten::add_": "elementwise", "aten::_softmax": "softmax",
             "aten::dropout": "dropout", "aten::flatten": "reshape", "aten::view": "reshape",
             "aten::copy_": "copy", "aten::_to_copy": "copy", "aten::empty": "other", "cudaLaunchKernel": "other"}
    assert {name: op_category(name) for name in cases} == cases


def test_events_count_self_time_under_outermost_category():
    cpu = torch.autograd.DeviceType.CPU

    class Event:
        def __init__(self, name, t, parent=None):
            self.name, self.self_cpu_time_total, self.cpu_parent = name, t, parent
            self.device_type, self.is_async = cpu, False

    linear = Event("aten::linear", 1.0)
    events = [linear, Event("aten::t", 2.0, linear), Event("aten::addmm", 10.0, linear),
              Event("aten::copy_", 4.0, linear), Event("aten::empty", 8.0), Event("aten::relu", 16.0)]
    totals = attribute_events(events, device_time=False)
    assert totals["dense"] == 17.0 and totals["other"] == 8.0 and totals["activation"] == 16.0
    assert totals["copy"] == 0.0 and sum(totals.values()) == 41.0


@pytest.mark.parametrize("name", GROUPS["small"])
def test_train_step_on_small_models(name):
    assert 0 < BACKEND.train_step_s(REGISTRY[name], "cpu", batch_size=8, steps=3, seed=0) < 10


@pytest.mark.parametrize("name", [*GROUPS["imagenet"], "null"])
def test_train_step_refuses_big_models(name):
    with pytest.raises(NotImplementedError, match=name):
        BACKEND.train_step_s(REGISTRY[name], "cpu", batch_size=1, steps=1, seed=0)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
@pytest.mark.parametrize("name", sorted(torch_nets.TORCHVISION_EQUIVALENT))
def test_keys_and_shapes_match_torchvision(name):
    import torchvision

    spec = REGISTRY[name]
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    with torch.device("meta"):
        theirs = getattr(torchvision.models, torch_nets.TORCHVISION_EQUIVALENT[name])(weights=None, **kwargs)
        ours = torch_nets.make(spec)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


# --- GPU (skipped without CUDA; run on a GPU machine) -----------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["mnist_cnn", pytest.param("resnet152", marks=pytest.mark.slow),
                                  pytest.param("caffenet", marks=pytest.mark.slow)])
def test_gpu_lanes_graphs_and_fp16(exported, name):
    e = exported(name)
    assert "gpu:0" in BACKEND.devices()
    scale = float(np.abs(e.ref).max())
    batches = [_input(e.spec, n, seed) for seed, n in enumerate((1, 2, 1, 4))]
    cpu_net = BACKEND.load(e.spec, e.model_dir, "cpu")
    expected = [cpu_net.predict(b) for b in batches]
    for graphs in (False, True):
        model = BACKEND.load(e.spec, e.model_dir, "gpu:0", LoadOptions(lanes=4, cuda_graphs=graphs))
        np.testing.assert_allclose(model.predict(e.x), e.ref, rtol=1e-3, atol=1e-3 * scale)
        results: dict[int, list[np.ndarray]] = {}

        def lane(i: int, model=model, results=results) -> None:
            results[i] = [model.predict(batches[i], lane=i) for _ in range(10)]

        threads = [threading.Thread(target=lane, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(4):
            for y in results[i]:
                np.testing.assert_allclose(y, expected[i], rtol=1e-3, atol=1e-3 * scale)
        model.close()
    half = BACKEND.load(e.spec, e.model_dir, "gpu:0", LoadOptions(precision="fp16", cuda_graphs=True))
    y = half.predict(e.x)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    assert np.abs(y - e.ref).max() < 0.1 * scale
    profile = BACKEND.profile_ops(half, e.x, runs=3)
    assert profile["convolution"] > 0 and profile["copy"] > 0
    assert 0 < BACKEND.train_step_s(REGISTRY["mnist_cnn"], "gpu:0", 16, 3, 0)


def test_builds_in_parallel_threads_get_their_own_seeds():
    spec = REGISTRY["mnist_mlp"]
    expected = {seed: torch_nets.build(spec, seed).state_dict()["fc1.weight"] for seed in range(4)}
    got: dict[int, torch.Tensor] = {}

    def build(seed: int) -> None:
        for _ in range(5):
            got[seed] = torch_nets.build(spec, seed).state_dict()["fc1.weight"]

    threads = [threading.Thread(target=build, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[s], expected[s]) for s in range(4))


@pytest.mark.gpu
@gpu
def test_gpu_launches_queued_back_to_back_answer_as_predict_does(exported):
    """Many launches queued on 4 lanes from 3 threads before any is collected: each answer equals the
    model's own predict of that input (pinned buffers are not reused before their answer is read)."""
    e = exported("mnist_cnn")
    model = BACKEND.load(e.spec, e.model_dir, "gpu:0", LoadOptions(lanes=4, cuda_graphs=True))
    assert model.launches
    inputs = [_input(e.spec, 1, seed) for seed in range(24)]
    expected = [model.predict(x) for x in inputs]
    got: dict[int, np.ndarray] = {}

    def run(t: int) -> None:
        mine = list(range(t, 24, 3))
        pending = [(k, model.launch(inputs[k], k % 4)) for k in mine]
        for k, p in pending:
            got[k] = p.result()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(24):
        np.testing.assert_array_equal(got[k], expected[k])
    model.close()


def test_on_the_cpu_launch_runs_at_once_and_the_worker_keeps_its_lane_threads(exported):
    e = exported("mnist_cnn")
    model = BACKEND.load(e.spec, e.model_dir, "cpu", LoadOptions(lanes=2, cuda_graphs=True))
    assert not model.launches  # a worker runs cached CPU images on its lane threads, not launched
    np.testing.assert_array_equal(model.launch(e.x, 1).result(), model.predict(e.x, 1))
    model.close()
