"""ModelWorker without Ray: the real mxnet backend on tiny models, synthetic images, every residency mode."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cortexbench.images.dataset import list_images
from cortexbench.ledger import OUTCOMES, WORKER_STAGES
from cortexbench.models.backends import get_backend
from cortexbench.models.backends.base import BlobLoader
from cortexbench.models.registry import get_spec
from cortexbench.protocol import RESULT_COLS, RequestGroup
from cortexbench.worker import ModelWorker, WorkerSpec
from tests.fakes import reference_lru_hits

MODELS = ("mlp2", "digits_cnn", "mnist_cnn")
OK, INPUT_ERROR, MODEL_ERROR = (OUTCOMES.index(n) for n in ("ok", "input_error", "model_error"))
STAGE_COLS = slice(3, 3 + len(WORKER_STAGES))


class CountingBackend:
    """The real backend, counting loads and closes (to see what a mode loads and frees)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.loads: list[str] = []
        self.live: set[int] = set()

    def model_files(self, spec: Any, model_dir: Path) -> list[Path]:
        return self.inner.model_files(spec, model_dir)

    def load(self, spec: Any, model_dir: Path, device: str, options: Any = None) -> Any:
        model = self.inner.load(spec, model_dir, device, options) if options else self.inner.load(spec, model_dir,
                                                                                                device)
        return self._counted(spec, model)

    def load_blobs(self, spec: Any, blobs: Any, paths: Any, device: str, options: Any = None) -> Any:
        return self._counted(spec, self.inner.load_blobs(spec, blobs, paths, device, options))

    def loader(self, model_dir: Path, device: str, options: Any, tier: Any, **kw: Any) -> Any:
        return BlobLoader(self, model_dir, device, options, tier, drop_cache=kw.get("drop_cache", False))  # counted

    def _counted(self, spec: Any, model: Any) -> Any:
        self.loads.append(spec.name)
        self.live.add(id(model))
        close = model.close

        def counted_close() -> None:
            self.live.discard(id(model))
            close()

        model.close = counted_close
        return model


class _Deferred:
    """A launched inference: the model runs when the answer is asked for, as a GPU's queued work
    finishes after ``launch`` has returned."""

    def __init__(self, model: Any, x: Any, lane: int, log: list[str]) -> None:
        self.model, self.x, self.lane, self.log = model, x, lane, log

    def result(self) -> np.ndarray:
        self.log.append("result")
        return self.model.predict(self.x, self.lane)


