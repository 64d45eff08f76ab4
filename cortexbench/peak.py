"""``--find-peak``: the search of ``peak_search`` run on the stream's workers, one pass (mode) at a time.

``PeakRun`` is a ``coordinator.StreamRun`` whose passes are searches: each step is the base plan at a rate
(the same seeded stream, ``count`` counted images, Poisson arrivals unless ``--arrivals`` says otherwise,
as many calls in flight as a worker runs, so that no image waits in the driver), run through
``StreamRun.run_mode`` on the run's target.  Without ``--rate`` a closed-loop probe (``PROBE_IMAGES``
images, two per worker lane in flight) measures the most the workers take, X images/s, and the search starts
at X / 2.  The pass's figures in results.json are those of the step at the peak; ``peaks`` holds every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cortexbench.coordinator import ModeRun, StreamPlan, StreamRun
from cortexbench.errors import WorkerError
from cortexbench.peak_search import LATE_LIMIT, WINDOWS, Measured, Slo, Step, parse_slo, samples_needed
from cortexbench.peak_search import search as search_peak
from cortexbench.schedule import make_schedule

PROBE_IMAGES = 400


@dataclass
class PeakResult:
    mode: str
    slos: tuple[Slo, ...]
    peak: float | None  # the highest rate met (lo), None when none was
    bracket: tuple[float | None, float | None]  # (lo, hi): met, missed
    converged: bool
    steps: list[Step]
    probe: float | None
    precision: float
    tolerance: float
    late_ms: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.bracket
        return {"mode": self.mode, "slo": [str(s) for s in self.slos], "peak_rate": self.peak,
                "bracket": [lo, hi], "uncertainty": None if lo is None or hi is None else hi / lo - 1,
                "converged": self.converged, "probe_throughput": self.probe, "precision": self.precision,
                "tolerance": self.tolerance, "late_limit": LATE_LIMIT, "late_ms": self.late_ms, "windows": WINDOWS,
                "samples_per_window": samples_needed(self.slos),
                "steps": [s.to_dict() for s in sorted(self.steps, key=lambda s: s.rate)]}


class PeakRun(StreamRun):
    """A StreamRun whose passes search the peak rate; ``modes[m]`` holds the step at the peak (or the
    lowest rate tried when none met the SLOs), ``peaks[m]`` the search."""

    def __init__(self, *args: Any, say: Callable[[str], None] = lambda s: None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.base = self.plan
        self.say = say
        self.peaks: dict[str, PeakResult] = {}
        st = self.plan.cfg.stream
        self.slos = tuple(parse_slo(s) for s in st.slo)

    async def run_passes(self) -> None:
        for mode in self.base.run_modes:
            if self.interrupted or self.error:
                break
            await self.find(mode)

    async def find(self, mode: str) -> None:
        st = self.base.cfg.stream
        probe = None
        start = st.rate
        if start is None:
            m = await self.measure(mode, None, PROBE_IMAGES)
            probe = m.throughput
            if self.interrupted or self.error:
                return
            if not probe > 0:
                raise WorkerError(f"find-peak {mode}: the closed-loop probe measured no throughput")
            start = probe / 2
            self.say(f"find-peak {mode}: closed-loop probe {probe:.4g} images/s; starting at {start:.4g}/s")
        lo, hi, steps = await search_peak(lambda r, n: self.measure(mode, r, n), self.slos, start=start,
                                          precision=st.peak_precision, tolerance=st.peak_tolerance,
                                          stop=lambda: self.interrupted or self.error is not None, say=self.say)
        converged = lo is not None and hi is not None and hi / lo <= 1 + st.peak_precision
        self.peaks[mode] = PeakResult(mode, self.slos, lo, (lo, hi), converged, steps, probe, st.peak_precision,
                                      st.peak_tolerance, st.peak_late_ms)
        keep = [s for s in steps if s.met and s.rate == lo] or sorted(steps, key=lambda s: s.rate)[:1]
        if keep and keep[0].run is not None:
            self.modes[mode] = keep[0].run
        for s in steps:
            s.run = None  # the other steps' ledgers are not kept
        if lo is not None:  # the run's plan (results.json's "run") is the peak's step
            self.plan = self._plan_at(lo, max(1, keep[0].samples))

    def _plan_at(self, rate: float | None, count: int) -> StreamPlan:
        """The base plan at ``rate`` (None: a closed loop of two images per worker lane) with ``count``
        counted images of the same seeded stream."""
        base = self.base
        st = base.cfg.stream
        lanes = max(1, base.workers[0].lanes if base.workers else 1)
        conc = st.concurrency if rate is not None else max(1, 2 * lanes * max(1, len(base.workers)))
        cfg = replace(base.cfg, times=count, stream=replace(st, rate=rate, duration_s=None, concurrency=conc,
                                                            on_demand_images=0))
        sched = make_schedule(count=count, models=base.models, n_images=len(base.images), popularity=st.popularity,
                              weights=st.model_weights, rate=rate, warmup=st.warmup, seed=cfg.seed,
                              arrivals=st.arrivals if rate is not None else "poisson")
        depth = base.depth
        if rate is not None and base.dispatch == "http":
            depth = max(st.concurrency, 1024)  # as plan_http sizes an open loop
        elif rate is not None and base.dispatch != "compiled":
            from cortexbench.cluster import CALLS_PER_WORKER  # a Ray target: cluster is imported already

            depth = CALLS_PER_WORKER
        return replace(base, cfg=cfg, schedule=sched, depth=depth)

    async def measure(self, mode: str, rate: float | None, count: int) -> Measured:
        self.plan = self._plan_at(rate, count)
        await self.run_mode(mode)
        if mode not in self.modes:  # stopped while the workers were set up: nothing was measured
            empty = np.zeros(0)
            return Measured(empty, 0.0, 0, rate or 0.0, 0.0, done_s=empty)
        mr: ModeRun = self.modes.pop(mode)
        led = mr.result.ledger
        warmup = self.plan.schedule.warmup
        item = led.column("item")
        counted = item >= warmup
        ok = counted & (led.column("outcome") == 0) & np.isfinite(led.column("latency_s"))
        order = np.argsort(led.column("scheduled_s")[ok], kind="stable")
        s = mr.summary["summary"]
        sent = counted & np.isfinite(led.column("sent_s"))
        delay = led.column("sent_s")[sent] - led.column("scheduled_s")[sent]
        late = float(np.count_nonzero(delay > self.base.cfg.stream.peak_late_ms / 1e3) / delay.size) if delay.size \
            else 0.0
        return Measured(led.column("latency_s")[ok][order].astype(np.float64), late,
                        int(s["counted_failed"]) + int(s["not_sent"]), rate or 0.0,
                        float(s["throughput_images_per_s"] or 0.0),
                        done_s=led.column("done_s")[ok][order].astype(np.float64), run=mr)
