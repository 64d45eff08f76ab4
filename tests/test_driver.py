"""The stream driver on fake workers in virtual time: accounting, loops, grouping, faults, stopping."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cortexbench.balancer import make_balancer
from cortexbench.driver import CANCELLED, ERROR, TIMEOUT, WORKER_DIED, Driver, DriverOptions
from cortexbench.ledger import OUTCOMES, WORKER_STAGES
from cortexbench.live import LiveView
from cortexbench.report.stream_summary import histograms, summarize_mode
from cortexbench.schedule import make_schedule
from tests.fakes import FakeWorkerHandle, VirtualTime, run_virtual

MODELS = ("a", "b", "c", "d")


def _drive(handles, *, count=400, rate=None, concurrency=8, max_group=1, depth=64, retries=2, warmup=0,
           balancer="least-outstanding", duration_s=None, stop_after=None, drain_timeout_s=10.0, seed=0,
           call_timeout_s=None, clock=None):
    """Run a schedule over ``handles`` in virtual time (``clock``: a VirtualTime the handles may block);
    check what must hold at the end of every run, however it ended."""
    sched = make_schedule(count=count, models=MODELS, n_images=50, rate=rate, warmup=warmup, seed=seed,
                          duration_s=duration_s if rate else None)
    opts = DriverOptions(mode="cached", concurrency=None if rate else concurrency, max_group=max_group,
                         depth=depth, retries=retries, duration_s=duration_s, drain_timeout_s=drain_timeout_s,
                         spin_s=0.0, fold_interval_s=0.05, call_timeout_s=call_timeout_s)
    seen = []
    view = LiveView(MODELS, [h.name for h in handles], server=None, run_id="t", backend="fake", quiet=True)
    view.start_mode("cached", len(sched), warmup)

    def progress(p):
        seen.append(p)
        view.fold(p)

    async def main():
        loop = asyncio.get_running_loop()
        bal = make_balancer(balancer, len(handles), len(MODELS), seed=seed)
        driver = Driver(sched, handles, bal, opts, clock=loop.time, on_progress=progress)
        if stop_after is not None:
            loop.call_later(stop_after, driver.stop)
        return driver, await driver.run()

    driver, res = run_virtual(main(), clock)
    _check_end_of_run(driver, res, sched, seen, view)
    return sched, res, seen


def _check_end_of_run(driver, res, sched, seen, view):
    """Nothing is left in flight or queued, every image sent has exactly one row, the gauges read zero."""
    assert driver.outstanding.tolist() == [0] * len(driver.handles)
    assert driver.calls_inflight == [0] * len(driver.handles)
    assert not driver._calls and not any(driver.pending) and not driver._parked
    assert seen and seen[-1].outstanding == [0] * len(driver.handles)
    assert set(view.state.inflight.values()) == {0}  # the in-flight gauge of the metrics
    assert res.sent + res.not_sent == len(sched)
    res.ledger.check_complete(res.sent)
    assert len(res.ledger) == res.sent
    led = res.ledger
    ok = led.column("outcome") == 0
    assert (seen[-1].done, seen[-1].failed, seen[-1].sent) == (int(ok.sum()), int((~ok).sum()), res.sent)
    scheduled, sent, done = led.column("scheduled_s"), led.column("sent_s"), led.column("done_s")
    assert (scheduled >= 0).all() and (sent >= scheduled).all() and (done >= sent).all()
    assert (done <= res.finished_s - res.started_s).all()
    lost = np.isin(led.column("outcome"), [WORKER_DIED, TIMEOUT, CANCELLED, ERROR])  # failed in the driver
    assert (led.column("hit")[lost] == -1).all()  # nothing known from the worker
    for stage in WORKER_STAGES:
        assert np.isnan(led.column(f"{stage}_s")[lost]).all()
        assert not np.isnan(led.column(f"{stage}_s")[ok]).any()


def _by_item(res, column):
    """A ledger column in schedule order (rows are kept in the order their outcome was known)."""
    return res.ledger.column(column)[np.argsort(res.ledger.column("item"))]


def _lindley(scheduled, service_s):
    """When each image of a single FIFO server with one call at a time is sent and done."""
    sent, done = np.empty_like(scheduled), np.empty_like(scheduled)
    free = -np.inf
    for k, t in enumerate(scheduled):
        sent[k] = max(t, free)
        done[k] = free = sent[k] + service_s
    return sent, done


def _late_share(res):
    summary = summarize_mode("cached", res.ledger, histograms(res.ledger, 0), warmup=0, sent=res.sent,
                             not_sent=res.not_sent, retries=res.retries, cancelled=res.cancelled)
    return summary["summary"]["late_share"]


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


@pytest.mark.parametrize("who_queues", ["worker", "driver"])
def test_open_loop_latency_counts_from_the_schedule_whoever_queues(who_queues):
    # one lane of 10 ms does 100 images/s; 150/s builds a queue: in the worker (many calls in flight), or
    # in the driver (one call at a time, the rest wait in its send queue).  Either way the latency is
    # exactly that of a FIFO server fed at the scheduled times; only the send delay differs.
    depth = 1000 if who_queues == "worker" else 1
    sched, res, _ = _drive([FakeWorkerHandle("w0", service_s=0.01, lanes=1)], count=300, rate=150.0, depth=depth)
    assert res.ledger.outcome_counts()["ok"] == 300
    scheduled = _by_item(res, "scheduled_s")
    np.testing.assert_allclose(scheduled, sched.send_at_s, rtol=0, atol=1e-9)  # the schedule, never the send
    sent, done = _lindley(sched.send_at_s, 0.01)
    np.testing.assert_allclose(_by_item(res, "latency_s"), done - sched.send_at_s, rtol=0, atol=1e-9)
    assert _by_item(res, "latency_s")[-20:].mean() == pytest.approx(1.10, abs=0.05)  # ~ (1/100 - 1/150) * i
    delay = _by_item(res, "sent_s") - scheduled
    if who_queues == "worker":
        np.testing.assert_allclose(delay, 0.0, atol=1e-9)
        assert _late_share(res) == 0.0
    else:
        np.testing.assert_allclose(delay, sent - sched.send_at_s, rtol=0, atol=1e-9)
        assert delay.max() > 1.0
        assert _late_share(res) == pytest.approx(np.mean(sent - sched.send_at_s > 1e-3))
        assert 0.9 < _late_share(res) < 1.0


def test_open_loop_under_capacity_the_latency_is_the_service_time():
    _, res, _ = _drive([FakeWorkerHandle("w0", service_s=0.01, lanes=16)], count=300, rate=150.0)
    np.testing.assert_allclose(res.ledger.column("latency_s"), 0.01, rtol=0, atol=1e-9)
    sent = res.ledger.column("sent_s") - res.ledger.column("scheduled_s")
    assert np.abs(sent).max() < 1e-9  # the virtual clock sends exactly on schedule


class _BlocksTheLoop(FakeWorkerHandle):
    """A handle whose n-th submit blocks the event loop's thread (a slow serialisation, a GC pause)."""

    def __init__(self, name, clock, block_at, block_s, **kw):
        super().__init__(name, **kw)
        self.clock, self.block_at, self.block_s = clock, block_at, block_s
        self.submits = 0
        self.blocked = (0.0, 0.0)

    def submit(self, group):
        self.submits += 1
        if self.submits == self.block_at:
            start = self.clock()
            self.clock.block(self.block_s)
            self.blocked = (start, self.clock())
        return super().submit(group)