class LaunchingBackend(CountingBackend):
    """The real backend whose models can ``launch`` (a fake of the torch GPU path's queue-then-collect,
    which needs a GPU; bench/gpu.py runs the real one): the worker then runs cached groups on the
    launched path."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.log: list[str] = []

    def _counted(self, spec: Any, model: Any) -> Any:
        model = super()._counted(spec, model)
        model.launches = True

        def launch(x: Any, lane: int = 0) -> _Deferred:
            self.log.append(f"launch {lane}")
            return _Deferred(model, x, lane, self.log)

        model.launch = launch
        return model


def _worker(model_dir: Path, images: list[Path], models: tuple[str, ...] = MODELS, lanes: int = 1,
            backend: Any = None, inputs: str = "pool") -> ModelWorker:
    spec = WorkerSpec(name="w0", device="cpu", backend="mxnet", model_dir=str(model_dir), models=models,
                      images=tuple(str(p) for p in images), lanes=lanes, image_pool=8, inputs=inputs)
    return ModelWorker(spec, backend=backend)


def _sequence(n: int, n_models: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_models, n), rng.integers(0, 8, n)


def _group(model_idx: np.ndarray, image_idx: np.ndarray) -> RequestGroup:
    return RequestGroup.of(np.arange(len(model_idx)), model_idx, image_idx)


def _files_size(backend: Any, name: str, model_dir: Path) -> int:
    return sum(f.stat().st_size for f in backend.model_files(get_spec(name), model_dir))


@pytest.fixture
def images(image_dir: Path) -> list[Path]:
    return list_images(image_dir)


def test_cached_loads_every_model_before_the_run_and_only_hits_after(model_dir, images):
    backend = CountingBackend(get_backend("mxnet"))
    w = _worker(model_dir, images, backend=backend)
    try:
        w.set_mode("cached")
        assert sorted(backend.loads) == sorted(MODELS)
        m, i = _sequence(30, len(MODELS))
        res = w.run(_group(m, i))
        assert (res.rows[:, 1] == OK).all(), res.errors
        assert (res.rows[:, 2] == 1).all()
        assert len(backend.loads) == len(MODELS)  # nothing loaded during the run
        st = w.state()
        assert st.hits_total == 30 and st.misses_total == 0 and st.loads_total == 0
        assert st.image_bytes_read == 0  # inputs come from the in-memory pool
    finally:
        w.close()
    assert not backend.live  # close() frees the resident models


def test_cold_reads_the_model_and_the_image_from_disk_for_every_image_and_frees_it(model_dir, images):
    backend = CountingBackend(get_backend("mxnet"))
    w = _worker(model_dir, images, backend=backend)
    try:
        w.set_mode("cold")
        m, i = _sequence(24, len(MODELS))
        res = w.run(_group(m, i))
        assert (res.rows[:, 1] == OK).all(), res.errors
        assert (res.rows[:, 2] == 0).all()
        st = w.state()
        # set_mode warmed the lane with one load of each model (not counted); then one load per image
        assert st.loads_total == 24 == len(backend.loads) - len(MODELS) and st.misses_total == 24
        assert st.hits_total == 0
        assert st.model_bytes_read == sum(_files_size(backend, MODELS[k], model_dir) for k in m)
        assert st.image_bytes_read == sum(images[k % len(images)].stat().st_size for k in i) > 0
        assert not backend.live  # every private copy was freed after its image
        for stage in ("read", "build"):
            assert (res.rows[:, 3 + WORKER_STAGES.index(stage)] > 0).all(), stage
        assert res.rows[:, -3].tolist() == [k % len(images) for k in i]  # the input file each image ran
    finally:
        w.close()


@pytest.mark.parametrize("capacity", [1, 2])
def test_lru_hits_equal_a_reference_lru_replay(model_dir, images, capacity):
    backend = CountingBackend(get_backend("mxnet"))
    w = _worker(model_dir, images, backend=backend)
    try:
        w.set_mode(f"lru:{capacity}")
        m, i = _sequence(40, len(MODELS), seed=capacity)
        hits = []
        for k in range(len(m)):  # one image at a time: the order is the sequence's
            res = w.run(_group(m[k:k + 1], i[k:k + 1]))
            assert res.rows[0, 1] == OK, res.errors
            hits.append(int(res.rows[0, 2]))
        names = [MODELS[k] for k in m]
        expected = reference_lru_hits(names, capacity)
        st = w.state()
        assert sum(hits) == st.hits_total == expected
        # set_mode warmed the lane with one load of each model (not counted)
        assert st.misses_total == st.loads_total == len(m) - expected == len(backend.loads) - len(MODELS)
        assert len(backend.live) <= capacity  # evicted models were freed
    finally:
        w.close()
    assert not backend.live


@pytest.mark.parametrize("mode", ["cached", "cold", "lru:1"])
def test_stage_times_are_non_negative_and_fit_in_the_wall_time(model_dir, images, mode):
    w = _worker(model_dir, images)
    try:
        w.set_mode(mode)
        m, i = _sequence(12, len(MODELS), seed=3)
        t0 = time.perf_counter()
        res = w.run(_group(m, i))
        wall = time.perf_counter() - t0
        assert res.rows.shape == (12, len(RESULT_COLS))
        stages = res.rows[:, STAGE_COLS]
        assert (res.rows[:, 1] == OK).all(), res.errors
        assert np.isfinite(stages).all() and (stages >= 0).all()
        assert (stages.sum(axis=1) <= wall).all()  # one image's stages, its queueing included
        assert stages[:, 1:].sum() <= wall  # one lane: the images' work does not overlap
        assert np.array_equal(res.rows[:, 0], np.arange(12))
    finally:
        w.close()


def test_an_undecodable_image_is_an_input_error_not_an_exception(model_dir, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    w = _worker(model_dir, [*images[:2], bad])
    try:
        w.set_mode("cold")
        res = w.run(RequestGroup.of([0, 1, 2], [1, 1, 1], [0, 2, 1]))
        assert res.rows[:, 1].tolist() == [OK, INPUT_ERROR, OK]
        assert set(res.errors) == {1} and "bad.jpg" in res.errors[1]
    finally:
        w.close()


@pytest.mark.parametrize("mode", ["cached", "lru:1", "swap"])
def test_jpeg_inputs_read_and_decode_every_image_in_every_mode(model_dir, images, tmp_path, mode):
    """--inputs jpeg: each image's file is read and decoded for that image (no pool), timed as input and
    decode; a corrupt file fails its images with input_error and the others go on."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(images[0].read_bytes()[:200])  # a JPEG cut short
    files = [*images[:3], bad]
    w = _worker(model_dir, files, inputs="jpeg", lanes=2)
    try:
        w.set_mode(mode)
        m, i = _sequence(24, len(MODELS))
        res = w.run(_group(m, i))
        broken = [k % len(files) == 3 for k in i]
        assert res.rows[:, 1].tolist() == [INPUT_ERROR if b else OK for b in broken]
        assert all("bad.jpg" in msg for msg in res.errors.values()) and len(res.errors) == sum(broken)
        ok = ~np.array(broken)
        decode_s = res.rows[ok, 3 + WORKER_STAGES.index("decode")]
        # cached decodes before it runs; a load (or a wait for another lane's load of the same model) hides
        # the decode it overlaps: only what it left visible counts
        assert (decode_s > 0).all() if mode == "cached" else (decode_s >= 0).all()
        assert w.state().image_bytes_read == sum(files[k % len(files)].stat().st_size for k in i)
        assert res.rows[:, -3].tolist() == [k % len(files) for k in i]  # the input file each image ran
        ref = _worker(model_dir, images[:3])  # the same images from the decoded pool answer alike
        try:
            ref.set_mode("cached")
            want = ref.run(_group(m[ok], np.array([k % len(files) for k in i[ok]])))
            assert np.array_equal(want.rows[:, -2], res.rows[ok, -2])  # top-1
        finally:
            ref.close()
    finally:
        w.close()


