"""The seeded image stream: arrival times, model choices and image ids, replayable for every mode.

``make_schedule`` draws the whole stream up front, so every residency mode (cached, cold, lru:K) replays
exactly the same work: same arguments, same schedule.  Item ``k`` of a schedule is "send image
``image_idx[k]`` to model ``models[model_idx[k]]`` at ``send_at_s[k]`` seconds after the start" (open loop)
or "as soon as a slot is free" (closed loop, ``send_at_s`` is None).

Randomness: one ``PCG64(seed)`` bit generator, split into three independent streams with ``jumped()``:
model choices, image ids, and arrival gaps.  Each stream is read in item order, so a shorter schedule is a
prefix of a longer one with the same seed, and the model sequence does not depend on the rate.

Arrivals (open loop): ``poisson`` (exponential gaps at ``rate``), ``gamma:CV`` (gamma gaps of mean
``1/rate`` and coefficient of variation CV: above 1 bursty, below 1 smoother; ``gamma:1`` is Poisson in
law), or ``trace:FILE`` (a request trace, ``traces.read_trace``, replayed with its times scaled so that its
mean rate is ``rate``, or as recorded without a rate; its models pick each image's model, in trace order).

Warm-up items come first (global items ``0 .. warmup-1``) and are extra: ``len(schedule) == warmup +
counted``.  In the open loop they sit at the start of the timeline; ``duration_s`` bounds the counted
part, which starts at the last warm-up arrival (0 without warm-up).

Sharding (several drivers): ``shard(i, n)`` takes items ``i, i+n, i+2n, ...``, so a Poisson stream split
across shards stays one Poisson process; global item ids and send times are kept.  ``shard_workers``
shares the workers out by node, so that a shard can run on the node of its workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cortexbench.errors import ConfigError, DatasetError, did_you_mean


@dataclass(frozen=True)
class Popularity:
    kind: Literal["uniform", "zipf"]
    s: float = 0.0

    def __str__(self) -> str:
        return f"zipf:{self.s:g}" if self.kind == "zipf" else "uniform"


def parse_popularity(text: str, key: str = "popularity") -> Popularity:
    """'uniform' or 'zipf:S' with S > 0."""
    t = text.strip().lower()
    if t == "uniform":
        return Popularity("uniform")
    if t == "zipf" or t.startswith("zipf:"):  # not 'zipfian' or 'zipf1.1': unknown spellings are refused
        _, _, s = t.partition(":")
        try:
            value = float(s)
        except ValueError:
            value = -1.0
        if value > 0:
            return Popularity("zipf", value)
        raise ConfigError(f"'{key}': '{text}' needs an exponent above 0, as in 'zipf:1.1'")
    raise ConfigError(f"'{key}': unknown popularity '{text}'{did_you_mean(t, ['uniform', 'zipf:1.1'])}")


@dataclass(frozen=True)
class Arrivals:
    """How the open loop's images arrive: see the module docstring."""

    kind: Literal["poisson", "gamma", "trace"]
    cv: float = 1.0  # gamma only
    path: str = ""  # trace only

    def __str__(self) -> str:
        if self.kind == "gamma":
            return f"gamma:{self.cv:g}"
        return f"trace:{self.path}" if self.kind == "trace" else "poisson"


ARRIVALS_CHOICES = "'poisson', 'gamma:CV' (CV > 0, as in 'gamma:2') or 'trace:FILE'"


def parse_arrivals(text: str, key: str = "stream.arrivals") -> Arrivals:
    """'poisson', 'gamma:CV' with CV > 0, or 'trace:FILE' (the file is read by make_schedule)."""
    t = text.strip()
    kind, sep, arg = t.partition(":")
    kind = kind.lower()
    if kind == "poisson" and not sep:
        return Arrivals("poisson")
    if kind == "gamma" and sep:
        try:
            cv = float(arg)
        except ValueError:
            cv = -1.0
        if cv > 0 and math.isfinite(cv):
            return Arrivals("gamma", cv=cv)
        raise ConfigError(f"'{key}': '{text}' needs a coefficient of variation above 0, as in 'gamma:2'")
    if kind == "trace" and sep and arg.strip():
        return Arrivals("trace", path=arg.strip())
    raise ConfigError(f"'{key}': unknown arrivals '{text}': use {ARRIVALS_CHOICES}")