def test_a_driver_that_falls_behind_sends_late_and_the_latency_counts_the_wait():
    clock = VirtualTime()
    h = _BlocksTheLoop("w0", clock, block_at=10, block_s=0.5, service_s=0.001, lanes=64)
    sched, res, _ = _drive([h], count=300, rate=100.0, clock=clock)
    assert res.ledger.outcome_counts()["ok"] == 300
    _, end = (t - res.started_s for t in h.blocked)
    due = sched.send_at_s
    np.testing.assert_allclose(_by_item(res, "scheduled_s"), due, rtol=0, atol=1e-9)
    # the images that fell due while the loop was blocked go out when it is free again, each at once
    behind = (np.arange(300) > 9) & (due <= end)  # after the 10th image, whose submit blocked
    assert 30 < behind.sum() < 70
    expect_sent = np.where(behind, end, due)
    expect_done = np.maximum(expect_sent, np.where(np.arange(300) == 9, end, 0)) + 0.001
    np.testing.assert_allclose(_by_item(res, "sent_s"), expect_sent, rtol=0, atol=1e-9)
    np.testing.assert_allclose(_by_item(res, "latency_s"), expect_done - due, rtol=0, atol=1e-9)
    delay = _by_item(res, "sent_s") - due
    assert (delay[behind] > 0).all() and delay.max() == pytest.approx(end - due[behind].min())
    assert _late_share(res) == pytest.approx(np.count_nonzero(end - due[behind] > 1e-3) / 300)


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


