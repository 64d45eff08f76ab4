"""The peak search on plain data: SLO parsing, a step's verdict (samples, stability, SLOs, late sends), and the
bracket-then-bisect search against a simulated M/D/1 queue (the seeded arrivals through one server of fixed
service time S, by Lindley's recursion), whose peak under a mean SLO the formula gives."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from cortexbench.errors import ConfigError
from cortexbench.peak_search import (
    LATE_LIMIT,
    MAX_ATTEMPTS,
    Measured,
    Slo,
    judge,
    measure_step,
    parse_slo,
    samples_needed,
    search,
)
from cortexbench.report import peak_report
from cortexbench.schedule import make_schedule

S = 0.01


def md1_mean(rate: float, s: float = S) -> float:
    """W = S + rho S / (2 (1 - rho))."""
    rho = rate * s
    return s + rho * s / (2 * (1 - rho))


def md1_rate_for(mean_s: float, s: float = S) -> float:
    """The rate at which the M/D/1 mean latency is ``mean_s``: rho / (1 - rho) = 2 (W - S) / S."""
    x = 2 * (mean_s - s) / s
    return x / (1 + x) / s


def lindley(times: np.ndarray, s: float) -> np.ndarray:
    out = np.empty(len(times))
    free = -math.inf
    for i, a in enumerate(times):
        free = max(a, free) + s
        out[i] = free - a
    return out


class SimulatedMD1:
    """A measure function: the seeded Poisson arrivals at the rate through one server of service time S."""

    def __init__(self, s: float = S, late_share: float = 0.0) -> None:
        self.s = s
        self.late_share = late_share
        self.calls: list[tuple[float, int]] = []

    async def __call__(self, rate: float, count: int) -> Measured:
        self.calls.append((rate, count))
        sched = make_schedule(count=count, models=("null",), n_images=1, rate=rate, warmup=50, seed=0)
        times = np.asarray(sched.send_at_s)
        lat = lindley(times, self.s)[50:]
        return Measured(lat, self.late_share, 0, rate, min(rate, 1 / self.s), done_s=times[50:] + lat)


def test_parse_slo_and_its_one_line_errors():
    assert parse_slo("p99=20ms") == Slo("p99", 0.02) and parse_slo("P50 = 5000us") == Slo("p50", 0.005)
    assert parse_slo("mean=0.1s") == Slo("mean", 0.1) and parse_slo("p99.9=30ms").q == 99.9
    assert str(parse_slo("p99=20ms")) == "p99=20ms" and parse_slo("mean=1ms").q is None
    for bad in ("p99", "p99=20", "p100=1ms", "p0=1ms", "max=1ms", "p99=-1ms", "p99=0ms", "pxx=1ms", "p99=ams"):
        with pytest.raises(ConfigError, match=rf"^'stream.slo': '{re_escape(bad)}' is not an SLO: use STAT=LIMIT "
                                              r"with STAT mean or pQ \(0 < Q < 100\) and LIMIT above 0 in us, ms or s"):
            parse_slo(bad)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_samples_needed_per_window_follow_the_strictest_percentile():
    assert samples_needed([parse_slo("p99=1ms")]) == 500
    assert samples_needed([parse_slo("p50=1ms")]) == 100  # never below MIN_WINDOW
    assert samples_needed([parse_slo("mean=1ms")]) == 200
    assert samples_needed([parse_slo("p50=1ms"), parse_slo("p99.9=1ms")]) == 5000


def test_a_step_is_judged_on_samples_stability_the_slos_and_late_sends():
    slos = [parse_slo("p99=20ms"), parse_slo("mean=10ms")]
    steady = np.full(1500, 0.005)
    ok = judge(Measured(steady, 0.0, 0, 100.0, 100.0), slos, 3, 500, 0.2)
    assert ok.verdict == "met" and ok.spread == 0.0 and len(ok.windows) == 3 and ok.stats["p99"] == 0.005
    assert judge(Measured(steady[:1400], 0.0, 0, 100.0, 100.0), slos, 3, 500, 0.2).verdict == "few"
    late = judge(Measured(steady, LATE_LIMIT + 0.001, 0, 100.0, 100.0), slos, 3, 500, 0.2)
    assert late.verdict == "missed" and "sent late" in late.why
    failed = judge(Measured(steady, 0.0, 3, 100.0, 100.0), slos, 3, 500, 0.2)
    assert failed.verdict == "missed" and "3 images failed" in failed.why
    drifting = np.concatenate([np.full(500, 0.004), np.full(500, 0.006), np.full(500, 0.008)])
    unstable = judge(Measured(drifting, 0.0, 0, 100.0, 100.0), slos, 3, 500, 0.2)
    assert unstable.verdict == "unstable" and unstable.spread == pytest.approx(1 / 3)
    over = judge(Measured(np.full(1500, 0.05), 0.0, 0, 100.0, 100.0), slos, 3, 500, 0.2)
    assert over.verdict == "missed" and "in every window" in over.why
    just_over = judge(Measured(np.full(1500, 0.0201), 0.0, 0, 100.0, 100.0), slos[:1], 3, 500, 0.2)
    assert just_over.verdict == "missed" and just_over.why.startswith("p99 20.1 ms > 20 ms")


def test_an_unsettled_step_runs_again_with_twice_the_images_then_counts_as_missed():
    calls = []

    async def growing(rate: float, count: int) -> Measured:  # a queue that never settles
        calls.append(count)
        return Measured(np.linspace(0.001, 0.01, count), 0.0, 0, rate, rate)

    step = asyncio.run(measure_step(growing, 50.0, [parse_slo("mean=20ms")], tolerance=0.2))
    assert calls == [600, 1200, 2400] and len(calls) == MAX_ATTEMPTS
    assert step.verdict == "missed" and step.why.startswith("unstable after 3 runs") and step.attempts == 3
    calls.clear()

    async def short(rate: float, count: int) -> Measured:  # too few samples until the third run
        calls.append(count)
        return Measured(np.full(count // 4 if count < 2400 else count, 0.001), 0.0, 0, rate, rate)

    step = asyncio.run(measure_step(short, 50.0, [parse_slo("mean=20ms")], tolerance=0.2))
    assert calls == [600, 1200, 2400] and step.verdict == "met"


@pytest.mark.parametrize("slo_ms", [15.0, 30.0])
def test_the_search_finds_the_md1_rate_of_a_mean_slo(slo_ms):
    """The simulated M/D/1 queue: the formula's rate for the SLO lies inside the final bracket widened by the
    stated 10% (the seeded sample path's mean is not the formula's exactly), and the bracket is narrow."""
    sim = SimulatedMD1()
    lo, hi, steps = asyncio.run(search(sim, [parse_slo(f"mean={slo_ms:g}ms")], start=20.0, precision=0.05,
                                       tolerance=0.25))
    want = md1_rate_for(slo_ms / 1e3)
    assert lo is not None and hi is not None and hi / lo <= 1.05
    assert lo * 0.9 <= want <= hi * 1.1, (lo, hi, want)
    met = [s.rate for s in steps if s.met]
    assert max(met) == lo and min(s.rate for s in steps if not s.met) == hi
    assert steps[0].rate == 20.0 and steps[1].rate == 40.0  # bracketing doubles from the start


def test_the_search_halves_down_and_gives_up_at_the_floor():
    sim = SimulatedMD1(late_share=0.5)  # every step sends half its images late: nothing can be met
    lo, hi, steps = asyncio.run(search(sim, [parse_slo("mean=1s")], start=1.0, precision=0.05, tolerance=0.25))
    assert lo is None and hi == pytest.approx(0.125) and [s.rate for s in steps] == [1.0, 0.5, 0.25, 0.125]
    stopped = asyncio.run(search(SimulatedMD1(), [parse_slo("mean=1s")], start=10.0, precision=0.05,
                                 tolerance=0.25, stop=lambda: True))
    assert stopped == (None, None, [])
    flag: list[bool] = []

    async def stopped_during(rate: float, count: int) -> Measured:  # Ctrl-C while the first step runs
        flag.append(True)
        return Measured(np.zeros(0), 0.0, 0, rate, 0.0)

    assert asyncio.run(search(stopped_during, [parse_slo("mean=1s")], start=10.0, precision=0.05, tolerance=0.25,
                              stop=lambda: bool(flag))) == (None, None, [])
    assert flag == [True]  # not run again longer: a stopped step is no verdict


def test_the_report_tables_and_plot_of_a_search(tmp_path):
    from cortexbench.peak import PeakResult

    sim = SimulatedMD1()
    slos = (parse_slo("mean=30ms"), parse_slo("p99=80ms"))
    lo, hi, steps = asyncio.run(search(sim, slos, start=20.0, precision=0.05, tolerance=0.25))
    res = PeakResult("cached", slos, lo, (lo, hi), True, steps, None, 0.05, 0.25).to_dict()
    assert res["peak_rate"] == lo and res["uncertainty"] == pytest.approx(hi / lo - 1)
    assert [s["rate"] for s in res["steps"]] == sorted(s.rate for s in steps)
    md = peak_report.render_markdown({"cached": res})
    assert "## Peak rate under the SLOs" in md and "| offered |" in md and "rate_latency.png" in md
    assert f"cached: peak {peak_report.format_rate(lo)} for mean=30ms, p99=80ms" in md
    assert peak_report.knee(res["steps"]) is not None
    png = peak_report.plot_rate_latency({"cached": res}, tmp_path / "rate_latency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    none = {**res, "peak_rate": None, "bracket": [None, 5.0]}
    assert peak_report.peak_lines({"cold": none})[0].startswith("cold: no rate met mean=30ms, p99=80ms")


def test_cost_per_million_images_at_the_peak_or_the_measured_throughput():
    modes = {"cached": {"summary": {"throughput_images_per_s": 500.0}},
             "cold": {"summary": {"throughput_images_per_s": 100.0}},
             "swap": {"summary": {"throughput_images_per_s": None}}}
    peaks = {"cached": {"peak_rate": 250.0}, "cold": {"peak_rate": None}}
    c = peak_report.costs(peaks, modes, 3.6, 8)
    # 3.6 per worker-hour x 8 workers = 28.8 per hour; 250 img/s = 900,000 img/hour -> 32 per million
    assert c["modes"]["cached"] == {"basis": "peak", "images_per_s": 250.0, "cost_per_million": pytest.approx(32.0)}
    assert c["modes"]["cold"]["basis"] == "throughput" and c["modes"]["cold"]["cost_per_million"] == pytest.approx(80.0)
    assert c["modes"]["swap"]["cost_per_million"] is None
    lines = peak_report.cost_lines(c)
    assert lines[0] == "cached: 32 per million images at the peak (250 img/s on 8 worker(s) at 3.6 per worker-hour)"
    assert lines[2] == "swap: no cost (no rate measured)"
