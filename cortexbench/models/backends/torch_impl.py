"""The torch backend: safetensors files, eager or CUDA-graph inference on CUDA streams, op profiles.

Files: ``model_dir/torch/<model>.safetensors``, a plain state dict (torchvision's key names where
torchvision has the model, see ``torch_nets``) with metadata ``{"model", "seed", "format": "pt"}``.

Loading builds the network on the ``meta`` device (no memory, no initialisation), reads the whole file
from disk into one host buffer (a real read, never a lazy mmap, so cold loads are measured honestly),
makes the tensors views of that buffer and assigns them to the module, then moves it to the device.

On a GPU each lane (``LoadOptions.lanes``) has its own CUDA stream and, per batch size, a pinned host
input buffer, a device input buffer and a pinned host output buffer; ``predict(batch, lane)`` copies in
on the lane's stream, runs, copies out and synchronises only that stream, so lanes driven by different
threads overlap.  With ``cuda_graphs`` each (lane, batch size) captures a CUDA graph on first use and
replays it afterwards.  ``torch.backends.cudnn.benchmark`` is on, and torch keeps cuDNN's tuned plans per
thread: warm each lane up from the thread that will drive it.  fp32 on a GPU is IEEE fp32 (TF32 is
switched off process-wide); fp16 converts the weights and casts inputs on the device.

``close`` drops the model and its buffers but does not call ``torch.cuda.empty_cache()`` (slow, and it
would only hand back memory that the next model loads into): the memory stays in torch's caching
allocator, reserved by this process.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cortexbench.errors import ConfigError, DeviceError
from cortexbench.models.backends import torch_nets
from cortexbench.models.backends.base import (
    OP_TYPES,
    BackendId,
    ExportResult,
    LoadedModel,
    LoadOptions,
    ModelLoader,
    NullModel,
    Tier,
    corrupt,
    export_null_result,
    files_size,
    load_null,
    null_file,
    parse_device,
    require_files,
)
from cortexbench.models.registry import ModelSpec, file_stem

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in this process
_DEFAULTS = LoadOptions()


# --- safetensors files, read and checked by hand ---------------------------------------------------


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, ``__metadata__``), cheaply."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file is too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > path.stat().st_size - 8:
            raise ValueError(f"header length {n} is larger than the file")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def header_param_count(spec: ModelSpec, header: dict[str, Any]) -> int:
    """Parameters (not batch-norm statistics, not ignored keys) listed in a safetensors header."""
    ignored = torch_nets.ignored_keys(spec, header)
    return sum(math.prod(v["shape"]) for k, v in header.items()
               if k != "__metadata__" and k not in ignored and not k.endswith(_BUFFER_SUFFIXES))


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the whole file into one host buffer and return tensors that are views of it, plus metadata."""
    size = path.stat().st_size
    buf = np.empty(size, dtype=np.uint8)
    view, pos = memoryview(buf), 0
    with open(path, "rb", buffering=0) as f:
        while pos < size:
            got = f.readinto(view[pos:])
            if not got:
                break
            pos += got
    if pos != size or size < 8:
        raise ValueError(f"read {pos} of {size} bytes (file truncated or changed while reading)")
    return parse_state_dict(buf)