def test_one_death_fails_every_call_in_flight_and_counts_once():
    # w0 dies as its 20th call arrives: as on Ray, that call and the 3 others in flight on it fail together
    handles = [FakeWorkerHandle("w0", die_at_call=20, down_s=0.2), FakeWorkerHandle("w1")]
    _, res, _ = _drive(handles, count=300, concurrency=8)
    assert res.ledger.outcome_counts()["ok"] == 300
    assert handles[0].deaths == 1 and handles[0].lost_images == 4
    assert res.worker_losses == {"w0": 1}  # one death, however many calls it took with it
    assert res.retries == 4
    (name, lost_at, back_after), = res.outages  # when it was lost, and how long it took to come back
    assert name == "w0" and 0 < lost_at < res.finished_s - res.started_s and back_after == pytest.approx(0.2, abs=0.01)
    assert np.bincount(res.ledger.column("attempts"), minlength=3).tolist() == [0, 296, 4]
    assert handles[0].images > 0  # it came back after recovering


def test_retried_images_keep_their_scheduled_time():
    handles = [FakeWorkerHandle("w0", die_at_call=20, down_s=0.2), FakeWorkerHandle("w1")]
    sched, res, _ = _drive(handles, count=300, rate=200.0)
    assert res.ledger.outcome_counts()["ok"] == 300 and res.retries == handles[0].lost_images > 0
    retried = _by_item(res, "attempts") == 2
    assert retried.sum() == res.retries
    scheduled = _by_item(res, "scheduled_s")
    np.testing.assert_allclose(scheduled, sched.send_at_s, rtol=0, atol=1e-9)  # retried ones included
    resent = _by_item(res, "sent_s")[retried]
    assert (resent >= scheduled[retried]).all() and np.ptp(resent) < 1e-9  # sent again together, at the death
    assert (resent > scheduled[retried]).sum() == res.retries - 1  # all but the call that killed it waited
    latency = _by_item(res, "latency_s")
    np.testing.assert_allclose(latency, _by_item(res, "done_s") - sched.send_at_s, rtol=0, atol=1e-9)


@pytest.mark.parametrize("retries", [0, 1, 2, 3])
def test_a_worker_that_dies_on_every_call_gets_exactly_retries_plus_one_attempts(retries):
    handles = [FakeWorkerHandle("w0", die_at_call=tuple(range(1, 10)), down_s=0.1)]
    _, res, _ = _drive(handles, count=1, concurrency=1, retries=retries)
    assert res.ledger.outcome_counts()["worker_died"] == 1
    assert res.ledger.column("attempts").tolist() == [retries + 1]
    assert res.retries == retries
    assert res.worker_losses == {"w0": retries + 1} and handles[0].deaths == retries + 1


def test_images_fail_as_worker_died_when_retries_run_out():
    # 4 images go out at once; the 3rd call to arrive kills w0 for good, and with it the 3 others in flight
    handles = [FakeWorkerHandle("w0", die_at_call=3, down_s=None)]
    _, res, _ = _drive(handles, count=50, concurrency=4, retries=0)
    counts = res.ledger.outcome_counts()
    assert handles[0].lost_images == counts["worker_died"] == 4
    assert counts["ok"] == 0 and res.sent == 4 and res.not_sent == 46
    assert res.worker_losses == {"w0": 1} and res.retries == 0
    assert res.error is not None and "every worker is gone" in res.error


def test_stop_counts_a_retried_image_still_queued():
    # w0 dies with image 0; its retry waits in the queue of w1, busy with one slow call (depth 1), when the
    # run stops: it was sent once, so it must end as worker_died, not vanish
    handles = [FakeWorkerHandle("w0", die_at_call=1, down_s=None), FakeWorkerHandle("w1", service_s=5.0)]
    _, res, _ = _drive(handles, count=10, concurrency=2, depth=1, stop_after=1.0)
    assert res.sent == 2 and res.retries == 1
    assert res.ledger.outcome_counts()["worker_died"] == 1 and res.ledger.outcome_counts()["ok"] == 1
    assert _by_item(res, "attempts").tolist() == [1, 1]
    assert res.error_samples == {}  # no message came with that failure


def test_least_outstanding_gives_a_faster_worker_more_images():
    handles = [FakeWorkerHandle("fast", service_s=0.01), FakeWorkerHandle("slow", service_s=0.03)]
    _, res, _ = _drive(handles, count=400, concurrency=4)
    per = np.bincount(res.ledger.column("worker"), minlength=2)
    assert per[0] > 2 * per[1]  # about 3 to 1: the slow worker's images stay outstanding 3 times as long


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