@dataclass(frozen=True, eq=False)
class Schedule:
    """The stream as columns of equal length n (read-only numpy arrays); see the module docstring."""

    models: tuple[str, ...]
    item: np.ndarray  # int64, global index 0..n-1 (kept when sharding)
    model_idx: np.ndarray  # int16 (int32 beyond 32767 models), index into models
    image_idx: np.ndarray  # int32, index into the image list
    send_at_s: np.ndarray | None  # float64 seconds from the start, nondecreasing; None in the closed loop
    warmup: int  # global items 0..warmup-1 are warm-up, not counted
    rate: float | None  # images/s of the open loop; None in the closed loop
    seed: int
    popularity: str  # 'uniform', 'zipf:S', 'weights' or 'trace'
    arrivals: str = "poisson"  # 'poisson', 'gamma:CV' or 'trace:FILE' (open loop)

    def __post_init__(self) -> None:
        n = len(self.item)
        cols = [self.model_idx, self.image_idx] + ([self.send_at_s] if self.send_at_s is not None else [])
        if any(len(c) != n for c in cols):
            raise ValueError("Schedule: item, model_idx, image_idx and send_at_s must have the same length")
        for c in [self.item, *cols]:
            c.setflags(write=False)

    def __len__(self) -> int:
        return len(self.item)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        same_times = (self.send_at_s is None and other.send_at_s is None) or (
            self.send_at_s is not None and other.send_at_s is not None
            and np.array_equal(self.send_at_s, other.send_at_s))
        return (self.models == other.models and self.warmup == other.warmup and self.rate == other.rate
                and self.seed == other.seed and self.popularity == other.popularity and same_times
                and self.arrivals == other.arrivals
                and np.array_equal(self.item, other.item) and np.array_equal(self.model_idx, other.model_idx)
                and np.array_equal(self.image_idx, other.image_idx))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        loop = f"open loop at {self.rate:g}/s" if self.rate is not None else "closed loop"
        if self.rate is not None and self.arrivals != "poisson":
            loop += f" ({self.arrivals})"
        return (f"Schedule({len(self)} items, warmup={self.warmup}, {len(self.models)} models, {loop}, "
                f"popularity={self.popularity}, seed={self.seed})")

    @property
    def open_loop(self) -> bool:
        return self.send_at_s is not None

    def is_warmup(self, item: Any) -> Any:
        """True where a global item id (scalar or array) is a warm-up item."""
        return np.asarray(item) < self.warmup

    def counted(self) -> int:
        """How many items of this schedule (or shard) are measured, i.e. not warm-up."""
        return int(np.count_nonzero(self.item >= self.warmup))

    def duration_s(self) -> float | None:
        """Send time of the last item (open loop), None in the closed loop."""
        if self.send_at_s is None:
            return None
        return float(self.send_at_s[-1]) if len(self.send_at_s) else 0.0

    def head(self, counted: int) -> Schedule:
        """The warm-up and the first ``counted`` counted items: the same stream, shorter (for the modes
        whose images are slow, see ``stream.on_demand_images``)."""
        n = min(len(self), self.warmup + max(0, counted))
        if n == len(self):
            return self
        return Schedule(
            models=self.models, item=self.item[:n], model_idx=self.model_idx[:n], image_idx=self.image_idx[:n],
            send_at_s=None if self.send_at_s is None else self.send_at_s[:n], warmup=self.warmup,
            rate=self.rate, seed=self.seed, popularity=self.popularity, arrivals=self.arrivals)

    def shard(self, i: int, n_shards: int) -> Schedule:
        """Items i, i+n_shards, ...: one of ``n_shards`` interleaved parts with global ids and times kept."""
        if n_shards < 1 or not 0 <= i < n_shards:
            raise ValueError(f"shard {i} of {n_shards}: need 0 <= i < n_shards")
        sl = slice(i, None, n_shards)
        return Schedule(
            models=self.models, item=self.item[sl], model_idx=self.model_idx[sl], image_idx=self.image_idx[sl],
            send_at_s=None if self.send_at_s is None else self.send_at_s[sl], warmup=self.warmup,
            rate=self.rate, seed=self.seed, popularity=self.popularity, arrivals=self.arrivals)


def shard_workers(nodes: Sequence[str], n_shards: int) -> list[tuple[tuple[int, ...], str]]:
    """Share workers out over ``n_shards`` driver shards so that each shard's workers sit together:
    ``nodes[w]`` is worker w's node; workers are ordered by node (nodes in order of first appearance),
    and shard i takes the i-th contiguous run, sizes differing by one at most.  Returns, per shard, its
    worker indices and the node most of them are on (where the shard should run)."""
    if n_shards < 1 or n_shards > len(nodes):
        raise ValueError(f"{n_shards} driver shards for {len(nodes)} workers: need 1 to {len(nodes)}")
    rank = {node: k for k, node in enumerate(dict.fromkeys(nodes))}
    order = sorted(range(len(nodes)), key=lambda w: (rank[nodes[w]], w))
    base, extra = divmod(len(order), n_shards)
    out, start = [], 0
    for i in range(n_shards):
        ids = tuple(sorted(order[start:start + base + (1 if i < extra else 0)]))
        start += len(ids)
        counts: dict[str, int] = {}
        for w in ids:
            counts[nodes[w]] = counts.get(nodes[w], 0) + 1
        out.append((ids, max(counts, key=lambda node: (counts[node], -rank[node]))))
    return out


