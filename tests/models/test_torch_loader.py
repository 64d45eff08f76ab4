"""The torch on-demand loader (cold and swap modes): the same answers as a plain load, bit for bit in fp32;
bad files fail one load with a clear error; buffers are reused, not grown.  The GPU path (pinned staging,
copy stream, fp16 conversion) is exercised by ``bench/cold.py`` on a GPU machine and by the GPU test
here, skipped without one."""

from __future__ import annotations

import itertools
import os
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from cortexbench.errors import ModelFileError, ModelNotFoundError  # noqa: E402
from cortexbench.models.backends.base import LoadOptions, LoadTimes  # noqa: E402
from cortexbench.models.backends.torch_impl import BACKEND  # noqa: E402
from cortexbench.models.backends.torch_loader import (  # noqa: E402
    CHUNK_ALIGN,
    MAX_CHUNK,
    TorchLoader,
    chunks,
    read_layout,
)
from cortexbench.models.registry import GROUPS, REGISTRY  # noqa: E402

SMALL = ("mnist_cnn", "digits_cnn", "mnist_mlp", "mlp2")
IMAGENET = tuple(GROUPS["imagenet"])
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/cold.py on one)")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("torch-small")
    for name in (*SMALL, "null"):
        BACKEND.export(REGISTRY[name], d, seed=3)
    return d


def _x(spec, seed=0):
    return np.random.default_rng(seed).standard_normal((1, *spec.input_shape)).astype(np.float32)


def _check_equal(model_dir, names, tier, lanes=2):
    specs = [REGISTRY[n] for n in names]
    loader = BACKEND.loader(model_dir, "cpu", LoadOptions(lanes=lanes), tier)
    try:
        info = loader.prepare(specs)
        assert info["slots"] == lanes + 1
        held = sum(read_layout(s, BACKEND.model_files(s, model_dir)[0], "fp32").data_bytes if not s.is_null
                   else BACKEND.model_files(s, model_dir)[0].stat().st_size for s in specs)  # null: its whole file
        assert info["host_bytes"] == (held if tier == "host" else 0)
        for round_ in range(2):  # the second round reuses slots that held other models
            for spec in specs:
                x = _x(spec, round_)
                plain = BACKEND.load(spec, model_dir, "cpu").predict(x)
                times = LoadTimes()
                model = loader.load(spec, times)
                try:
                    got = model.predict(x, lane=round_ % lanes)
                finally:
                    model.close()
                assert np.array_equal(got, plain), spec.name
                assert times.read_s >= 0 and times.build_s >= 0 and times.copy_s >= 0
                if tier == "host" and not spec.is_null:
                    assert times.read_s == 0.0  # nothing is read from disk
    finally:
        loader.close()


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_outputs_equal_a_plain_load_bit_for_bit(small_dir, tier):
    _check_equal(small_dir, (*SMALL, "null"), tier)


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["disk", "host"])
def test_every_imagenet_model_equals_a_plain_load(tmp_path_factory, tier):
    d = tmp_path_factory.getbasetemp() / "torch-imagenet"
    if not d.exists():
        d.mkdir()
        for name in IMAGENET:
            BACKEND.export(REGISTRY[name], d, seed=3)
    _check_equal(d, IMAGENET, tier, lanes=1)


@pytest.mark.parametrize("n", [4, 1000, (1 << 20) + 4, 15_190_356, 30_380_804, 553_435_520, 575_000_004])
@pytest.mark.parametrize("readers", [1, 2, 16])
def test_chunks_cover_the_data_and_start_aligned(n, readers):
    """Every chunk starts on CHUNK_ALIGN (an fp32 chunk then converts to fp16 on its own: on the GPU a
    chunk that starts mid-element cannot be viewed as fp32) and the chunks cover 0..n exactly."""
    parts = chunks(n, readers)
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(b == a2 for (_, b), (a2, _) in itertools.pairwise(parts))
    assert all(a % CHUNK_ALIGN == 0 and 0 < b - a <= MAX_CHUNK for a, b in parts)


def test_the_layout_says_how_weights_reach_a_slot(small_dir):
    path = BACKEND.model_files(REGISTRY["mnist_cnn"], small_dir)[0]
    fp32 = read_layout(REGISTRY["mnist_cnn"], path, "fp32")
    half = read_layout(REGISTRY["mnist_cnn"], path, "fp16")
    assert fp32.kind == "direct" and fp32.slot_bytes == fp32.data_bytes == path.stat().st_size - len(fp32.head)
    assert half.kind == "half" and half.slot_bytes == fp32.data_bytes // 2