def test_a_call_never_answered_marks_its_worker_hung_replaces_it_and_retries_the_images():
    handles = [_NeverAnswers("w0"), FakeWorkerHandle("w1")]
    _, res, _ = _drive(handles, count=100, concurrency=4, call_timeout_s=5.0)
    assert res.ledger.outcome_counts()["ok"] == 100 and res.retries == 1
    assert res.worker_hangs == {"w0": 1} and res.worker_losses == {"w0": 1}
    assert handles[0].replaced == 1 and handles[1].replaced == 0
    res.ledger.check_complete(res.sent)


def test_a_hung_call_whose_images_are_out_of_retries_fails_them_as_timeout():
    handles = [_NeverAnswers("w0"), FakeWorkerHandle("w1")]
    _, res, _ = _drive(handles, count=100, concurrency=4, call_timeout_s=5.0, retries=0)
    counts = res.ledger.outcome_counts()
    assert counts["timeout"] == 1 and counts["ok"] == 99
    res.ledger.check_complete(res.sent)
    assert "did not answer within 5 s; retries ran out" in res.error_samples["timeout"]


def test_the_only_worker_hung_is_replaced_and_takes_its_queued_images_once_back():
    # one worker, one call at a time: the hung call's image and those queued behind it wait for the
    # replacement (down 0.5 s), then run on it
    handles = [_NeverAnswers("w0")]
    _, res, _ = _drive(handles, count=4, concurrency=4, depth=1, call_timeout_s=5.0, stop_after=60.0)
    assert not res.stopped_early
    assert res.ledger.outcome_counts()["ok"] == 4 and handles[0].replaced == 1
    assert res.sent == 4 and res.finished_s - res.started_s == pytest.approx(5.0 + 0.5 + 0.04, abs=0.02)


class _FailsLong(FakeWorkerHandle):
    async def call(self, group):
        raise RuntimeError("x" * 500 + "\nsecond line")


def test_an_error_sample_is_the_first_line_cut_to_300_characters():
    _, res, _ = _drive([_FailsLong("w0")], count=2, concurrency=1)
    assert res.error_samples == {"error": "RuntimeError: " + "x" * 286}
    assert res.ledger.outcome_counts()["error"] == 2


def test_open_loop_duration_counts_after_the_warmup():
    handles = [FakeWorkerHandle("w0", service_s=0.001, lanes=4)]
    sched, res, _ = _drive(handles, count=100_000, rate=1000.0, duration_s=2.0, warmup=500)
    assert res.not_sent == 0 and res.sent == len(sched)  # the schedule and the driver end together


