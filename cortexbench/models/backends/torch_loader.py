"""The torch backend's on-demand loader: cold and swap loads as fast as the disk and the copy engine allow.

One ``TorchLoader`` per worker (one device).  Before the run (``prepare``) it reads each model file's
header, keeps the network's structure (a module built on the ``meta`` device, as a serving process keeps
its code loaded) and allocates everything a load needs, once:

- a pinned host staging buffer as large as the largest model (tier ``disk``), or each model's weights in
  pinned host memory (tier ``host``, the ``swap`` mode);
- ``slots`` device weight slots, each as large as the largest model at the run's precision; for every
  (model, slot) a module whose parameters are views of that slot, so binding weights costs nothing per
  load (``rebuild=True`` builds the module and binds it for every load instead, and times that as
  ``build``);
- a dedicated CUDA copy stream, the lanes' CUDA streams and I/O buffers (shared by every model it loads),
  and a pool of reader threads.

A load takes a free slot, then the loader (one load at a time, so cold images in flight share the disk
and the copy engine instead of thrashing them; lanes keep running inference meanwhile), and:

1. ``read``: checks the file's size and header against what ``prepare`` saw, then reads the data section
   in chunks on the reader threads (``os.preadv``) into the staging buffer; each chunk is copied to the
   device on the copy stream as soon as it has arrived, so the copy overlaps the read;
2. ``copy``: waits for the last copies; with ``fp16`` and an fp32 file the weights land in a raw device
   buffer and one kernel converts them into the slot (integer buffers are gathered by a second one);
3. ``build``: picks the module bound to the slot (or builds one with ``rebuild``).

On a GPU with ``cuda_graphs`` (the stream's torch default) ``prepare`` also captures, for every (model,
slot), a CUDA graph of batch 1 bound to the slot's memory, with cuDNN's autotuned kernels; a loaded model
replays its slot's graph, so its first inference after the load costs what a cached one does (a serving
process keeps its compiled plans; only the weights are new).  Without graphs (``rebuild``, other batch
sizes, a graph busy on another lane, ``CORTEXBENCH_SLOT_GRAPHS=0``) the model runs eagerly on the lane's
stream with cuDNN's heuristics (``cudnn.benchmark`` off: no autotuning on the cold path).  Closing it gives
the slot back.  On the CPU the same happens without the
copy: the file is read straight into the slot (``disk``) or copied from host memory (``host``).

Files this fast path cannot take (mixed or unusual dtypes, unaligned tensors) and the null model go
through ``BlobLoader`` (read the file, then ``TorchBackend.load_blobs``), which is correct but slower.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cortexbench.errors import ModelFileError, ModelNotFoundError
from cortexbench.models.backends import torch_nets
from cortexbench.models.backends.base import (
    Backend,
    BlobLoader,
    LoadedModel,
    LoadOptions,
    LoadTimes,
    Tier,
    corrupt,
    parse_device,
    require_files,
)
from cortexbench.models.backends.torch_impl import (
    _DTYPES,
    BoundGraph,
    TorchModel,
    _check_keys,
    _ieee_fp32,
    capture,
    make_lanes,
    run_net,
)
from cortexbench.models.registry import ModelSpec

MIN_CHUNK = 1 << 20
# Copies follow the reads in bursts of readers x chunk; each chunk costs a GIL hand-off.  The environment
# variable is a tuning knob for bench/cold.py's A/B runs.
MAX_CHUNK = int(float(os.environ.get("CORTEXBENCH_CHUNK_MB", "8")) * (1 << 20))
# CUDA graphs bound to the slots (see the module docstring); 0 runs loaded models eagerly (bench/cold.py's A/B)
SLOT_GRAPHS = os.environ.get("CORTEXBENCH_SLOT_GRAPHS", "1") != "0"
STAGING = 2
CHUNK_ALIGN = 1 << 16
_ALIGN = 256


@dataclass(frozen=True)
class _Tensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


@dataclass(frozen=True)
class _Layout:
    """What ``prepare`` read from a model file's header, and where its weights go in a slot."""

    path: Path
    file_bytes: int
    head: bytes  # the 8-byte length and the JSON header: compared with the file on every disk load
    data_bytes: int
    tensors: tuple[_Tensor, ...]
    kind: Literal["direct", "half", "other"]  # direct: the slot holds the data section as it is
    slot_bytes: int
    side: tuple[_Tensor, ...] = ()  # 'half': the non-float tensors, packed after the fp16 weights

    @property
    def data_offset(self) -> int:
        return len(self.head)


