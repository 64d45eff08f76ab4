"""Test doubles for what cannot run here, and a virtual clock.

``FakeWorkerHandle`` stands in for a worker reached over Ray (the driver's tests need thousands of
images with exact service times), ``FakeTarget`` for a whole target of them; ``run_virtual`` runs a coroutine on an event loop whose clock jumps to
the next timer instead of sleeping, so a 10-second stream takes milliseconds and timings are exact.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import numpy as np

from cortexbench.errors import WorkerError, WorkerLostError
from cortexbench.protocol import (
    CHECKSUM,
    INFER,
    INPUT_IDX,
    RESULT_COLS,
    TOP1,
    RequestGroup,
    ResultGroup,
    WorkerState,
)
from cortexbench.target import WorkerInfo


class VirtualTime:
    """The clock of ``run_virtual``.  ``block(s)`` moves it on without running the loop: what a call that
    blocks the event loop's thread (a slow serialisation, a GC pause) does to a real driver."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start  # not 0: a driver that mixes up absolute and relative times shows

    def __call__(self) -> float:
        return self.now

    def block(self, seconds: float) -> None:
        self.now += seconds


class VirtualHang(RuntimeError):
    """``run_virtual`` found that the coroutine can never finish (what a hung driver looks like in virtual time)."""


def run_virtual(coro: Coroutine[Any, Any, Any], clock: VirtualTime | None = None, *,
                max_virtual_s: float = 600.0, max_busy_turns: int = 10_000) -> Any:
    """Run ``coro`` on a loop with virtual time: waiting for a timer advances the clock at once.

    A hang fails fast instead of blocking the test run (and each mutant of a mutation run) until a timeout:
    VirtualHang when the loop would wait with no timer (a deadlock), when the clock passes ``max_virtual_s``
    from its start (a periodic task going on forever), or after ``max_busy_turns`` loop turns in a row at
    the same time (a busy wait for a time that never comes)."""
    loop = asyncio.new_event_loop()
    now = clock if clock is not None else VirtualTime()
    select = loop._selector.select  # type: ignore[attr-defined]

    start = now.now
    still = 0  # loop turns in a row without the clock moving

    def virtual_select(timeout: float | None = None) -> Any:
        nonlocal still
        if timeout is None:  # no timer and nothing ready: in virtual time nothing can ever wake the loop
            raise VirtualHang("the event loop waits for nothing: deadlock")
        before = now.now
        if timeout > 0:
            now.now += timeout
        # asyncio runs a timer up to its clock resolution early: move the clock onto every timer that will
        # run now, as a real clock would be by then (the driver's last stretch before a send waits for
        # ``clock() >= due`` with sleep(0), which in virtual time would never end an instant short)
        soon = now.now + loop._clock_resolution  # type: ignore[attr-defined]
        now.now = max([now.now, *(h.when() for h in loop._scheduled if h.when() < soon)])  # type: ignore[attr-defined]
        if now.now > before:
            still = 0
            if now.now - start > max_virtual_s:
                raise VirtualHang(f"virtual time ran past {max_virtual_s:g} s: a loop that never ends")
            return select(0)
        still += 1
        if still > max_busy_turns:
            raise VirtualHang(f"{max_busy_turns} loop turns without the clock moving: a busy wait that never ends")
        return select(0)

    loop._selector.select = virtual_select  # type: ignore[attr-defined]
    loop.time = now  # type: ignore[method-assign]
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        result = loop.run_until_complete(coro)
    finally:
        loop.close()
    if errors:  # an exception in a callback: asyncio would only log it, and the run could look fine
        raise AssertionError(f"exception in the event loop: {errors[0].get('message')}: {errors[0].get('exception')!r}")
    return result