class _DiesWithLateFailures(FakeWorkerHandle):
    """Dies at its 5th call and is gone for good; the calls in flight then fail one after another, the last
    ones after its recovery already failed (a Ray actor's in-flight calls do not all fail at one instant)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, service_s=1.0, lanes=8, down_s=None)
        self.futures: list[asyncio.Future] = []

    def submit(self, group):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.futures.append(fut)
        self.calls += 1
        if self.calls == 5:
            from cortexbench.errors import WorkerLostError

            for k, f in enumerate(self.futures):  # the first at once, the rest 10 ms apart
                loop.call_later(0.01 * k, lambda f=f: f.done() or f.set_exception(WorkerLostError(self.name)))
        return fut


def test_images_whose_worker_loss_is_known_after_every_worker_is_gone_are_still_accounted_for():
    """Found by a real-clock test that lost one image in 31: failures that arrive after the last worker's
    recovery failed were parked for a recovery that never comes, and never recorded."""
    _, res, _ = _drive([_DiesWithLateFailures("w0")], count=40, concurrency=5, retries=1)
    assert res.error is not None and "every worker is gone" in res.error
    res.ledger.check_complete(res.sent)
    assert res.ledger.outcome_counts()["worker_died"] == res.sent == 5


# --- written against the survivors of a mutation run (docs/testing.md) ---

from cortexbench.errors import WorkerLostError  # noqa: E402
from cortexbench.protocol import RESULT_COLS, ResultGroup, WorkerState  # noqa: E402


def _run(sched, handles, opts, *, balancer="least-outstanding", clock=None, before=None, **driver_kw):
    """One Driver over ``sched`` in virtual time, with the end-of-run checks; ``before(driver, loop)``
    runs before ``run()``."""
    seen = []
    view = LiveView(sched.models, [h.name for h in handles], server=None, run_id="t", backend="fake", quiet=True)
    view.start_mode(opts.mode, len(sched), sched.warmup)

    def progress(p):
        seen.append(p)
        view.fold(p)

    async def main():
        loop = asyncio.get_running_loop()
        bal = make_balancer(balancer, len(handles), len(sched.models))
        driver = Driver(sched, handles, bal, opts, clock=driver_kw.pop("driver_clock", loop.time),
                        on_progress=progress, **driver_kw)
        if before is not None:
            before(driver, loop)
        return driver, await driver.run()

    driver, res = run_virtual(main(), clock)
    _check_end_of_run(driver, res, sched, seen, view)
    return driver, res, seen


def _opts(**kw):
    base = dict(mode="cached", concurrency=None, spin_s=0.0, fold_interval_s=0.05)
    return DriverOptions(**{**base, **kw})


def test_a_run_reports_its_result_and_progress_exactly():
    handles = [FakeWorkerHandle("w0", lanes=2), FakeWorkerHandle("w1", lanes=2)]
    sched = make_schedule(count=60, models=MODELS, n_images=50, seed=1)
    _, res, seen = _run(sched, handles, _opts(mode="lru:2", concurrency=4))
    assert (res.mode, res.sent, res.not_sent, res.retries, res.cancelled) == ("lru:2", 60, 0, 0, 0)
    assert res.stopped_early is False and res.error is None and res.error_samples == {} and res.worker_losses == {}
    assert res.started_s == 1000.0 and res.finished_s == pytest.approx(1000.0 + 60 / 4 * 0.01)
    assert set(res.states) == {"w0", "w1"} and all(isinstance(s, WorkerState) for s in res.states.values())
    assert len(seen) >= 3  # a snapshot every fold interval, not only at the end
    for p in seen[:-1]:
        assert p.mode == "lru:2" and p.workers == ("w0", "w1")
    assert [round(p.elapsed_s, 9) for p in seen[:2]] == [0.05, 0.1]
    last = seen[-1]
    assert (last.scheduled, last.sent, last.done, last.failed) == (60, 60, 60, 0)
    assert last.elapsed_s == pytest.approx(res.finished_s - res.started_s)
    assert sum(len(p.new_rows) for p in seen) == 60 and set(last.states) == {"w0", "w1"}
    # what the workers answered reaches the ledger, row by row
    led = res.ledger
    item = led.column("item")
    assert (led.column("hit") == 1).all()
    assert np.array_equal(led.column("input_idx"), sched.image_idx[item])
    assert np.array_equal(led.column("top1"), sched.model_idx[item])
    assert np.array_equal(led.column("checksum"), item / 2)


def test_start_at_waits_for_the_agreed_start():
    sched = make_schedule(count=20, models=MODELS, n_images=5, rate=100.0, seed=2)
    _, res, _ = _run(sched, [FakeWorkerHandle("w0")], _opts(), start_at=1002.5)
    assert res.started_s == 1002.5
    np.testing.assert_allclose(_by_item(res, "scheduled_s"), sched.send_at_s, rtol=0, atol=1e-9)
    _, res, _ = _run(sched, [FakeWorkerHandle("w0")], _opts(), start_at=900.0)  # already past: no wait
    assert res.started_s == 1000.0


def test_worker_ids_and_names_label_the_rows():
    handles = [FakeWorkerHandle("a0", die_at_call=2, down_s=None, service_s=0.01), FakeWorkerHandle("a1")]
    sched = make_schedule(count=30, models=MODELS, n_images=5, seed=3)
    # a shard's two workers are workers 3 and 1 of the run's four
    _, res, _ = _run(sched, handles, _opts(concurrency=4, retries=0), worker_ids=[3, 1],
                     worker_names=["x", "y", "z", "q"])
    assert res.ledger.workers == ("x", "y", "z", "q")
    assert set(res.ledger.column("worker").tolist()) == {3, 1}
    died = res.ledger.column("outcome") == WORKER_DIED
    assert died.any() and (res.ledger.column("worker")[died] == 3).all()


@pytest.mark.parametrize("max_group, error_text", [(2, "model b broke\ntraceback"), (3, "model b broke\ntraceback"),
                                                   (2, None)])
def test_grouped_calls_count_each_images_outcome_and_message(max_group, error_text):
    handles = [FakeWorkerHandle("w0", lanes=4, fail_models=(1,), error_text=error_text)]
    sched = make_schedule(count=200, models=MODELS, n_images=5, seed=4)
    _, res, seen = _run(sched, handles, _opts(concurrency=8, max_group=max_group, depth=2))
    counts = res.ledger.outcome_counts()
    n_b = int(np.count_nonzero(sched.model_idx == 1))
    assert counts["model_error"] == n_b and counts["ok"] == 200 - n_b
    assert (seen[-1].done, seen[-1].failed) == (200 - n_b, n_b)
    assert res.error_samples == ({"model_error": "model b broke"} if error_text else {})
    assert max(handles[0].groups) == max_group


def test_the_first_image_goes_alone_and_the_rest_are_grouped_per_loop_turn():
    # closed loop of 8 on one worker with 2 call slots: the first image finds it idle and goes at once;
    # the 7 others arrive in the same loop turn and go out as groups of up to 4 as slots free
    handles = [FakeWorkerHandle("w0", lanes=8, service_s=0.01)]
    sched = make_schedule(count=24, models=MODELS, n_images=5, seed=5)
    _, res, _ = _run(sched, handles, _opts(concurrency=8, max_group=4, depth=2))
    assert handles[0].groups[:3] == [1, 4, 3]
    assert sum(handles[0].groups) == 24 and res.ledger.outcome_counts()["ok"] == 24
    assert (_by_item(res, "sent_s")[:5] == 0).all()  # the second call goes out in the same loop turn
    handles = [FakeWorkerHandle("w0", lanes=8, service_s=0.01)]
    _run(sched, handles, _opts(concurrency=3, max_group=4, depth=2))
    assert handles[0].groups[:2] == [1, 2]  # two queued images: one call of two
    handles = [FakeWorkerHandle("w0", lanes=8, service_s=0.01)]
    _run(sched, handles, _opts(concurrency=8, max_group=2, depth=2))
    assert handles[0].groups[:3] == [1, 2, 2]


def test_a_grouped_call_lost_with_its_worker_retries_each_image_once():
    handles = [FakeWorkerHandle("w0", die_at_call=3, down_s=0.2, lanes=4), FakeWorkerHandle("w1", lanes=4)]
    sched = make_schedule(count=100, models=MODELS, n_images=5, seed=6)
    _, res, _ = _run(sched, handles, _opts(concurrency=8, max_group=4, depth=2))
    attempts = res.ledger.column("attempts")
    assert res.retries == handles[0].lost_images > 1
    assert np.bincount(attempts, minlength=3).tolist() == [0, 100 - res.retries, res.retries]


def test_the_affinity_balancer_gets_each_images_model():
    handles = [FakeWorkerHandle(f"w{i}") for i in range(4)]
    sched = make_schedule(count=200, models=MODELS, n_images=5, seed=7)
    _, res, _ = _run(sched, handles, _opts(concurrency=1), balancer="affinity")
    homes = make_balancer("affinity", 4, 4)
    led = res.ledger
    for m in range(4):  # one image at a time: never a spill, every image on its model's home
        assert set(led.column("worker")[led.column("model_idx") == m].tolist()) == set(homes.homes(m))


class _Scripted:
    """A worker that answers each call after 10 ms with the next (hits_total, inflight) of ``states``;
    its call ``die_at`` fails as a lost worker, which comes back 0.1 s later."""

    def __init__(self, name, states, die_at=None):
        self.name, self.states, self.die_at, self.calls = name, list(states), die_at, 0

    def submit(self, group):
        return asyncio.ensure_future(self._call(group))

    async def _call(self, group):
        self.calls += 1
        if self.calls == self.die_at:
            await asyncio.sleep(0.001)
            raise WorkerLostError("gone")
        await asyncio.sleep(0.01)
        rows = np.zeros((len(group), len(RESULT_COLS)))
        rows[:, 0] = group.rows[:, 0]
        rows[:, 2] = 1
        hits, inflight = self.states.pop(0)
        state = WorkerState(misses_total=hits, inflight=inflight)
        return ResultGroup(rows, {}, state), asyncio.get_running_loop().time()

    async def recover(self):
        await asyncio.sleep(0.1)


def test_the_newest_worker_counters_are_kept_whatever_order_replies_come_in():
    states = [(3, 0), (5, 0), (5, 1), (4, 0)]  # (5, 1) is the newest: most served, the later of two equal
    # (served = hits + misses; these are all misses)
    sched = make_schedule(count=4, models=MODELS, n_images=5, seed=0)
    _, res, _ = _run(sched, [_Scripted("w0", states)], _opts(concurrency=1))
    assert res.states["w0"] == WorkerState(misses_total=5, inflight=1)
    # after the worker died its counters start again: the first reply after the death is kept
    _, res, _ = _run(sched, [_Scripted("w0", [(3, 0), (5, 0), (1, 0), (2, 0)], die_at=3)], _opts(concurrency=1))
    assert res.worker_losses == {"w0": 1} and res.states["w0"] == WorkerState(misses_total=2)


class _CancelledCall(FakeWorkerHandle):
    """Its second call's future is cancelled by the transport (as a Ray ref can be)."""

    def submit(self, group):
        fut = super().submit(group)
        if self.calls == 1 and not getattr(self, "_cancelled_one", False):
            self._cancelled_one = True
            asyncio.get_running_loop().call_later(0.005, fut.cancel)
        return fut


