"""The stopping rule of one point, with a fake predict function and a fake clock that it advances."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cortexbench.stats import relative_spread
from cortexbench.timing import PointTiming, TimingPolicy, measure_point


class FakeModel:
    """``predict`` takes the next duration from ``durations`` by advancing the shared fake clock."""

    def __init__(self, durations) -> None:
        self.now = 100.0
        self.durations = iter(durations)
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.now += next(self.durations)
        return np.zeros((len(batch), 10), dtype=np.float32)


BATCH = np.zeros((4, 3, 8, 8), dtype=np.float32)


def run(durations, **policy) -> tuple[PointTiming, FakeModel]:
    fake = FakeModel(durations)
    return measure_point(fake.predict, BATCH, TimingPolicy(**policy), clock=fake.clock), fake


def test_stops_at_min_runs_when_times_are_steady():
    timing, fake = run(itertools.repeat(0.010), warmup_runs=2, min_runs=5, max_seconds=60, target_rel_spread=0.02)
    assert timing.runs == 5
    assert timing.stable
    assert timing.rel_spread < 0.02
    assert fake.calls == 2 + 5
    assert timing.batch.mean_s == pytest.approx(0.010)
    assert timing.elapsed_s == pytest.approx(0.050)


def test_stops_at_the_first_run_where_the_spread_is_below_target():
    rng = np.random.default_rng(1)
    durations = list(0.010 * (1 + 0.05 * rng.standard_normal(400)))
    timing, _ = run(iter(durations), warmup_runs=0, min_runs=5, max_seconds=60, target_rel_spread=0.02)
    expected = next(n for n in range(5, 400) if relative_spread(durations[:n]) < 0.02)
    assert expected > 5  # the noise makes it wait past min_runs
    assert timing.runs == expected
    assert timing.stable
    assert timing.rel_spread == pytest.approx(relative_spread(durations[:expected]))


def test_time_bound_stops_a_noisy_point_and_flags_it_unstable():
    # 1 ms and 100 ms in turn never reach a 2% spread; the bound is 1 s of timed runs.
    timing, _ = run(itertools.cycle([0.001, 0.100]), warmup_runs=1, min_runs=3, max_seconds=1.0,
                    target_rel_spread=0.02)
    assert not timing.stable
    assert timing.rel_spread > 0.02
    assert math.isfinite(timing.rel_spread)
    assert 1.0 <= timing.elapsed_s < 1.0 + 0.100 + 1e-9  # stopped by the first run past the bound
    # the warm-up takes the first 1 ms; then 100 ms, 1 ms, ...: 10 x 100 ms + 9 x 1 ms = 1.009 s
    assert timing.runs == 19
    assert timing.batch.min_s == pytest.approx(0.001)
    assert timing.batch.max_s == pytest.approx(0.100)


def test_never_fewer_than_min_runs_even_past_the_time_bound():
    timing, fake = run(itertools.repeat(2.0), warmup_runs=0, min_runs=4, max_seconds=0.5, target_rel_spread=0.02)
    assert timing.runs == 4
    assert fake.calls == 4
    assert timing.elapsed_s == pytest.approx(8.0)
    # steady times: the spread is zero, so the point is stable even though it ran past the bound
    assert timing.stable


def test_min_runs_is_respected_by_a_noisy_slow_point():
    timing, _ = run(itertools.cycle([1.0, 3.0]), warmup_runs=0, min_runs=7, max_seconds=0.1, target_rel_spread=0.02)
    assert timing.runs == 7
    assert not timing.stable


def test_warm_up_runs_are_not_timed():
    durations = itertools.chain([5.0, 5.0, 5.0], itertools.repeat(0.002))
    timing, fake = run(durations, warmup_runs=3, min_runs=5, max_seconds=10, target_rel_spread=0.05)
    assert fake.calls == 3 + timing.runs
    assert timing.batch.max_s == pytest.approx(0.002)
    assert timing.warmup_runs == 3


def test_per_image_figures_and_throughput_follow_from_the_batch_times():
    timing, _ = run(itertools.cycle([0.008, 0.012]), warmup_runs=0, min_runs=10, max_seconds=0.3,
                    target_rel_spread=0.5)
    assert timing.batch_size == 4
    assert timing.mean_batch_s == pytest.approx(0.010)
    assert timing.mean_image_s == pytest.approx(0.010 / 4)
    assert timing.throughput_images_per_s == pytest.approx(4 / timing.batch.mean_s)
    d = timing.to_dict()
    for key in ("mean", "p50", "p90", "p99"):
        assert d["image_latency_s"][key] == pytest.approx(d["batch_latency_s"][key] / 4)
    assert d["throughput_images_per_s"] == pytest.approx(400.0)
    assert d["runs"] == timing.runs and d["stable"] is timing.stable


def test_real_clock_with_a_trivial_predict():
    calls = []
    timing = measure_point(lambda b: calls.append(len(b)), BATCH, TimingPolicy(1, 5, 0.2, 0.5))
    assert timing.runs >= 5
    assert len(calls) == timing.runs + 1
    assert timing.elapsed_s < 5.0
    assert timing.batch.mean_s >= 0


@pytest.mark.parametrize("bad", [dict(warmup_runs=-1), dict(min_runs=0), dict(max_seconds=0),
                                 dict(target_rel_spread=0), dict(target_rel_spread=1.5)])
def test_policy_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        TimingPolicy(**bad)