@pytest.mark.parametrize("inputs", ["pool", "jpeg"])
def test_cached_groups_of_launching_models_are_queued_first_then_collected_with_the_same_answers(
        model_dir, images, tmp_path, inputs):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    files = [*images[:3], bad] if inputs == "jpeg" else images
    backend = LaunchingBackend(get_backend("mxnet"))
    w = _worker(model_dir, files, lanes=3, backend=backend, inputs=inputs)
    ref = _worker(model_dir, files, lanes=3, inputs=inputs)
    try:
        w.set_mode("cached")
        ref.set_mode("cached")
        assert w.lanes.pipeline is not None and ref.lanes.pipeline is None
        m, i = _sequence(12, len(MODELS))
        backend.log.clear()
        res = w.run(_group(m, i))
        n_ok = 12 - len(res.errors)  # an image that does not decode fails before its launch
        assert backend.log == [f"launch {k % 3}" for k in range(n_ok)] + ["result"] * n_ok
        want = ref.run(_group(m, i))
        cols = [0, 1, 2, -3, -2, -1]
        assert np.array_equal(res.rows[:, cols], want.rows[:, cols], equal_nan=True)
        assert res.errors == want.errors
        ok = res.rows[:, 1] == OK
        assert ok.sum() == (12 if inputs == "pool" else sum(k % 4 != 3 for k in i))
        assert (res.rows[ok, 3 + WORKER_STAGES.index("infer")] > 0).all()
        assert all(h.users == 0 for h in w.models.held.values())  # every model given back
        assert w.state().hits_total == 12 - (0 if inputs == "pool" else 12 - int(ok.sum()))
    finally:
        w.close()
        ref.close()
    assert not backend.live


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_corrupt_model_file_is_a_model_error(model_dir, images, tmp_path, damage):
    mine = tmp_path / "models"
    shutil.copytree(model_dir, mine)
    params = get_backend("mxnet").model_files(get_spec("digits_cnn"), mine)[1]
    if damage == "missing":
        params.unlink()
    else:
        params.write_bytes(b"not an mxnet params file" * 10)
    w = _worker(mine, images)
    try:
        w.set_mode("cold")
        res = w.run(RequestGroup.of([0, 1, 2], [0, 1, 2], [0, 1, 2]))
        assert res.rows[:, 1].tolist() == [OK, MODEL_ERROR, OK]
        assert set(res.errors) == {1} and "digits_cnn" in res.errors[1]
    finally:
        w.close()