def test_a_cancelled_call_fails_its_images_as_cancelled():
    handles = [_CancelledCall("w0"), FakeWorkerHandle("w1")]
    sched = make_schedule(count=20, models=MODELS, n_images=5, seed=0)
    _, res, _ = _run(sched, handles, _opts(concurrency=2))
    assert res.ledger.outcome_counts()["cancelled"] == 1 and res.ledger.outcome_counts()["ok"] == 19
    assert res.error_samples == {"cancelled": "the call was cancelled"}


class _RaisesOnSubmit(FakeWorkerHandle):
    def submit(self, group):
        if self.calls == 2 and not getattr(self, "_raised", False):
            self._raised = True
            raise RuntimeError("could not serialise")
        return super().submit(group)


class _AnswersTooMuch(FakeWorkerHandle):
    async def call(self, group):
        result, t = await super().call(group)
        if self.images == 3:
            return ResultGroup(np.vstack([result.rows, result.rows]), {}, result.state), t
        return result, t


@pytest.mark.parametrize("handle, outcome, sample", [
    (_RaisesOnSubmit, ERROR, "RuntimeError: could not serialise"),
    (_AnswersTooMuch, ERROR, "driver: WorkerError: worker w0 answered 2 results for 1 images"),
])
def test_a_bad_call_fails_its_images_on_its_own_worker(handle, outcome, sample):
    handles = [handle("w0"), FakeWorkerHandle("w1")]
    sched = make_schedule(count=40, models=MODELS, n_images=5, seed=0)
    _, res, _ = _run(sched, handles, _opts(concurrency=2))
    counts = res.ledger.outcome_counts()
    assert counts[OUTCOMES[outcome]] == 1 and counts["ok"] == 39
    assert res.error_samples == {OUTCOMES[outcome]: sample}