def _weights(n_models: int, popularity: Popularity | str, weights: Sequence[float]) -> tuple[np.ndarray, str]:
    """Normalised probabilities of each model, and the popularity's name for the record."""
    pop = parse_popularity(popularity) if isinstance(popularity, str) else popularity
    if len(weights):
        if pop.kind != "uniform":
            raise ConfigError(f"'stream.model_weights' and 'stream.popularity' = '{pop}' both set: give one of them")
        if len(weights) != n_models:
            raise ConfigError(f"'stream.model_weights' has {len(weights)} weights for {n_models} models: "
                              "give one weight per model, in the order of 'models'")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ConfigError("'stream.model_weights' must be 0 or more each, with at least one above 0")
        return w / w.sum(), "weights"
    if pop.kind == "zipf":
        w = 1.0 / np.arange(1, n_models + 1, dtype=np.float64) ** pop.s
        return w / w.sum(), str(pop)
    return np.full(n_models, 1.0 / n_models), "uniform"


def _choose(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    """n model indices drawn with probabilities p (inverse CDF; zero-weight models are never drawn)."""
    dtype = np.int16 if len(p) <= np.iinfo(np.int16).max else np.int32
    if len(p) == 1:
        return np.zeros(n, dtype=dtype)
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, len(p) - 1).astype(dtype)


Gaps = Callable[[np.random.Generator, int], np.ndarray]


def gamma_gaps(rate: float, cv: float) -> Gaps:
    """Gamma inter-arrival gaps of mean 1/rate and coefficient of variation cv (shape 1/cv^2)."""
    k = 1.0 / (cv * cv)
    return lambda rng, n: rng.standard_gamma(k, n) / (k * rate)


def _arrivals(rng: np.random.Generator, rate: float, n_max: int, warmup: int, duration_s: float | None,
              gaps_of: Gaps | None = None) -> np.ndarray:
    """Arrival times from 0 (Poisson, or the gaps ``gaps_of`` draws): up to n_max, cut ``duration_s`` after
    the last warm-up arrival."""
    draw: Gaps = gaps_of or (lambda g, n: g.standard_exponential(n) / rate)
    if duration_s is None:
        gaps = draw(rng, n_max)
        return np.concatenate(([0.0], np.cumsum(gaps[:-1]))) if n_max else np.zeros(0)
    # Draw in chunks (the stream is read in order and every gap is used, so chunking does not change the
    # values: the times are those of the uncut stream above).
    expected = warmup + rate * duration_s
    chunk = min(n_max, int(expected + 6 * math.sqrt(expected) + 64))
    times = np.zeros(1)  # the first arrival, at 0
    last = 0.0
    while len(times) < n_max:
        k = min(chunk, n_max - len(times))
        gaps = draw(rng, k)
        times = np.concatenate((times, last + np.cumsum(gaps)))
        last = float(times[-1])
        if len(times) > warmup:
            end = (times[warmup - 1] if warmup else 0.0) + duration_s
            if last >= end:
                cut = int(np.searchsorted(times, end, side="left"))
                return times[:max(cut, warmup)]
    return times


