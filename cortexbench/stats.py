"""Latency statistics: HDR histograms of durations, keyed sets of them, and the small numbers around them.

``LatencyHistogram`` records durations in seconds into an HDR histogram (the ``hdrhistogram`` package) as
integer microseconds from 1 us to 100 s with 3 significant digits, so any percentile is within 0.1% of
the true one whatever the number of samples, in a fixed 150 KB.  Next to it the count, minimum,
maximum and sum are tracked exactly, so the mean, p0 and p100 are exact and no percentile is reported
above the maximum.  Values above 100 s are recorded as 100 s and counted (``clamped_count``).

Histograms merge exactly (merging two is the same as recording both sets), serialise compactly
(``to_bytes``) and pickle through that, so workers in other Ray processes can ship them to the driver.
``HistogramSet`` keys histograms by tuples such as ``(mode, model, worker)`` and rolls them up.

``relative_spread`` is the stopping rule of ``single``: runs continue until the 95% confidence interval
of the mean is narrower than ``single.target_rel_spread`` of the mean.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 100_000_000  # 100 s
SIGNIFICANT_DIGITS = 3
HIGHEST_S = HIGHEST_US / 1e6
MIN_SAMPLES = 300  # p99 needs a few samples above it: 300 leaves 3

_MAGIC = b"CBLH"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBqqddd")  # magic, version, count, clamped, min_s, max_s, sum_s


def _new_hdr() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS, b64_wrap=False)


class _Geometry:
    """Index <-> value tables of the HDR layout, computed once with numpy (the package loops in Python)."""

    def __init__(self) -> None:
        h = _new_hdr()
        self.unit_magnitude = int(h.unit_magnitude)
        self.half_mag = int(h.sub_bucket_half_count_magnitude)
        self.half_count = int(h.sub_bucket_half_count)
        self.mask = int(h.sub_bucket_mask)
        self.counts_len = int(h.counts_len)
        idx = np.arange(self.counts_len, dtype=np.int64)
        bucket = (idx >> self.half_mag) - 1
        sub = (idx & (self.half_count - 1)) + self.half_count
        first = bucket < 0
        sub = np.where(first, sub - self.half_count, sub)
        bucket = np.where(first, 0, bucket)
        self.lowest_us = sub << (bucket + self.unit_magnitude)
        self.highest_us = self.lowest_us + (np.int64(1) << (bucket + self.unit_magnitude)) - 1

    def bucket_floor(self, us: np.ndarray) -> np.ndarray:
        """The lowest value of the HDR bucket of each integer value (same bucket, fewer distinct values)."""
        bits = np.frexp((us | self.mask).astype(np.float64))[1].astype(np.int64)  # bit length, exact < 2**53
        shift = bits - (self.half_mag + 1)  # bucket index + unit magnitude
        return (us >> shift) << shift

    def index_of(self, us: int) -> int:
        bucket = max(0, (us | self.mask).bit_length() - self.unit_magnitude - (self.half_mag + 1))
        sub = us >> (bucket + self.unit_magnitude)
        return ((bucket + 1) << self.half_mag) + sub - self.half_count


_GEOMETRY: _Geometry | None = None


def _geometry() -> _Geometry:
    global _GEOMETRY
    if _GEOMETRY is None:
        _GEOMETRY = _Geometry()
    return _GEOMETRY


@dataclass(frozen=True)
class LatencySummary:
    """The numbers a report shows for one histogram; NaN where there are no samples."""

    count: int
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    p999_s: float
    min_s: float
    max_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LatencyHistogram:
    """Durations in seconds: an HDR histogram (1 us .. 100 s, 3 digits) plus exact count/min/max/sum.

    Not thread-safe: keep one per thread (or per actor) and ``merge`` them.  ``record`` costs about 1.5 us;
    ``record_many`` about 0.15 us per value on batches of 10K or more (about 1 us at 1K), so batch on hot
    paths."""

    __slots__ = ("_clamped", "_count", "_hdr", "_max_s", "_min_s", "_sum_s")

    def __init__(self) -> None:
        self._hdr = _new_hdr()
        self._count = 0
        self._clamped = 0
        self._min_s = math.inf
        self._max_s = -math.inf
        self._sum_s = 0.0

    # --- recording -----------------------------------------------------------------------------

    def record(self, value_s: float) -> None:
        """Record one duration (seconds, finite, 0 or more); about 1.5 us."""
        value_s = float(value_s)  # numpy float32 would round differently from record_many
        if not 0.0 <= value_s < math.inf:
            raise ValueError(f"a duration must be a finite number of seconds >= 0, not {value_s!r}")
        if value_s > HIGHEST_S:
            us = HIGHEST_US
            self._clamped += 1
        else:
            us = int(value_s * 1e6 + 0.5)
        self._hdr.record_value(us)
        self._count += 1
        self._sum_s += value_s
        if value_s < self._min_s:
            self._min_s = value_s
        if value_s > self._max_s:
            self._max_s = value_s

    def record_many(self, values_s: np.ndarray | Sequence[float]) -> None:
        """Record many durations at once: quantised to microseconds and to HDR buckets in numpy, then
        one ``record_value(v, count)`` per distinct bucket (far fewer calls than values)."""
        values = np.asarray(values_s, dtype=np.float64).ravel()
        if values.size == 0:
            return
        lo, hi = float(values.min()), float(values.max())
        if not (lo >= 0.0 and math.isfinite(hi)):
            bad = values[~(np.isfinite(values) & (values >= 0))][0]
            raise ValueError(f"a duration must be a finite number of seconds >= 0, not {float(bad)!r}")
        us = np.floor(values * 1e6 + 0.5)  # the same rounding as record()
        clamped = 0
        if hi > HIGHEST_S:
            over = values > HIGHEST_S
            clamped = int(np.count_nonzero(over))
            us[over] = HIGHEST_US
        buckets = _geometry().bucket_floor(us.astype(np.int64))
        distinct, counts = np.unique(buckets, return_counts=True)
        record_value = self._hdr.record_value
        for v, c in zip(distinct.tolist(), counts.tolist(), strict=True):
            record_value(v, c)
        self._count += int(values.size)
        self._clamped += clamped
        self._sum_s += float(values.sum())
        self._min_s = min(self._min_s, lo)
        self._max_s = max(self._max_s, hi)

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s samples to this histogram (in place); ``other`` is unchanged."""
        if other._count == 0:
            return
        self._hdr.add(other._hdr)
        self._count += other._count
        self._clamped += other._clamped
        self._sum_s += other._sum_s
        self._min_s = min(self._min_s, other._min_s)
        self._max_s = max(self._max_s, other._max_s)

    def copy(self) -> LatencyHistogram:
        out = LatencyHistogram()
        out.merge(self)
        return out

    # --- exact fields --------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._count

    @property
    def clamped_count(self) -> int:
        """How many values were above 100 s and recorded as 100 s (min, max, sum and mean stay exact)."""
        return self._clamped

    @property
    def min_s(self) -> float:
        return self._min_s if self._count else math.nan

    @property
    def max_s(self) -> float:
        return self._max_s if self._count else math.nan

    @property
    def sum_s(self) -> float:
        return self._sum_s

    @property
    def mean_s(self) -> float:
        return self._sum_s / self._count if self._count else math.nan

    # --- percentiles ---------------------------------------------------------------------------

    def _counts(self) -> np.ndarray:
        return np.ctypeslib.as_array(self._hdr.counts)

    def percentiles(self, ps: Sequence[float]) -> list[float]:
        """Several percentiles in one pass; see ``percentile``."""
        for p in ps:
            if not 0.0 <= p <= 100.0:
                raise ValueError(f"a percentile must be between 0 and 100, not {p!r}")
        if self._count == 0:
            return [math.nan] * len(ps)
        geo = _geometry()
        cum = None
        total = int(self._hdr.total_count)
        out = []
        for p in ps:
            if p == 0.0:
                out.append(self._min_s)
                continue
            if p == 100.0:
                out.append(self._max_s)
                continue
            if cum is None:
                cum = np.cumsum(self._counts())
            target = max(1, int(p * total / 100.0 + 0.5))  # HDR's own rank rule
            idx = int(np.searchsorted(cum, target))
            value_s = float(geo.highest_us[idx]) / 1e6
            out.append(min(max(value_s, self._min_s), self._max_s))
        return out

    def percentile(self, p: float) -> float:
        """The value at percentile ``p`` (0..100): HDR's value (the highest value of the bucket holding
        that rank, within 0.1%), clamped into [min_s, max_s]; p0 is min_s and p100 is max_s exactly.
        NaN when empty."""
        return self.percentiles([p])[0]

    def summary(self) -> LatencySummary:
        p50, p90, p99, p999 = self.percentiles([50.0, 90.0, 99.0, 99.9])
        return LatencySummary(self._count, self.mean_s, p50, p90, p99, p999, self.min_s, self.max_s)

    def cumulative_counts(self, bounds_s: Sequence[float]) -> list[int]:
        """For each bound, how many values are <= it (Prometheus 'le' buckets).

        Exact for bounds below the minimum or at/above the maximum; otherwise exact up to HDR's
        resolution: values within 0.1% (or 1 us) above a bound may be counted in its bucket, since the
        whole HDR bucket holding the bound counts as below it (HDR's own convention).  Values above
        100 s (clamped) count only for bounds at or above the maximum."""
        if self._count == 0:
            return [0] * len(bounds_s)
        geo = _geometry()
        cum = np.cumsum(self._counts())
        top = geo.index_of(HIGHEST_US)
        out = []
        for b in bounds_s:
            if b >= self._max_s:
                out.append(self._count)
            elif b < self._min_s:
                out.append(0)
            else:
                idx = geo.index_of(min(int(b * 1e6 + 0.5), HIGHEST_US))
                out.append(int(cum[idx]) - (self._clamped if idx >= top else 0))
        return out

    # --- serialisation -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """A compact form: the exact fields, then HDR's compressed encoding (a few KB at most)."""
        head = _HEADER.pack(_MAGIC, _FORMAT_VERSION, self._count, self._clamped,
                            self._min_s, self._max_s, self._sum_s)
        return head + bytes(self._hdr.encode())

    @classmethod
    def from_bytes(cls, data: bytes) -> LatencyHistogram:
        """The histogram ``to_bytes`` wrote; ValueError if ``data`` is not one."""
        if len(data) < _HEADER.size:
            raise ValueError("not a serialised LatencyHistogram (too short)")
        magic, version, count, clamped, min_s, max_s, sum_s = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _FORMAT_VERSION:
            raise ValueError(f"not a serialised LatencyHistogram (header {magic!r} v{version})")
        out = cls()
        if count:
            try:
                decoded = HdrHistogram.decode(bytes(data[_HEADER.size:]), b64_wrap=False)
            except Exception as e:  # zlib.error and the package's own exception types
                raise ValueError(f"not a serialised LatencyHistogram: {e}") from None
            if (decoded.lowest_trackable_value, decoded.highest_trackable_value, decoded.significant_figures) \
                    != (LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS) or decoded.total_count != count:
                raise ValueError("not a serialised LatencyHistogram (layout or count does not match)")
            out._hdr.add(decoded)
        out._count, out._clamped = count, clamped
        out._min_s, out._max_s, out._sum_s = min_s, max_s, sum_s
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (LatencyHistogram.from_bytes, (self.to_bytes(),))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return (self._count == other._count and self._clamped == other._clamped
                and (self._count == 0 or (self._min_s == other._min_s and self._max_s == other._max_s))
                and math.isclose(self._sum_s, other._sum_s, rel_tol=1e-12, abs_tol=1e-15)
                and np.array_equal(self._counts(), other._counts()))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if not self._count:
            return "LatencyHistogram(count=0)"
        return (f"LatencyHistogram(count={self._count}, mean_s={self.mean_s:.6g}, "
                f"p99_s={self.percentile(99):.6g}, max_s={self._max_s:.6g})")


