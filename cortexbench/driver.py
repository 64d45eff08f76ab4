"""The stream driver: replays a seeded schedule through a balancer onto worker handles, one mode at a time.

Plain asyncio; it talks to workers only through ``WorkerHandle`` (Ray actors, compiled graphs and unit-test
fakes all implement it), so it imports no Ray.

One image's life::

    dispatcher ──(scheduled time)──> Balancer.pick ──> pending[w] ──flush──group──> handle.submit
                                                                                   │ (a future)
    ledger row (ok | failed kind) <── results (stage times from the worker) <──────┘ (its done callback)

- Open loop (``rate``): each image has a scheduled send time from one Poisson process; latency is counted
  from that time, so a slow system cannot hide its queueing (MLPerf LoadGen's Server scenario).
- Closed loop (``concurrency``): C images in flight; an image is scheduled when a slot frees.
- Sending is plain callbacks, not a task per call: an image for an idle worker is sent at once (the
  lowest latency); otherwise it waits in the worker's queue and a flush (the next loop turn, or the
  completion of a call) sends up to ``max_group`` queued images per call, keeping up to ``depth`` calls in
  flight, so the transport's round trip does not serialise the device.  With ``max_group=1`` every image
  is its own call (the plain actor path).  A call's future completes through a done callback; results are
  appended to the ledger in batches (at every fold and at the end).
- ``send_delay`` (sent - scheduled) is recorded for every image; the share sent more than 1 ms late is
  reported, so an overloaded driver shows instead of flattering the result.
- A worker that dies (``WorkerLostError``): its images are retried on live workers up to ``retries``
  times, then counted as failed (``worker_died``); the worker rejoins when its handle has recovered.
- A call not answered within ``call_timeout_s``: its images fail as ``timeout`` and the run goes on (a
  worker that hangs, or a transport that lost a reply, cannot hang the run).
- ``stop()`` (Ctrl-C, or the duration is up): dispatching stops, in-flight calls get ``drain_timeout_s``,
  the rest are cancelled and counted as ``cancelled``.  Every image sent ends in the ledger as ok or failed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cortexbench.balancer import Balancer, make_balancer
from cortexbench.driver_types import DriverOptions, DriverResult, Progress
from cortexbench.errors import WorkerError, WorkerLostError
from cortexbench.ledger import OUTCOMES, WORKER_STAGES, Ledger
from cortexbench.protocol import RequestGroup, ResultGroup, WorkerHandle, WorkerState
from cortexbench.schedule import Schedule

WORKER_DIED, TIMEOUT, CANCELLED, ERROR = (OUTCOMES.index(n) for n in ("worker_died", "timeout", "cancelled", "error"))
LATE_S = 1e-3


class Driver:
    """Runs one mode of one schedule (or one shard of it) over ``handles``."""

    def __init__(self, schedule: Schedule, handles: Sequence[WorkerHandle], balancer: Balancer,
                 options: DriverOptions, *, clock: Callable[[], float] = time.monotonic,
                 on_progress: Callable[[Progress], None] | None = None, start_at: float | None = None,
                 worker_ids: Sequence[int] | None = None, worker_names: Sequence[str] | None = None) -> None:
        self.schedule = schedule
        self.handles = list(handles)
        self.balancer = balancer
        self.opt = options
        self.clock = clock
        self.on_progress = on_progress
        self.start_at = start_at
        n, nw = len(schedule), len(handles)
        self.model_idx = np.asarray(schedule.model_idx, np.int64)
        self.image_idx = np.asarray(schedule.image_idx, np.int64)
        self.scheduled_s = np.full(n, np.nan)
        self.sent_s = np.full(n, np.nan)
        self.attempts = np.zeros(n, np.int64)
        self.worker_of = np.full(n, -1, np.int64)
        self.outstanding = np.zeros(nw, np.int64)
        self.alive = np.ones(nw, bool)
        self.pending: list[deque[int]] = [deque() for _ in range(nw)]
        self.calls_inflight = [0] * nw
        self._flush_due = [False] * nw
        self._model_of = self.model_idx.tolist()  # plain ints: the balancer's hot path
        self._n_down = 0  # workers lost and not yet back (the dispatcher checks ``alive`` only then)
        # what a group carries, by schedule position: item id, model index, image index
        self._req = np.column_stack([np.asarray(schedule.item, np.int64), self.model_idx, self.image_idx])
        self.worker_ids = np.asarray(worker_ids if worker_ids is not None else range(nw), np.int16)
        names = tuple(worker_names) if worker_names is not None else tuple(h.name for h in handles)
        self.ledger = Ledger(capacity=max(n, 1), models=schedule.models, workers=names)
        self.states: dict[str, WorkerState] = {}
        self._restarted = [False] * nw  # a worker lost since its last state: its counters start again
        self._life = [0] * nw  # how many times each worker was lost: a call knows which life it was sent to
        self.losses: dict[str, int] = {}
        self.n_sent = self.n_done = self.n_failed = self.n_retries = self.n_cancelled = 0
        self.dispatched = 0
        self._stop = asyncio.Event()
        self._dispatch_done = asyncio.Event()
        self._all_done = asyncio.Event()
        self._closed_loop = False
        self._free_slots = 0
        self._slot_ev = asyncio.Event()
        self._alive_ev = asyncio.Event()
        self._parked: deque[int] = deque()  # images to retry while no worker is alive
        self._gone = 0
        self.error: str | None = None
        self.error_samples: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # calls in flight: future -> (worker, positions, its timeout timer, the worker's life it was sent to)
        self._calls: dict[asyncio.Future[Any], tuple[int, list[int], asyncio.TimerHandle | None, int]] = {}
        self._results: list[tuple[int, list[int], np.ndarray, float]] = []  # answered, not yet in the ledger
        self._loop: asyncio.AbstractEventLoop | None = None
        self._folded = 0
        self._t0 = 0.0

    # --- control ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop dispatching; what is in flight drains (bounded), the rest is cancelled and counted."""
        self._stop.set()
        self._slot_ev.set()
        self._alive_ev.set()

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> DriverResult:
        self._loop = asyncio.get_running_loop()
        loop_t = self.clock()
        if self.start_at is not None and self.start_at > loop_t:
            await asyncio.sleep(self.start_at - loop_t)
        self._t0 = self.clock()
        if self.opt.concurrency is not None and self.schedule.send_at_s is None:
            self._closed_loop = True
            self._free_slots = self.opt.concurrency
        folder = self._spawn(self._fold_loop())
        dispatcher = self._spawn(self._dispatch())
        stopped_early = False
        try:
            await dispatcher
            stopped_early = self._stop.is_set()
            await self._drain()
        finally:
            for t in [folder, *self._tasks]:
                t.cancel()
            if self._calls:  # only when run() itself is cancelled: what was in flight is cancelled
                self._cancel_rest()
            await asyncio.gather(folder, *list(self._tasks), return_exceptions=True)
        self._fold()
        not_sent = len(self.schedule) - self.n_sent
        return DriverResult(self.opt.mode, self.ledger, self.n_sent, not_sent, self._t0, self.clock(),
                            self.n_retries, self.n_cancelled, stopped_early, dict(self.states), dict(self.losses),
                            error=self.error, error_samples=dict(self.error_samples))

    async def _drain(self) -> None:
        """Wait for every image sent; once stop() is called, only ``drain_timeout_s``, then cancel."""
        if not self._stop.is_set():
            await _first(self._all_done.wait(), self._stop.wait())
        if self._all_done.is_set():
            return
        for w, q in enumerate(self.pending):  # stopping: images not yet sent stay unsent
            retried = [p for p in q if self.attempts[p] > 0]  # ...but a retry was sent once: it failed
            self.outstanding[w] -= len(q)
            q.clear()
            self._record_failed(retried, WORKER_DIED, self.clock())
        self._fail_parked()
        self._check_all_done()
        if not self._all_done.is_set():
            try:
                await asyncio.wait_for(self._all_done.wait(), timeout=self.opt.drain_timeout_s)
            except asyncio.TimeoutError:
                self._cancel_rest()

    def _cancel_rest(self) -> None:
        now = self.clock()
        for fut, (w, positions, timer, _) in list(self._calls.items()):
            del self._calls[fut]
            if timer is not None:
                timer.cancel()
            self.calls_inflight[w] -= 1
            self.outstanding[w] -= len(positions)
            fut.cancel()
            self._record_failed(positions, CANCELLED, now)
            self.n_cancelled += len(positions)

    # --- dispatch -----------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        sched = self.schedule
        n = len(sched)
        send_at = sched.send_at_s
        deadline = self._t0 + self.opt.duration_s if self.opt.duration_s else None
        if deadline is not None and sched.send_at_s is not None:
            # open loop: the duration is the measured part, after the warm-up (as make_schedule cuts it)
            counted = np.flatnonzero(sched.item >= sched.warmup)
            if len(counted):
                deadline += float(sched.send_at_s[counted[0]])
        clock = self.clock
        spin = self.opt.spin_s
        for pos in range(n):
            if self._stop.is_set():
                break
            if send_at is not None:
                due = self._t0 + float(send_at[pos])
                if due - clock() > spin:
                    await _sleep_until(due - spin, clock, self._stop)
                while clock() < due and not self._stop.is_set():
                    await asyncio.sleep(0)  # the last stretch: asyncio's timers are too coarse
                if self._stop.is_set():
                    break
                scheduled = due
            else:
                while self._free_slots <= 0 and not self._stop.is_set():
                    self._slot_ev.clear()
                    await self._slot_ev.wait()
                if self._stop.is_set():
                    break
                self._free_slots -= 1
                scheduled = clock()
            if deadline is not None and scheduled >= deadline:
                self.stop()
                break
            while self._n_down and not self.alive.any() and not self._stop.is_set():
                self._alive_ev.clear()
                await self._alive_ev.wait()
            if self._stop.is_set():
                break
            self._assign(pos, scheduled)
        self._dispatch_done.set()
        self._check_all_done()

    def _assign(self, pos: int, scheduled: float) -> None:
        w = self.balancer.pick(self._model_of[pos], self.outstanding, self.alive)
        if math.isnan(self.scheduled_s[pos]):
            self.scheduled_s[pos] = scheduled
            self.dispatched += 1
        self.worker_of[pos] = w
        self.outstanding[w] += 1
        pending = self.pending[w]
        pending.append(pos)
        if self.calls_inflight[w] == 0 and len(pending) == 1:
            self._flush(w)  # an idle worker: send at once
        elif not self._flush_due[w]:  # a busy one: group what comes in this loop turn
            self._flush_due[w] = True
            assert self._loop is not None
            self._loop.call_soon(self._flush, w)

    def _flush(self, w: int) -> None:
        """Send the worker's queued images, up to ``max_group`` per call, while it has call slots."""
        self._flush_due[w] = False
        pending = self.pending[w]
        max_group, depth = self.opt.max_group, self.opt.depth
        while pending and self.calls_inflight[w] < depth and self.alive[w]:
            if max_group == 1 or len(pending) == 1:
                self._send(w, [pending.popleft()])
            else:
                self._send(w, [pending.popleft() for _ in range(min(max_group, len(pending)))])

    def _send(self, w: int, positions: list[int]) -> None:
        now = self.clock()
        if len(positions) == 1:
            p = positions[0]
            self.n_sent += int(self.attempts[p] == 0)
            self.attempts[p] += 1
            self.sent_s[p] = now
            rows = self._req[p:p + 1]
        else:
            pos = np.asarray(positions, np.int64)
            self.n_sent += int(np.count_nonzero(self.attempts[pos] == 0))
            self.attempts[pos] += 1
            self.sent_s[pos] = now
            rows = self._req[pos]
        self.calls_inflight[w] += 1
        try:
            fut = self.handles[w].submit(RequestGroup(rows))
        except Exception as e:  # a handle that raises instead of failing its future: the same to us
            assert self._loop is not None
            fut = self._loop.create_future()
            fut.set_exception(e)
        timer = None
        if self.opt.call_timeout_s is not None:
            assert self._loop is not None
            timer = self._loop.call_later(self.opt.call_timeout_s, self._timed_out, fut)
        self._calls[fut] = (w, positions, timer, self._life[w])
        fut.add_done_callback(self._answered)

    def _answered(self, fut: asyncio.Future[Any]) -> None:
        """A call's done callback (on the event loop)."""
        entry = self._calls.pop(fut, None)
        if entry is None:  # timed out or cancelled: already counted
            return
        w, positions, timer, life = entry
        if timer is not None:
            timer.cancel()
        self.calls_inflight[w] -= 1
        try:
            if fut.cancelled():
                self._call_failed(w, positions, CANCELLED, "the call was cancelled")
                return
            err = fut.exception()
            if err is None:
                result, received = fut.result()
                self._completed(w, positions, result, received)
            elif isinstance(err, WorkerLostError):
                self._worker_lost(w, positions, life)
            else:  # an unexpected transport error: count the images as failed, keep going
                self._call_failed(w, positions, ERROR, f"{type(err).__name__}: {err}")
        except Exception as e:  # a bug here must not leave the run waiting for images forever
            self._call_failed(w, positions, ERROR, f"driver: {type(e).__name__}: {e}")
        finally:
            self._flush(w)  # a call slot came free
            self._check_all_done()

    def _timed_out(self, fut: asyncio.Future[Any]) -> None:
        entry = self._calls.pop(fut, None)
        if entry is None:
            return
        w, positions, _, _ = entry
        self.calls_inflight[w] -= 1
        fut.cancel()
        self._call_failed(w, positions, TIMEOUT,
                          f"worker {self.handles[w].name} did not answer within {self.opt.call_timeout_s:g} s")
        self._flush(w)

    def _completed(self, w: int, positions: list[int], result: ResultGroup, received: float) -> None:
        rows = result.rows
        if len(rows) != len(positions):
            raise WorkerError(f"worker {self.handles[w].name} answered {len(rows)} results for {len(positions)} "
                              f"images")
        self.outstanding[w] -= len(positions)
        self._keep_state(w, self.handles[w].name, result.state)
        self._results.append((w, positions, rows, received))
        failed = int(np.count_nonzero(rows[:, 1])) if result.errors or len(rows) > 1 else int(rows[0, 1] != 0)
        for i, msg in result.errors.items():
            self._sample_error(int(rows[i, 1]), msg)
        self.n_failed += failed
        self.n_done += len(positions) - failed
        self._release(len(positions))
        if len(self._results) >= 1024:
            self._flush_results()

    def _flush_results(self) -> None:
        """Append the answered calls' rows to the ledger, in one go."""
        if not self._results:
            return
        done, self._results = self._results, []
        counts = [len(p) for _, p, _, _ in done]
        pos = np.fromiter((p for _, ps, _, _ in done for p in ps), np.int64, sum(counts))
        rows = np.concatenate([r for _, _, r, _ in done]) if len(done) > 1 else done[0][2]
        worker = np.repeat(self.worker_ids[[w for w, _, _, _ in done]], counts)
        received = np.repeat(np.array([t for _, _, _, t in done]), counts)
        self.ledger.add_many(
            item=self.schedule.item[pos], model_idx=self.model_idx[pos], image_idx=self.image_idx[pos],
            worker=worker, outcome=rows[:, 1].astype(np.int8), attempts=self.attempts[pos],
            hit=rows[:, 2].astype(np.int8), scheduled_s=self.scheduled_s[pos] - self._t0,
            sent_s=self.sent_s[pos] - self._t0, done_s=received - self._t0,
            stages=rows[:, 3:3 + len(WORKER_STAGES)], answers=rows[:, 3 + len(WORKER_STAGES):])

    def _call_failed(self, w: int, positions: list[int], outcome: int, msg: str) -> None:
        """A call that failed as a whole (not a lost worker): its images fail as ``outcome``."""
        self.outstanding[w] -= len(positions)
        self._record_failed(positions, outcome, self.clock(), msg)
        self._release(len(positions))

    def _keep_state(self, w: int, name: str, state: WorkerState) -> None:
        """Keep the newest counters of a worker.  Replies to calls in flight together may arrive in any
        order; the counters only grow within a mode, so the one that has served most images is the newest
        (after a restart the worker counts from zero again)."""
        prev = self.states.get(name)
        if prev is None or self._restarted[w] or _served(state) >= _served(prev):
            self.states[name] = state
            self._restarted[w] = False

    def _release(self, n: int) -> None:
        if self._closed_loop:
            self._free_slots += n
            self._slot_ev.set()

    def _check_all_done(self) -> None:
        if (self._dispatch_done.is_set() and self.n_done + self.n_failed >= self.n_sent and not any(self.pending)
                and not self._parked):
            self._all_done.set()

    def _sample_error(self, outcome: int, msg: str) -> None:
        """Keep the first message of each failure kind (one line) for the results."""
        lines = [line.strip() for line in str(msg).splitlines() if line.strip()]
        if lines and 0 <= outcome < len(OUTCOMES):
            self.error_samples.setdefault(OUTCOMES[outcome], lines[0][:300])

    def _record_failed(self, positions: list[int], outcome: int, now: float, msg: str = "") -> None:
        pos = np.asarray(positions, np.int64)
        n = len(pos)
        if not n:
            return
        self._sample_error(outcome, msg)
        self._flush_results()  # the ledger keeps rows in the order their outcome was known
        self.ledger.add_many(
            item=self.schedule.item[pos], model_idx=self.model_idx[pos], image_idx=self.image_idx[pos],
            worker=self.worker_ids[np.maximum(self.worker_of[pos], 0)], outcome=np.full(n, outcome, np.int8),
            attempts=self.attempts[pos], hit=np.full(n, -1, np.int8), scheduled_s=self.scheduled_s[pos] - self._t0,
            sent_s=self.sent_s[pos] - self._t0, done_s=np.full(n, now - self._t0),
            stages=np.full((n, len(WORKER_STAGES)), np.nan))
        self.n_failed += n
        self._check_all_done()

    # --- faults -------------------------------------------------------------------------------------

    def _worker_lost(self, w: int, positions: list[int], life: int) -> None:
        """A call failed because its worker died.  One death fails every call in flight on the worker; the
        first failure of a life counts the loss and starts the recovery, the others only retry their
        images (a call sent before the death fails as part of it, even if it is answered after the
        worker is back)."""
        name = self.handles[w].name
        if life == self._life[w] and self.alive[w]:  # the first failure of this life: the worker died
            self._life[w] += 1
            self.losses[name] = self.losses.get(name, 0) + 1
            self.alive[w] = False
            self._n_down += 1
            self._restarted[w] = True
            self._spawn(self._recover(w))
        self.outstanding[w] -= len(positions)
        retry = [p for p in positions if self.attempts[p] <= self.opt.retries]
        give_up = [p for p in positions if self.attempts[p] > self.opt.retries]
        if give_up:
            self._record_failed(give_up, WORKER_DIED, self.clock(), f"worker {name} died; retries ran out")
            self._release(len(give_up))
        # the worker's queued images go elsewhere too
        queued = list(self.pending[w])
        self.pending[w].clear()
        self.outstanding[w] -= len(queued)
        self.n_retries += len(retry)
        self._reassign([*retry, *queued])

    def _reassign(self, positions: list[int]) -> None:
        """Send images again through the balancer; park them while no worker is alive, until one is back.
        Once every worker is gone for good nothing comes back: they fail at once (as parked ones do)."""
        for p in positions:
            if self.alive.any():
                self._assign(p, float(self.scheduled_s[p]))
            else:
                self._parked.append(p)
        if self._parked and self._gone >= len(self.handles):
            self._fail_parked()

    def _fail_parked(self) -> None:
        """Give up on the parked images: those sent before failed (worker_died); those a dead worker had
        queued but never sent stay unsent (they count in ``not_sent``, not in the ledger)."""
        parked = list(self._parked)
        self._parked.clear()
        self._record_failed([p for p in parked if self.attempts[p] > 0], WORKER_DIED, self.clock())
        self._release(len(parked))

    async def _recover(self, w: int) -> None:
        try:
            await self.handles[w].recover()
        except WorkerError as e:
            self._gone += 1  # stays dead; the others carry on
            if self._gone >= len(self.handles):
                self.error = f"every worker is gone (last: {e})"
                self._fail_parked()
                self.stop()
            return
        self.alive[w] = True
        self._n_down -= 1
        self._alive_ev.set()
        self._flush(w)
        parked = list(self._parked)
        self._parked.clear()
        self._reassign(parked)

    # --- progress -----------------------------------------------------------------------------------

    async def _fold_loop(self) -> None:
        while True:
            await asyncio.sleep(self.opt.fold_interval_s)
            self._fold()

    def _fold(self) -> None:
        self._flush_results()
        if self.on_progress is None:
            return
        new = self.ledger.slice(self._folded, len(self.ledger))
        self._folded = len(self.ledger)
        self.on_progress(Progress(self.opt.mode, self.dispatched, self.n_sent, self.n_done, self.n_failed,
                                  self.clock() - self._t0, new, self.outstanding.tolist(), dict(self.states),
                                  tuple(h.name for h in self.handles)))