def read_layout(spec: ModelSpec, path: Path, precision: str) -> _Layout:
    """The layout of ``spec``'s safetensors file (ValueError when the header is not a valid one)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        if len(first) < 8:
            raise ValueError("file is too short for a safetensors header")
        n = int.from_bytes(first, "little")
        if n > size - 8:
            raise ValueError(f"header length {n} is larger than the file (truncated?)")
        raw = f.read(n)
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if meta.get("model") not in (None, spec.name):
        raise ValueError(f"it holds model '{meta['model']}'")
    data_bytes = size - 8 - n
    tensors = []
    for key, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor '{key}' has unsupported dtype {info.get('dtype')!r}")
        shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
        count = 1
        for d in shape:
            count *= d
        if not 0 <= begin <= end <= data_bytes or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor '{key}' lies outside the file or has the wrong size (truncated?)")
        tensors.append(_Tensor(key, dtype, shape, begin, end))
    want = torch.float16 if precision == "fp16" else torch.float32
    floats = [t for t in tensors if t.dtype.is_floating_point]
    aligned = all((8 + n + t.begin) % t.dtype.itemsize == 0 for t in tensors)
    kind: Literal["direct", "half", "other"] = "other"
    side: tuple[_Tensor, ...] = ()
    slot = data_bytes
    if aligned and all(t.dtype == want for t in floats):
        kind = "direct"
    elif (aligned and want == torch.float16 and all(t.dtype == torch.float32 for t in floats)
          and data_bytes % 4 == 0 and all(t.begin % 4 == 0 for t in tensors)):
        kind = "half"
        slot = data_bytes // 2
        side = tuple(t for t in tensors if not t.dtype.is_floating_point)
    return _Layout(path, size, first + raw, data_bytes, tuple(tensors), kind, slot, side)


def chunks(n: int, readers: int) -> list[tuple[int, int]]:
    """Byte ranges that cover 0..n: about ``n / readers`` each, between MIN_CHUNK and MAX_CHUNK, every start
    a multiple of CHUNK_ALIGN (so that each range converts on its own from fp32 to fp16)."""
    size = min(MAX_CHUNK, max(MIN_CHUNK, -(-n // max(1, readers))))
    size = -(-size // CHUNK_ALIGN) * CHUNK_ALIGN
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (several reads if the kernel returns fewer bytes)."""
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise ValueError(f"the file ended at byte {offset} (truncated while reading?)")
        view = view[got:]
        offset += got