class HistogramSet:
    """Latency histograms keyed by tuples, e.g. ``(mode, model, worker)``; picklable, mergeable."""

    def __init__(self) -> None:
        self._hists: dict[tuple[Hashable, ...], LatencyHistogram] = {}

    def _at(self, key: tuple[Hashable, ...]) -> LatencyHistogram:
        h = self._hists.get(key)
        if h is None:
            h = self._hists[key] = LatencyHistogram()
        return h

    def record(self, key: tuple[Hashable, ...], value_s: float) -> None:
        self._at(key).record(value_s)

    def record_many(self, key: tuple[Hashable, ...], values_s: np.ndarray | Sequence[float]) -> None:
        self._at(key).record_many(values_s)

    def merge(self, other: HistogramSet) -> None:
        """Add every histogram of ``other`` to the one of the same key here (in place)."""
        for key, h in other._hists.items():
            self._at(key).merge(h)

    def get(self, key: tuple[Hashable, ...]) -> LatencyHistogram | None:
        return self._hists.get(key)

    def keys(self) -> list[tuple[Hashable, ...]]:
        return list(self._hists)

    def items(self) -> list[tuple[tuple[Hashable, ...], LatencyHistogram]]:
        return list(self._hists.items())

    def rollup(self, fn: Callable[[tuple[Hashable, ...]], tuple[Hashable, ...]]) -> HistogramSet:
        """A new set with the histograms merged by ``fn(key)``, e.g. ``lambda k: k[:1]`` for per mode."""
        out = HistogramSet()
        for key, h in self._hists.items():
            out._at(fn(key)).merge(h)
        return out

    def total(self) -> LatencyHistogram:
        """Every histogram merged into one."""
        out = LatencyHistogram()
        for h in self._hists.values():
            out.merge(h)
        return out

    def __len__(self) -> int:
        return len(self._hists)

    def __contains__(self, key: object) -> bool:
        return key in self._hists

    def __iter__(self) -> Iterator[tuple[Hashable, ...]]:
        return iter(self._hists)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_histogram_set_from, ([(k, h.to_bytes()) for k, h in self._hists.items()],))

    def __repr__(self) -> str:
        return f"HistogramSet({len(self._hists)} keys, {sum(h.count for h in self._hists.values())} values)"


