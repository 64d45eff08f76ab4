"""The one small interface every backend implements, and what is shared between backends.

A backend turns a ``ModelSpec`` into files in ``model_dir`` (``export``) and loads those files onto a
device (``load``, or ``load_blobs`` from file contents already read) as a ``LoadedModel`` that predicts one
batch at a time.  Loading is always a real read from disk: the stream's cold mode measures exactly that.

On-demand loads (the stream's ``cold`` and ``swap`` modes, and LRU misses) go through a ``ModelLoader``
(``Backend.loader``): it reads the model's files from disk (tier ``disk``) or from host memory filled
before the run (tier ``host``), builds the model and copies it to the device, timing each part
(``LoadTimes``).  ``BlobLoader`` here does this for any backend (read the files, then ``load_blobs``); the
torch backend has a faster one of its own (``torch_loader``).

Devices are written ``cpu`` or ``gpu:N``.  Inputs and outputs are host numpy arrays; ``predict`` includes
the host-to-device copy, the computation, the copy back and the device synchronisation, so its wall time
is the inference time of the batch.

File layout (the same for random-init exports and for real weights a user puts there)::

    model_dir/
      manifest.json                      name, backend, input shape, parameter count, bytes, source
      mxnet/<model>-symbol.json          MXNet symbol
      mxnet/<model>-0000.params          MXNet parameters
      torch/<model>.safetensors          torch state dict (torchvision's names where torchvision has the model)
      onnx/<model>.onnx                  ONNX graph + weights, exported from torch (or MXNet without torch)
      null/null.json                     the null model (a few bytes, so cold mode still reads a file)
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from cortexbench.errors import CortexbenchError, ModelFileError, ModelNotFoundError
from cortexbench.models.registry import ModelSpec

BackendId = Literal["mxnet", "torch", "onnxruntime"]
Tier = Literal["disk", "host"]
BACKEND_IDS: tuple[BackendId, ...] = ("mxnet", "torch", "onnxruntime")

# Operator types that --profile-ops reports; every backend maps its own operator names onto these.
OP_TYPES = ("convolution", "activation", "pooling", "batch_norm", "normalization", "dense", "concat",
            "elementwise", "softmax", "dropout", "reshape", "copy", "other")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: numeric precision, how many concurrent lanes (CUDA streams) will call it,
    and whether to capture CUDA graphs (torch on GPU only; ignored elsewhere)."""

    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # bf16: torch only (single's engine axis)
    lanes: int = 1
    cuda_graphs: bool = False


@dataclass(frozen=True)
class ExportResult:
    """What ``Backend.export`` wrote (or found already there)."""

    name: str
    backend: BackendId
    files: tuple[Path, ...]
    input_shape: tuple[int, ...]
    param_count: int
    size_bytes: int
    source: Literal["random-init", "user"]  # 'user': files were already there and were left alone
    seed: int | None
    export_s: float


