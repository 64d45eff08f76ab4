"""The stream driver on fake workers in virtual time: accounting, loops, grouping, faults, stopping."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cortexbench.balancer import make_balancer
from cortexbench.driver import Driver, DriverOptions
from cortexbench.ledger import OUTCOMES
from cortexbench.schedule import make_schedule
from tests.fakes import FakeWorkerHandle, run_virtual

MODELS = ("a", "b", "c", "d")


def _drive(handles, *, count=400, rate=None, concurrency=8, max_group=1, depth=64, retries=2, warmup=0,
           balancer="least-outstanding", duration_s=None, stop_after=None, drain_timeout_s=10.0, seed=0,
           call_timeout_s=None):
    sched = make_schedule(count=count, models=MODELS, n_images=50, rate=rate, warmup=warmup, seed=seed,
                          duration_s=duration_s if rate else None)
    opts = DriverOptions(mode="cached", concurrency=None if rate else concurrency, max_group=max_group,
                         depth=depth, retries=retries, duration_s=duration_s, drain_timeout_s=drain_timeout_s,
                         spin_s=0.0, fold_interval_s=0.05, call_timeout_s=call_timeout_s)
    seen = []

    async def main():
        loop = asyncio.get_running_loop()
        bal = make_balancer(balancer, len(handles), len(MODELS), seed=seed)
        driver = Driver(sched, handles, bal, opts, clock=loop.time, on_progress=seen.append)
        if stop_after is not None:
            loop.call_later(stop_after, driver.stop)
        return await driver.run()

    return sched, run_virtual(main()), seen


def test_closed_loop_accounts_for_every_image_and_respects_concurrency():
    handles = [FakeWorkerHandle(f"w{i}", service_s=0.01, lanes=4) for i in range(2)]
    _sched, res, _ = _drive(handles, count=400, concurrency=8)
    assert res.sent == 400 and res.not_sent == 0
    counts = res.ledger.outcome_counts()
    assert counts["ok"] == 400 and sum(counts.values()) == 400
    res.ledger.check_complete(res.sent)
    assert sum(h.images for h in handles) == 400
    assert sum(h.max_inflight for h in handles) <= 8
    # each image: 10 ms of service; 8 in flight over 8 lanes -> latency about 10 ms, ~800 images/s
    lat = res.ledger.column("latency_s")
    assert np.allclose(np.median(lat), 0.01, rtol=0.05)
    assert res.finished_s - res.started_s == pytest.approx(400 / 800, rel=0.05)


def test_open_loop_latency_counts_from_the_schedule_so_queueing_shows():
    # one lane of 10 ms can do 100 images/s; offering 150/s must build a queue the latency shows
    slow = [FakeWorkerHandle("w0", service_s=0.01, lanes=1)]
    _sched, res, _ = _drive(slow, count=300, rate=150.0)
    lat = res.ledger.column("latency_s")
    assert res.ledger.outcome_counts()["ok"] == 300
    assert lat[-20:].mean() > 0.4  # a growing queue: later images wait ~ (1/100 - 1/150) * i
    # under capacity the latency is the service time
    fast = [FakeWorkerHandle("w0", service_s=0.01, lanes=16)]
    _, res2, _ = _drive(fast, count=300, rate=150.0)
    assert np.percentile(res2.ledger.column("latency_s"), 99) < 0.0101
    sent = res2.ledger.column("sent_s") - res2.ledger.column("scheduled_s")
    assert np.abs(sent).max() < 1e-9  # the virtual clock sends exactly on schedule


def test_same_seed_same_schedule_for_every_mode():
    a = make_schedule(count=100, models=MODELS, n_images=10, rate=50.0, seed=3)
    b = make_schedule(count=100, models=MODELS, n_images=10, rate=50.0, seed=3)
    assert a == b


def test_grouping_carries_several_images_per_call_and_keeps_per_image_rows():
    h = [FakeWorkerHandle("w0", service_s=0.001, lanes=8)]
    _, res, _ = _drive(h, count=512, concurrency=64, max_group=16, depth=2)
    assert res.ledger.outcome_counts()["ok"] == 512
    assert max(h[0].groups) == 16 and h[0].calls < 512
    assert len(np.unique(res.ledger.column("item"))) == 512


def test_dead_worker_images_are_retried_elsewhere_and_all_accounted():
    handles = [FakeWorkerHandle("w0", die_at_call=20, down_s=0.2), FakeWorkerHandle("w1")]
    _, res, _ = _drive(handles, count=300, concurrency=8)
    res.ledger.check_complete(res.sent)
    counts = res.ledger.outcome_counts()
    assert counts["ok"] == 300
    assert res.retries >= 1 and res.worker_losses == {"w0": 1}
    assert handles[0].images > 0  # it came back after recovering


def test_images_fail_as_worker_died_when_retries_run_out():
    handles = [FakeWorkerHandle("w0", die_at_call=3, down_s=None)]
    _, res, _ = _drive(handles, count=50, concurrency=4, retries=0)
    counts = res.ledger.outcome_counts()
    assert counts["worker_died"] >= 1
    assert counts["ok"] + sum(v for k, v in counts.items() if k != "ok") == res.sent
    res.ledger.check_complete(res.sent)


def test_failed_images_are_counted_not_lost():
    handles = [FakeWorkerHandle("w0", fail_models=(1,))]
    _, res, _ = _drive(handles, count=200, concurrency=4)
    counts = res.ledger.outcome_counts()
    n_b = int((res.ledger.column("model_idx") == 1).sum())
    assert counts["model_error"] == n_b > 0 and counts["ok"] == 200 - n_b


def test_stop_drains_in_flight_and_leaves_the_rest_unsent():
    handles = [FakeWorkerHandle("w0", service_s=0.01, lanes=2)]
    _, res, _ = _drive(handles, count=10_000, concurrency=4, stop_after=0.5)
    assert res.stopped_early
    assert 0 < res.sent < 10_000 and res.sent + res.not_sent == 10_000
    res.ledger.check_complete(res.sent)
    assert res.ledger.outcome_counts()["ok"] == res.sent  # everything in flight finished within the drain


def test_stop_cancels_what_does_not_finish_within_the_drain_timeout():
    handles = [FakeWorkerHandle("w0", service_s=5.0, lanes=4)]
    _, res, _ = _drive(handles, count=100, concurrency=4, stop_after=1.0, drain_timeout_s=0.5)
    assert res.cancelled == 4
    counts = res.ledger.outcome_counts()
    assert counts["cancelled"] == 4 and res.sent == 4
    res.ledger.check_complete(res.sent)


def test_duration_ends_an_open_loop_run():
    handles = [FakeWorkerHandle("w0", service_s=0.001, lanes=4)]
    _, res, _ = _drive(handles, count=100_000, rate=1000.0, duration_s=2.0)
    assert 1800 < res.sent < 2200


def test_progress_reports_every_row_once():
    handles = [FakeWorkerHandle(f"w{i}") for i in range(3)]
    _, _res, seen = _drive(handles, count=300, concurrency=6)
    assert sum(len(p.new_rows) for p in seen) == 300
    assert seen[-1].done == 300


def test_balancer_spreads_work_over_workers():
    handles = [FakeWorkerHandle(f"w{i}", service_s=0.01) for i in range(4)]
    _, res, _ = _drive(handles, count=400, concurrency=8, balancer="round-robin")
    per = np.bincount(res.ledger.column("worker"), minlength=4)
    assert per.max() - per.min() <= 2


def test_outcome_codes_are_stable():
    assert OUTCOMES[0] == "ok"


@pytest.mark.parametrize("how", ["gone for good", "stopped while it is down"])
def test_images_a_dead_worker_had_queued_but_never_sent_stay_unsent(how):
    # depth 1: three of the four images in flight wait in the worker's queue, unsent, when it dies
    gone = how == "gone for good"
    handles = [FakeWorkerHandle("w0", die_at_call=3, down_s=None if gone else 10.0)]
    _, res, _ = _drive(handles, count=50, concurrency=4, depth=1, stop_after=None if gone else 0.1)
    if gone:
        assert res.error is not None and "every worker is gone" in res.error
    else:
        assert res.stopped_early and res.error is None
    res.ledger.check_complete(res.sent)  # a row for every image sent, none for those never sent
    assert res.sent + res.not_sent == 50
    assert res.ledger.outcome_counts()["worker_died"] == 1


class _FailsOnce(FakeWorkerHandle):
    """A worker whose first call fails with an unexpected (non-worker-lost) error."""

    async def call(self, group):
        if self.calls == 0:
            self.calls += 1
            await asyncio.sleep(0.001)
            raise RuntimeError("transport broke")
        return await super().call(group)


def test_an_unexpected_call_error_fails_its_images_and_the_rest_still_go_out():
    # depth 1: the other three images wait for the failed call's slot (this used to hang)
    handles = [_FailsOnce("w0")]
    _, res, _ = _drive(handles, count=4, concurrency=4, depth=1)
    counts = res.ledger.outcome_counts()
    assert counts["error"] == 1 and counts["ok"] == 3
    assert res.error_samples == {"error": "RuntimeError: transport broke"}
    res.ledger.check_complete(res.sent)


class _NeverAnswers(FakeWorkerHandle):
    """A worker whose second call never comes back (a hung worker, a lost reply)."""

    async def call(self, group):
        if self.calls == 1:
            self.calls += 1
            await asyncio.Event().wait()
        return await super().call(group)


def test_a_call_never_answered_times_out_and_the_run_goes_on():
    handles = [_NeverAnswers("w0"), FakeWorkerHandle("w1")]
    _, res, _ = _drive(handles, count=100, concurrency=4, call_timeout_s=5.0)
    counts = res.ledger.outcome_counts()
    assert counts["timeout"] == 1 and counts["ok"] == 99
    res.ledger.check_complete(res.sent)
    assert "did not answer within 5 s" in res.error_samples["timeout"]


def test_open_loop_duration_counts_after_the_warmup():
    handles = [FakeWorkerHandle("w0", service_s=0.001, lanes=4)]
    sched, res, _ = _drive(handles, count=100_000, rate=1000.0, duration_s=2.0, warmup=500)
    assert res.not_sent == 0 and res.sent == len(sched)  # the schedule and the driver end together