def test_loads_reuse_their_slots_and_memory_stays_flat(small_dir):
    """1,000 cold loads: the weights always live in one of the slots allocated by prepare, and the process's
    resident memory does not grow with the number of loads."""
    spec = REGISTRY["mnist_cnn"]
    loader = BACKEND.loader(small_dir, "cpu", LoadOptions(lanes=1), "disk")
    try:
        loader.prepare([spec])
        slots = {s.data_ptr(): s.numel() for s in loader._slots}
        x = _x(spec)

        def one() -> None:
            model = loader.load(spec, LoadTimes())
            ptr = next(iter(model.net.parameters())).data_ptr()
            assert any(base <= ptr < base + n for base, n in slots.items())
            model.predict(x)
            model.close()

        for _ in range(100):
            one()
        before = _rss()
        for _ in range(900):
            one()
        grown = _rss() - before
        assert grown < 32 << 20, f"resident memory grew {grown / 2**20:.1f} MiB over 900 loads"
        assert {s.data_ptr() for s in loader._slots} == set(slots)
    finally:
        loader.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_file_that_changes_fails_its_load_and_the_next_load_works(small_dir, tmp_path):
    for name in ("mnist_cnn", "digits_cnn"):
        src = BACKEND.model_files(REGISTRY[name], small_dir)[0]
        dst = BACKEND.model_files(REGISTRY[name], tmp_path)[0]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    specs = [REGISTRY["mnist_cnn"], REGISTRY["digits_cnn"]]
    loader = BACKEND.loader(tmp_path, "cpu", LoadOptions(), "disk")
    try:
        loader.prepare(specs)
        path = BACKEND.model_files(specs[0], tmp_path)[0]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # truncated during the run
        with pytest.raises(ModelFileError, match="changed since the run started"):
            loader.load(specs[0], LoadTimes())
        loader.load(specs[1], LoadTimes()).close()  # the other model still loads, and no slot was lost
        path.write_bytes(data)
        for _ in range(3):
            loader.load(specs[0], LoadTimes()).close()
        path.unlink()
        with pytest.raises(ModelNotFoundError):
            loader.load(specs[0], LoadTimes())
    finally:
        loader.close()


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_a_corrupt_file_at_prepare_fails_each_load_of_that_model_only(small_dir, tmp_path, tier):
    for name in ("mnist_cnn", "digits_cnn"):
        dst = BACKEND.model_files(REGISTRY[name], tmp_path)[0]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(BACKEND.model_files(REGISTRY[name], small_dir)[0].read_bytes())
    bad = BACKEND.model_files(REGISTRY["mnist_cnn"], tmp_path)[0]
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(100))
    loader = BACKEND.loader(tmp_path, "cpu", LoadOptions(), tier)
    try:
        loader.prepare([REGISTRY["mnist_cnn"], REGISTRY["digits_cnn"]])
        for _ in range(2):
            with pytest.raises(ModelFileError) as err:
                loader.load(REGISTRY["mnist_cnn"], LoadTimes())
            assert str(bad) in str(err.value) and "--force" in str(err.value)
            loader.load(REGISTRY["digits_cnn"], LoadTimes()).close()
    finally:
        loader.close()


def test_loads_in_flight_queue_for_the_loader_and_wait_for_slots(small_dir):
    """Two slots, four threads loading two models at once: every load gets a slot, the loads run one at a
    time, and the answers are right (no load writes into a slot that a running model still uses)."""
    specs = [REGISTRY["mnist_cnn"], REGISTRY["mnist_mlp"]]
    loader = TorchLoader(BACKEND, small_dir, "cpu", LoadOptions(lanes=4), "disk", slots=2)
    loader.prepare(specs)
    xs = [_x(s) for s in specs]
    expected = [BACKEND.load(s, small_dir, "cpu").predict(x) for s, x in zip(specs, xs, strict=True)]
    errors: list[BaseException] = []
    waits: list[float] = []
    start = threading.Barrier(4)

    def lane(i: int) -> None:
        try:
            start.wait(timeout=30)
            for k in range(20):
                m = (i + k) % 2
                times = LoadTimes()
                model = loader.load(specs[m], times)
                waits.append(times.wait_s)
                try:
                    for _ in range(3):
                        assert np.array_equal(model.predict(xs[m], lane=i), expected[m])
                finally:
                    model.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loader.close()
    assert not errors, errors[:1]
    assert len(waits) == 80 and max(waits) > 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("tier", ["disk", "host"])
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_loader_agrees_with_a_plain_load(small_dir, precision, tier, graphs):
    """Each model loaded several times, so every slot holds each model in turn: a slot's graph must replay
    the weights of the load, not those it was captured with (zeros) or a previous model's."""
    specs = [REGISTRY[n] for n in SMALL]
    loader = BACKEND.loader(small_dir, "gpu:0", LoadOptions(precision=precision, lanes=2, cuda_graphs=graphs), tier)
    try:
        info = loader.prepare(specs)
        assert info["h2d_gbps"] > 0
        assert info.get("graphs", 0) == (len(specs) * info["slots"] if graphs else 0)
        plain = {s.name: BACKEND.load(s, small_dir, "gpu:0", LoadOptions(precision=precision)).predict(_x(s))
                 for s in specs}
        tol = 1e-5 if precision == "fp32" else 2e-2
        for _ in range(int(info["slots"]) + 1):
            for spec in specs:
                model = loader.load(spec, LoadTimes())
                assert (model._bound is not None) == graphs
                got = model.predict(_x(spec), lane=1)
                model.close()
                want = plain[spec.name]
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))
    finally:
        loader.close()
