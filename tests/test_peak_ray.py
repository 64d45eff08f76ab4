"""Queueing theory on real Ray workers: one CPU worker, one lane, the null model with a fixed service time S
and Poisson arrivals is an M/D/1 queue.  Its mean latency at load 0.5 and 0.8 agrees with the formula
W = S + rho S / (2 (1 - rho)), and ``--find-peak`` with an SLO on the mean lands near the rate the formula
gives for it.

The queue is the worker's: an image waits for the lane (``queue``) and is served (``infer``: the sleep of S
and its overshoot).  S is taken as the measured mean of ``infer`` (on a busy machine a 10 ms sleep takes a
little longer); the transport and send delay ahead of the queue are not part of the M/D/1 system and are
reported apart.  The seeded arrivals' own M/D/1 mean (Lindley's recursion over the same arrival times) is
checked against the formula first (with the nominal S, so exactly), so that the tolerance is about the
system, not the sample path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cortexbench.config import Config, StreamConfig
from cortexbench.coordinator import run_stream
from cortexbench.schedule import make_schedule

pytestmark = [pytest.mark.ray, pytest.mark.slow]

S = 0.010
COUNT, WARMUP = 1000, 50
# The measured mean at the worker against the formula: at load 0.8 the queue multiplies what the sleep's
# jitter and the transport's (which make the service and the arrivals less regular than M/D/1's) add, by
# 1 / (1 - rho), so its tolerance is wider.  Measured on the shared 2-core machine: +4% and +22%.
MD1_TOLERANCE = {0.5: 0.15, 0.8: 0.30}
PATH_TOLERANCE = 0.05  # the seeded arrivals' own M/D/1 mean against the formula


def md1_mean(rate: float, s: float) -> float:
    rho = rate * s
    return s + rho * s / (2 * (1 - rho))


def lindley_mean(times: np.ndarray, s: float) -> float:
    free, total = -math.inf, 0.0
    for a in times:
        free = max(a, free) + s
        total += free - a
    return total / len(times)


def _cfg(model_dir: Path, image_dir: Path, result_dir: Path, **stream: object) -> Config:
    return Config(models=(f"null:{S:g}",), model_dir=model_dir, img_dir=image_dir, result_dir=result_dir,
                  times=COUNT, seed=0,
                  stream=StreamConfig(modes=("cached",), warmup=WARMUP, cpu_workers=1, lanes=1, metrics_port=0,
                                      records="none", **stream))  # type: ignore[arg-type]


STALL_SEND_P99_S = 0.010  # a run whose p99 send delay is above this was stalled by other work on the machine
STALL_INFER_P99 = 2.0  # ... or whose p99 service time is above this many S


def _stalls(mode: dict) -> str | None:
    """Why a run cannot be judged against M/D/1 (the machine stalled the driver or the worker), or None."""
    st = mode["stages"]
    if st["send_delay"]["p99_s"] > STALL_SEND_P99_S:
        return f"p99 send delay {st['send_delay']['p99_s'] * 1e3:.1f} ms"
    if st["infer"]["p99_s"] > STALL_INFER_P99 * S:
        return f"p99 service time {st['infer']['p99_s'] * 1e3:.1f} ms"
    return None


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_the_mean_latency_of_one_lane_agrees_with_md1(ray_session, model_dir, image_dir, tmp_path, rho):
    """A stall of the machine (other work holding the cores for 100 ms) is not M/D/1: at load 0.8 one doubles
    the mean.  A run the harness's own figures show stalled is run once more, and when that one stalls too
    the test is skipped with the stall named, not judged."""
    rate = rho / S
    stalled = []
    for attempt in range(2):
        run_dir = run_stream(_cfg(model_dir, image_dir, tmp_path / str(attempt), rate=rate), quiet=True)
        results = json.loads((run_dir / "results.json").read_text())
        mode = results["modes"]["cached"]
        why = _stalls(mode)
        if why is None:
            break
        stalled.append(why)
    else:
        pytest.skip(f"the machine stalled both runs ({'; '.join(stalled)}): M/D/1 cannot be judged")
    assert mode["summary"]["counted_ok"] == COUNT
    stages = {k: v["mean_s"] for k, v in mode["stages"].items()}
    s_eff = stages["infer"]
    at_worker = sum(v for k, v in stages.items() if k not in ("send_delay", "transport"))
    want = md1_mean(rate, s_eff)
    sched = make_schedule(count=COUNT, models=("null",), n_images=8, rate=rate, warmup=WARMUP, seed=0)
    path = lindley_mean(np.asarray(sched.send_at_s)[WARMUP:], S)  # the seeded arrivals, the nominal S
    print(f"rho {rho}: S {s_eff * 1e3:.2f} ms, at the worker {at_worker * 1e3:.2f} ms, M/D/1 {want * 1e3:.2f} ms, "
          f"seeded path {path * 1e3:.2f} ms, end to end {mode['summary']['latency']['mean_s'] * 1e3:.2f} ms "
          f"(send delay {stages['send_delay'] * 1e3:.2f}, transport {stages['transport'] * 1e3:.2f})")
    assert abs(path / md1_mean(rate, S) - 1) < PATH_TOLERANCE
    assert S <= s_eff < 1.5 * S  # the sleep, and what a busy machine adds to it
    assert abs(at_worker / want - 1) < MD1_TOLERANCE[rho], (at_worker, want)


@pytest.mark.timeout(480)
def test_find_peak_with_a_mean_slo_lands_near_the_md1_rate(ray_session, model_dir, image_dir, tmp_path):
    """SLO mean <= 3 S: the formula's rate is 0.8 / S (80/s).  The measured peak lies within -35% / +10% of it:
    the harness's own milliseconds (transport, send delay) come on top of the queue, so the peak is lower,
    never much higher.  Late means more than 50 ms here: on the shared 2-core machine this was written on, the
    driver sends 5-8% of images 1-3 ms late at any rate (5/s as at 40/s), and other work on it stalls the
    driver for tens of ms now and then, which the 1 ms default would count against every step; the send delay
    is part of each image's latency, so the SLO on the mean still sees it."""
    slo_s = 3 * S
    x = 2 * (slo_s - S) / S
    want = x / (1 + x) / S
    cfg = _cfg(model_dir, image_dir, tmp_path, rate=0.5 * want, find_peak=True, slo=(f"mean={slo_s * 1e3:g}ms",),
               peak_precision=0.1, peak_late_ms=50.0, gpu_hour_cost=2.0)
    run_dir = run_stream(cfg, quiet=True)
    results = json.loads((run_dir / "results.json").read_text())
    peak = results["peak"]["cached"]
    lo, hi = peak["bracket"]
    print(f"find-peak: met at {lo}, missed at {hi}; M/D/1 {want:.1f}/s; steps "
          + "; ".join(f"{s['rate']:.1f}/s {s['verdict']} ({s['why']})" for s in peak["steps"]))
    assert peak["peak_rate"] == lo and lo is not None and hi is not None
    assert 0.65 * want <= lo <= 1.1 * want
    assert peak["steps"][0]["rate"] == pytest.approx(0.5 * want)
    assert (run_dir / "rate_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "report.md").read_text()
    assert "## Peak rate under the SLOs" in report and "| offered |" in report
    assert results["modes"]["cached"]["summary"]["counted_ok"] >= 600  # the figures of the step at the peak
    assert results["run"]["rate"] == lo
    cost = results["cost"]["modes"]["cached"]  # 2.0 per worker-hour, one worker, at the peak
    assert cost["basis"] == "peak" and cost["cost_per_million"] == pytest.approx(2.0 / (lo * 3600) * 1e6)
    assert "## Cost" in report