class FakeWorkerHandle:
    """A worker with ``lanes`` parallel lanes and a fixed service time per image (virtual time).

    ``die_at_call``: the worker process dies when its n-th call arrives (an int, or several call numbers,
    one death each), and as on Ray every call in flight on it fails with WorkerLostError at that moment,
    not only the call that triggered it; it comes back (``recover``) after ``down_s`` seconds with its
    counters and lanes reset, or never when ``down_s`` is None.  Calls made while it is dead fail too
    (Ray's ActorUnavailableError) and do not count as arrived.  ``fail_models``: model indices whose
    images fail with a model error (with the message ``error_text`` when given).  ``deaths`` and
    ``lost_images`` record what the deaths cost.  An image's answer columns are its image index (input),
    its model index (top1) and half its item id (checksum)."""

    def __init__(self, name: str, service_s: float = 0.01, lanes: int = 1,
                 die_at_call: int | tuple[int, ...] | None = None, down_s: float | None = 0.5,
                 fail_models: tuple[int, ...] = (), error_text: str | None = None) -> None:
        self.name = name
        self.service_s = service_s
        self.lanes = lanes
        self.die_at = {die_at_call} if isinstance(die_at_call, int) else set(die_at_call or ())
        self.down_s = down_s
        self.fail_models = fail_models
        self.error_text = error_text
        self.calls = 0
        self.images = 0
        self.max_inflight = 0
        self.inflight = 0
        self.dead = False
        self.deaths = 0
        self.lost_images = 0  # images whose call failed because the worker died
        self._deathwatch: set[asyncio.Future[None]] = set()  # one per call in flight: done when it dies
        self._lane_free = [0.0] * lanes
        self.groups: list[int] = []
        self.started = self.closed = 0  # start() and close() calls
        self.replaced = 0  # replace() calls (the driver took it as hung)

    def submit(self, group: RequestGroup) -> asyncio.Future[tuple[ResultGroup, float]]:
        return asyncio.ensure_future(self.call(group))

    def _lost(self, n: int) -> WorkerLostError:
        self.lost_images += n
        return WorkerLostError(f"worker {self.name} died")

    def _die(self) -> None:
        self.dead = True
        self.deaths += 1
        for watch in self._deathwatch:  # every call in flight fails now
            if not watch.done():
                watch.set_result(None)

    async def call(self, group: RequestGroup) -> tuple[ResultGroup, float]:
        loop = asyncio.get_running_loop()
        n = len(group)
        if self.dead:
            await asyncio.sleep(0.001)
            raise self._lost(n)
        self.calls += 1
        if self.calls in self.die_at:
            self._die()
            raise self._lost(n)
        self.groups.append(n)
        self.inflight += n
        self.max_inflight = max(self.max_inflight, self.inflight)
        arrived = loop.time()
        rows = np.zeros((n, len(RESULT_COLS)))
        rows[:, 0] = group.rows[:, 0]
        rows[:, 2] = 1
        rows[:, INPUT_IDX] = group.rows[:, 2]
        rows[:, TOP1] = group.rows[:, 1]
        rows[:, CHECKSUM] = group.rows[:, 0] / 2
        errors: dict[int, str] = {}
        finish = arrived
        for i in range(n):  # each image on the lane that frees first
            lane = int(np.argmin(self._lane_free))
            start = max(arrived, self._lane_free[lane])
            end = start + self.service_s
            self._lane_free[lane] = end
            rows[i, 3] = start - arrived
            rows[i, 3 + INFER] = self.service_s
            finish = max(finish, end)
            if int(group.rows[i, 1]) in self.fail_models:
                rows[i, 1] = 2  # model_error
                if self.error_text is not None:
                    errors[i] = self.error_text
        watch: asyncio.Future[None] = loop.create_future()
        self._deathwatch.add(watch)
        try:
            done, _ = await asyncio.wait([watch], timeout=max(0.0, finish - loop.time()))
        finally:
            self._deathwatch.discard(watch)
        survived = not done
        self.inflight -= n
        if not survived:
            raise self._lost(n)
        self.images += n
        return ResultGroup(rows, errors, WorkerState(inflight=self.inflight)), loop.time()

    async def recover(self) -> None:
        if self.down_s is None:
            raise WorkerError(f"worker {self.name} is gone")
        await asyncio.sleep(self.down_s)
        self.dead = False
        self._lane_free = [0.0] * self.lanes

    async def replace(self) -> None:
        """Ended and started afresh (as the Ray handle kills the actor and Ray restarts it)."""
        self.replaced += 1
        self.dead = True
        for watch in self._deathwatch:  # whatever else it had in flight is lost with it
            if not watch.done():
                watch.set_result(None)
        await self.recover()

    async def start(self) -> None:
        self.started += 1

    async def close(self) -> None:
        self.closed += 1


class FakeTarget:
    """A ``target.Target`` of FakeWorkerHandles: the whole protocol, driver shards included (each shard a
    driver of its own on the same event loop, as a target's shard actors are each a driver of their own).

    ``set_mode`` records the modes and may run a hook (``on_set_mode``, e.g. a Ctrl-C)."""

    shards_supported = True

    def __init__(self, handles: dict[str, FakeWorkerHandle], on_set_mode: Any = None,
                 shards_supported: bool = True) -> None:
        self.by_name = handles
        self.workers = tuple(WorkerInfo(name, "cpu", "127.0.0.1", node_id=f"node{i % 2}", pid=1000 + i, host="fake")
                             for i, name in enumerate(handles))
        self.modes: list[str] = []
        self.on_set_mode = on_set_mode
        self.shards_supported = shards_supported
        self.shard_jobs: list[Any] = []
        self._drivers: list[Any] = []
        self.closed = False

    def set_mode(self, mode: str) -> list[dict[str, float]]:
        self.modes.append(mode)
        if self.on_set_mode is not None:
            self.on_set_mode()
        return [{"total_s": 0.0} for _ in self.workers]

    def handles(self, mode: str, options: Any, ids: Any = None) -> list[FakeWorkerHandle]:
        ids = range(len(self.workers)) if ids is None else ids
        return [self.by_name[self.workers[i].name] for i in ids]

    async def run_shards(self, jobs: Any, fold: Any, stopping: Any) -> list[Any]:
        from cortexbench.driver import drive

        self.shard_jobs = list(jobs)
        names = [w.name for w in self.workers]

        def progress(p: Any) -> None:
            fold(p, [p.new_rows])

        def keep(driver: Any) -> None:
            if driver is not None:
                self._drivers.append(driver)

        return list(await asyncio.gather(*[
            drive(job.schedule, self.handles("", job.handle_options, job.worker_ids), job.options,
                  balancer=job.balancer, seed=job.seed, lru_capacity=job.lru_capacity, on_progress=progress,
                  on_driver=keep, worker_ids=job.worker_ids, worker_names=names)
            for job in jobs]))

    def stop_shards(self) -> None:
        for d in self._drivers:
            d.stop()

    def close(self) -> None:
        self.closed = True


def expected_lanes_time(n: int, service_s: float, lanes: int) -> float:
    return math.ceil(n / lanes) * service_s


def reference_lru_hits(names: list[str], capacity: int) -> int:
    """Hits of a plain LRU of ``capacity`` over a sequence of model names (the reference for the worker's)."""
    lru: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for name in names:
        if name in lru:
            hits += 1
            lru.move_to_end(name)
        else:
            lru[name] = None
            if len(lru) > capacity:
                lru.popitem(last=False)
    return hits
