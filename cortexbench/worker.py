"""``ModelWorker``: one device, its models, a residency policy, and per-image stage times.

A plain class, testable without Ray; ``cortexbench.cluster`` wraps it in a Ray actor (one per GPU).

Requests travel in groups (``protocol.RequestGroup``) so that one Ray call can carry several images;
each image is still run on its own at batch size 1 and timed on its own.  A worker has ``lanes`` lanes
(``lanes.Lanes``: one CUDA stream each on a GPU, a thread per lane); the images of a group are shared out
over free lanes, so several images are in flight at once, each through ``process``.  Cached models that
can queue work without waiting (torch with CUDA graphs on a GPU) take the launched path instead: the
calling thread queues each image of the group on the next lane's stream (``begin``), then collects the
answers (``end``), so the GPU is fed by a few threads that never wait per image.  Its inputs are
``inputs.WorkerInputs``, its models ``resident.ResidentModels`` (in cached mode with ``WorkerSpec.engine``, built
by that engine of ``models.engines`` instead of the backend).

Per image the worker measures the stages of ``ledger.WORKER_STAGES`` (defined there and in
docs/metrics.md): ``queue`` from the group's arrival to the image's start; ``input`` and ``decode`` (0 with
an in-memory pool; a launched group decoded at once: the group's); ``wait`` for the loader or another
lane's load; a miss's ``read``, ``build`` and ``copy`` (``models.backends.base.LoadTimes``); ``infer`` at
batch size 1 (launched: from the launch to the answer, the wait behind earlier images on its stream
included); ``free``.

It also says which input file each image ran on and the model's top-1 class and logit sum, so that the
tiers' answers can be compared (``ledger.ANSWER_COLUMNS``).

Modes (see ``residency``): ``cached`` loads every model and decodes an in-memory pool of inputs before
the run; ``swap`` holds every model's weights in host memory and loads them onto the device for every
image; ``cold`` reads the model file and the image file from disk for every image; both free the model
afterwards and load through the backend's ``ModelLoader``, one load at a time.  ``lru:K`` keeps at most K
models loaded.  Every mode but cold takes inputs from an in-memory pool unless ``--inputs jpeg`` (see
``inputs``), so that it measures model residency alone.

In the modes that load on demand (swap, cold, lru:K) images run on the lane threads only (never on a
caller's thread): per-thread framework state (cuDNN's plans) is then warmed once per lane before the run,
as in a serving process that has run each model before, and the report says so.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cortexbench.errors import ImageDecodeError, ModelFileError, ModelNotFoundError, UsageError
from cortexbench.inputs import WorkerInputs
from cortexbench.lanes import Lanes
from cortexbench.machine import device_memory_bytes, host_memory_bytes
from cortexbench.models.backends.base import Backend, LoadOptions, LoadTimes, files_size
from cortexbench.models.registry import ModelSpec, get_spec
from cortexbench.protocol import (
    BLANK_ROW,
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
    ONE_ROW,
    QUEUE,
    READ,
    STAGE0,
    TOP1,
    WAIT,
    RequestGroup,
    ResultGroup,
    WorkerState,
    decode_tensor_request,
    encode_result,
    encode_tensor_result,
)
from cortexbench.residency import Mode, Residency, parse_mode
from cortexbench.resident import ResidentModels

MEMORY_REFRESH_S = 0.25  # WorkerState.memory_bytes is read again at most this often (a /proc read costs ~20 us)
_DEFAULT_SWITCH_S = sys.getswitchinterval()
LOADING_SWITCH_S = float(os.environ.get("CORTEXBENCH_SWITCH_INTERVAL_S", "0.0005"))
CACHED_SWITCH_S = float(os.environ.get("CORTEXBENCH_CACHED_SWITCH_INTERVAL_S", str(_DEFAULT_SWITCH_S)))
# cached with every image's file read and decoded (--inputs jpeg): each read and decode gives up the GIL
INPUTS_SWITCH_S = float(os.environ.get("CORTEXBENCH_INPUTS_SWITCH_INTERVAL_S", "0.0005"))
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
    engine: str = ""  # cached mode's models built by this engine (models.engines); "" = the backend's load


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
        self.models = ResidentModels(spec.models, backend, self.model_dir, spec.device, self.options, clock,
                                     engine=spec.engine, sample=lambda s: self.inputs.warm(s))
        self.inputs = WorkerInputs(spec.images, pool_size=spec.image_pool, inputs=spec.inputs, decode=spec.decode,
                                   device=spec.device, backend=backend, threads=self.options.lanes, name=spec.name,
                                   drop_cache=spec.drop_cache, clock=clock)
        self._turn = itertools.count()  # the launched path: images take the lanes' streams in turn
        self.lanes = Lanes(max(1, spec.lanes), spec.name, self.process, self._counters, clock)
        self._memory = (-1, 0)
        self._memory_at = -math.inf

    @property
    def residency(self) -> Residency:
        return self.models.residency

    # --- setup between runs (not timed) ---------------------------------------------------------

    def set_mode(self, mode: str) -> dict[str, float]:
        """Switch residency; cached loads every model, swap fills the host tier, and every mode warms its
        lanes before the run.  Returns setup times and the loader's figures (``loader_*``)."""
        t0 = self.clock()
        self.mode = parse_mode(mode)
        kind = self.mode.kind
        self.lanes.caller_runs = kind == "cached"
        self.lanes.pipeline = self.lanes.prepare = None
        # Loads are I/O threads handing chunks on: with Python's default 5 ms GIL switch interval a reader
        # back from the kernel waits behind the lanes' inference (measured on an H200: cold at 16 in flight
        # 32 images/s at 5 ms, 48 at 0.5 ms).  A process-wide setting: this worker process is ours.
        sys.setswitchinterval(LOADING_SWITCH_S if kind != "cached" else
                              INPUTS_SWITCH_S if self.spec.inputs == "jpeg" else CACHED_SWITCH_S)
        t_pool = self.clock()
        if self.spec.engine and kind == "cached":  # an engine builds each model on one pooled input: the pool first
            self.inputs.configure(kind, self.specs)
        t_models = self.clock()
        info: dict[str, float] = {}
        self.models.reset(self.mode, self.specs if kind == "cached" else ())
        if kind != "cached":  # every model resident at once at most K (lru), or for one image (swap, cold), plus loads in flight
            slots = (self.mode.capacity if kind == "lru" else 0) + self.options.lanes + 1
            loader = self.backend.loader(self.model_dir, self.spec.device, self.options,
                                         "host" if kind == "swap" else "disk", drop_cache=self.spec.drop_cache,
                                         rebuild=self.spec.cold_rebuild, slots=slots)
            self.models.loader = loader
            info = loader.prepare(self.specs)
        t_inputs = self.clock()
        self.inputs.configure(kind, self.specs)
        t_warm = self.clock()
        if kind == "cached":
            self._warm_lanes()
        else:
            self._warm_loader()
        resident = [h.model for h in self.models.held.values()]
        launched = kind == "cached" and LAUNCH and bool(resident) and all(
            getattr(m, "launches", False) for m in resident)
        self.lanes.pipeline = (self.begin, self.end) if launched else None
        self.lanes.prepare = self.prepare if launched and self.inputs.batched else None
        self.models.reset_counts()
        self.inputs.reset()
        self._memory_at = -math.inf  # read the memory in use afresh with the next group
        end = self.clock()
        sizes = {f"model_bytes.{spec.name}": float(files_size(self.backend.model_files(spec, self.model_dir)))
                 for spec in self.specs}
        return {"models_s": t_inputs - t_models, "inputs_s": t_warm - t_inputs + t_models - t_pool, "warm_s": end - t_warm,
                "total_s": end - t0, **{f"loader_{k}": float(v) for k, v in info.items()}, **sizes}

    def _warm_lanes(self) -> None:
        """Run every resident model once on every lane, from that lane's thread, so that per-thread setup
        (cuDNN tuning, CUDA graph capture) happens before the run and not inside its first images."""
        models = [(s, h.model) for s in self.specs if (h := self.models.held.get(s.name)) is not None]

        def warm(lane: int) -> None:
            for spec, model in models:
                model.predict(self.inputs.warm(spec), lane)

        self.lanes.on_every_lane(warm)

    def _warm_loader(self) -> None:
        """Load and run every model once on every lane through the loader (cold, swap): the process has run
        each model before, as a serving process has; its weights still come from disk or host memory for
        every image of the run.  A model that does not load is left to fail its images."""
        loader = self.models.loader
        assert loader is not None

        def warm(lane: int) -> None:
            for spec in self.specs:
                try:
                    model = loader.load(spec, LoadTimes())
                except (ModelFileError, ModelNotFoundError):
                    continue
                try:
                    model.predict(self.inputs.warm(spec), lane)
                finally:
                    model.close()

        self.lanes.on_every_lane(warm)

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
            inputs = self.inputs
            if inputs.in_memory:
                x, out[INPUT_IDX] = inputs.pooled(spec, image_idx)
            elif inputs.overlap:  # the image is read and decoded while the model loads
                out[INPUT_IDX] = inputs.file_index(image_idx)
                pending = inputs.submit(image_idx, spec)
            else:  # the image first, then the model (cached with --inputs jpeg; loads without the overlap)
                out[INPUT_IDX] = inputs.file_index(image_idx)
                x, t1, start = inputs.read(image_idx, spec)
                out[STAGE0 + INPUT], out[STAGE0 + DECODE] = t1 - t0, start - t1
            model, res, hit, t3, times = self.models.acquire(spec, start)
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
                self.models.release(model, res)
            _answered(out, y[0], times, start, ready, t3, t4, clock())
            return None
        except Exception as e:
            return _failed(e, out)

    # --- the launched path (cached on a GPU): a group's images queued back to back, then collected ----

    def prepare(self, items: list[list[int]]) -> list[Any]:
        """A launched group's inputs made at once (``Lanes.prepare``, ``WorkerInputs.read_many``); a failure
        of the whole batch fails each of its images, as its own would."""
        try:
            return self.inputs.read_many([(image_idx, self.specs[m]) for _, m, image_idx in items])
        except Exception as e:
            now = self.clock()
            return [(e, now, now, now)] * len(items)

    def begin(self, model_idx: int, image_idx: int, arrived: float, out: list[float], prepared: Any = None) -> Any:
        """Queue one image (``Lanes.pipeline``): its input (``prepared`` by ``prepare`` when given), its
        model, then ``launch`` on the next lane's stream in turn.  Returns what ``end`` takes (an error
        message once the image has failed)."""
        t0 = self.clock() if prepared is None else prepared[1]
        out[STAGE0 + QUEUE] = t0 - arrived
        spec = self.specs[model_idx]
        try:
            out[STAGE0 + INPUT] = out[STAGE0 + DECODE] = 0.0
            inputs = self.inputs
            if prepared is not None:
                x, _, t1, start = prepared
                out[INPUT_IDX] = inputs.file_index(image_idx)
                out[STAGE0 + INPUT], out[STAGE0 + DECODE] = t1 - t0, start - t1
                if isinstance(x, Exception):
                    raise x
            elif inputs.in_memory:
                x, out[INPUT_IDX] = inputs.pooled(spec, image_idx)
                start = t0
            else:
                out[INPUT_IDX] = inputs.file_index(image_idx)
                x, t1, start = inputs.read(image_idx, spec)
                out[STAGE0 + INPUT], out[STAGE0 + DECODE] = t1 - t0, start - t1
            model, res, hit, t3, times = self.models.acquire(spec, start)
            out[2] = hit
            try:
                pending = model.launch(x, next(self._turn) % self.lanes.n)  # type: ignore[attr-defined]
            except BaseException:
                self.models.release(model, res)
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
            self.models.release(model, res)
        t4 = self.clock()
        _answered(out, y[0], times, start, t3, t3, t4, t4)
        return None

    # --- one input sent whole (the serving gateway, cortexbench.serve) ------------------------------

    def run_tensor(self, data: bytes) -> bytes:
        """Run one input the gateway decoded and checked (``protocol.encode_tensor_request``): on a free lane,
        through the residency policy as any image of the stream, with the same stage times; the answer
        (``protocol.encode_tensor_result``) carries the model's output row.  Several threads may call this."""
        arrived = self.clock()
        item, model_idx, x = decode_tensor_request(data)
        out = [float(item), *BLANK_ROW]
        lane = self.lanes.lane()
        try:
            msg, y = self._run_tensor(model_idx, np.array(x), arrived, lane, out)
        finally:
            self.lanes.release(lane)
        result = encode_result(1, ONE_ROW.pack(*out), {} if msg is None else {0: msg}, self._counters())
        return encode_tensor_result(result, y)

    def _run_tensor(self, model_idx: int, x: np.ndarray, arrived: float, lane: int,
                    out: list[float]) -> tuple[str | None, np.ndarray | None]:
        clock = self.clock
        t0 = clock()
        out[STAGE0 + QUEUE] = t0 - arrived
        out[STAGE0 + INPUT] = out[STAGE0 + DECODE] = 0.0
        try:
            if not 0 <= model_idx < len(self.specs):
                raise ModelNotFoundError(f"worker {self.spec.name} has no model #{model_idx}")
            model, res, hit, t3, times = self.models.acquire(self.specs[model_idx], t0)
            out[2] = hit
            try:
                y = model.predict(x, lane)
                t4 = clock()
            finally:
                self.models.release(model, res)
            t5 = clock()
        except Exception as e:
            return _failed(e, out), None
        first = np.asarray(y[0], np.float32).reshape(-1)
        _answered(out, first, times, t0, t3, t3, t4, t5)
        return None, first

    def state(self) -> WorkerState:
        return WorkerState(*self._counters())

    def _counters(self) -> tuple[int, int, int, int, int, int, int, int]:
        """WorkerState's fields, in order."""
        now = self.clock()
        if now - self._memory_at >= MEMORY_REFRESH_S:
            self._memory = (device_memory_bytes(self.spec.device), host_memory_bytes())
            self._memory_at = now
        m = self.models
        return (m.loads, m.hits, m.misses, m.model_bytes, self.inputs.bytes_read, self.lanes.inflight, *self._memory)

    def close(self) -> None:
        self.models.close()
        self.inputs.close()
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


def _answered(out: list[float], y0: np.ndarray, times: LoadTimes | None, start: float, ready: float,
              infer_from: float, infer_to: float, freed: float) -> None:
    """An answered image's row: ok, where the time to its model went (``start``: when the model was asked
    for; ``ready``: when it was there; a load's stages add up to that wait), ``infer`` and ``free``, and the
    answer (top-1, logit sum)."""
    out[1] = OK
    if times is None:
        out[STAGE0 + WAIT] = ready - start
        out[STAGE0 + READ] = out[STAGE0 + BUILD] = out[STAGE0 + COPY] = 0.0
    else:
        out[STAGE0 + READ], out[STAGE0 + BUILD], out[STAGE0 + COPY] = times.read_s, times.build_s, times.copy_s
        out[STAGE0 + WAIT] = max(0.0, ready - start - times.read_s - times.build_s - times.copy_s)
    out[STAGE0 + INFER] = infer_to - infer_from
    out[STAGE0 + FREE] = freed - infer_to
    out[TOP1] = float(y0.argmax())
    out[CHECKSUM] = float(y0.sum(dtype=np.float64))
