"""Prometheus metrics of the stream test: plain mergeable counts, served by a custom Collector.

At 20,000 images/s across driver shards, one ``prometheus_client`` ``observe()`` per image costs too much,
so every shard keeps a ``MetricsState`` (dicts of ints and ``BucketCounts``, picklable, updated a whole
column of results at a time with numpy) and the coordinator merges the shards' states and hands the merged
one to a ``metrics_http.MetricsServer``, which renders it on each scrape of ``/metrics``::

    state = MetricsState(run_id="r1", mode="cached", backend="torch")
    state.record_images("cached", model_idx, worker_idx, outcome_idx, latency_s,
                        models=MODELS, workers=WORKERS, outcomes=("ok", "error"))
    with MetricsServer(8000) as server:       # or MetricsServer(0).start() -> the ephemeral port
        server.update(MetricsState.merged(shard_states))

docs/metrics.md lists every metric with its labels, units and example PromQL.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from cortexbench.ledger import WORKER_STAGES

# Upper bounds (seconds) of the histogram buckets, about 3 per decade from 50 us to 30 s; +Inf is implicit.
BUCKETS_S: tuple[float, ...] = (
    50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0, 30.0,
)
_BOUNDS = np.asarray(BUCKETS_S, dtype=np.float64)
LE = [floatToGoString(b) for b in BUCKETS_S] + ["+Inf"]

# The parts of one image's latency (label ``stage`` of cortexbench_stage_seconds); docs/metrics.md says
# what each measures.  send_delay and transport are measured by the driver, the rest inside the worker.
STAGES: tuple[str, ...] = ("send_delay", "transport", *WORKER_STAGES)

# The outcome of an image that succeeded; other outcome names are the stream's failure kinds.
OK = "ok"

# Label ``phase`` of the per-image series: the first ``stream.warmup`` images of each mode are "warmup"
# (sent, not counted in the results), the rest "measured" (what the report counts).  Model loads also
# have "setup": cached mode's preload before the mode's first image.
WARMUP, MEASURED, SETUP = "warmup", "measured", "setup"
PHASES: tuple[str, ...] = (WARMUP, MEASURED)
LOAD_PHASES: tuple[str, ...] = (SETUP, WARMUP, MEASURED)
# cortexbench_run_phase: what the run is doing now.  "preparing" covers starting Ray and the workers,
# exporting models, synthesising images and each mode's setup; "done" is after the last mode.
RUN_PHASES: tuple[str, ...] = ("preparing", "warmup", "measuring", "done")

# Every metric family this module exposes (the names Prometheus sees, before _bucket/_sum/_count).
METRIC_NAMES: tuple[str, ...] = (
    "cortexbench_image_latency_seconds", "cortexbench_stage_seconds", "cortexbench_images_total",
    "cortexbench_model_loads_total", "cortexbench_cache_hits_total", "cortexbench_inflight",
    "cortexbench_device_memory_bytes", "cortexbench_host_memory_bytes", "cortexbench_run_info",
    "cortexbench_run_progress_ratio", "cortexbench_mode_progress_ratio", "cortexbench_run_phase",
)


class BucketCounts:
    """One histogram: counts per bucket of BUCKETS_S (plus +Inf), the sum and the count of observations.

    ``counts`` is non-cumulative here (bucket i holds values in (BUCKETS_S[i-1], BUCKETS_S[i]]); ``cumulative()``
    gives what Prometheus shows.  NaN values mean "not measured" and are skipped.
    """

    __slots__ = ("count", "counts", "sum_s")

    def __init__(self) -> None:
        self.counts = np.zeros(len(BUCKETS_S) + 1, dtype=np.int64)
        self.sum_s = 0.0
        self.count = 0

    def observe_many(self, values_s: np.ndarray | Sequence[float]) -> None:
        """Add many values (seconds); a value equal to a bound lands in that bound's bucket (``le``)."""
        v = np.asarray(values_s, dtype=np.float64).ravel()
        v = v[~np.isnan(v)]
        if v.size == 0:
            return
        idx = np.searchsorted(_BOUNDS, v, side="left")
        self.counts += np.bincount(idx, minlength=len(self.counts)).astype(np.int64)
        self.sum_s += float(v.sum())
        self.count += int(v.size)

    def observe(self, value_s: float) -> None:
        """Add one value (seconds)."""
        if math.isnan(value_s):
            return
        self.counts[int(np.searchsorted(_BOUNDS, value_s, side="left"))] += 1
        self.sum_s += float(value_s)
        self.count += 1

    def add_counts(self, counts: np.ndarray, sum_s: float, count: int | None = None) -> None:
        """Add pre-binned non-cumulative counts (length len(BUCKETS_S)+1), their sum and (if known) total."""
        self.counts += counts
        self.sum_s += float(sum_s)
        self.count += int(counts.sum()) if count is None else int(count)

    def merge(self, other: BucketCounts) -> BucketCounts:
        """Add ``other`` into this one; returns self."""
        self.counts += other.counts
        self.sum_s += other.sum_s
        self.count += other.count
        return self

    def cumulative(self) -> list[int]:
        """Counts per ``le`` bound as Prometheus shows them, the last one (+Inf) being ``count``."""
        return np.cumsum(self.counts).tolist()

    def copy(self) -> BucketCounts:
        out = BucketCounts()
        out.counts = self.counts.copy()
        out.sum_s = self.sum_s
        out.count = self.count
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BucketCounts):
            return NotImplemented
        return (self.count == other.count and self.sum_s == other.sum_s
                and bool(np.array_equal(self.counts, other.counts)))

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> tuple[np.ndarray, float, int]:
        return self.counts, self.sum_s, self.count

    def __setstate__(self, state: tuple[np.ndarray, float, int]) -> None:
        self.counts, self.sum_s, self.count = state

    def __repr__(self) -> str:
        return f"BucketCounts(count={self.count}, sum_s={self.sum_s:.6g})"