def test_a_closed_loop_duration_stops_dispatching_at_the_deadline():
    # one image at a time, 0.125 s each: about 4 images fit in 0.5 s
    sched = make_schedule(count=100, models=MODELS, n_images=5, seed=0)
    _, res, _ = _run(sched, [FakeWorkerHandle("w0", service_s=0.125)], _opts(concurrency=1, duration_s=0.5))
    assert res.sent in (4, 5) and res.stopped_early and res.finished_s - res.started_s == pytest.approx(0.5, abs=0.13)


def test_an_image_due_exactly_at_the_deadline_is_not_sent():
    from cortexbench.schedule import Schedule

    n = 5
    sched = Schedule(models=MODELS, item=np.arange(n), model_idx=np.zeros(n, np.int16), image_idx=np.zeros(n, np.int32),
                     send_at_s=np.arange(n) * 0.25, warmup=0, rate=4.0, seed=0, popularity="uniform")
    _, res, _ = _run(sched, [FakeWorkerHandle("w0", service_s=0.001)], _opts(duration_s=0.5))
    assert res.sent == 2 and res.stopped_early  # due at 0 and 0.25; the one due at 0.5 is not


def test_an_open_loop_duration_counts_from_the_first_counted_item():
    sched = make_schedule(count=1000, models=MODELS, n_images=5, rate=100.0, warmup=5, seed=8)  # 10 s, uncut
    _, res, _ = _run(sched, [FakeWorkerHandle("w0", service_s=0.001)], _opts(duration_s=1.0))
    end = sched.send_at_s[5] + 1.0
    assert res.sent == int(np.count_nonzero(sched.send_at_s < end)) and res.stopped_early