def _histogram_set_from(items: list[tuple[tuple[Hashable, ...], bytes]]) -> HistogramSet:
    out = HistogramSet()
    for key, data in items:
        out._hists[key] = LatencyHistogram.from_bytes(data)
    return out


# --- small numbers ----------------------------------------------------------------------------


def enough_samples(count: int, minimum: int = MIN_SAMPLES) -> bool:
    """Whether a tail percentile over ``count`` samples is worth reporting (p99 of 300 leaves 3 above it)."""
    return count >= minimum


def samples_note(count: int, minimum: int = MIN_SAMPLES, statistic: str = "p99") -> str | None:
    """'p99 rests on N samples; at least 300 are needed' for the report, or None when there are enough."""
    if enough_samples(count, minimum):
        return None
    return f"{statistic} rests on {count} sample{'s' if count != 1 else ''}; at least {minimum} are needed"


def rate_per_s(count: float, seconds: float) -> float:
    """``count / seconds``; NaN when no time passed."""
    return count / seconds if seconds > 0 else math.nan


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion around the normal 1.95996, accurate to 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be 1 or more, not {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = 1.959963984540054, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def relative_spread(values: Sequence[float] | np.ndarray) -> float:
    """The relative half-width of the 95% confidence interval of the mean of ``values``:
    ``t(0.975, n-1) * s / sqrt(n) / mean`` with ``s`` the sample standard deviation.

    ``single`` keeps timing runs until this is at most ``single.target_rel_spread`` (e.g. 0.02: the true
    mean is within +-2% of the measured one with 95% confidence, if runs are independent).  Infinite
    for fewer than two values or a mean that is not positive."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        return math.inf
    mean = float(x.mean())
    if not mean > 0:
        return math.inf
    s = float(x.std(ddof=1))
    return t_quantile_975(x.size - 1) * s / math.sqrt(x.size) / mean