def _codes(values: ArrayLike, table: Sequence[str] | None, what: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes and their name table: ``values`` are codes into ``table``, or names when table is None."""
    if table is None:
        names, inv = np.unique(np.asarray(values).astype(str), return_inverse=True)
        return inv.ravel().astype(np.int64), [str(n) for n in names]
    codes = np.asarray(values, dtype=np.int64).ravel()
    if codes.size and (codes.min() < 0 or codes.max() >= len(table)):
        raise ValueError(f"{what} codes must be in 0..{len(table) - 1}")
    return codes, list(table)


@dataclass
class MetricsState:
    """Everything /metrics shows, as plain data: picklable, and mergeable across driver shards.

    Counters and histograms add on ``merge``; gauges (``inflight``, ``device_memory_bytes``,
    ``host_memory_bytes``) take the other state's values for its workers, since shards own disjoint workers.
    The run fields (``run_id``, ``mode``, ``backend``, ``host``, ``phase``, the progress ratios) are the
    coordinator's: ``merge`` takes the other's when it has them.  Every series carries the label ``host``.
    """

    latency: dict[tuple[str, str, str, str], BucketCounts] = field(default_factory=dict)  # (mode, phase, model, worker)
    stage: dict[tuple[str, str, str], BucketCounts] = field(default_factory=dict)         # (mode, phase, stage)
    images: dict[tuple[str, str, str, str, str], int] = field(default_factory=dict)  # (mode, phase, model, worker, outcome)
    model_loads: dict[tuple[str, str, str], int] = field(default_factory=dict)            # (mode, phase, worker)
    cache_hits: dict[tuple[str, str, str], int] = field(default_factory=dict)             # (mode, phase, worker)
    inflight: dict[str, int] = field(default_factory=dict)                                # worker (gauge)
    device_memory_bytes: dict[str, int] = field(default_factory=dict)                     # worker (gauge)
    host_memory_bytes: dict[str, int] = field(default_factory=dict)                       # worker (gauge)
    run_id: str = ""
    mode: str = ""
    backend: str = ""
    host: str = ""
    phase: str = ""  # one of RUN_PHASES, or "" before the run says
    progress_ratio: float | None = None  # over all modes
    mode_progress_ratio: float | None = None  # of the mode being run

    # -- updates ---------------------------------------------------------------------------------------

    def record_images(
        self,
        mode: str,
        model: ArrayLike,
        worker: ArrayLike,
        outcome: ArrayLike,
        latency_s: ArrayLike,
        *,
        models: Sequence[str] | None = None,
        workers: Sequence[str] | None = None,
        outcomes: Sequence[str] | None = None,
        timed_outcomes: Collection[str] = (OK,),
        phase: str = MEASURED,
    ) -> None:
        """Count a column of finished images of one mode and phase and add their latencies, vectorised.

        ``model``, ``worker`` and ``outcome`` are equal-length arrays of integer codes into ``models``,
        ``workers`` and ``outcomes``, or arrays of names when that table is None.  Every image is counted
        in ``images``; only those whose outcome is in ``timed_outcomes`` (and whose latency is not NaN)
        go into the latency histogram, so that fast failures do not pull the percentiles down.
        """
        _check_phase(phase, PHASES)
        m, m_names = _codes(model, models, "model")
        w, w_names = _codes(worker, workers, "worker")
        o, o_names = _codes(outcome, outcomes, "outcome")
        lat = np.asarray(latency_s, dtype=np.float64).ravel()
        if not m.size == w.size == o.size == lat.size:
            raise ValueError(f"record_images: columns differ in length ({m.size}, {w.size}, {o.size}, {lat.size})")
        if lat.size == 0:
            return
        nw, no = max(len(w_names), 1), max(len(o_names), 1)
        mw = m * nw + w
        keys, counts = np.unique(mw * no + o, return_counts=True)
        for key, n in zip(keys.tolist(), counts.tolist(), strict=True):
            k = (mode, phase, m_names[key // (nw * no)], w_names[key // no % nw], o_names[key % no])
            self.images[k] = self.images.get(k, 0) + n

        timed = np.array([name in timed_outcomes for name in o_names] or [False])
        sel = timed[o] & ~np.isnan(lat)
        if not sel.any():
            return
        mw, lat = mw[sel], lat[sel]
        uniq, inv = np.unique(mw, return_inverse=True)
        inv = inv.ravel()
        nb = len(BUCKETS_S) + 1
        binned = np.bincount(inv * nb + np.searchsorted(_BOUNDS, lat, side="left"),
                             minlength=uniq.size * nb).reshape(uniq.size, nb)
        sums = np.bincount(inv, weights=lat, minlength=uniq.size).tolist()
        ns = np.bincount(inv, minlength=uniq.size).tolist()
        for i, key in enumerate(uniq.tolist()):
            k3 = (mode, phase, m_names[key // nw], w_names[key % nw])
            h = self.latency.get(k3)
            if h is None:
                h = self.latency[k3] = BucketCounts()
            h.add_counts(binned[i], sums[i], ns[i])

    def record_group(self, mode: str, model: str, worker: str, latency_s: np.ndarray | Sequence[float],
                     outcome: str = OK, *, timed: bool | None = None, phase: str = MEASURED) -> None:
        """Count images of one (mode, phase, model, worker, outcome) and add their latencies (when ``timed``,
        which defaults to outcome == 'ok')."""
        _check_phase(phase, PHASES)
        lat = np.asarray(latency_s, dtype=np.float64).ravel()
        if lat.size == 0:
            return
        k = (mode, phase, model, worker, outcome)
        self.images[k] = self.images.get(k, 0) + int(lat.size)
        if (timed if timed is not None else outcome == OK) and not np.isnan(lat).all():
            self.latency.setdefault((mode, phase, model, worker), BucketCounts()).observe_many(lat)

    def record_stages(self, mode: str, stages_s: Mapping[str, np.ndarray | Sequence[float]], *,
                      phase: str = MEASURED) -> None:
        """Add per-image stage times (seconds) by stage name; NaN means the stage did not happen and is not
        observed."""
        _check_phase(phase, PHASES)
        for name, values in stages_s.items():
            if name not in STAGES:
                raise ValueError(f"unknown stage '{name}' (valid: {', '.join(STAGES)})")
            v = np.asarray(values, dtype=np.float64).ravel()
            v = v[~np.isnan(v)]
            if v.size:
                self.stage.setdefault((mode, phase, name), BucketCounts()).observe_many(v)

    def record_residency(self, mode: str, worker: ArrayLike, hit: ArrayLike, *, workers: Sequence[str] | None = None,
                         phase: str = MEASURED) -> None:
        """Count, per worker, the images whose model was resident (``hit`` 1: a cache hit) and those that
        loaded it (``hit`` 0: a model load); ``hit`` -1 (failed before the model was looked up) counts as
        neither.  ``worker`` holds codes into ``workers``, or names when that table is None."""
        _check_phase(phase, PHASES)
        w, w_names = _codes(worker, workers, "worker")
        h = np.asarray(hit).ravel()
        if w.size != h.size:
            raise ValueError(f"record_residency: columns differ in length ({w.size}, {h.size})")
        for counter, value in ((self.cache_hits, 1), (self.model_loads, 0)):
            for code, n in enumerate(np.bincount(w[h == value], minlength=len(w_names)).tolist()):
                if n:
                    k = (mode, phase, w_names[code])
                    counter[k] = counter.get(k, 0) + n

    def add_model_loads(self, worker: str, n: int = 1, *, mode: str, phase: str = MEASURED) -> None:
        """Count ``n`` models loaded by ``worker`` (phase "setup" for cached mode's preload)."""
        _check_phase(phase, LOAD_PHASES)
        k = (mode, phase, worker)
        self.model_loads[k] = self.model_loads.get(k, 0) + int(n)

    def add_cache_hits(self, worker: str, n: int = 1, *, mode: str, phase: str = MEASURED) -> None:
        _check_phase(phase, PHASES)
        k = (mode, phase, worker)
        self.cache_hits[k] = self.cache_hits.get(k, 0) + int(n)

    def set_inflight(self, worker: str, n: int) -> None:
        self.inflight[worker] = int(n)

    def set_device_memory(self, worker: str, size_bytes: int) -> None:
        self.device_memory_bytes[worker] = int(size_bytes)

    def set_host_memory(self, worker: str, size_bytes: int) -> None:
        self.host_memory_bytes[worker] = int(size_bytes)

    # -- merging ---------------------------------------------------------------------------------------

    def merge(self, other: MetricsState) -> MetricsState:
        """Add ``other`` (another shard's state) into this one; returns self.  ``other`` is not changed."""
        for k, h in other.latency.items():
            mine = self.latency.get(k)
            self.latency[k] = h.copy() if mine is None else mine.merge(h)
        for ks, h in other.stage.items():
            mine = self.stage.get(ks)
            self.stage[ks] = h.copy() if mine is None else mine.merge(h)
        for counter_self, counter_other in ((self.images, other.images), (self.model_loads, other.model_loads),
                                            (self.cache_hits, other.cache_hits)):
            for kc, n in counter_other.items():
                counter_self[kc] = counter_self.get(kc, 0) + n
        self.inflight.update(other.inflight)
        self.device_memory_bytes.update(other.device_memory_bytes)
        self.host_memory_bytes.update(other.host_memory_bytes)
        self.run_id = other.run_id or self.run_id
        self.mode = other.mode or self.mode
        self.backend = other.backend or self.backend
        self.host = other.host or self.host
        self.phase = other.phase or self.phase
        if other.progress_ratio is not None:
            self.progress_ratio = other.progress_ratio
        if other.mode_progress_ratio is not None:
            self.mode_progress_ratio = other.mode_progress_ratio
        return self

    @classmethod
    def merged(cls, states: Iterable[MetricsState]) -> MetricsState:
        """A new state holding the sum of ``states`` (none of them is changed)."""
        out = cls()
        for s in states:
            out.merge(s)
        return out

    def copy(self) -> MetricsState:
        """A deep copy (about 1 ms for 3 modes x 8 models x 8 workers)."""
        return MetricsState().merge(self)

    @property
    def images_total(self) -> int:
        """All images counted, every outcome."""
        return sum(self.images.values())

    # -- rendering -------------------------------------------------------------------------------------

    def families(self) -> list[Metric]:
        """The metric families of this state, as prometheus_client renders them (every series with ``host``)."""
        host = self.host

        def hist(name: str, doc: str, labels: tuple[str, ...], data: Mapping[Any, BucketCounts]) -> Metric:
            fam = HistogramMetricFamily(name, doc, labels=(*labels, "host"))
            for k, h in sorted(data.items()):
                fam.add_metric([*k, host], list(zip(LE, h.cumulative(), strict=True)), h.sum_s)
            return fam

        def counter(name: str, doc: str, labels: tuple[str, ...], data: Mapping[Any, int]) -> Metric:
            fam = CounterMetricFamily(name, doc, labels=(*labels, "host"))
            for k, n in sorted(data.items()):
                fam.add_metric([*k, host], n)
            return fam

        def per_worker(name: str, doc: str, data: Mapping[str, int]) -> Metric:
            fam = GaugeMetricFamily(name, doc, labels=("worker", "host"))
            for w, n in sorted(data.items()):
                fam.add_metric([w, host], n)
            return fam

        out = [
            hist("cortexbench_image_latency_seconds",
                 "Per-image latency from scheduled send to result of ok images, by mode, phase, model, worker",
                 ("mode", "phase", "model", "worker"), self.latency),
            hist("cortexbench_stage_seconds",
                 "Time of each stage of an ok image that went through it (see docs/metrics.md)",
                 ("mode", "phase", "stage"), self.stage),
            counter("cortexbench_images", "Images finished, by mode, phase, model, worker and outcome",
                    ("mode", "phase", "model", "worker", "outcome"), self.images),
            counter("cortexbench_model_loads", "Models loaded onto a worker's device, by mode, phase (setup: "
                    "cached mode's preload) and worker", ("mode", "phase", "worker"), self.model_loads),
            counter("cortexbench_cache_hits", "Images whose model was already resident, by mode, phase, worker",
                    ("mode", "phase", "worker"), self.cache_hits),
            per_worker("cortexbench_inflight", "Images sent to the worker and not yet answered", self.inflight),
            per_worker("cortexbench_device_memory_bytes",
                       "GPU memory held by the worker's process, bytes (GPU workers only)", self.device_memory_bytes),
            per_worker("cortexbench_host_memory_bytes", "Resident host memory (RSS) of the worker's process, bytes",
                       self.host_memory_bytes),
        ]
        info = GaugeMetricFamily("cortexbench_run_info", "The run: id, mode being run, backend (always 1)",
                                 labels=("run_id", "mode", "backend", "host"))
        if self.run_id or self.mode or self.backend:
            info.add_metric([self.run_id, self.mode, self.backend, host], 1)
        progress = GaugeMetricFamily("cortexbench_run_progress_ratio",
                                     "Fraction of the run's images done, 0 to 1, over all modes", labels=("host",))
        if self.progress_ratio is not None:
            progress.add_metric([host], self.progress_ratio)
        mode_progress = GaugeMetricFamily("cortexbench_mode_progress_ratio",
                                          "Fraction of the mode being run's images done, 0 to 1",
                                          labels=("mode", "host"))
        if self.mode_progress_ratio is not None:
            mode_progress.add_metric([self.mode, host], self.mode_progress_ratio)
        phase = GaugeMetricFamily("cortexbench_run_phase", "What the run is doing: 1 for the current phase "
                                  "(preparing, warmup, measuring, done), 0 for the others", labels=("phase", "host"))
        if self.phase:
            for p in RUN_PHASES:
                phase.add_metric([p, host], 1.0 if p == self.phase else 0.0)
        return [*out, info, progress, mode_progress, phase]


def _check_phase(phase: str, valid: Sequence[str]) -> None:
    if phase not in valid:
        raise ValueError(f"unknown phase '{phase}' (valid: {', '.join(valid)})")