def _served(state: WorkerState) -> int:
    return state.hits_total + state.misses_total


async def _first(*aws: object) -> None:
    """Wait for the first of several awaitables; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _sleep_until(t: float, clock: Callable[[], float], stop: asyncio.Event) -> None:
    delay = t - clock()
    if delay <= 0:
        return
    if stop.is_set():
        return
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except asyncio.TimeoutError:
        pass


async def drive(schedule: Schedule, handles: Sequence[WorkerHandle], options: DriverOptions, *, balancer: str,
                seed: int, lru_capacity: int | None = None, on_progress: Callable[[Progress], None] | None = None,
                on_driver: Callable[[Driver | None], None] | None = None, start_at: float | None = None,
                worker_ids: Sequence[int] | None = None, worker_names: Sequence[str] | None = None,
                clock: Callable[[], float] = time.monotonic, manage_handles: bool = True) -> DriverResult:
    """The one place that wires handles, a balancer and a driver together (the coordinator, a target's
    driver shards and the benches call it): start the handles, run the driver, close the handles.
    ``on_driver`` is told the driver once it exists (and None when it is done), so that a caller can stop it;
    ``manage_handles`` False: the caller starts and closes the handles (several runs over the same ones)."""
    if manage_handles:
        for h in handles:
            await h.start()
    try:
        chooser = make_balancer(balancer, len(handles), len(schedule.models), seed=seed, lru_capacity=lru_capacity)
        driver = Driver(schedule, handles, chooser, options, clock=clock, on_progress=on_progress, start_at=start_at,
                        worker_ids=worker_ids, worker_names=worker_names)
        if on_driver is not None:
            on_driver(driver)
        try:
            return await driver.run()
        finally:
            if on_driver is not None:
                on_driver(None)
    finally:
        if manage_handles:
            for h in handles:
                await h.close()