@runtime_checkable
class LoadedModel(Protocol):
    """A model on a device, ready to predict."""

    spec: ModelSpec
    device: str
    param_count: int
    size_bytes: int

    def predict(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        """Run one batch (N, *input_shape) float32 on the device; return (N, num_classes) float32 on the host.
        ``lane`` picks the CUDA stream (0 .. options.lanes-1); lanes may call concurrently from threads."""
        ...

    def close(self) -> None:
        """Free the model's device memory.  The model must not be used afterwards."""
        ...


class Pending(Protocol):
    """An inference queued on a device (``launch``); ``result`` waits for it and returns what ``predict``
    would have."""

    def result(self) -> np.ndarray:
        ...


@runtime_checkable
class Launchable(Protocol):
    """A model that can queue inferences without waiting for them (torch with CUDA graphs on a GPU): a
    worker launches a group's images back to back on several streams, then collects the answers."""

    def launch(self, batch: Any, lane: int = 0) -> Pending:
        ...


@runtime_checkable
class Backend(Protocol):
    """One framework: MXNet, torch or ONNX Runtime."""

    name: BackendId

    def devices(self) -> list[str]:
        """Devices this backend can use on this machine: 'cpu' and 'gpu:N' for each GPU it sees."""
        ...

    def supports(self, spec: ModelSpec) -> bool:
        ...

    def model_files(self, spec: ModelSpec, model_dir: Path) -> list[Path]:
        """The files ``load`` reads for ``spec`` (they may not exist yet)."""
        ...

    def export(self, spec: ModelSpec, model_dir: Path, seed: int, *, force: bool = False) -> ExportResult:
        """Build ``spec`` with deterministic random weights and write it to ``model_dir``.
        Files already there are kept (they may be real weights) unless ``force``."""
        ...

    def load(self, spec: ModelSpec, model_dir: Path, device: str, options: LoadOptions = LoadOptions()) -> LoadedModel:
        """Read the model's files from disk and put the model on ``device``.
        Raises ModelNotFoundError (no file) or ModelFileError (unreadable file)."""
        ...

    def load_blobs(self, spec: ModelSpec, blobs: Sequence[bytes], paths: Sequence[Path], device: str,
                   options: LoadOptions = LoadOptions()) -> LoadedModel:
        """``load`` from the contents of ``model_files`` already read (``blobs``, in that order; ``paths``
        name them in errors).  Raises ModelFileError for contents that do not load."""
        ...

    def loader(self, model_dir: Path, device: str, options: LoadOptions, tier: Tier, *,
               drop_cache: bool = False, rebuild: bool = False, slots: int = 0) -> ModelLoader:
        """The on-demand loader of this backend for ``device`` (see the module docstring); ``slots``: how
        many loaded models may exist at once (0: the lanes + 1)."""
        ...

    def profile_ops(self, model: LoadedModel, batch: np.ndarray, runs: int) -> dict[str, float]:
        """Seconds per batch spent in each operator type (keys from OP_TYPES), from the backend's own
        profiler, averaged over ``runs`` predictions."""
        ...

    def train_step_s(self, spec: ModelSpec, device: str, batch_size: int, steps: int, seed: int) -> float:
        """Mean seconds of one training step (forward, backward, SGD update) at ``batch_size``
        for a small (trainable) model; raises NotImplementedError where the backend cannot train."""
        ...


@dataclass
class LoadTimes:
    """Seconds of one on-demand load, filled in by a ``ModelLoader``."""

    wait_s: float = 0.0  # for the loader (another load in progress) or a free device slot
    read_s: float = 0.0  # the model's bytes, disk to host (0 from the host tier)
    build_s: float = 0.0  # the network's structure and binding the weights to it
    copy_s: float = 0.0  # host to device (the part not overlapped with the read) and precision conversion


@runtime_checkable
class ModelLoader(Protocol):
    """Loads models on demand for one device, one load at a time (the loads in flight queue for it)."""

    tier: Tier

    def prepare(self, specs: Sequence[ModelSpec]) -> dict[str, float]:
        """Before the run: what the loader keeps (structures, buffers, the host tier's bytes).  Returns
        figures for the results (seconds, bytes, measured bandwidths)."""
        ...

    def load(self, spec: ModelSpec, times: LoadTimes) -> LoadedModel:
        """The model on the device, loaded now; ``close()`` frees it.  Raises ModelFileError or
        ModelNotFoundError for a file that is missing or does not load."""
        ...

    def close(self) -> None:
        ...


def read_file(path: Path, drop_cache: bool = False) -> bytes:
    """The whole file, read now (a real read; ``drop_cache`` first asks the kernel to forget its cached
    pages).  OSError as the file system raises it."""
    if drop_cache:
        drop_page_cache(path)
    with open(path, "rb", buffering=0) as f:
        return f.read()


def drop_page_cache(path: Path) -> None:
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


class BlobLoader:
    """The loader for any backend: read the model's files (disk tier) or take them from host memory (host
    tier, read in ``prepare``), then ``Backend.load_blobs``.  ``read`` is the file read, ``build``
    everything the backend does after it (copy to the device included: the backend does not tell)."""

    def __init__(self, backend: Backend, model_dir: Path, device: str, options: LoadOptions, tier: Tier, *,
                 drop_cache: bool = False, clock: Any = time.perf_counter) -> None:
        self.backend, self.model_dir, self.device, self.options = backend, Path(model_dir), device, options
        self.tier: Tier = tier
        self.drop_cache = drop_cache
        self.clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, tuple[bytes, ...] | CortexbenchError] = {}

    def prepare(self, specs: Sequence[ModelSpec]) -> dict[str, float]:
        t0 = self.clock()
        held = 0
        if self.tier == "host":
            for spec in specs:
                try:
                    blobs = self._read(spec)
                except (ModelFileError, ModelNotFoundError) as e:
                    self._held[spec.name] = e  # every image of this model fails with this error
                    continue
                self._held[spec.name] = blobs
                held += sum(len(b) for b in blobs)
        return {"prepare_s": self.clock() - t0, "host_bytes": float(held)}

    def _read(self, spec: ModelSpec) -> tuple[bytes, ...]:
        files = self.backend.model_files(spec, self.model_dir)
        require_files(spec, files, self.backend.name)
        blobs = []
        for f in files:
            try:
                blobs.append(read_file(f, self.drop_cache))
            except OSError as e:
                raise corrupt(spec, f, self.backend.name, e.strerror or e) from None
        return tuple(blobs)

    def load(self, spec: ModelSpec, times: LoadTimes) -> LoadedModel:
        t0 = self.clock()
        with self._lock:
            t1 = self.clock()
            if self.tier == "host":
                held = self._held.get(spec.name)
                if held is None:
                    raise ModelNotFoundError(f"model '{spec.name}' was not held in host memory (not in the run's models)")
                if isinstance(held, CortexbenchError):
                    raise held
                blobs = held
            else:
                blobs = self._read(spec)
            t2 = self.clock()
            files = self.backend.model_files(spec, self.model_dir)
            model = self.backend.load_blobs(spec, blobs, files, self.device, self.options)
            t3 = self.clock()
        if self.tier == "host":  # nothing was read: taking the held bytes is part of the build
            t1 = t2 = min(t1, t2)
        times.wait_s, times.read_s, times.build_s, times.copy_s = t1 - t0, t2 - t1, t3 - t2, 0.0
        return model

    def close(self) -> None:
        self._held.clear()


