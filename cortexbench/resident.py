"""A worker's loaded models under its residency policy (``residency``): who loads, who waits, who frees.

``residency`` decides which models stay loaded (a plain policy over names); this module holds the models
themselves.  ``acquire`` gives a lane the model for one image: a resident one (a hit), a private copy
loaded for that image alone (cold, swap: freed on ``release``), or, under LRU, one loaded by this lane
and kept (other lanes wanting the same model wait for that load instead of loading it twice).  Models the
policy evicts are freed at once, or by the last lane still using them.  It counts loads, hits, misses
and model bytes for the worker's state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cortexbench.models.backends.base import (
    Backend,
    BlobLoader,
    LoadedModel,
    LoadOptions,
    LoadTimes,
    ModelLoader,
)
from cortexbench.models.registry import ModelSpec
from cortexbench.residency import Mode, Residency, make_residency, parse_mode


class Held:
    """A loaded model shared by lanes; freed when evicted and no lane uses it any more."""

    __slots__ = ("evicted", "model", "users")

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.users = 0
        self.evicted = False


class ResidentModels:
    """See the module docstring.  ``loader``: the mode's on-demand loader (None in cached mode until a
    model outside the list is asked for).  ``engine`` (``models.engines``; "" = the backend): the engine
    that builds cached mode's preloaded models, each built and run once on ``sample(spec)``."""

    def __init__(self, names: Sequence[str], backend: Backend, model_dir: Path, device: str, options: LoadOptions,
                 clock: Callable[[], float] = time.perf_counter, engine: str = "",
                 sample: Callable[[ModelSpec], np.ndarray] | None = None) -> None:
        self.backend, self.model_dir, self.device, self.options, self.clock = backend, model_dir, device, options, clock
        self.engine, self.sample = engine, sample
        self.residency: Residency = make_residency(parse_mode("cold"), ())
        self.held: dict[str, Held] = {}
        self.loader: ModelLoader | None = None
        self.lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {m: threading.Lock() for m in names}
        self.loads = self.hits = self.misses = self.model_bytes = 0

    def reset(self, mode: Mode, preload: Sequence[ModelSpec] = ()) -> None:
        """Free every model and the loader, then load ``preload`` (cached mode) under a fresh policy for
        ``mode``; ``loader`` is set afterwards for the modes that load on demand."""
        self.close()
        self.residency = make_residency(mode, tuple(s.name for s in preload))
        for spec in preload:
            self.held[spec.name] = Held(self._preload(spec))

    def _preload(self, spec: ModelSpec) -> LoadedModel:
        """A cached model: through the engine when there is one, else the backend's own ``load``."""
        if not self.engine:
            return self.backend.load(spec, self.model_dir, self.device, self.options)
        from cortexbench.models.engines import load_engine

        sample = self.sample(spec) if self.sample is not None else np.zeros((1, *spec.input_shape), np.float32)
        return load_engine(self.engine, self.options.precision, spec, self.model_dir, self.device,
                           np.empty((0, *spec.input_shape), np.float32), sample, lanes=self.options.lanes)

    def reset_counts(self) -> None:
        with self.lock:
            self.loads = self.hits = self.misses = self.model_bytes = 0

    def acquire(self, spec: ModelSpec, now: float) -> tuple[LoadedModel, Held | None, int, float, LoadTimes | None]:
        """The model to run ``spec`` with, its entry (None: a private copy, freed after use), whether it was
        resident, the time it was ready, and the load's times (None for a hit)."""
        name = spec.name
        with self.lock:
            access = self.residency.access(name)
            for victim in access.evict:  # at once, so the loaded set never drifts from the policy's
                if victim != name:
                    self._evict(victim)
            held = self.held.get(name) if access.hit else None
            if held is not None:
                held.users += 1
                self.hits += 1
                return held.model, held, 1, now, None
        if not access.keep:  # cold, swap: a private copy, loaded now, freed after use
            times = LoadTimes()
            model = self._load(spec, times)
            return model, None, 0, self.clock(), times
        with self._loading[name]:  # one lane loads; others wanting the same model wait for it
            with self.lock:
                held = self.held.get(name)
                if held is not None:
                    held.users += 1
                    self.hits += 1
                    return held.model, held, 1, self.clock(), None
            times = LoadTimes()
            model = self._load(spec, times)
            with self.lock:
                held = Held(model)
                held.users = 1
                if name in self.residency.resident():
                    self.held[name] = held
                else:  # another lane's miss evicted it while it loaded: use it once, then free it
                    held.evicted = True
        return model, held, 0, self.clock(), times

    def _load(self, spec: ModelSpec, times: LoadTimes) -> LoadedModel:
        """Load ``spec`` on demand through the mode's loader (a model loaded before the run never comes here
        except in cached mode's misses, which load like LRU misses)."""
        loader = self.loader
        if loader is None:  # cached mode, a model not in the list
            loader = self.loader = BlobLoader(self.backend, self.model_dir, self.device, self.options, "disk")
        model = loader.load(spec, times)
        with self.lock:
            self.loads += 1
            self.misses += 1
            self.model_bytes += model.size_bytes
        return model

    def release(self, model: LoadedModel, held: Held | None) -> None:
        if held is None:
            model.close()
            return
        with self.lock:
            held.users -= 1
            if held.evicted and held.users == 0:
                model.close()

    def _evict(self, name: str) -> None:
        """Called with ``self.lock`` held; the last lane still using the model frees it."""
        held = self.held.pop(name, None)
        if held is None:
            return
        held.evicted = True
        if held.users == 0:
            held.model.close()

    def close(self) -> None:
        with self.lock:
            for name in list(self.held):
                self._evict(name)
        if self.loader is not None:
            self.loader.close()
            self.loader = None