@pytest.mark.parametrize("how", ["before", "slot", "timer", "deadline", "parked"])
def test_a_stopped_run_ends_when_its_last_call_does_not_after_the_drain_timeout(how):
    sched = make_schedule(count=50, models=MODELS, n_images=5,
                          rate=100.0 if how in ("timer", "deadline", "parked") else None, seed=0)
    opts = _opts(concurrency=None if sched.open_loop else 2, drain_timeout_s=100.0,
                 duration_s=0.105 if how == "deadline" else None)
    handles = [FakeWorkerHandle("w0", service_s=0.03, die_at_call=3 if how == "parked" else None, down_s=5.0)]

    def before(driver, loop):
        if how == "before":
            driver.stop()
        elif how != "deadline":
            loop.call_later(0.2 if how == "parked" else 0.1, driver.stop)

    _, res, _ = _run(sched, handles, opts, before=before)
    assert res.stopped_early
    assert res.finished_s - res.started_s < 1.0  # not the 100 s drain timeout
    if how == "before":
        assert res.sent == 0


def test_a_stop_leaves_queued_images_unsent_and_uncounted():
    handles = [FakeWorkerHandle("w0", service_s=1.0)]
    sched = make_schedule(count=20, models=MODELS, n_images=5, seed=0)
    _, res, _ = _run(sched, handles, _opts(concurrency=8, depth=1, drain_timeout_s=100.0),
                     before=lambda d, loop: loop.call_later(0.5, d.stop))
    assert res.sent == 1 and res.not_sent == 19 and len(res.ledger) == 1
    assert res.ledger.outcome_counts()["ok"] == 1 and res.error_samples == {}
    assert res.finished_s - res.started_s == pytest.approx(1.0)


def test_images_due_while_a_worker_is_down_go_to_the_others_on_time():
    handles = [FakeWorkerHandle("w0", die_at_call=3, down_s=0.5), FakeWorkerHandle("w1")]
    sched = make_schedule(count=200, models=MODELS, n_images=5, rate=50.0, seed=9)
    _, res, _ = _run(sched, handles, _opts())
    retried = _by_item(res, "attempts") > 1
    delay = _by_item(res, "sent_s") - _by_item(res, "scheduled_s")
    assert retried.sum() == 1 and (delay[~retried] == 0).all()


def test_images_due_while_the_only_worker_is_down_wait_for_it_each_time():
    handles = [FakeWorkerHandle("w0", die_at_call=(3, 8), down_s=0.5)]
    sched = make_schedule(count=60, models=MODELS, n_images=5, rate=20.0, seed=9)
    _, res, _ = _run(sched, handles, _opts())
    assert res.ledger.outcome_counts()["ok"] == 60 and res.worker_losses == {"w0": 2}
    assert (_by_item(res, "sent_s") > _by_item(res, "scheduled_s")).sum() > 2  # they waited for it


def test_a_worker_gone_for_good_leaves_the_run_to_the_others():
    handles = [FakeWorkerHandle("w0", die_at_call=2, down_s=None), FakeWorkerHandle("w1")]
    sched = make_schedule(count=50, models=MODELS, n_images=5, seed=0)
    _, res, _ = _run(sched, handles, _opts(concurrency=2))
    assert res.error is None and res.ledger.outcome_counts()["ok"] == 50 and not res.stopped_early
    handles = [FakeWorkerHandle("w0", die_at_call=2, down_s=None), FakeWorkerHandle("w1", die_at_call=4, down_s=None)]
    _, res, _ = _run(sched, handles, _opts(concurrency=2, retries=0))
    assert res.error == "every worker is gone (last: worker w1 is gone)" and res.stopped_early
    assert res.error_samples == {"worker_died": "worker w0 died; retries ran out"}


def test_the_spin_sends_each_image_exactly_when_due():
    # a driver clock that moves 0.1 ms per read: the last stretch before each send is a busy wait
    now = VirtualTime()

    def creeping():
        now.now += 1e-4
        return now.now

    sched = make_schedule(count=50, models=MODELS, n_images=5, rate=100.0, seed=0)
    _, res, _ = _run(sched, [FakeWorkerHandle("w0", service_s=0.001)], _opts(spin_s=0.001), clock=now,
                     driver_clock=creeping)
    delay = _by_item(res, "sent_s") - _by_item(res, "scheduled_s")
    assert (delay >= 0).all() and (delay < 8e-4).all()  # not a whole spin_s late


def test_a_stop_after_the_last_send_still_ends_the_drain_on_time():
    # everything is sent at once; the second call never answers; stop() at 1 s: the drain gives it 2 s more
    _, res, _ = _run(make_schedule(count=2, models=MODELS, n_images=5, seed=0), [_NeverAnswers("w0")],
                     _opts(concurrency=2, drain_timeout_s=2.0), before=lambda d, loop: loop.call_later(1.0, d.stop))
    assert res.cancelled == 1 and res.ledger.outcome_counts()["ok"] == 1
    assert res.finished_s - res.started_s == pytest.approx(3.0)
