"""``PeakRun`` without Ray: the coordinator's run of a peak search on fake workers (one lane of a fixed 2 ms
service time, an exact M/D/1 server on the real clock): the closed-loop probe, the search from half its
throughput, the step at the peak kept as the mode's figures, and the results, report section and picture."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from cortexbench import stream_results
from cortexbench.config import Config, StreamConfig
from cortexbench.coordinator import StreamPlan
from cortexbench.live import LiveView
from cortexbench.peak import PeakRun
from cortexbench.schedule import make_schedule
from cortexbench.worker import WorkerSpec
from tests.fakes import FakeTarget, FakeWorkerHandle

MODELS = ("null",)
S = 0.002


@pytest.mark.slow
def test_a_peak_run_probes_searches_and_keeps_the_step_at_the_peak(tmp_path):
    cfg = Config(models=MODELS, times=100, stream=StreamConfig(
        modes=("cached",), concurrency=4, warmup=20, retries=1, find_peak=True, slo=("mean=20ms",),
        peak_precision=0.1, peak_late_ms=50.0, gpu_hour_cost=1.0))
    sched = make_schedule(count=100, models=MODELS, n_images=4, seed=0)
    workers = (WorkerSpec("w0", "cpu", "mxnet", "models", MODELS, ("a.jpg",), lanes=1),)
    plan = StreamPlan(cfg, "mxnet", MODELS, ("a.jpg",), workers, False, 1.0, 1, "grouped", 1, 1, 4, sched)
    target = FakeTarget({"w0": FakeWorkerHandle("w0", service_s=S, lanes=1)})
    said: list[str] = []
    run = PeakRun(plan, target, LiveView(MODELS, ["w0"], server=None, run_id="t", backend="x", quiet=True),
                  say=said.append)
    started = time.monotonic()
    asyncio.run(run.run())
    assert time.monotonic() - started < 240
    peak = run.peaks["cached"]
    assert peak.probe is not None and 0.5 / S <= peak.probe <= 1.05 / S  # one 2 ms lane: at most 500/s
    assert said[0].startswith(f"find-peak cached: closed-loop probe {peak.probe:.4g} images/s; starting at ")
    assert peak.steps[0].rate == pytest.approx(peak.probe / 2)
    lo, hi = peak.bracket
    want = 18 / 19 / S  # M/D/1: W = 20 ms = S + rho S / (2 (1 - rho)) at rho = 18/19
    assert lo is not None and hi is not None and hi / lo <= 1.1
    assert 0.5 * want <= lo <= 1.05 * want, (lo, hi, want)
    kept = run.modes["cached"]
    assert kept.summary["summary"]["counted_ok"] >= 600 and run.plan.cfg.stream.rate == lo
    assert len(target.modes) == len(peak.steps) + sum(s.attempts - 1 for s in peak.steps) + 1  # + the probe
    results = stream_results.make_results(run.plan, target, run, None, time.time())
    assert results["peak"]["cached"]["peak_rate"] == lo and results["run"]["loop"] == "open"
    assert results["cost"]["modes"]["cached"]["basis"] == "peak"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stream_results.write_results(run_dir, results, run)
    assert json.loads((run_dir / "results.json").read_text())["peak"]["cached"]["bracket"] == [lo, hi]
    assert (run_dir / "rate_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "report.md").read_text()
    assert "## Peak rate under the SLOs" in report and "## Cost" in report