def seed_for(name: str, seed: int) -> int:
    """A per-model seed, stable across runs and machines."""
    import zlib

    return (zlib.crc32(name.encode()) ^ (seed * 2654435761)) & 0x7FFFFFFF


def require_files(spec: ModelSpec, files: list[Path], backend: str) -> None:
    """Raise ModelNotFoundError naming the missing file and the command that makes it."""
    for f in files:
        if not f.exists():
            raise ModelNotFoundError(
                f"model '{spec.name}' ({backend}): {f} is missing; make it with "
                f"'python -m cortexbench.models export --models {spec.name} --backend {backend} "
                f"--model-dir {f.parent.parent}'")


def corrupt(spec: ModelSpec, path: Path, backend: str, why: object) -> ModelFileError:
    lines = [ln.strip() for ln in str(why).strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("Traceback"):
        lines = lines[-1:]  # a framework's whole traceback in its message: its last line is the cause
    first = lines[0][:160] if lines else type(why).__name__
    return ModelFileError(
        f"model '{spec.name}' ({backend}): cannot load {path}: {first}; re-export it with "
        f"'python -m cortexbench.models export --models {spec.name} --backend {backend} --force'")


def files_size(files: list[Path] | tuple[Path, ...]) -> int:
    return sum(f.stat().st_size for f in files if f.exists())


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'gpu:3' -> ('gpu', 3)."""
    if device == "cpu":
        return "cpu", 0
    if device.startswith("gpu:") and device[4:].isdigit():
        return "gpu", int(device[4:])
    raise ValueError(f"not a device: {device!r} (use 'cpu' or 'gpu:N')")


# --- the null model: the same in every backend --------------------------------------------------


@dataclass
class NullModel:
    """Returns zeros at once, or after ``spec.service_s`` (a sleep, so lanes overlap as on a GPU)."""

    spec: ModelSpec
    device: str
    path: Path
    param_count: int = 0
    size_bytes: int = 0
    closed: bool = field(default=False)

    def predict(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        if self.spec.service_s > 0:
            time.sleep(self.spec.service_s)
        return np.zeros((len(batch), 1), dtype=np.float32)

    def close(self) -> None:
        self.closed = True


def null_file(model_dir: Path) -> Path:
    return model_dir / "null" / "null.json"


def export_null(model_dir: Path) -> Path:
    path = null_file(model_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": "null", "params": 0}) + "\n")
    return path


def export_null_result(spec: ModelSpec, model_dir: Path, backend: BackendId, started: float) -> ExportResult:
    """``Backend.export`` of the null model, the same in every backend (one shared file)."""
    existed = null_file(model_dir).exists()
    path = export_null(model_dir)
    return ExportResult(spec.name, backend, (path,), spec.input_shape, 0, files_size([path]),
                        "user" if existed else "random-init", None, time.perf_counter() - started)


def load_null(spec: ModelSpec, model_dir: Path, device: str, data: bytes | None = None) -> NullModel:
    """The null model from its file (a real read, like every other model), or from its bytes ``data``."""
    path = null_file(model_dir)
    if data is None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelNotFoundError(f"model 'null': {path} is missing; make it with "
                                     "'python -m cortexbench.models export --models null'") from None
    try:
        json.loads(data)
    except ValueError as e:
        raise corrupt(spec, path, "null", e) from None
    return NullModel(spec, device, path, size_bytes=len(data))
