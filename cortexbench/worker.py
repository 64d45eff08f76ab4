"""``ModelWorker``: one device, its models, a residency policy, and per-image stage times.

A plain class, testable without Ray; ``cortexbench.cluster`` wraps it in a Ray actor (one per GPU).

Requests travel in groups (``RequestGroup``: one row per image: item id, model index, image index) so
that one Ray call can carry several images; each image is still run on its own at batch size 1 and
timed on its own.  A worker has ``lanes`` threads (one CUDA stream each on a GPU); the images of a group
are shared out over free lanes, so several images are in flight at once and the calling thread (a Ray
actor's event loop or a compiled graph's execution thread) is never the one that waits on the device
unless it takes a lane itself.

Per image the worker measures (``ledger.WORKER_STAGES``):

- ``queue``: from the group's arrival to a lane starting the image;
- ``read``: reading the image file (cold mode; 0 when inputs are held in memory);
- ``decode``: decoding and preprocessing it;
- ``load``: reading the model file and putting the model on the device (a miss), or waiting for another
  lane that is loading the same model;
- ``infer``: ``predict`` at batch size 1, host-to-device copy and synchronisation included;
- ``free``: freeing the model after use (cold) or freeing evicted models (LRU).

Modes (see ``residency``): ``cached`` loads every model and decodes an in-memory pool of inputs before
the run; ``cold`` reads the model file and the image file from disk for every image and frees the
model afterwards; ``lru:K`` keeps at most K models loaded, with inputs in memory as in cached mode, so
that it measures model residency alone.  The in-memory pool holds ``image_pool`` decoded images per
input shape; image ``i`` uses pool entry ``i % len(pool)`` (a pool of 100K decoded 224x224 inputs would
need 60 GB).
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cortexbench.errors import ImageDecodeError, ModelFileError, ModelNotFoundError, UsageError
from cortexbench.ledger import OUTCOMES, WORKER_STAGES
from cortexbench.models.backends.base import Backend, LoadedModel, LoadOptions
from cortexbench.models.registry import ModelSpec, get_spec
from cortexbench.residency import Mode, Residency, make_residency, parse_mode

OK, INPUT_ERROR, MODEL_ERROR, ERROR = (OUTCOMES.index(n) for n in ("ok", "input_error", "model_error", "error"))
N_STAGES = len(WORKER_STAGES)
QUEUE, READ, DECODE, LOAD, INFER, FREE = range(N_STAGES)
# Columns of ResultGroup.rows: item, outcome, hit, then one per stage.
RESULT_COLS = ("item", "outcome", "hit", *WORKER_STAGES)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start; picklable, so it travels to a Ray actor."""

    name: str
    device: str
    backend: str
    model_dir: str
    models: tuple[str, ...]
    images: tuple[str, ...]
    lanes: int = 1
    precision: str = "fp32"
    cuda_graphs: bool = False
    image_pool: int = 256
    drop_cache: bool = False


@dataclass(frozen=True)
class RequestGroup:
    """Images for one worker call: ``rows`` is int64 (n, 3): item id, model index, image index."""

    rows: np.ndarray

    @staticmethod
    def of(items: Sequence[int], model_idx: Sequence[int], image_idx: Sequence[int]) -> RequestGroup:
        return RequestGroup(np.column_stack([np.asarray(items, np.int64), np.asarray(model_idx, np.int64),
                                             np.asarray(image_idx, np.int64)]))

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class WorkerState:
    """Counters the driver turns into metrics; sent back with every group."""

    loads_total: int = 0
    hits_total: int = 0
    misses_total: int = 0
    model_bytes_read: int = 0
    image_bytes_read: int = 0
    inflight: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class ResultGroup:
    """What a worker gives back for a group: ``rows`` float64 (n, 3 + stages) in ``RESULT_COLS`` order,
    error messages by row position (failed images only), and the worker's counters."""

    rows: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    state: WorkerState = field(default_factory=WorkerState)

    def __len__(self) -> int:
        return len(self.rows)


class _Resident:
    """A loaded model shared by lanes; freed when evicted and no lane uses it any more."""

    __slots__ = ("evicted", "model", "users")

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.users = 0
        self.evicted = False