def _side_size(layout: _Layout) -> int:
    return sum(-(-(t.end - t.begin) // 8) * 8 for t in layout.side)


class TorchLoader:
    """See the module docstring."""

    def __init__(self, backend: Backend, model_dir: Path, device: str, options: LoadOptions, tier: Tier, *,
                 drop_cache: bool = False, rebuild: bool = False, slots: int = 0, readers: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.backend, self.model_dir, self.device = backend, Path(model_dir), device
        self.options = replace(options, cuda_graphs=False)  # models get a slot's graph, never their own
        self.tier: Tier = tier
        self.drop_cache, self.rebuild, self.clock = drop_cache, rebuild, clock
        kind, index = parse_device(device)
        self._cuda = torch.device("cuda", index) if kind == "gpu" else None
        self.slot_graphs = bool(options.cuda_graphs and self._cuda is not None and not rebuild and SLOT_GRAPHS)
        self._graphs: dict[tuple[str, int], BoundGraph] = {}
        self._n_slots = slots or options.lanes + 1
        self._readers = readers or max(2, min(16, os.cpu_count() or 2))
        self._fallback = BlobLoader(backend, model_dir, device, self.options, tier, drop_cache=drop_cache, clock=clock)
        self._lock = threading.Lock()
        self._layouts: dict[str, _Layout] = {}
        self._broken: dict[str, ModelFileError | ModelNotFoundError] = {}
        self._host: dict[str, torch.Tensor] = {}
        self._nets: dict[tuple[str, int], nn.Module] = {}
        self._side_index: dict[str, torch.Tensor] = {}
        self._slots: list[torch.Tensor] = []
        self._side_at = 0
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Two staging pairs (pinned host buffer, raw device buffer for fp16 conversion), taken in turn:
        # one load's copies drain from one while the next load reads into the other.
        self._staging: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._host_staging: list[torch.Tensor] = []
        self._raw: list[torch.Tensor] = []
        self._stream: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self.lanes = make_lanes(self._cuda, options.lanes)

    # --- before the run ----------------------------------------------------------------------------

    def prepare(self, specs: Sequence[ModelSpec]) -> dict[str, float]:
        t0 = self.clock()
        fallback: list[ModelSpec] = []
        for spec in specs:
            if spec.is_null:
                fallback.append(spec)
                continue
            files = self.backend.model_files(spec, self.model_dir)
            try:
                require_files(spec, files, self.backend.name)
                layout = read_layout(spec, files[0], self.options.precision)
                skeleton = self._skeleton(spec, layout)
            except ModelNotFoundError as e:
                self._broken[spec.name] = e
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                self._broken[spec.name] = corrupt(spec, files[0], self.backend.name, e)
                continue
            if layout.kind == "other":
                fallback.append(spec)
                continue
            self._layouts[spec.name] = layout
            del skeleton
        info = self._fallback.prepare(fallback)
        if self._cuda is not None:
            torch.backends.cudnn.benchmark = False  # heuristics, no autotuning, on the cold path
            if self.options.precision == "fp32":
                _ieee_fp32()
        layouts = list(self._layouts.values())
        slot_bytes = _round(max((lay.slot_bytes for lay in layouts), default=0))
        self._side_at = slot_bytes  # where a slot's packed non-float tensors start ('half')
        side_bytes = max((_side_size(lay) for lay in layouts), default=0)
        raw_bytes = max((lay.data_bytes for lay in layouts if lay.kind == "half"), default=0)
        biggest = max((lay.data_bytes for lay in layouts), default=0)
        dev = self._cuda or torch.device("cpu")
        pin = self._cuda is not None
        for i in range(self._n_slots if layouts else 0):
            self._slots.append(torch.zeros(slot_bytes + side_bytes, dtype=torch.uint8, device=dev))  # touched now
            self._free.put(i)
        if self._cuda is not None and layouts:
            self._stream = torch.cuda.Stream(device=self._cuda)
            for _ in range(STAGING):
                if raw_bytes:
                    self._raw.append(torch.empty(raw_bytes, dtype=torch.uint8, device=dev))
                if self.tier == "disk":
                    self._host_staging.append(torch.empty(biggest, dtype=torch.uint8, pin_memory=True))
        for i in range(STAGING if self._cuda is not None else 1):
            self._staging.put(i)
        if self.tier == "disk":
            self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="cortexbench-read")
        host = 0
        for name, lay in list(self._layouts.items()):
            if lay.kind == "half" and lay.side:
                idx: list[int] = []
                for t in lay.side:  # packed as _views expects them: each padded to 8 bytes
                    idx.extend(range(t.begin, t.end))
                    idx.extend([t.begin] * (-(-(t.end - t.begin) // 8) * 8 - (t.end - t.begin)))
                self._side_index[name] = torch.tensor(idx, dtype=torch.int64, device=dev)
            if self.tier == "host":
                spec = next(s for s in specs if s.name == name)
                try:
                    self._host[name] = self._read_host(lay, pin)
                except (OSError, ValueError) as e:
                    self._broken[name] = corrupt(spec, lay.path, self.backend.name, e)
                    del self._layouts[name]
                    continue
                host += lay.data_bytes
            if not self.rebuild:
                spec = next(s for s in specs if s.name == name)
                for i in range(len(self._slots)):
                    self._nets[(name, i)] = self._bind(spec, lay, i)
        t_graphs = self.clock()
        if self.slot_graphs:
            self._capture_all(specs)
        if self._graphs:
            info.update(graphs=float(len(self._graphs)), graphs_s=self.clock() - t_graphs)
        info.update(prepare_s=self.clock() - t0, host_bytes=info.get("host_bytes", 0.0) + host,
                    slots=float(len(self._slots)), slot_bytes=float(slot_bytes + side_bytes))
        if self._cuda is not None and layouts:
            info["h2d_gbps"] = self._h2d_gbps(biggest)
        return info

    def _capture_all(self, specs: Sequence[ModelSpec]) -> None:
        """A CUDA graph of batch 1 for every (model, slot), bound to the slot's memory and captured with
        cuDNN autotuning on (then off again for eager runs).  A load replays the graph of its slot: the
        weights are new, the kernels and their order are the ones a serving process would have compiled
        once.  The slots hold zeros while capturing: the graphs record addresses, not values."""
        assert self._cuda is not None
        fp16 = self.options.precision == "fp16"
        stream = self.lanes[0].stream
        torch.backends.cudnn.benchmark = True
        try:
            with torch.cuda.device(self._cuda):
                for spec in specs:
                    if spec.name not in self._layouts:
                        continue
                    dev_in = torch.zeros((1, *spec.input_shape), dtype=torch.float32, device=self._cuda)
                    for i in range(len(self._slots)):
                        net = self._nets[(spec.name, i)]
                        graph, out = capture(lambda x, net=net: run_net(net, x, fp16), dev_in, stream, self._cuda)
                        self._graphs[(spec.name, i)] = BoundGraph(graph, dev_in, out)
                        dev_in = torch.zeros_like(dev_in)
            stream.synchronize()
        finally:
            torch.backends.cudnn.benchmark = False

    def _skeleton(self, spec: ModelSpec, layout: _Layout) -> nn.Module:
        with torch.device("meta"):
            net = torch_nets.make(spec)
        keys = {t.key: torch.empty(t.shape, device="meta") for t in layout.tensors}
        for key in torch_nets.ignored_keys(spec, keys):
            del keys[key]
        problem = _check_keys(spec, net.state_dict(), keys)
        if problem:
            raise ValueError(problem)
        return net

    def _read_host(self, layout: _Layout, pin: bool) -> torch.Tensor:
        buf = torch.empty(layout.data_bytes, dtype=torch.uint8, pin_memory=pin)
        fd = os.open(layout.path, os.O_RDONLY)
        try:
            _pread_into(fd, memoryview(buf.numpy()), layout.data_offset)
        finally:
            os.close(fd)
        return buf

    def _views(self, spec: ModelSpec, layout: _Layout, slot: int) -> dict[str, torch.Tensor]:
        mem = self._slots[slot]
        ignored = torch_nets.ignored_keys(spec, [t.key for t in layout.tensors])
        out: dict[str, torch.Tensor] = {}
        if layout.kind == "direct":
            for t in layout.tensors:
                if t.key not in ignored:
                    out[t.key] = mem[t.begin:t.end].view(t.dtype).view(t.shape)
            return out
        half = mem[:layout.slot_bytes].view(torch.float16)
        pos = self._side_at
        for t in layout.side:
            if t.key not in ignored:
                out[t.key] = mem[pos:pos + t.end - t.begin].view(t.dtype).view(t.shape)
            pos += -(-(t.end - t.begin) // 8) * 8
        for t in layout.tensors:
            if t.dtype.is_floating_point and t.key not in ignored:
                out[t.key] = half[t.begin // 4:t.end // 4].view(t.shape)
        return out

    def _bind(self, spec: ModelSpec, layout: _Layout, slot: int) -> nn.Module:
        """A module of ``spec`` whose weights are views of slot ``slot``."""
        with torch.device("meta"):
            net = torch_nets.make(spec)
        net.load_state_dict(self._views(spec, layout, slot), strict=True, assign=True)
        return net.requires_grad_(False).eval()

    def _h2d_gbps(self, nbytes: int) -> float:
        """Pinned host-to-device bandwidth on the copy stream, best of three (for the report's floor)."""
        n = max(64 << 20, min(nbytes, 512 << 20))
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(n, dtype=torch.uint8, device=self._cuda)
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._stream):
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        del src, dst
        return n / best / 1e9

    # --- one load -----------------------------------------------------------------------------------

    def load(self, spec: ModelSpec, times: LoadTimes) -> LoadedModel:
        broken = self._broken.get(spec.name)
        if broken is not None:
            raise broken
        layout = self._layouts.get(spec.name)
        if layout is None:
            return self._fallback.load(spec, times)
        t0 = self.clock()
        slot = self._free.get()
        staging = self._staging.get()  # a staging pair whose last load's copies have finished
        done: Any = None
        try:
            try:
                with self._lock:  # one read at a time; the copy tail below overlaps the next load's read
                    t1 = self.clock()
                    t_read, done = self._fill(spec, layout, slot, staging, t1)
                if done is not None:
                    done.synchronize()
            except BaseException:
                if self._stream is not None:
                    self._stream.synchronize()  # nothing may still copy into the slot or out of staging
                raise
            finally:
                self._staging.put(staging)
            t2 = self.clock()
            net = self._nets.get((spec.name, slot)) if not self.rebuild else None
            if net is None:
                net = self._bind(spec, layout, slot)
            t3 = self.clock()
        except BaseException:
            self._free.put(slot)
            raise
        times.wait_s, times.read_s, times.copy_s, times.build_s = t1 - t0, t_read - t1, t2 - t_read, t3 - t2
        return TorchModel(spec, self.device, net, layout.path, layout.file_bytes, self.options, lanes=self.lanes,
                          on_close=lambda: self._free.put(slot), bound=self._graphs.get((spec.name, slot)))

    def _fill(self, spec: ModelSpec, layout: _Layout, slot: int, staging: int, start: float) -> tuple[float, Any]:
        """Start putting the weights into ``slot``: read them (disk) and queue their copy and conversion on
        the copy stream.  Returns the time the last byte had been read (``start`` from the host tier, which
        reads nothing) and a CUDA event to wait for (None on the CPU, where all is done)."""
        mem = self._slots[slot]
        n = layout.data_bytes
        raw = self._raw[staging] if layout.kind == "half" else mem
        if self.tier == "host":
            if self._cuda is None:
                mem[:n].copy_(self._host[spec.name])
                return start, None
            with torch.cuda.stream(self._stream):
                raw[:n].copy_(self._host[spec.name], non_blocking=True)
                self._convert(layout, mem, raw, 0, n)
            t_read = start
        else:
            t_read = self._read_disk(spec, layout, mem, raw, staging)
            if self._cuda is None:
                return t_read, None
        with torch.cuda.stream(self._stream):
            idx = self._side_index.get(spec.name)
            if layout.kind == "half" and idx is not None:
                mem[self._side_at:self._side_at + len(idx)].copy_(raw[idx])
            done = torch.cuda.Event()
            done.record()
        return t_read, done

    @staticmethod
    def _convert(layout: _Layout, mem: torch.Tensor, raw: torch.Tensor, a: int, b: int) -> None:
        """fp32 bytes a:b of the raw buffer to fp16 in the slot (on the current stream); 'half' only."""
        if layout.kind == "half":
            mem[a // 2:b // 2].view(torch.float16).copy_(raw[a:b].view(torch.float32))

    def _read_disk(self, spec: ModelSpec, layout: _Layout, mem: torch.Tensor, raw: torch.Tensor, staging: int) -> float:
        try:
            fd = os.open(layout.path, os.O_RDONLY)
        except FileNotFoundError:
            raise ModelNotFoundError(f"model '{spec.name}': {layout.path} is missing (removed during the run?)") from None
        except OSError as e:
            raise corrupt(spec, layout.path, self.backend.name, e.strerror or e) from None
        try:
            size = os.fstat(fd).st_size
            if size != layout.file_bytes or os.pread(fd, len(layout.head), 0) != layout.head:
                raise corrupt(spec, layout.path, self.backend.name,
                              f"the file changed since the run started ({size} bytes, was {layout.file_bytes}; "
                              "truncated or rewritten?)")
            if self.drop_cache:
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except (OSError, AttributeError):
                    pass
            n = layout.data_bytes
            target = self._host_staging[staging] if self._cuda is not None else mem
            assert self._pool is not None
            host = memoryview(target.numpy())
            parts = chunks(n, self._readers)
            reads: list[Future[None]] = [self._pool.submit(_pread_into, fd, host[a:b], layout.data_offset + a)
                                         for a, b in parts]
            try:
                for (a, b), f in zip(parts, reads, strict=True):
                    f.result()
                    if self._cuda is not None:  # each chunk on its way as soon as it is in
                        with torch.cuda.stream(self._stream):
                            raw[a:b].copy_(target[a:b], non_blocking=True)
                            self._convert(layout, mem, raw, a, b)
            except (OSError, ValueError) as e:
                for f in reads:
                    f.cancel()
                for f in reads:
                    if not f.cancelled():
                        f.exception()  # wait: no read may still write into the staging buffer
                raise corrupt(spec, layout.path, self.backend.name, e) from None
            return self.clock()
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._fallback.close()
        self._graphs.clear()
        self._nets.clear()
        self._host.clear()
        self._slots.clear()
        self._host_staging.clear()
        self._raw.clear()


def _round(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
