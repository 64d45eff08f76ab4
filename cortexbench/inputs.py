"""A worker's inputs: a decoded pool reused image after image, or every image's file read and decoded.

- pool (``stream.inputs: pool``, every mode but cold): ``image_pool`` images decoded once per input
  shape before the run; image ``i`` uses entry ``i % len(pool)``, and the pool remembers which file each
  entry came from (the answers' ``input_idx``).  A pool of 100K decoded 224x224 inputs would need 60 GB.
- read (cold always; every mode with ``stream.inputs: jpeg``): the image's file is read and decoded for
  that image, on the CPU (OpenCV) or, with ``decode: gpu``, by the backend's GPU decoder (a device
  tensor); the bytes read are counted whether the file decodes or not.  In the modes that load models on
  demand the read runs on an input thread while the model loads (``overlap``).  A decoder that decodes
  many images in one call (the GPU decoder's ``many``, nvJPEG's batched decode) gets a launched group's
  images at once (``read_many``).

Plain Python: the GPU decoder comes from the backend (``gpu_decoder``), the files from the worker's spec.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cortexbench.errors import ImageDecodeError, UsageError
from cortexbench.models.backends.base import Backend, drop_page_cache
from cortexbench.models.registry import ModelSpec

# read and decode the image while the model loads (a tuning knob for bench/cold.py's A/B runs)
INPUT_OVERLAP = os.environ.get("CORTEXBENCH_INPUT_OVERLAP", "1") != "0"


class WorkerInputs:
    """See the module docstring.  ``configure(kind)`` before each mode; ``bytes_read`` counts image bytes
    read since the last ``reset``."""

    def __init__(self, images: Sequence[str], *, pool_size: int, inputs: str, decode: str, device: str,
                 backend: Backend, threads: int, name: str, drop_cache: bool = False,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.images = tuple(images)
        self.pool_size, self.inputs, self.decode, self.device = pool_size, inputs, decode, device
        self.backend, self.threads, self.name, self.drop_cache, self.clock = backend, threads, name, drop_cache, clock
        self.in_memory = False
        self.overlap = False
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._pool: dict[tuple[int, ...], np.ndarray] = {}
        self._pool_files: dict[tuple[int, ...], list[int]] = {}  # pool entry -> index of its image file
        self._decoder: Callable[[bytes, Path, ModelSpec], Any] | None = None
        self._threads: ThreadPoolExecutor | None = None

    def configure(self, kind: str, specs: Sequence[ModelSpec]) -> None:
        """Set up for a mode of ``kind`` (cached, swap, cold, lru): fill the pool if the mode uses one."""
        self.in_memory = kind != "cold" and self.inputs == "pool"
        self.overlap = not self.in_memory and kind != "cached" and INPUT_OVERLAP
        if self.decode == "gpu" and self._decoder is None:
            make = getattr(self.backend, "gpu_decoder", None)
            if make is None or not self.device.startswith("gpu"):
                raise UsageError(f"--decode gpu: the {self.backend.name} backend on {self.device} has no GPU "
                                 "decoder; use --decode cpu")
            self._decoder = make(self.device)
        if self.overlap and self._threads is None:
            self._threads = ThreadPoolExecutor(self.threads, thread_name_prefix=f"{self.name}-input")
        if self.in_memory and not self._pool:
            self._fill(specs)

    def _fill(self, specs: Sequence[ModelSpec]) -> None:
        from cortexbench.images.dataset import load_batch

        shapes = {s.input_shape: s for s in specs}
        n = min(self.pool_size, len(self.images))
        paths = [Path(p) for p in self.images[:n]]
        for shape, spec in shapes.items():
            batch, bad = load_batch(paths, spec)
            if len(batch) == 0:
                raise ImageDecodeError(f"none of the first {n} images decodes; check img_dir")
            self._pool[shape] = batch
            skip = set(bad)
            self._pool_files[shape] = [i for i, p in enumerate(paths) if p not in skip]

    def pooled(self, spec: ModelSpec, image_idx: int) -> tuple[np.ndarray, int]:
        """Image ``image_idx``'s pool entry for ``spec`` (a (1, *input_shape) view) and its file's index."""
        pool = self._pool[spec.input_shape]
        k = image_idx % len(pool)
        return pool[k:k + 1], self._pool_files[spec.input_shape][k]

    def file_index(self, image_idx: int) -> int:
        return image_idx % len(self.images)

    def read(self, image_idx: int, spec: ModelSpec) -> tuple[Any, float, float]:
        """Read and decode image ``image_idx`` for ``spec``: (input, when the read ended, when the decode
        ended).  ImageDecodeError names a file that does not decode."""
        from cortexbench.images.dataset import decode, preprocess, read_bytes

        path = Path(self.images[image_idx % len(self.images)])
        if self.drop_cache:
            drop_page_cache(path)
        data = read_bytes(path)
        t1 = self.clock()
        with self._lock:  # read, whether it decodes or not
            self.bytes_read += len(data)
        if self._decoder is not None:
            x = self._decoder(data, path, spec)  # on the worker's GPU, a device tensor (1, *input_shape)
        else:
            x = preprocess(decode(data, path), spec)[None]
        return x, t1, self.clock()

    @property
    def batched(self) -> bool:
        """Inputs read per image by a decoder that takes many at once: a launched group's inputs are made
        together by ``read_many``."""
        return not self.in_memory and callable(getattr(self._decoder, "many", None))

    def read_many(self, requests: Sequence[tuple[int, ModelSpec]]) -> list[tuple[Any, float, float, float]]:
        """``read`` for a group's images at once: every file read, then one call of the decoder's ``many``.
        Per image: (its input, or the ImageDecodeError of its file; when the reads began; when they ended;
        when the decode ended): each image waited for the whole group's reads and decode."""
        from cortexbench.images.dataset import read_bytes

        decoder = self._decoder
        assert decoder is not None
        t0 = self.clock()
        got: list[Any] = []
        for image_idx, _ in requests:
            path = Path(self.images[image_idx % len(self.images)])
            if self.drop_cache:
                drop_page_cache(path)
            try:
                got.append((read_bytes(path), path))
            except ImageDecodeError as e:
                got.append(e)
        t1 = self.clock()
        with self._lock:  # read, whether it decodes or not
            self.bytes_read += sum(len(g[0]) for g in got if isinstance(g, tuple))
        todo = [i for i, g in enumerate(got) if isinstance(g, tuple)]
        xs = decoder.many([(*got[i], requests[i][1]) for i in todo]) if todo else []  # type: ignore[attr-defined]
        for i, x in zip(todo, xs, strict=True):
            got[i] = x
        t2 = self.clock()
        return [(x, t0, t1, t2) for x in got]

    def submit(self, image_idx: int, spec: ModelSpec) -> Future[tuple[Any, float, float]]:
        """``read`` on an input thread (``overlap``)."""
        assert self._threads is not None
        return self._threads.submit(self.read, image_idx, spec)

    def warm(self, spec: ModelSpec) -> Any:
        """A warm-up's input: from the pool, or, when inputs are read per image, the first image read and
        decoded as the run will (so a GPU decoder is warm too); zeros if it does not decode."""
        if not self.in_memory and self.images:
            try:
                return self.read(0, spec)[0]
            except ImageDecodeError:
                pass
        pool = self._pool.get(spec.input_shape)
        return pool[:1] if pool is not None else np.zeros((1, *spec.input_shape), np.float32)

    def reset(self) -> None:
        with self._lock:
            self.bytes_read = 0

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