class ModelWorker:
    """One device, its models under a residency policy, and ``lanes`` threads that run images."""

    def __init__(self, spec: WorkerSpec, backend: Backend | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if backend is None:
            from cortexbench.models.backends import get_backend

            backend = get_backend(spec.backend)
        self.spec = spec
        self.backend = backend
        self.clock = clock
        self.model_dir = Path(spec.model_dir)
        self.specs: tuple[ModelSpec, ...] = tuple(get_spec(m) for m in spec.models)
        self.options = LoadOptions(precision=spec.precision, lanes=max(1, spec.lanes),  # type: ignore[arg-type]
                                   cuda_graphs=spec.cuda_graphs)
        self.mode: Mode = parse_mode("cold")
        self.residency: Residency = make_residency(self.mode, ())
        self._resident: dict[str, _Resident] = {}
        self._loading: dict[str, threading.Lock] = {m: threading.Lock() for m in spec.models}
        self._lock = threading.Lock()
        self._pool: dict[tuple[int, ...], np.ndarray] = {}
        self._inputs_in_memory = False
        self._free_lanes: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(max(1, spec.lanes)):
            self._free_lanes.put(lane)
        self._executor = ThreadPoolExecutor(max_workers=max(1, spec.lanes), thread_name_prefix=f"{spec.name}-lane")
        self._inflight = 0
        self._loads = self._hits = self._misses = 0
        self._model_bytes = self._image_bytes = 0

    # --- setup between runs (not timed) ---------------------------------------------------------

    def set_mode(self, mode: str) -> dict[str, float]:
        """Switch residency; cached and lru load what they need before the run.  Returns setup times."""
        t0 = self.clock()
        self.mode = parse_mode(mode)
        with self._lock:
            for name in list(self._resident):
                self._evict(name)
        self.residency = make_residency(self.mode, self.spec.models if self.mode.kind == "cached" else ())
        self._inputs_in_memory = self.mode.kind != "cold"
        t_models = self.clock()
        if self.mode.kind == "cached":
            for spec in self.specs:
                self._resident[spec.name] = _Resident(self.backend.load(spec, self.model_dir, self.spec.device,
                                                                        self.options))
        t_inputs = self.clock()
        if self._inputs_in_memory and not self._pool:
            self._fill_pool()
        self._loads = self._hits = self._misses = 0
        self._model_bytes = self._image_bytes = 0
        return {"models_s": t_inputs - t_models, "inputs_s": self.clock() - t_inputs, "total_s": self.clock() - t0}

    def _fill_pool(self) -> None:
        from cortexbench.images.dataset import load_batch

        shapes = {s.input_shape: s for s in self.specs}
        n = min(self.spec.image_pool, len(self.spec.images))
        paths = [Path(p) for p in self.spec.images[:n]]
        for shape, spec in shapes.items():
            batch, _bad = load_batch(paths, spec)
            if len(batch) == 0:
                raise ImageDecodeError(f"none of the first {n} images decodes; check img_dir")
            self._pool[shape] = batch

    def check(self) -> None:
        """Load every model once and decode one image: a bad file is a clear error before the run."""
        from cortexbench.images.dataset import load_input

        for spec in self.specs:
            self.backend.load(spec, self.model_dir, self.spec.device, self.options).close()
        if self.spec.images:
            load_input(Path(self.spec.images[0]), self.specs[0])

    # --- the per-image path ----------------------------------------------------------------------

    def submit(self, group: RequestGroup, arrived_s: float | None = None) -> Future[ResultGroup]:
        """Share the group's images out over lanes; the future completes when all are done.
        Never blocks the caller (suits an event loop)."""
        arrived = self.clock() if arrived_s is None else arrived_s
        job = _Job(group, arrived, self)
        for _ in range(min(len(group), self.options.lanes)):
            self._executor.submit(job.lane_loop, None)
        return job.future

    def run(self, group: RequestGroup) -> ResultGroup:
        """Run a group and wait for it; the calling thread takes a lane itself when one is free
        (a compiled graph's execution thread calls this)."""
        arrived = self.clock()
        job = _Job(group, arrived, self)
        try:
            lane: int | None = self._free_lanes.get_nowait()
        except queue.Empty:
            lane = None
        helpers = min(len(group), self.options.lanes) - (1 if lane is not None else 0)
        for _ in range(helpers):
            self._executor.submit(job.lane_loop, None)
        if lane is not None:
            try:
                job.work(lane)
            finally:
                self._free_lanes.put(lane)
                job.lane_done()
        return job.future.result()

    def _lane(self) -> int:
        return self._free_lanes.get()  # blocks while the calling thread of run() holds the last lane

    def _release(self, lane: int) -> None:
        self._free_lanes.put(lane)

    def process(self, row: np.ndarray, out: np.ndarray, arrived: float, lane: int) -> str | None:
        """Run one image; fill ``out`` (outcome, hit, stages); return an error message or None."""
        clock = self.clock
        t0 = clock()
        out[3 + QUEUE] = t0 - arrived
        spec = self.specs[int(row[1])]
        try:
            if self._inputs_in_memory:
                pool = self._pool[spec.input_shape]
                x = pool[int(row[2]) % len(pool)][None]
                t1 = t2 = t0
            else:
                x, t1, t2 = self._read_input(int(row[2]), spec)
            model, res, hit, t3 = self._acquire(spec, t2)
            out[2] = hit
            try:
                model.predict(x, lane)
                t4 = clock()
            finally:
                self._release_model(model, res)
            t5 = clock()
            out[3 + READ], out[3 + DECODE], out[3 + LOAD] = t1 - t0, t2 - t1, t3 - t2
            out[3 + INFER], out[3 + FREE] = t4 - t3, t5 - t4
            out[1] = OK
            return None
        except ImageDecodeError as e:
            out[1] = INPUT_ERROR
            return str(e)
        except (ModelFileError, ModelNotFoundError) as e:
            out[1] = MODEL_ERROR
            return str(e)
        except UsageError as e:
            out[1] = MODEL_ERROR
            return str(e)
        except Exception as e:  # a framework error: counted, the worker keeps going
            out[1] = ERROR
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"

    def _read_input(self, image_idx: int, spec: ModelSpec) -> tuple[np.ndarray, float, float]:
        from cortexbench.images.dataset import decode, preprocess, read_bytes

        path = Path(self.spec.images[image_idx % len(self.spec.images)])
        if self.spec.drop_cache:
            _drop_page_cache(path)
        data = read_bytes(path)
        t1 = self.clock()
        x = preprocess(decode(data, path), spec)[None]
        self._image_bytes += len(data)
        return x, t1, self.clock()

    def _acquire(self, spec: ModelSpec, now: float) -> tuple[LoadedModel, _Resident | None, int, float]:
        """The model to run ``spec`` with, its residency entry (None: a private cold copy), whether it
        was resident, and the time it was ready."""
        name = spec.name
        with self._lock:
            access = self.residency.access(name)
            res = self._resident.get(name) if access.hit else None
            if res is not None:
                res.users += 1
                self._hits += 1
                return res.model, res, 1, now
        if not access.keep:  # cold: a private copy, read from disk now, freed after use
            model = self._load(spec)
            with self._lock:
                self._misses += 1
            return model, None, 0, self.clock()
        with self._loading[name]:  # one lane loads; others wanting the same model wait for it
            with self._lock:
                res = self._resident.get(name)
                if res is not None:
                    res.users += 1
                    self._hits += 1
                    return res.model, res, 1, self.clock()
            model = self._load(spec)
            with self._lock:
                self._misses += 1
                res = _Resident(model)
                res.users = 1
                self._resident[name] = res
                for victim in access.evict:
                    self._evict(victim)
        return model, res, 0, self.clock()

    def _load(self, spec: ModelSpec) -> LoadedModel:
        if self.spec.drop_cache:
            for f in self.backend.model_files(spec, self.model_dir):
                _drop_page_cache(f)
        model = self.backend.load(spec, self.model_dir, self.spec.device, self.options)
        with self._lock:
            self._loads += 1
            self._model_bytes += model.size_bytes
        return model

    def _release_model(self, model: LoadedModel, res: _Resident | None) -> None:
        if res is None:
            model.close()
            return
        with self._lock:
            res.users -= 1
            if res.evicted and res.users == 0:
                model.close()

    def _evict(self, name: str) -> None:
        """Called with ``self._lock`` held; the last lane still using the model frees it."""
        res = self._resident.pop(name, None)
        if res is None:
            return
        res.evicted = True
        if res.users == 0:
            res.model.close()

    def state(self) -> WorkerState:
        return WorkerState(self._loads, self._hits, self._misses, self._model_bytes, self._image_bytes,
                           self._inflight, memory_bytes(self.spec.device))

    def close(self) -> None:
        with self._lock:
            for name in list(self._resident):
                self._evict(name)
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Job:
    """One group being run: lanes take its images one by one (work sharing), the last one finishes it."""

    __slots__ = ("arrived", "errors", "future", "group", "lanes_left", "lock", "next", "rows", "worker")

    def __init__(self, group: RequestGroup, arrived: float, worker: ModelWorker) -> None:
        self.group = group
        self.arrived = arrived
        self.worker = worker
        n = len(group)
        self.rows = np.zeros((n, len(RESULT_COLS)), np.float64)
        self.rows[:, 0] = group.rows[:, 0]
        self.rows[:, 2] = -1
        self.errors: dict[int, str] = {}
        self.next = itertools.count()  # atomic under the GIL
        self.future: Future[ResultGroup] = Future()
        self.lock = threading.Lock()
        self.lanes_left = min(n, worker.options.lanes)
        with worker._lock:
            worker._inflight += n

    def work(self, lane: int) -> None:
        n = len(self.group)
        rows = self.group.rows
        while (i := next(self.next)) < n:
            msg = self.worker.process(rows[i], self.rows[i], self.arrived, lane)
            if msg is not None:
                self.errors[i] = msg

    def lane_loop(self, _: object) -> None:
        w = self.worker
        lane = w._lane()
        try:
            self.work(lane)
        except BaseException as e:  # never leave a future hanging
            self.future.set_exception(e) if not self.future.done() else None
        finally:
            w._release(lane)
            self.lane_done()

    def lane_done(self) -> None:
        with self.lock:
            self.lanes_left -= 1
            last = self.lanes_left <= 0
        if last and not self.future.done():
            w = self.worker
            with w._lock:
                w._inflight -= len(self.group)
            self.future.set_result(ResultGroup(self.rows, self.errors, w.state()))


def memory_bytes(device: str) -> int:
    """Device memory in use: torch's allocator on a GPU when torch is loaded, else this process's RSS."""
    if device.startswith("gpu:") and "torch" in sys.modules:
        try:
            import torch

            return int(torch.cuda.memory_allocated(int(device[4:])))
        except Exception:
            return 0
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages, so the next read goes to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)
