"""The stream driver: replays a seeded schedule through a balancer onto worker handles, one mode at a time.

Plain asyncio; it talks to workers only through ``WorkerHandle`` (Ray actors, compiled graphs and unit-test
fakes all implement it), so it imports no Ray.

One image's life::

    dispatcher ──(scheduled time)──> Balancer.pick ──> pending[w] ──flush──group──> handle.submit
                                                                                   │ (a future)
    ledger row (ok | failed kind) <── results (stage times from the worker) <──────┘ (its done callback)

- When an image is due: ``pacing.Pacer`` (open loop: its Poisson time; closed loop: a free slot).  What is
  known of each image, and its ledger row, is kept by ``tally.Tally``.
- Sending is plain callbacks, not a task per call: an image for an idle worker is sent at once (the
  lowest latency); otherwise it waits in the worker's queue and a flush (the next loop turn, or the
  completion of a call) sends up to ``max_group`` queued images per call, keeping up to ``depth`` calls in
  flight, so the transport's round trip does not serialise the device.  With ``max_group=1`` every image
  is its own call (the plain actor path).
- ``send_delay`` (sent - scheduled) is recorded for every image; the share sent more than 1 ms late is
  reported, so an overloaded driver shows instead of flattering the result.
- Back-pressure: at most ``backlog`` images (workers x depth x max_group) wait in the workers' queues; an
  open loop far above capacity makes the dispatcher wait for room with the next due image, which then goes
  out late (and counts from its due time).  So the driver's queues and the calls in flight per worker
  (``depth``, the Ray task backlog) stay bounded whatever the rate; the schedule is precomputed.
- A worker that dies (``WorkerLostError``): its images are retried on live workers up to ``retries``
  times, then counted as failed (``worker_died``); the worker rejoins when its handle has recovered.
- A call not answered within ``call_timeout_s`` (``--image-timeout``): the worker is taken as hung; its
  images are retried elsewhere like a dead worker's (those out of retries fail as ``timeout``) and the
  handle replaces it (``WorkerHandle.replace``: ended, restarted, set up), so a worker that hangs, or a
  transport that lost a reply, cannot hang the run.
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
from cortexbench.ledger import OUTCOMES
from cortexbench.pacing import Pacer
from cortexbench.protocol import RequestGroup, ResultGroup, WorkerHandle
from cortexbench.recovery import Recovery
from cortexbench.schedule import Schedule
from cortexbench.tally import Tally

WORKER_DIED, TIMEOUT, CANCELLED, ERROR = (OUTCOMES.index(n) for n in ("worker_died", "timeout", "cancelled", "error"))


class Driver(Recovery):
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
        nw = len(handles)
        ids = np.asarray(worker_ids if worker_ids is not None else range(nw), np.int16)
        names = tuple(worker_names) if worker_names is not None else tuple(h.name for h in handles)
        self.tally = tally = Tally(schedule, ids, names)
        # the tally's arrays, by schedule position (the hot path's names)
        self.scheduled_s, self.sent_s, self.attempts, self.worker_of = \
            tally.scheduled_s, tally.sent_s, tally.attempts, tally.worker_of
        self.outstanding = np.zeros(nw, np.int64)
        self.alive = np.ones(nw, bool)
        self.pending: list[deque[int]] = [deque() for _ in range(nw)]
        self.calls_inflight = [0] * nw
        # images assigned to a worker and not yet sent, at most (one more full round of calls per worker): the
        # dispatcher waits for room beyond that, so an open loop far above capacity queues nothing unbounded
        self.backlog = max(1, nw * options.depth * options.max_group)
        self._room = asyncio.Event()
        self._flush_due = [False] * nw
        self._model_of = tally.model_idx.tolist()  # plain ints: the balancer's hot path
        self._n_down = 0  # workers lost and not yet back (the dispatcher checks ``alive`` only then)
        # what a group carries, by schedule position: item id, model index, image index
        self._req = np.column_stack([tally.item, tally.model_idx, tally.image_idx])
        self._restarted = [False] * nw  # a worker lost since its last state: its counters start again
        self._life = [0] * nw  # how many times each worker was lost: a call knows which life it was sent to
        self.losses: dict[str, int] = {}
        self.hangs: dict[str, int] = {}
        self._outages: list[list[Any]] = []  # [worker, lost at (run seconds), back after (seconds) or None]
        self._down_since: dict[int, list[Any]] = {}
        self.n_sent = self.n_done = self.n_failed = self.n_retries = self.n_cancelled = 0
        self.dispatched = 0
        self._stop = asyncio.Event()
        self._dispatch_done = asyncio.Event()
        self._all_done = asyncio.Event()
        self.pacer = Pacer(schedule, options.concurrency, options.duration_s, options.spin_s, clock, self._stop)
        self._alive_ev = asyncio.Event()
        self._parked: deque[int] = deque()  # images to retry while no worker is alive
        self._gone = 0
        self.error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # calls in flight: future -> (worker, positions, its timeout timer, the worker's life it was sent to)
        self._calls: dict[asyncio.Future[Any], tuple[int, list[int], asyncio.TimerHandle | None, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._folded = 0
        self._t0 = 0.0

    # --- control ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop dispatching; what is in flight drains (bounded), the rest is cancelled and counted."""
        self._stop.set()
        self.pacer.wake()
        self._alive_ev.set()
        self._room.set()

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
        self._t0 = self.tally.t0 = self.clock()
        self.pacer.start(self._t0)
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
        t = self.tally
        return DriverResult(self.opt.mode, t.ledger, self.n_sent, not_sent, self._t0, self.clock(),
                            self.n_retries, self.n_cancelled, stopped_early, dict(t.states), dict(self.losses),
                            dict(self.hangs), tuple((n, t_lost, back) for n, t_lost, back in self._outages),
                            error=self.error, error_samples=dict(t.error_samples))

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
        pacer = self.pacer
        for pos in range(len(self.schedule)):
            scheduled = await pacer.due(pos)
            if scheduled is None:
                if pacer.expired:
                    self.stop()
                break
            while not self._stop.is_set():
                if self._n_down and not self.alive.any():
                    self._alive_ev.clear()
                    await self._alive_ev.wait()
                elif sum(map(len, self.pending)) >= self.backlog:
                    self._room.clear()  # back-pressure: the image waits here, due; it goes out late, and says so
                    await self._room.wait()
                else:
                    break
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
            self._room.set()

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
        """A call not answered in time: its worker is hung (see the module docstring)."""
        entry = self._calls.pop(fut, None)
        if entry is None:
            return
        w, positions, _, life = entry
        self.calls_inflight[w] -= 1
        fut.cancel()
        self._worker_lost(w, positions, life, hung=True)

    def _completed(self, w: int, positions: list[int], result: ResultGroup, received: float) -> None:
        rows = result.rows
        if len(rows) != len(positions):
            raise WorkerError(f"worker {self.handles[w].name} answered {len(rows)} results for {len(positions)} "
                              f"images")
        self.outstanding[w] -= len(positions)
        self.tally.keep_state(self.handles[w].name, result.state, self._restarted[w])
        self._restarted[w] = False
        self.tally.answered(w, positions, rows, received)
        failed = int(np.count_nonzero(rows[:, 1])) if result.errors or len(rows) > 1 else int(rows[0, 1] != 0)
        for i, msg in result.errors.items():
            self.tally.sample_error(int(rows[i, 1]), msg)
        self.n_failed += failed
        self.n_done += len(positions) - failed
        self.pacer.release(len(positions))

    def _call_failed(self, w: int, positions: list[int], outcome: int, msg: str) -> None:
        """A call that failed as a whole (not a lost worker): its images fail as ``outcome``."""
        self.outstanding[w] -= len(positions)
        self._record_failed(positions, outcome, self.clock(), msg)
        self.pacer.release(len(positions))

    def _check_all_done(self) -> None:
        if (self._dispatch_done.is_set() and self.n_done + self.n_failed >= self.n_sent and not any(self.pending)
                and not self._parked):
            self._all_done.set()

    def _record_failed(self, positions: list[int], outcome: int, now: float, msg: str = "") -> None:
        self.n_failed += self.tally.failed(positions, outcome, now, msg)
        self._check_all_done()

    # --- progress -----------------------------------------------------------------------------------

    async def _fold_loop(self) -> None:
        while True:
            await asyncio.sleep(self.opt.fold_interval_s)
            self._fold()

    def _fold(self) -> None:
        self.tally.flush()
        if self.on_progress is None:
            return
        ledger = self.tally.ledger
        new = ledger.slice(self._folded, len(ledger))
        self._folded = len(ledger)
        self.on_progress(Progress(self.opt.mode, self.dispatched, self.n_sent, self.n_done, self.n_failed,
                                  self.clock() - self._t0, new, self.outstanding.tolist(), dict(self.tally.states),
                                  tuple(h.name for h in self.handles)))


async def _first(*aws: object) -> None:
    """Wait for the first of several awaitables; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


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
