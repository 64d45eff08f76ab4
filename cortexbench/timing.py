"""The measurement of one point of the single-device sweep: warm-up runs, then timed runs until stable.

One function, ``measure_point``, does it for ``python -m cortexbench.single`` and for
``bench/single_overhead.py`` alike, so that the benchmark of the harness measures the harness itself.

The stopping rule: after ``warmup_runs`` untimed calls, call ``predict`` again and again, timing each call
alone with the clock (``time.perf_counter`` unless a test passes its own); stop as soon as at least
``min_runs`` times are in and the relative half-width of the 95% confidence interval of their mean
(``cortexbench.stats.relative_spread``) is below ``target_rel_spread`` (the point is *stable*), or when
``max_seconds`` have passed since the first timed call (the point is *unstable*, and its spread says by how
much).  Never fewer than ``min_runs`` timed calls, however long they take.

Only the ``predict`` call sits between the two clock readings; for a real model that call includes the
host-to-device copy, the computation, the copy back and the device synchronisation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cortexbench.stats import LatencySummary, relative_spread

Clock = Callable[[], float]

# Below this many timed runs the spread is checked after every run; above it, once the runs have grown by
# about 2%, so that checking stays a small fraction of the work when a point takes millions of runs.
_CHECK_EVERY_RUN_UP_TO = 100


@dataclass(frozen=True)
class TimingPolicy:
    """When to stop timing a point (the ``single.*`` keys of config.json)."""

    warmup_runs: int = 3
    min_runs: int = 5
    max_seconds: float = 10.0
    target_rel_spread: float = 0.02

    def __post_init__(self) -> None:
        if self.warmup_runs < 0 or self.min_runs < 1 or not self.max_seconds > 0 \
                or not 0 < self.target_rel_spread < 1:
            raise ValueError(f"not a timing policy: {self}")

    @classmethod
    def from_config(cls, single: Any) -> TimingPolicy:
        """From a ``cortexbench.config.SingleConfig`` (or anything with the same attributes)."""
        return cls(single.warmup_runs, single.min_runs, single.max_seconds, single.target_rel_spread)


@dataclass(frozen=True)
class PointTiming:
    """The times of one point: ``batch_size`` images per call, ``runs`` timed calls."""

    batch_size: int
    runs: int
    warmup_runs: int
    elapsed_s: float  # wall time of the timed phase (first timed call to last)
    rel_spread: float  # relative half-width of the 95% CI of the mean batch time
    stable: bool  # rel_spread fell below the target before max_seconds
    batch: LatencySummary  # seconds per call (per batch)

    @property
    def mean_batch_s(self) -> float:
        return self.batch.mean_s

    @property
    def mean_image_s(self) -> float:
        """Seconds per image: the mean batch time divided by the batch size."""
        return self.batch.mean_s / self.batch_size

    @property
    def throughput_images_per_s(self) -> float:
        """Images per second: the batch size divided by the mean batch time."""
        return self.batch_size / self.batch.mean_s if self.batch.mean_s > 0 else math.inf

    def latency_s(self, per: str = "batch") -> dict[str, float]:
        """Mean and percentiles in seconds, per 'batch' or per 'image' (per batch / batch size)."""
        scale = 1.0 if per == "batch" else 1.0 / self.batch_size
        b = self.batch
        return {"mean": b.mean_s * scale, "p50": b.p50_s * scale, "p90": b.p90_s * scale,
                "p99": b.p99_s * scale, "min": b.min_s * scale, "max": b.max_s * scale}

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "runs": self.runs,
            "warmup_runs": self.warmup_runs,
            "elapsed_s": self.elapsed_s,
            "rel_spread": self.rel_spread if math.isfinite(self.rel_spread) else None,
            "stable": self.stable,
            "batch_latency_s": self.latency_s("batch"),
            "image_latency_s": self.latency_s("image"),
            "throughput_images_per_s": self.throughput_images_per_s,
        }


def _spread(times: list[float]) -> float:
    if len(times) < 2:
        return math.inf
    s = float(relative_spread(times))
    return s if math.isfinite(s) else math.inf


def measure_point(predict: Callable[[np.ndarray], Any], batch: np.ndarray, policy: TimingPolicy, *,
                  clock: Clock = time.perf_counter) -> PointTiming:
    """Warm up, then time ``predict(batch)`` until the mean is stable or ``policy.max_seconds`` have passed.

    ``clock`` is read just before and just after each timed call and to enforce the time bound; a test can
    pass a fake clock that its fake ``predict`` advances.
    """
    for _ in range(policy.warmup_runs):
        predict(batch)
    times: list[float] = []
    append = times.append
    spread = math.inf
    stable = False
    next_check = policy.min_runs
    start = clock()
    end = start
    while True:
        t0 = clock()
        predict(batch)
        end = clock()
        append(end - t0)
        n = len(times)
        if n < policy.min_runs:
            continue
        if n >= next_check:
            spread = _spread(times)
            if spread < policy.target_rel_spread:
                stable = True
                break
            next_check = n + (1 if n < _CHECK_EVERY_RUN_UP_TO else max(1, n // 50))
        if end - start >= policy.max_seconds:
            break
    if not stable:
        spread = _spread(times)
        stable = spread < policy.target_rel_spread
    return PointTiming(batch_size=len(batch), runs=len(times), warmup_runs=policy.warmup_runs,
                       elapsed_s=end - start, rel_spread=spread, stable=stable, batch=summarise_times(times))


def summarise_times(times_s: list[float] | np.ndarray) -> LatencySummary:
    """Exact mean, percentiles (linear interpolation), min and max of a few raw durations.

    A point has at most a few hundred thousand times, all in memory, so no histogram is needed and the
    figures hold below the microsecond resolution of ``cortexbench.stats.LatencyHistogram``."""
    x = np.asarray(times_s, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no times to summarise")
    p50, p90, p99, p999 = (float(v) for v in np.percentile(x, [50.0, 90.0, 99.0, 99.9]))
    return LatencySummary(count=int(x.size), mean_s=float(x.mean()), p50_s=p50, p90_s=p90, p99_s=p99,
                          p999_s=p999, min_s=float(x.min()), max_s=float(x.max()))