def make_schedule(*, count: int, models: Sequence[str], n_images: int, popularity: Popularity | str = "uniform",
                  weights: Sequence[float] = (), rate: float | None = None, duration_s: float | None = None,
                  warmup: int = 0, seed: int = 0, arrivals: Arrivals | str = "poisson") -> Schedule:
    """The seeded stream of ``warmup + count`` items (fewer in the open loop when ``duration_s`` ends it).

    ``popularity`` is 'uniform' or 'zipf:S' (P(rank k) proportional to 1/k^S, ranks in the order ``models``
    are given); ``weights`` (one per model) replaces it.  ``rate`` (images/s) makes an open loop of Poisson
    arrivals; without it the loop is closed (``send_at_s`` is None, and a ``duration_s`` is the driver's to
    enforce).  Same arguments give an identical schedule.
    """
    models = tuple(models)
    if not models:
        raise ConfigError("'models' is empty: name at least one model to send images to")
    if count < 1:
        raise ConfigError(f"'times' must be 1 or more images, not {count}")
    if warmup < 0:
        raise ConfigError(f"'stream.warmup' must be 0 or more, not {warmup}")
    if n_images < 1:
        raise DatasetError("no images to send: the image set is empty (check 'img_dir')")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        raise ConfigError(f"'stream.rate' must be more than 0 images/s, not {rate}")
    if duration_s is not None and not duration_s > 0:
        raise ConfigError(f"'stream.duration_s' must be more than 0 seconds, not {duration_s}")
    arr = parse_arrivals(arrivals) if isinstance(arrivals, str) else arrivals
    if arr.kind == "trace":
        return _replay(arr, models=models, count=count, n_images=n_images, popularity=popularity, weights=weights,
                       rate=rate, duration_s=duration_s, warmup=warmup, seed=seed)
    if arr.kind == "gamma" and rate is None:
        raise ConfigError(f"'stream.arrivals' {arr} shapes the open loop: give 'stream.rate' (--rate) too")
    p, pop_name = _weights(len(models), popularity, weights)

    bits = np.random.PCG64(seed)
    rng_model = np.random.Generator(bits)
    rng_image = np.random.Generator(bits.jumped(1))
    rng_time = np.random.Generator(bits.jumped(2))
    n = warmup + count
    send_at = None
    if rate is not None:
        gaps = gamma_gaps(float(rate), arr.cv) if arr.kind == "gamma" else None
        send_at = _arrivals(rng_time, float(rate), n, warmup, duration_s, gaps)
        n = len(send_at)
    model_idx = _choose(rng_model, p, n)
    image_idx = rng_image.integers(0, n_images, n, dtype=np.int64).astype(np.int32)
    return Schedule(models=models, item=np.arange(n, dtype=np.int64), model_idx=model_idx, image_idx=image_idx,
                    send_at_s=send_at, warmup=warmup, rate=None if rate is None else float(rate),
                    seed=seed, popularity=pop_name, arrivals=str(arr))


def _replay(arr: Arrivals, *, models: tuple[str, ...], count: int, n_images: int, popularity: Popularity | str,
            weights: Sequence[float], rate: float | None, duration_s: float | None, warmup: int,
            seed: int) -> Schedule:
    """The schedule of a trace: its first ``warmup + count`` requests (fewer when the trace or the duration
    ends first), times scaled by (trace rate / ``rate``), each request's model from the trace; the image ids
    are seeded as in every schedule."""
    from cortexbench.traces import read_trace

    if len(weights) or (parse_popularity(popularity) if isinstance(popularity, str) else popularity).kind != "uniform":
        raise ConfigError(f"'stream.arrivals' {arr}: the trace picks each image's model; leave out "
                          "'stream.popularity' and 'stream.model_weights'")
    trace = read_trace(arr.path)
    index = {m: i for i, m in enumerate(models)}
    unknown = sorted(set(trace.model) - set(index))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConfigError(f"'stream.arrivals' {arr}: the trace names models not in 'models': {shown}")
    times = trace.time_s
    own = trace.rate
    if rate is not None and own is not None:
        times = times * (own / rate)
    n = min(len(trace), warmup + count)
    if n <= warmup:
        raise ConfigError(f"'stream.arrivals' {arr}: the trace has {len(trace)} requests, none left to count after "
                          f"the {warmup} warm-up images ('stream.warmup')")
    times = times[:n]
    if duration_s is not None and n > warmup:
        end = (times[warmup - 1] if warmup else 0.0) + duration_s
        n = max(warmup, int(np.searchsorted(times, end, side="left")))
        times = times[:n]
    dtype = np.int16 if len(models) <= np.iinfo(np.int16).max else np.int32
    model_idx = np.fromiter((index[m] for m in trace.model[:n]), dtype=dtype, count=n)
    rng_image = np.random.Generator(np.random.PCG64(seed).jumped(1))
    image_idx = rng_image.integers(0, n_images, n, dtype=np.int64).astype(np.int32)
    return Schedule(models=models, item=np.arange(n, dtype=np.int64), model_idx=model_idx, image_idx=image_idx,
                    send_at_s=np.ascontiguousarray(times, dtype=np.float64), warmup=warmup,
                    rate=float(rate) if rate is not None else own, seed=seed, popularity="trace", arrivals=str(arr))


def model_shares(schedule: Schedule) -> dict[str, float]:
    """Fraction of the counted (non-warm-up) items that go to each model, for every model of the schedule."""
    counted = schedule.model_idx[schedule.item >= schedule.warmup]
    counts = np.bincount(counted, minlength=len(schedule.models))
    total = int(counts.sum())
    return {m: (int(c) / total if total else 0.0) for m, c in zip(schedule.models, counts.tolist(), strict=True)}
