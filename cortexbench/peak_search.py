"""The peak search of ``--find-peak``, on plain data: SLOs, the verdict of one step, bracket and bisection.

For each pass (mode) of the run, ``peak.PeakRun`` starts at ``--rate`` if given, else at half of what a
short closed-loop probe measured, and calls ``search``:

1. **Bracket**: the rate doubles after a step that meets the SLOs, halves after one that does not, until a
   met rate (lo) and a missed one (hi) are known.
2. **Bisect** on a log scale (the geometric mean of lo and hi) until hi / lo <= 1 + ``stream.peak_precision``.
   The peak is lo; its uncertainty is the bracket [lo, hi].

A **step** (``measure_step``) runs ``windows`` x N counted images (warm-up first) of the same seeded stream
at the rate: N is what the strictest SLO needs per window (``samples_needed``: 5 / (1 - q) for the q-th
percentile, so 500 for p99; ``MEAN_SAMPLES`` for the mean; ``MIN_WINDOW`` at least).  Its counted
latencies, in scheduled order, are cut into ``windows`` windows of equal count; the step is **stable** when
each window's median latency and throughput lie within ``stream.peak_tolerance`` of the windows' median
(perf_analyzer's rule: consecutive windows agree, on latency and throughput; a queue that does not settle
drifts in its median too).  The median, not the mean or a tail percentile, because it is the statistic that
is steady when the system is: a window's p99 of a queue at high load, or its mean on a shared machine whose
other work stalls a few images for 100 ms, varies from window to window even when nothing drifts.  The SLO
statistics themselves are judged over the whole step, on all its samples.  A step with too few samples in a window, or
unstable, is run again with twice the images (``MAX_ATTEMPTS`` runs at most); still unstable, it counts as
missed (the latency drifts: the queue does not settle).  A step whose every window already misses an SLO
by more than the tolerance is missed at once (running it longer cannot help).  A stable step **meets** the
SLOs when each SLO statistic over the whole step is at or below its limit, no counted image failed or went
unsent, and at most ``LATE_LIMIT`` of its images were sent late: more than ``stream.peak_late_ms`` (1 ms,
as the report counts them) after their scheduled time.

Plain Python and numpy (``config`` checks the keys with ``check_peak_config``).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cortexbench.errors import ConfigError

LATE_LIMIT = 0.01  # at most this share of a step's images sent late (stream.peak_late_ms)
MEAN_SAMPLES = 200  # per window, for an SLO on the mean
MIN_WINDOW = 100  # per window, whatever the SLO
WINDOWS = 3
MAX_ATTEMPTS = 3  # runs of one step: N, 2N, 4N images
MAX_STEPS = 24  # steps of one search (probe excluded)
FLOOR_RATE = 0.1  # images/s: below this the search gives up (nothing meets the SLO)
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class Slo:
    """A latency objective: ``stat`` ('mean' or 'pQ', 0 < Q < 100) at or below ``limit_s``."""

    stat: str
    limit_s: float

    @property
    def q(self) -> float | None:
        """The percentile (99.0 for p99), None for the mean."""
        return None if self.stat == "mean" else float(self.stat[1:])

    def __str__(self) -> str:
        return f"{self.stat}={self.limit_s * 1e3:g}ms"


def parse_slo(text: str, key: str = "stream.slo") -> Slo:
    """'p99=20ms', 'p50=5ms', 'mean=8ms', 'p99.9=0.1s' (units us, ms, s)."""
    t = text.strip().lower().replace(" ", "")
    stat, sep, limit = t.partition("=")
    unit = next((u for u in ("us", "ms", "s") if limit.endswith(u)), "")
    try:
        value = float(limit[:len(limit) - len(unit)]) * UNITS[unit] if unit else math.nan
    except ValueError:
        value = math.nan
    q_ok = stat.startswith("p") and _float(stat[1:]) is not None and 0 < (_float(stat[1:]) or 0) < 100
    if not sep or not (stat == "mean" or q_ok) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"'{key}': '{text}' is not an SLO: use STAT=LIMIT with STAT mean or pQ (0 < Q < 100) "
                          "and LIMIT above 0 in us, ms or s, as in 'p99=20ms'")
    return Slo("mean" if stat == "mean" else f"p{_float(stat[1:]):g}", value)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def samples_needed(slos: Sequence[Slo]) -> int:
    """Counted images one window needs for the strictest SLO: 5 above the percentile (500 for p99)."""
    need = MIN_WINDOW
    for s in slos:
        need = max(need, MEAN_SAMPLES if s.q is None else math.ceil(5 / (1 - s.q / 100) - 1e-9))
    return need


def _stat(lat: np.ndarray, stat: str) -> float:
    if not len(lat):
        return math.nan
    return float(lat.mean()) if stat == "mean" else float(np.percentile(lat, float(stat[1:])))


@dataclass
class Measured:
    """What one run of a step gives the search: counted ok latencies in scheduled order (and their done
    times, for each window's throughput), the share sent late, the counted images that failed or went unsent,
    the offered rate and the throughput."""

    latency_s: np.ndarray
    late_share: float
    failed: int
    rate: float
    throughput: float
    done_s: np.ndarray | None = None
    run: Any = None  # the ModeRun it came from (kept for the peak's report), if any


def _throughput(done: np.ndarray) -> float:
    """Images per second of one window: its images over the span of their done times."""
    span = float(done.max() - done.min()) if len(done) > 1 else 0.0
    return (len(done) - 1) / span if span > 0 else math.nan


@dataclass
class Step:
    """One rate of the search: its verdict and figures (seconds)."""

    rate: float
    verdict: str  # 'met', 'missed', 'unstable', 'few'
    why: str
    attempts: int
    samples: int
    late_share: float
    throughput: float
    stats: dict[str, float]  # mean, p50, p90, p99 and each SLO's statistic over the whole step
    windows: list[dict[str, float]]
    spread: float  # the largest relative distance of a window's statistic from the windows' median
    run: Any = field(default=None, repr=False)

    @property
    def met(self) -> bool:
        return self.verdict == "met"

    def to_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "verdict": self.verdict, "why": self.why, "attempts": self.attempts,
                "samples": self.samples, "late_share": self.late_share, "throughput": self.throughput,
                "stats_s": self.stats, "windows_s": self.windows, "spread": self.spread}


def judge(m: Measured, slos: Sequence[Slo], windows: int, need: int, tolerance: float) -> Step:
    """The verdict of one run of a step (see the module docstring)."""
    lat = m.latency_s
    stats_names = list(dict.fromkeys(["mean", "p50", "p90", "p99", *(s.stat for s in slos)]))
    whole = {k: _stat(lat, k) for k in stats_names}
    per_window = list(dict.fromkeys(["p50", "mean", *(s.stat for s in slos)]))
    parts = np.array_split(lat, windows) if len(lat) else [lat] * windows
    wins = [{k: _stat(p, k) for k in per_window} | {"samples": float(len(p))} for p in parts]
    checked = ["p50"]  # the windows must agree on the median latency and the throughput (see the docstring)
    if m.done_s is not None and len(m.done_s) == len(lat) and len(lat):
        for w, d in zip(wins, np.array_split(m.done_s, windows), strict=True):
            w["throughput"] = _throughput(d)
        checked.append("throughput")
    spread = 0.0
    for k in checked:
        vals = np.array([w[k] for w in wins])
        med = float(np.median(vals))
        spread = max(spread, float(np.max(np.abs(vals - med)) / med) if med > 0 and np.all(np.isfinite(vals))
                     else math.inf)
    base = dict(rate=m.rate, samples=len(lat), late_share=m.late_share, throughput=m.throughput, stats=whole,
                windows=wins, spread=spread, attempts=1, run=m.run)
    if min(len(p) for p in parts) < need:
        return Step(verdict="few", why=f"{min(len(p) for p in parts)} samples in a window, {need} needed", **base)
    over = [s for s in slos if all(w[s.stat] > s.limit_s * (1 + tolerance) for w in wins)]
    if over:
        return Step(verdict="missed", why=f"{over[0]} missed in every window", **base)
    if spread > tolerance:
        return Step(verdict="unstable", why=f"windows differ by {spread:.0%} (tolerance {tolerance:.0%})", **base)
    missed = [s for s in slos if whole[s.stat] > s.limit_s]
    if missed:
        s = missed[0]
        return Step(verdict="missed", why=f"{s.stat} {whole[s.stat] * 1e3:.3g} ms > {s.limit_s * 1e3:g} ms", **base)
    if m.failed:
        return Step(verdict="missed", why=f"{m.failed} images failed", **base)
    if m.late_share > LATE_LIMIT:
        return Step(verdict="missed", why=f"{m.late_share:.1%} sent late (limit {LATE_LIMIT:.0%})", **base)
    return Step(verdict="met", why="every SLO met, windows agree", **base)


Measure = Callable[[float, int], Awaitable[Measured]]


async def measure_step(measure: Measure, rate: float, slos: Sequence[Slo], *, tolerance: float,
                       windows: int = WINDOWS, say: Callable[[str], None] = lambda s: None,
                       stop: Callable[[], bool] = lambda: False) -> Step:
    """Run one rate until its windows agree (twice the images each time, ``MAX_ATTEMPTS`` runs at most)."""
    need = samples_needed(slos)
    count = windows * need
    step: Step | None = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        step = judge(await measure(rate, count), slos, windows, need, tolerance)
        step.attempts = attempt
        say(f"find-peak: {rate:.4g}/s, {count} images: {step.verdict} ({step.why}); "
            + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in step.stats.items()))
        if step.verdict not in ("few", "unstable") or stop():
            return step
        count *= 2
    assert step is not None
    if step.verdict == "unstable":
        step.verdict, step.why = "missed", f"unstable after {MAX_ATTEMPTS} runs: {step.why}"
    return step


async def search(measure: Measure, slos: Sequence[Slo], *, start: float, precision: float, tolerance: float,
                 windows: int = WINDOWS, max_steps: int = MAX_STEPS, stop: Callable[[], bool] = lambda: False,
                 say: Callable[[str], None] = lambda s: None) -> tuple[float | None, float | None, list[Step]]:
    """Bracket, then bisect on a log scale: (lo, hi, steps), lo the highest rate met, hi the lowest missed."""
    lo: float | None = None
    hi: float | None = None
    steps: list[Step] = []
    rate = start
    while len(steps) < max_steps and not stop():
        step = await measure_step(measure, rate, slos, tolerance=tolerance, windows=windows, say=say, stop=stop)
        if stop():  # stopped (Ctrl-C, every worker gone) during the step: it is not a verdict
            break
        steps.append(step)
        if step.met:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if lo is not None and hi is not None:
            if hi / lo <= 1 + precision or hi <= lo:
                break
            rate = math.sqrt(lo * hi)
        elif lo is None:
            rate /= 2
            if rate < FLOOR_RATE:
                break
        else:
            rate *= 2
    return lo, hi, steps


def check_peak_config(st: Any) -> None:
    """The find-peak keys, checked with the rest of the config (one line each)."""
    for text in st.slo:
        parse_slo(text)
    if st.find_peak and not st.slo:
        raise ConfigError("'stream.find_peak' needs at least one SLO: add --slo p99=20ms (or mean=..., p50=...)")
    if st.slo and not st.find_peak:
        raise ConfigError("'stream.slo' applies to the peak search: add --find-peak")
    if st.find_peak and st.duration_s is not None:
        raise ConfigError("'stream.find_peak' sizes each step by its samples: leave out --duration")
    if not 0 < st.peak_precision < 1:
        raise ConfigError(f"'stream.peak_precision' must be between 0 and 1, not {st.peak_precision}")
    if not st.peak_late_ms > 0:
        raise ConfigError(f"'stream.peak_late_ms' must be more than 0, not {st.peak_late_ms}")
    if not 0 < st.peak_tolerance < 1:
        raise ConfigError(f"'stream.peak_tolerance' must be between 0 and 1, not {st.peak_tolerance}")