@pytest.mark.parametrize("mode", ["cold", "swap"])
@pytest.mark.parametrize("backend", ["mxnet", "torch"])
@pytest.mark.parametrize("when", ["before the run", "during the run"])
def test_a_damaged_model_file_fails_its_images_in_cold_and_swap_and_the_run_goes_on(model_dir, images, tmp_path,
                                                                                     mode, backend, when):
    """A file corrupt before the run (swap holds what it could read: nothing) or truncated during it (cold
    reads it again for every image; swap already holds the good bytes) fails exactly its model's images."""
    if backend == "torch":
        pytest.importorskip("torch")
        mine = tmp_path / "models"
        for name in MODELS:
            get_backend("torch").export(get_spec(name), mine, seed=0)
    else:
        mine = tmp_path / "models"
        shutil.copytree(model_dir, mine)
    target = get_backend(backend).model_files(get_spec("digits_cnn"), mine)[-1]
    good = target.read_bytes()

    def damage() -> None:
        target.write_bytes(good[: len(good) // 2] if when == "during the run" else b"not a model file" * 10)

    if when == "before the run":
        damage()
    spec = WorkerSpec(name="w0", device="cpu", backend=backend, model_dir=str(mine), models=MODELS,
                      images=tuple(str(p) for p in images), lanes=1, image_pool=8)
    w = ModelWorker(spec)
    try:
        w.set_mode(mode)
        if when == "during the run":
            damage()
        res = w.run(RequestGroup.of(range(6), [0, 1, 2, 1, 0, 2], range(6)))
        swap_kept_it = mode == "swap" and when == "during the run"
        bad = OK if swap_kept_it else MODEL_ERROR
        assert res.rows[:, 1].tolist() == [OK, bad, OK, bad, OK, OK], res.errors
        if not swap_kept_it:
            assert set(res.errors) == {1, 3} and all("digits_cnn" in m and "\n" not in m for m in res.errors.values())
    finally:
        w.close()


class RendezvousBackend(CountingBackend):
    """The real backend; once ``armed``, each predict waits until ``parties`` predicts are running (a
    barrier), so a test sees that images ran at the same time without reading the wall clock.  It also
    records the most predicts that ran at once and the lanes they ran on."""

    def __init__(self, inner: Any, parties: int) -> None:
        super().__init__(inner)
        self.barrier = threading.Barrier(parties)
        self.armed = False
        self.running = self.peak = 0
        self.lanes_used: set[int] = set()
        self._lock = threading.Lock()

    def load(self, spec: Any, model_dir: Path, device: str, options: Any = None) -> Any:
        model = super().load(spec, model_dir, device, options)
        predict = model.predict

        def rendezvous(batch: np.ndarray, lane: int = 0) -> np.ndarray:
            if not self.armed:
                return predict(batch, lane)
            with self._lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
                self.lanes_used.add(lane)
            try:
                self.barrier.wait(timeout=10)  # broken (an error) unless another lane runs meanwhile
                return predict(batch, lane)
            finally:
                with self._lock:
                    self.running -= 1

        model.predict = rendezvous
        return model


def test_two_lanes_run_two_images_at_once(model_dir, images):
    backend = RendezvousBackend(get_backend("mxnet"), parties=2)
    w = _worker(model_dir, images, models=("null:0.05",), lanes=2, backend=backend)
    try:
        w.set_mode("cached")
        group = RequestGroup.of(range(4), [0] * 4, range(4))
        backend.armed = True
        t0 = time.perf_counter()
        res = w.submit(group).result()
        wall = time.perf_counter() - t0
        assert (res.rows[:, 1] == OK).all(), res.errors  # each image met another one running: 2 at a time
        assert backend.peak == 2 and backend.lanes_used == {0, 1}  # never more than the lanes
        assert wall >= 0.1  # 4 images of 50 ms on 2 lanes: at least 2 rounds (an upper bound is load's to say)
        infer = res.rows[:, 3 + WORKER_STAGES.index("infer")]
        assert (infer >= 0.05).all()
    finally:
        w.close()


def test_lru_with_several_lanes_keeps_at_most_k_models_loaded(model_dir, images):
    # lanes race for models: one lane evicting while another loads must not leave extra models loaded
    backend = CountingBackend(get_backend("mxnet"))
    w = _worker(model_dir, images, lanes=4, backend=backend)
    try:
        w.set_mode("lru:1")
        m, i = _sequence(120, len(MODELS), seed=7)
        res = w.run(_group(m, i))
        assert (res.rows[:, 1] == OK).all(), res.errors
        assert set(w.models.held) <= set(w.residency.resident())
        assert len(backend.live) <= 1 + 4  # K resident, plus models still held by a lane when evicted
        hit_ratio = res.rows[:, 2].mean()
        assert hit_ratio < 0.6  # 3 models, lru:1: a replay gives about a third; far from "all hits"
    finally:
        w.close()
    assert not backend.live


class BatchDecoder:
    """A fake of the GPU decoder's batched path (``torch_decode.GpuDecoder.many``: nvJPEG needs a GPU;
    ``pytest -m gpu`` and bench/gpu.py run the real one): each image decoded by the CPU path, so answers
    equal ``--decode cpu``'s, a bad file's ImageDecodeError in its place; every call logged."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, data: bytes, path: Path, spec: Any) -> np.ndarray:
        from cortexbench.images.dataset import decode, preprocess

        return preprocess(decode(data, path), spec)[None]

    def many(self, items: list[tuple[bytes, Path, Any]]) -> list[Any]:
        from cortexbench.errors import ImageDecodeError

        self.calls.append(len(items))
        out: list[Any] = []
        for data, path, spec in items:
            try:
                out.append(self(data, path, spec))
            except ImageDecodeError as e:
                out.append(e)
        return out


def test_a_launched_group_of_jpeg_inputs_is_decoded_in_one_batch_with_the_same_answers(model_dir, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    files = [*images[:3], bad, tmp_path / "gone.jpg"]
    backend = LaunchingBackend(get_backend("mxnet"))
    w = _worker(model_dir, files, lanes=3, backend=backend, inputs="jpeg")
    ref = _worker(model_dir, files, lanes=3, inputs="jpeg")
    decoder = w.inputs._decoder = BatchDecoder()
    try:
        w.set_mode("cached")
        ref.set_mode("cached")
        assert w.lanes.prepare is not None and ref.lanes.prepare is None
        m, i = _sequence(12, len(MODELS))[0], np.arange(12) % 5
        decoder.calls.clear()
        res = w.run(_group(m, i))
        assert decoder.calls == [10]  # one call for the group; the missing file is never decoded
        want = ref.run(_group(m, i))
        cols = [0, 1, 2, -3, -2, -1]
        assert np.array_equal(res.rows[:, cols], want.rows[:, cols], equal_nan=True)
        assert res.errors == want.errors and len(res.errors) == 4
        assert res.rows[:, 1].tolist() == [INPUT_ERROR if k >= 3 else OK for k in i]
        decode_s = res.rows[:, 3 + WORKER_STAGES.index("decode")]
        assert (decode_s == decode_s[0]).all() and decode_s[0] > 0  # each image waited for the group's decode
        sizes = [Path(f).stat().st_size for f in files[:4]] + [0]
        assert w.state().image_bytes_read == ref.state().image_bytes_read == sum(sizes[k] for k in i)
    finally:
        w.close()
        ref.close()