def parse_state_dict(buf: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a whole safetensors file held in ``buf`` (uint8), as views of it, plus metadata."""
    size = len(buf)
    if size < 8:
        raise ValueError(f"{size} bytes is too short for a safetensors file")
    n = int.from_bytes(buf[:8].tobytes(), "little")
    if n > size - 8:
        raise ValueError(f"header length {n} is larger than the file (truncated?)")
    header = json.loads(buf[8:8 + n].tobytes())
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data = torch.from_numpy(buf[8 + n:])
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor '{key}' has unsupported dtype {info.get('dtype')!r}")
        shape, (begin, end) = list(info["shape"]), info["data_offsets"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"tensor '{key}' lies outside the file or has the wrong size (truncated?)")
        raw = data[begin:end]
        if (8 + n + begin) % itemsize:  # unaligned (not written by safetensors): copy to align
            raw = raw.clone()
        out[key] = raw.view(dtype).reshape(shape)
    meta = header.get("__metadata__") or {}
    return out, {str(k): str(v) for k, v in meta.items()}


def _check_keys(spec: ModelSpec, expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> str | None:
    """None when ``sd`` fits the network exactly, else what is wrong (one line)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (want {tuple(expected[k].shape)})" for k in expected
             if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    for what, items in (("missing key", missing), ("unexpected key", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 1} more" if len(items) > 1 else ""
            return f"not a {spec.name} state dict: {what} {items[0]}{more}"
    return None


# --- the loaded model -------------------------------------------------------------------------------


@dataclass
class _Slot:
    """Buffers (and maybe a CUDA graph) of one lane for one batch size."""

    host_in: torch.Tensor  # pinned
    dev_in: torch.Tensor
    host_out: torch.Tensor  # pinned
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    static_out: torch.Tensor | None = None
    spare: list = field(default_factory=list)  # launch: free (pinned in, pinned out, event) triples


@dataclass
class _Lane:
    stream: Any  # torch.cuda.Stream, or None on the CPU
    slots: dict[int, _Slot] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # launches on this stream, one at a time


class _Launched:
    """An image queued on a lane's stream (``TorchModel.launch``): its pinned buffers and the event after
    its output copy.  ``result`` waits for the event (without the GIL), returns the logits and gives the
    buffers back to the slot's free list."""

    __slots__ = ("bufs", "free")

    def __init__(self, bufs: tuple[torch.Tensor, torch.Tensor, Any], free: list) -> None:
        self.bufs, self.free = bufs, free

    def result(self) -> np.ndarray:
        _, host_out, event = self.bufs
        event.synchronize()
        y = host_out.numpy().copy()
        self.free.append(self.bufs)  # list.append is atomic under the GIL
        return y


@dataclass
class BoundGraph:
    """A CUDA graph of one network bound to fixed weight memory (an on-demand loader's device slot): the
    loader captures it once before the run, and every load into that slot replays it, with new weights in
    the same memory.  ``lock``: one lane replays it at a time (its input and output buffers are static);
    a lane that finds it busy runs eagerly instead."""

    graph: Any  # torch.cuda.CUDAGraph
    dev_in: torch.Tensor
    static_out: torch.Tensor
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Done:
    """A launch that already ran (no graphs, or the CPU)."""

    __slots__ = ("y",)

    def __init__(self, y: np.ndarray) -> None:
        self.y = y

    def result(self) -> np.ndarray:
        return self.y


def run_net(net: nn.Module, x: torch.Tensor, fp16: bool | torch.dtype) -> torch.Tensor:
    """One forward: fp32 in, fp32 out, fp16 inside when ``fp16`` is True (or that dtype inside: bf16)."""
    dtype = torch.float16 if fp16 is True else (fp16 or None)
    y = net(x.to(dtype) if dtype is not None else x)
    return y if y.dtype == torch.float32 else y.float()


REDUCED = {"fp16": torch.float16, "bf16": torch.bfloat16}  # LoadOptions.precision -> the weights' dtype


def capture(forward: Callable[[torch.Tensor], torch.Tensor], dev_in: torch.Tensor, stream: Any,
            cuda: torch.device) -> tuple[Any, torch.Tensor]:
    """Warm ``forward`` up on a side stream (cuDNN autotuning, lazy workspaces), then capture one call on
    ``stream``; other lanes keep running meanwhile ('thread_local' capture mode).  Returns the graph and
    its static output."""
    with _CAPTURE_LOCK:
        side = torch.cuda.Stream(device=cuda)
        side.wait_stream(stream)
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                forward(dev_in)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            static_out = forward(dev_in)
    return graph, static_out


class TorchModel:
    """A torch network on one device (see the module docstring for the GPU serving path)."""

    def __init__(self, spec: ModelSpec, device: str, net: nn.Module, path: Path, size_bytes: int,
                 options: LoadOptions, lanes: list[_Lane] | None = None,
                 on_close: Callable[[], None] | None = None, bound: BoundGraph | None = None) -> None:
        """``lanes``: lanes shared with other models (an on-demand loader's: their streams and I/O buffers
        outlive the model); ``on_close``: called once when the model is closed (frees its weights' slot);
        ``bound``: a graph captured on this model's weight memory (replayed for batches of its size)."""
        self.spec, self.device, self.path, self.size_bytes = spec, device, path, size_bytes
        self.param_count = sum(p.numel() for p in net.parameters())
        self.options = options
        self._net: nn.Module | None = net
        self._fp16 = REDUCED.get(options.precision)
        kind, index = parse_device(device)
        self._cuda = torch.device("cuda", index) if kind == "gpu" else None
        self._graphs = bool(options.cuda_graphs and self._cuda is not None)
        self.launches = self._graphs  # ``launch`` queues without waiting (else it runs ``predict``)
        self._shared_lanes = lanes is not None
        self._lanes = lanes if lanes is not None else make_lanes(self._cuda, options.lanes)
        self._on_close = on_close
        self._bound = bound

    @property
    def net(self) -> nn.Module:
        if self._net is None:
            raise RuntimeError(f"model '{self.spec.name}' on {self.device} was closed")
        return self._net

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_net(self.net, x, self._fp16)

    def _input(self, batch: np.ndarray) -> np.ndarray:
        if isinstance(batch, torch.Tensor):  # a device tensor from a GPU decoder
            if batch.ndim != len(self.spec.input_shape) + 1 or tuple(batch.shape[1:]) != self.spec.input_shape:
                raise ValueError(f"model '{self.spec.name}' takes (N, {', '.join(map(str, self.spec.input_shape))}), "
                                 f"got {tuple(batch.shape)}")
            return batch if self._cuda is not None else batch.cpu().numpy()  # type: ignore[return-value]
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != len(self.spec.input_shape) + 1 or x.shape[1:] != self.spec.input_shape:
            raise ValueError(f"model '{self.spec.name}' takes (N, {', '.join(map(str, self.spec.input_shape))}), "
                             f"got {x.shape}")
        return x if x.flags.writeable else x.copy()

    def predict(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        return self._predict(batch, lane, self._graphs)

    def _predict(self, batch: np.ndarray, lane: int, graphs: bool) -> np.ndarray:
        self.net  # noqa: B018 - raises once closed
        x = self._input(batch)
        if not 0 <= lane < len(self._lanes):
            raise ValueError(f"lane {lane} does not exist (this model was loaded with {len(self._lanes)} lanes)")
        if self._cuda is None:
            with torch.inference_mode():
                return self._forward(torch.from_numpy(x)).numpy()
        state = self._lanes[lane]
        key = (len(x), self.spec.input_shape, self.spec.num_classes)
        slot = state.slots.get(key) or self._new_slot(state, key)
        if isinstance(x, torch.Tensor):  # already on the device (its producer synchronised its stream)
            src = x
        else:
            np.copyto(slot.host_in.numpy(), x)
            src = slot.host_in
        bound = self._bound
        if bound is not None and bound.dev_in.shape == slot.dev_in.shape and bound.lock.acquire(blocking=False):
            try:
                with torch.cuda.device(self._cuda), torch.cuda.stream(state.stream):
                    bound.dev_in.copy_(src, non_blocking=True)
                    bound.graph.replay()
                    slot.host_out.copy_(bound.static_out, non_blocking=True)
                state.stream.synchronize()
            finally:
                bound.lock.release()
            return slot.host_out.numpy().copy()
        with state.lock, torch.cuda.device(self._cuda), torch.cuda.stream(state.stream):
            slot.dev_in.copy_(src, non_blocking=True)
            if graphs:
                if slot.graph is None:
                    self._capture(state, slot)
                slot.graph.replay()
                out = slot.static_out
            else:
                with torch.inference_mode():
                    out = self._forward(slot.dev_in)
            slot.host_out.copy_(out, non_blocking=True)
        state.stream.synchronize()
        return slot.host_out.numpy().copy()

    def launch(self, batch: Any, lane: int = 0) -> Any:
        """Queue one batch on lane ``lane``'s stream and return at once: a ``_Launched`` whose ``result``
        waits for it.  On a GPU with CUDA graphs (the cached serving path): the input is copied into a
        pinned buffer of its own, then the copy in, the graph and the copy out are queued back to back,
        with an event after them, so one thread can keep several streams busy and nothing waits per image
        until its answer is wanted.  Elsewhere it runs ``predict`` and returns the finished result."""
        if not self._graphs:
            return _Done(self.predict(batch, lane))
        self.net  # noqa: B018 - raises once closed
        x = self._input(batch)
        state = self._lanes[lane]
        key = (len(x), self.spec.input_shape, self.spec.num_classes)
        slot = state.slots.get(key) or self._new_slot(state, key)
        try:
            bufs = slot.spare.pop()
        except IndexError:
            bufs = (torch.empty(slot.host_in.shape, dtype=torch.float32, pin_memory=True),
                    torch.empty(slot.host_out.shape, dtype=torch.float32, pin_memory=True), torch.cuda.Event())
        host_in, host_out, event = bufs
        if isinstance(x, torch.Tensor):
            src = x
        else:
            np.copyto(host_in.numpy(), x)
            src = host_in
        with state.lock, torch.cuda.device(self._cuda), torch.cuda.stream(state.stream):
            if slot.graph is None:
                self._capture(state, slot)
            slot.dev_in.copy_(src, non_blocking=True)
            slot.graph.replay()
            host_out.copy_(slot.static_out, non_blocking=True)
            event.record()
        return _Launched(bufs, slot.spare)

    def _new_slot(self, state: _Lane, key: tuple[Any, ...]) -> _Slot:
        n = key[0]
        shape = (n, *self.spec.input_shape)
        slot = _Slot(host_in=torch.empty(shape, dtype=torch.float32, pin_memory=True),
                     dev_in=torch.empty(shape, dtype=torch.float32, device=self._cuda),
                     host_out=torch.empty((n, self.spec.num_classes), dtype=torch.float32, pin_memory=True))
        state.slots[key] = slot
        return slot

    def _capture(self, state: _Lane, slot: _Slot) -> None:
        assert self._cuda is not None
        slot.graph, slot.static_out = capture(self._forward, slot.dev_in, state.stream, self._cuda)

    def close(self) -> None:
        if self._net is None:
            return
        if not self._shared_lanes:
            for state in self._lanes:
                state.slots.clear()
        self._net = None
        if self._on_close is not None:
            self._on_close()


def make_lanes(cuda: torch.device | None, n: int) -> list[_Lane]:
    """``n`` lanes, each with its own CUDA stream on a GPU."""
    return [_Lane(torch.cuda.Stream(device=cuda) if cuda is not None else None) for _ in range(n)]


def _ieee_fp32() -> None:
    """fp32 means IEEE fp32: no TF32 tensor-core rounding in convolutions and matrix products
    (process-wide; torch allows TF32 in cuDNN convolutions by default on Ampere and newer)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


# --- the backend ------------------------------------------------------------------------------------


class TorchBackend:
    name: BackendId = "torch"

    def devices(self) -> list[str]:
        return ["cpu"] + [f"gpu:{i}" for i in range(torch.cuda.device_count())]

    def supports(self, spec: ModelSpec) -> bool:
        return spec.is_null or spec.name in torch_nets.names()

    def model_files(self, spec: ModelSpec, model_dir: Path) -> list[Path]:
        if spec.is_null:
            return [null_file(model_dir)]
        return [Path(model_dir) / "torch" / f"{file_stem(spec.name)}.safetensors"]

    def export(self, spec: ModelSpec, model_dir: Path, seed: int, *, force: bool = False) -> ExportResult:
        start = time.perf_counter()
        model_dir = Path(model_dir)
        if spec.is_null:
            return export_null_result(spec, model_dir, self.name, start)
        (path,) = self.model_files(spec, model_dir)
        if path.exists() and not force:
            try:
                header = read_header(path)
                params = header_param_count(spec, header)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise corrupt(spec, path, self.name, e) from None
            file_seed = (header.get("__metadata__") or {}).get("seed")
            return ExportResult(spec.name, self.name, (path,), spec.input_shape, params, files_size([path]), "user",
                                int(file_seed) if str(file_seed).isdigit() else None, time.perf_counter() - start)
        from safetensors.torch import save_file

        net = torch_nets.build(spec, seed)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            save_file(state, str(tmp), metadata={"model": spec.name, "seed": str(seed), "format": "pt"})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        params = sum(p.numel() for p in net.parameters())
        return ExportResult(spec.name, self.name, (path,), spec.input_shape, params, files_size([path]),
                            "random-init", seed, time.perf_counter() - start)

    def _check_device(self, device: str, options: LoadOptions) -> None:
        kind, index = parse_device(device)
        if options.lanes < 1:
            raise ConfigError(f"lanes must be 1 or more, got {options.lanes}")
        if kind == "cpu":
            if options.precision == "fp16":
                raise ConfigError("precision 'fp16' needs a GPU with the torch backend; use fp32 on cpu")
            return
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise DeviceError(f"device '{device}' is not available to torch {torch.__version__} "
                              f"(it sees {torch.cuda.device_count()} GPU(s)); use one of {', '.join(self.devices())}")

    def load(self, spec: ModelSpec, model_dir: Path, device: str, options: LoadOptions = _DEFAULTS) -> LoadedModel:
        model_dir = Path(model_dir)
        if spec.is_null:
            parse_device(device)
            return load_null(spec, model_dir, device)
        self._check_device(device, options)
        files = self.model_files(spec, model_dir)
        require_files(spec, files, self.name)
        (path,) = files
        try:
            state, meta = read_state_dict(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise corrupt(spec, path, self.name, e) from None
        return self._build(spec, state, meta, path, files_size(files), device, options)

    def gpu_decoder(self, device: str) -> Callable[[bytes, Path, ModelSpec], Any]:
        """JPEG decoding on ``device`` (nvJPEG) for ``--inputs jpeg --decode gpu``."""
        from cortexbench.models.backends.torch_decode import GpuDecoder

        return GpuDecoder(device)

    def load_blobs(self, spec: ModelSpec, blobs: Sequence[bytes], paths: Sequence[Path], device: str,
                   options: LoadOptions = _DEFAULTS) -> LoadedModel:
        if spec.is_null:
            parse_device(device)
            return load_null(spec, paths[0].parent.parent, device, blobs[0])
        self._check_device(device, options)
        (path,), (blob,) = paths, blobs
        try:
            with warnings.catch_warnings():  # read-only bytes: the weights are only ever read
                warnings.filterwarnings("ignore", message=".*not writable.*")
                state, meta = parse_state_dict(np.frombuffer(blob, np.uint8))
        except (ValueError, KeyError, TypeError) as e:
            raise corrupt(spec, path, self.name, e) from None
        return self._build(spec, state, meta, path, len(blob), device, options)

    def _build(self, spec: ModelSpec, state: dict[str, torch.Tensor], meta: dict[str, str], path: Path,
               size_bytes: int, device: str, options: LoadOptions) -> TorchModel:
        if meta.get("model") not in (None, spec.name):
            raise corrupt(spec, path, self.name, f"it holds model '{meta['model']}'")
        with torch.device("meta"):
            net = torch_nets.make(spec)
        for key in torch_nets.ignored_keys(spec, state):
            del state[key]
        problem = _check_keys(spec, net.state_dict(), state)
        if problem:
            raise corrupt(spec, path, self.name, problem)
        net.load_state_dict(state, strict=True, assign=True)
        net.requires_grad_(False).eval()
        if any(p.dtype != torch.float32 for p in net.parameters()):
            net.float()
        kind, index = parse_device(device)
        if kind == "gpu":
            torch.backends.cudnn.benchmark = True
            if options.precision == "fp32":
                _ieee_fp32()
            net.to(torch.device("cuda", index))
        if options.precision in REDUCED:
            net.to(REDUCED[options.precision])
        return TorchModel(spec, device, net, path, size_bytes, options)

    def loader(self, model_dir: Path, device: str, options: LoadOptions, tier: Tier, *,
               drop_cache: bool = False, rebuild: bool = False, slots: int = 0) -> ModelLoader:
        """The fast loader (``torch_loader.TorchLoader``)."""
        from cortexbench.models.backends.torch_loader import TorchLoader

        self._check_device(device, options)
        return TorchLoader(self, Path(model_dir), device, options, tier, drop_cache=drop_cache, rebuild=rebuild,
                           slots=slots)

    def profile_ops(self, model: LoadedModel, batch: np.ndarray, runs: int) -> dict[str, float]:
        if isinstance(model, NullModel):
            return {t: (model.spec.service_s if t == "other" else 0.0) for t in OP_TYPES}
        if not isinstance(model, TorchModel):
            raise TypeError(f"profile_ops of the torch backend needs a torch model, got {type(model).__name__}")
        from cortexbench.models.backends.torch_profile import profile_model

        return profile_model(model, batch, runs)

    def train_step_s(self, spec: ModelSpec, device: str, batch_size: int, steps: int, seed: int) -> float:
        if not spec.trainable:
            raise NotImplementedError(f"model '{spec.name}' is not trainable here; --train takes the small models")
        kind, index = parse_device(device)
        self._check_device(device, _DEFAULTS)
        dev = torch.device("cuda", index) if kind == "gpu" else torch.device("cpu")
        net = torch_nets.build(spec, seed).to(dev).train()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((batch_size, *spec.input_shape), generator=gen).to(dev)
        y = torch.randint(0, spec.num_classes, (batch_size,), generator=gen).to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        sync: Callable[[], None] = (lambda: torch.cuda.synchronize(dev)) if kind == "gpu" else (lambda: None)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()

        for _ in range(2):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(max(1, steps)):
            step()
        sync()
        return (time.perf_counter() - start) / max(1, steps)


BACKEND = TorchBackend()
