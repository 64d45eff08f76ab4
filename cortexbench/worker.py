"""``ModelWorker``: one device, its models, a residency policy, and per-image stage times.

A plain class, testable without Ray; ``cortexbench.cluster`` wraps it in a Ray actor (one per GPU).

Requests travel in groups (``protocol.RequestGroup``) so that one Ray call can carry several images;
each image is still run on its own at batch size 1 and timed on its own.  A worker has ``lanes`` lanes
(``lanes.Lanes``: one CUDA stream each on a GPU, a thread per lane); the images of a group are shared out
over free lanes, so several images are in flight at once, each through ``process``.

Per image the worker measures (``ledger.WORKER_STAGES``):

- ``queue``: from the group's arrival to a lane starting the image;
- ``input``: reading the image file (cold mode; 0 when inputs are held in memory);
- ``decode``: decoding and preprocessing it;
- ``wait``: waiting for the model loader (another load in progress, or no free device slot) or for
  another lane that is loading the same model (LRU);
- ``read``, ``build``, ``copy``: a miss's load (``models.backends.base.LoadTimes``): the model's bytes from
  disk (0 from host memory), its structure, and the copy to the device;
- ``infer``: ``predict`` at batch size 1, host-to-device copy and synchronisation included;
- ``free``: freeing the model after use (cold, swap) or freeing evicted models (LRU).

It also says which input file each image ran on and the model's top-1 class and logit sum, so that the
tiers' answers can be compared (``ledger.ANSWER_COLUMNS``).

Modes (see ``residency``): ``cached`` loads every model and decodes an in-memory pool of inputs before
the run; ``swap`` holds every model's weights in host memory and loads them onto the device for every
image; ``cold`` reads the model file and the image file from disk for every image; both free the model
afterwards and load through the backend's ``ModelLoader``, one load at a time.  ``lru:K`` keeps at most K
models loaded.  Every mode but cold takes inputs from an in-memory pool, so that it measures model
residency alone: ``image_pool`` decoded images per input shape; image ``i`` uses pool entry
``i % len(pool)`` (a pool of 100K decoded 224x224 inputs would need 60 GB).

In the modes that load on demand (swap, cold, lru:K) images run on the lane threads only (never on a
caller's thread): per-thread framework state (cuDNN's plans) is then warmed once per lane before the run,
as in a serving process that has run each model before, and the report says so.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cortexbench.errors import ImageDecodeError, ModelFileError, ModelNotFoundError, UsageError
from cortexbench.lanes import Lanes
from cortexbench.machine import device_memory_bytes, host_memory_bytes
from cortexbench.models.backends.base import (
    Backend,
    BlobLoader,
    LoadedModel,
    LoadOptions,
    LoadTimes,
    ModelLoader,
    drop_page_cache,
    files_size,
)
from cortexbench.models.registry import ModelSpec, get_spec
from cortexbench.protocol import (
    BUILD,
    CHECKSUM,
    COPY,
    DECODE,
    ERROR,
    FREE,
    INFER,
    INPUT,
    INPUT_ERROR,
    INPUT_IDX,
    MODEL_ERROR,
    OK,
    QUEUE,
    READ,
    STAGE0,
    TOP1,
    WAIT,
    RequestGroup,
    ResultGroup,
    WorkerState,
)
from cortexbench.residency import Mode, Residency, make_residency, parse_mode

MEMORY_REFRESH_S = 0.25  # WorkerState.memory_bytes is read again at most this often (a /proc read costs ~20 us)
_NAN = float("nan")
_DEFAULT_SWITCH_S = sys.getswitchinterval()
LOADING_SWITCH_S = float(os.environ.get("CORTEXBENCH_SWITCH_INTERVAL_S", "0.0005"))
CACHED_SWITCH_S = float(os.environ.get("CORTEXBENCH_CACHED_SWITCH_INTERVAL_S", str(_DEFAULT_SWITCH_S)))
# cold: read and decode the image while the model loads (a tuning knob for bench/cold.py's A/B runs)
INPUT_OVERLAP = os.environ.get("CORTEXBENCH_INPUT_OVERLAP", "1") != "0"
# cached on a GPU: launch a group's images back to back and collect them (0: one lane thread per image,
# each waiting for its own; bench/gpu.py's A/B)
LAUNCH = os.environ.get("CORTEXBENCH_LAUNCH", "1") != "0"


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
    cold_rebuild: bool = False  # cold/swap: build the network's structure for every load, timed as 'build'
    inputs: str = "pool"  # pool: a decoded pool reused (not in cold); jpeg: every image read and decoded
    decode: str = "cpu"  # jpeg inputs on a GPU worker: cpu (OpenCV) or gpu (the backend's GPU decoder)


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
        self._pool_files: dict[tuple[int, ...], list[int]] = {}  # pool entry -> index of its image file
        self._inputs_in_memory = False
        self._overlap_inputs = False  # the image is read and decoded on an input thread while its model loads
        self._decoder: Callable[[bytes, Path, ModelSpec], Any] | None = None  # --decode gpu
        self._turn = itertools.count()  # the launched path: images take the lanes' streams in turn
        self._loader: ModelLoader | None = None
        self._input_threads: ThreadPoolExecutor | None = None  # cold: images read while their model loads
        self.lanes = Lanes(max(1, spec.lanes), spec.name, self.process, self._counters, clock)
        self._loads = self._hits = self._misses = 0
        self._model_bytes = self._image_bytes = 0
        self._memory = (-1, 0)
        self._memory_at = -math.inf

    # --- setup between runs (not timed) ---------------------------------------------------------

    def set_mode(self, mode: str) -> dict[str, float]:
        """Switch residency; cached loads every model, swap fills the host tier, and every mode warms its
        lanes before the run.  Returns setup times and the loader's figures (``loader_*``)."""
        t0 = self.clock()
        self.mode = parse_mode(mode)
        kind = self.mode.kind
        with self._lock:
            for name in list(self._resident):
                self._evict(name)
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        self.residency = make_residency(self.mode, self.spec.models if kind == "cached" else ())
        self._inputs_in_memory = kind != "cold" and self.spec.inputs == "pool"
        self._overlap_inputs = not self._inputs_in_memory and kind != "cached" and INPUT_OVERLAP
        if self.spec.decode == "gpu" and self._decoder is None:
            make = getattr(self.backend, "gpu_decoder", None)
            if make is None or not self.spec.device.startswith("gpu"):
                raise UsageError(f"--decode gpu: the {self.backend.name} backend on {self.spec.device} has no GPU "
                                 "decoder; use --decode cpu")
            self._decoder = make(self.spec.device)
        self.lanes.caller_runs = kind == "cached"
        self.lanes.pipeline = None
        # Loads are I/O threads handing chunks on: with Python's default 5 ms GIL switch interval a reader
        # back from the kernel waits behind the lanes' inference (measured on an H200: cold at 16 in flight
        # 32 images/s at 5 ms, 48 at 0.5 ms).  A process-wide setting: this worker process is ours.
        sys.setswitchinterval(CACHED_SWITCH_S if kind == "cached" else LOADING_SWITCH_S)
        if self._overlap_inputs and self._input_threads is None:
            self._input_threads = ThreadPoolExecutor(self.options.lanes, thread_name_prefix=f"{self.spec.name}-input")
        t_models = self.clock()
        info: dict[str, float] = {}
        if kind == "cached":
            for spec in self.specs:
                self._resident[spec.name] = _Resident(self.backend.load(spec, self.model_dir, self.spec.device,
                                                                        self.options))
        else:  # every model resident at once at most K (lru), or for one image (swap, cold), plus loads in flight
            slots = (self.mode.capacity if kind == "lru" else 0) + self.options.lanes + 1
            self._loader = self.backend.loader(self.model_dir, self.spec.device, self.options,
                                               "host" if kind == "swap" else "disk", drop_cache=self.spec.drop_cache,
                                               rebuild=self.spec.cold_rebuild, slots=slots)
            info = self._loader.prepare(self.specs)
        t_inputs = self.clock()
        if self._inputs_in_memory and not self._pool:
            self._fill_pool()
        t_warm = self.clock()
        if kind == "cached":
            self._warm_lanes()
        else:
            self._warm_loader()
        resident = [r.model for r in self._resident.values()]
        launched = kind == "cached" and LAUNCH and bool(resident) and all(
            getattr(m, "launches", False) for m in resident)
        self.lanes.pipeline = (self.begin, self.end) if launched else None
        self._loads = self._hits = self._misses = 0
        self._model_bytes = self._image_bytes = 0
        self._memory_at = -math.inf  # read the memory in use afresh with the next group
        end = self.clock()
        sizes = {f"model_bytes.{spec.name}": float(files_size(self.backend.model_files(spec, self.model_dir)))
                 for spec in self.specs}
        return {"models_s": t_inputs - t_models, "inputs_s": t_warm - t_inputs, "warm_s": end - t_warm,
                "total_s": end - t0, **{f"loader_{k}": float(v) for k, v in info.items()}, **sizes}

    def _warm_input(self, spec: ModelSpec) -> Any:
        """A warm-up's input: from the pool, or, when inputs are read per image, the first image read and
        decoded as the run will (so a GPU decoder is warm too); zeros if it does not decode."""
        if not self._inputs_in_memory and self.spec.images:
            try:
                return self._read_input(0, spec)[0]
            except ImageDecodeError:
                pass
        return self._input_like(spec)

    def _input_like(self, spec: ModelSpec) -> np.ndarray:
        pool = self._pool.get(spec.input_shape)
        return pool[:1] if pool is not None else np.zeros((1, *spec.input_shape), np.float32)

    def _warm_lanes(self) -> None:
        """Run every resident model once on every lane, from that lane's thread, so that per-thread setup
        (cuDNN tuning, CUDA graph capture) happens before the run and not inside its first images."""
        models = [(s, r.model) for s in self.specs if (r := self._resident.get(s.name)) is not None]

        def warm(lane: int) -> None:
            for spec, model in models:
                model.predict(self._warm_input(spec), lane)

        self.lanes.on_every_lane(warm)

    def _warm_loader(self) -> None:
        """Load and run every model once on every lane through the loader (cold, swap): the process has run
        each model before, as a serving process has; its weights still come from disk or host memory for
        every image of the run.  A model that does not load is left to fail its images."""
        loader = self._loader
        assert loader is not None

        def warm(lane: int) -> None:
            for spec in self.specs:
                try:
                    model = loader.load(spec, LoadTimes())
                except (ModelFileError, ModelNotFoundError):
                    continue
                try:
                    model.predict(self._warm_input(spec), lane)
                finally:
                    model.close()

        self.lanes.on_every_lane(warm)

    def _fill_pool(self) -> None:
        from cortexbench.images.dataset import load_batch

        shapes = {s.input_shape: s for s in self.specs}
        n = min(self.spec.image_pool, len(self.spec.images))
        paths = [Path(p) for p in self.spec.images[:n]]
        for shape, spec in shapes.items():
            batch, bad = load_batch(paths, spec)
            if len(batch) == 0:
                raise ImageDecodeError(f"none of the first {n} images decodes; check img_dir")
            self._pool[shape] = batch
            skip = set(bad)
            self._pool_files[shape] = [i for i, p in enumerate(paths) if p not in skip]

    def check(self) -> None:
        """Load every model once and decode one image: a bad file is a clear error before the run."""
        from cortexbench.images.dataset import load_input

        for spec in self.specs:
            self.backend.load(spec, self.model_dir, self.spec.device, self.options).close()
        if self.spec.images:
            load_input(Path(self.spec.images[0]), self.specs[0])

    # --- the per-image path ----------------------------------------------------------------------

    def submit(self, group: RequestGroup, arrived_s: float | None = None) -> Future[ResultGroup]:
        """Share the group's images out over lanes; the future completes when all are done (``Lanes.submit``)."""
        return self.lanes.submit(group, arrived_s)

    def run(self, group: RequestGroup) -> ResultGroup:
        """Run a group and wait for it (``Lanes.run``); several threads may call this at once."""
        return self.lanes.run(group)

    def run_bytes(self, data: bytes) -> bytes:
        """``run`` on the wire form (``Lanes.run_bytes``): what the Ray actor calls."""
        return self.lanes.run_bytes(data)

    def process(self, model_idx: int, image_idx: int, arrived: float, lane: int, out: list[float]) -> str | None:
        """Run one image; fill ``out`` (a row in RESULT_COLS order: outcome, hit, stages, answers); return an
        error message or None."""
        clock = self.clock
        t0 = clock()
        out[STAGE0 + QUEUE] = t0 - arrived
        spec = self.specs[model_idx]
        try:
            pending: Future[tuple[np.ndarray, float, float]] | None = None
            start = t0  # when the model was asked for
            out[STAGE0 + INPUT] = out[STAGE0 + DECODE] = 0.0
            if self._inputs_in_memory:
                pool = self._pool[spec.input_shape]
                k = image_idx % len(pool)
                x = pool[k:k + 1]
                out[INPUT_IDX] = self._pool_files[spec.input_shape][k]
            elif self._overlap_inputs:  # the image is read and decoded while the model loads
                out[INPUT_IDX] = image_idx % len(self.spec.images)
                assert self._input_threads is not None
                pending = self._input_threads.submit(self._read_input, image_idx, spec)
            else:  # the image first, then the model (cached with --inputs jpeg; loads without the overlap)
                out[INPUT_IDX] = image_idx % len(self.spec.images)
                x, t1, start = self._read_input(image_idx, spec)
                out[STAGE0 + INPUT], out[STAGE0 + DECODE] = t1 - t0, start - t1
            model, res, hit, t3, times = self._acquire(spec, start)
            out[2] = hit
            try:
                if pending is not None:
                    x, t1, t2 = pending.result()
                    # only the part of the input's time that the model load did not hide is a stage
                    visible = max(0.0, t2 - t3)
                    decode = min(visible, t2 - t1)
                    out[STAGE0 + INPUT], out[STAGE0 + DECODE] = visible - decode, decode
                    ready, t3 = t3, max(t2, t3)
                else:
                    ready = t3
                y = model.predict(x, lane)
                t4 = clock()
            finally:
                self._release_model(model, res)
            t5 = clock()
            out[1] = OK
            if times is None:  # ready: when the model was; the image may have been ready later (t3)
                out[STAGE0 + WAIT] = ready - start
                out[STAGE0 + READ] = out[STAGE0 + BUILD] = out[STAGE0 + COPY] = 0.0
            else:  # the stages add up to the time the model took to be ready
                out[STAGE0 + READ], out[STAGE0 + BUILD], out[STAGE0 + COPY] = times.read_s, times.build_s, times.copy_s
                out[STAGE0 + WAIT] = max(0.0, ready - start - times.read_s - times.build_s - times.copy_s)
            out[STAGE0 + INFER] = t4 - t3
            out[STAGE0 + FREE] = t5 - t4
            first = y[0]
            out[TOP1] = float(first.argmax())
            out[CHECKSUM] = float(first.sum(dtype=np.float64))
            return None
        except Exception as e:
            return _failed(e, out)

    # --- the launched path (cached on a GPU): a group's images queued back to back, then collected ----

    def begin(self, model_idx: int, image_idx: int, arrived: float, out: list[float]) -> Any:
        """Queue one image (``Lanes.pipeline``): its input, its model, then ``launch`` on the next lane's
        stream in turn.  Returns what ``end`` takes (an error message once the image has failed)."""
        t0 = self.clock()
        out[STAGE0 + QUEUE] = t0 - arrived
        spec = self.specs[model_idx]
        try:
            out[STAGE0 + INPUT] = out[STAGE0 + DECODE] = 0.0
            if self._inputs_in_memory:
                pool = self._pool[spec.input_shape]
                k = image_idx % len(pool)
                x = pool[k:k + 1]
                out[INPUT_IDX] = self._pool_files[spec.input_shape][k]
                start = t0
            else:
                out[INPUT_IDX] = image_idx % len(self.spec.images)
                x, t1, start = self._read_input(image_idx, spec)
                out[STAGE0 + INPUT], out[STAGE0 + DECODE] = t1 - t0, start - t1
            model, res, hit, t3, times = self._acquire(spec, start)
            out[2] = hit
            try:
                pending = model.launch(x, next(self._turn) % self.lanes.n)  # type: ignore[attr-defined]
            except BaseException:
                self._release_model(model, res)
                raise
        except Exception as e:
            return _failed(e, out)
        return pending, model, res, start, t3, times

    def end(self, begun: Any, out: list[float]) -> str | None:
        """Wait for an image ``begin`` queued and fill in its row; returns an error message or None.
        ``infer`` runs from the launch to the answer on the host (it includes the wait behind the images
        queued before it on the same stream)."""
        if isinstance(begun, str):
            return begun
        pending, model, res, start, t3, times = begun
        try:
            y = pending.result()
        except Exception as e:
            return _failed(e, out)
        finally:
            self._release_model(model, res)
        t4 = self.clock()
        out[1] = OK
        if times is None:
            out[STAGE0 + WAIT] = t3 - start
            out[STAGE0 + READ] = out[STAGE0 + BUILD] = out[STAGE0 + COPY] = 0.0
        else:
            out[STAGE0 + READ], out[STAGE0 + BUILD], out[STAGE0 + COPY] = times.read_s, times.build_s, times.copy_s
            out[STAGE0 + WAIT] = max(0.0, t3 - start - times.read_s - times.build_s - times.copy_s)
        out[STAGE0 + INFER] = t4 - t3
        out[STAGE0 + FREE] = 0.0
        first = y[0]
        out[TOP1] = float(first.argmax())
        out[CHECKSUM] = float(first.sum(dtype=np.float64))
        return None

    def _read_input(self, image_idx: int, spec: ModelSpec) -> tuple[Any, float, float]:
        from cortexbench.images.dataset import decode, preprocess, read_bytes

        path = Path(self.spec.images[image_idx % len(self.spec.images)])
        if self.spec.drop_cache:
            drop_page_cache(path)
        data = read_bytes(path)
        t1 = self.clock()
        with self._lock:  # read, whether it decodes or not
            self._image_bytes += len(data)
        if self._decoder is not None:
            x = self._decoder(data, path, spec)  # on the worker's GPU, a device tensor (1, *input_shape)
        else:
            x = preprocess(decode(data, path), spec)[None]
        return x, t1, self.clock()

    def _acquire(self, spec: ModelSpec, now: float) -> tuple[LoadedModel, _Resident | None, int, float,
                                                             LoadTimes | None]:
        """The model to run ``spec`` with, its residency entry (None: a private copy, freed after use),
        whether it was resident, the time it was ready, and the load's times (None for a hit)."""
        name = spec.name
        with self._lock:
            access = self.residency.access(name)
            for victim in access.evict:  # at once, so the loaded set never drifts from the policy's
                if victim != name:
                    self._evict(victim)
            res = self._resident.get(name) if access.hit else None
            if res is not None:
                res.users += 1
                self._hits += 1
                return res.model, res, 1, now, None
        if not access.keep:  # cold, swap: a private copy, loaded now, freed after use
            times = LoadTimes()
            model = self._load(spec, times)
            return model, None, 0, self.clock(), times
        with self._loading[name]:  # one lane loads; others wanting the same model wait for it
            with self._lock:
                res = self._resident.get(name)
                if res is not None:
                    res.users += 1
                    self._hits += 1
                    return res.model, res, 1, self.clock(), None
            times = LoadTimes()
            model = self._load(spec, times)
            with self._lock:
                res = _Resident(model)
                res.users = 1
                if name in self.residency.resident():
                    self._resident[name] = res
                else:  # another lane's miss evicted it while it loaded: use it once, then free it
                    res.evicted = True
        return model, res, 0, self.clock(), times

    def _load(self, spec: ModelSpec, times: LoadTimes) -> LoadedModel:
        """Load ``spec`` on demand through the mode's loader (a model loaded before the run never comes here
        except in cached mode's misses, which load like LRU misses)."""
        loader = self._loader
        if loader is None:  # cached mode, a model not in the list
            loader = self._loader = BlobLoader(self.backend, self.model_dir, self.spec.device, self.options, "disk")
        model = loader.load(spec, times)
        with self._lock:
            self._loads += 1
            self._misses += 1
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
        return WorkerState(*self._counters())

    def _counters(self) -> tuple[int, int, int, int, int, int, int, int]:
        """WorkerState's fields, in order."""
        now = self.clock()
        if now - self._memory_at >= MEMORY_REFRESH_S:
            self._memory = (device_memory_bytes(self.spec.device), host_memory_bytes())
            self._memory_at = now
        return (self._loads, self._hits, self._misses, self._model_bytes, self._image_bytes, self.lanes.inflight,
                *self._memory)

    def close(self) -> None:
        with self._lock:
            for name in list(self._resident):
                self._evict(name)
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        if self._input_threads is not None:
            self._input_threads.shutdown(wait=True)
            self._input_threads = None
        self.lanes.close()


def _failed(e: Exception, out: list[float]) -> str:
    """An image's failure: its outcome in ``out`` by kind, and the message."""
    if isinstance(e, ImageDecodeError):
        out[1] = INPUT_ERROR
        return str(e)
    if isinstance(e, (ModelFileError, ModelNotFoundError, UsageError)):
        out[1] = MODEL_ERROR
        return str(e)
    out[1] = ERROR  # a framework error: counted, the worker keeps going
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
