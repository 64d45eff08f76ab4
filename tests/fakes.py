"""Test doubles for what cannot run here, and a virtual clock.

``FakeWorkerHandle`` stands in for a worker reached over Ray (the driver's tests need thousands of
images with exact service times); ``run_virtual`` runs a coroutine on an event loop whose clock jumps to
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
from cortexbench.worker import INFER, RESULT_COLS, RequestGroup, ResultGroup, WorkerState


def run_virtual(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on a loop with virtual time: waiting for a timer advances the clock at once."""
    loop = asyncio.new_event_loop()
    now = [0.0]
    select = loop._selector.select  # type: ignore[attr-defined]

    def virtual_select(timeout: float | None = None) -> Any:
        if timeout is not None and timeout > 0:
            now[0] += timeout
            return select(0)
        return select(timeout)

    loop._selector.select = virtual_select  # type: ignore[attr-defined]
    loop.time = lambda: now[0]  # type: ignore[method-assign]
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class FakeWorkerHandle:
    """A worker with ``lanes`` parallel lanes and a fixed service time per image (virtual time).

    ``die_at_call``: the n-th call raises WorkerLostError (the worker 'dies'); it comes back after
    ``down_s`` seconds, or never when ``down_s`` is None.  ``fail_models``: model indices whose images
    fail with a model error."""

    def __init__(self, name: str, service_s: float = 0.01, lanes: int = 1, die_at_call: int | None = None,
                 down_s: float | None = 0.5, fail_models: tuple[int, ...] = ()) -> None:
        self.name = name
        self.service_s = service_s
        self.lanes = lanes
        self.die_at_call = die_at_call
        self.down_s = down_s
        self.fail_models = fail_models
        self.calls = 0
        self.images = 0
        self.max_inflight = 0
        self.inflight = 0
        self.dead = False
        self._lane_free = [0.0] * lanes
        self.groups: list[int] = []

    def submit(self, group: RequestGroup) -> asyncio.Future[tuple[ResultGroup, float]]:
        return asyncio.ensure_future(self.call(group))

    async def call(self, group: RequestGroup) -> tuple[ResultGroup, float]:
        loop = asyncio.get_running_loop()
        self.calls += 1
        if self.dead or (self.die_at_call is not None and self.calls == self.die_at_call):
            self.dead = True
            await asyncio.sleep(0.001)
            raise WorkerLostError(f"worker {self.name} died")
        n = len(group)
        self.groups.append(n)
        self.inflight += n
        self.max_inflight = max(self.max_inflight, self.inflight)
        arrived = loop.time()
        rows = np.zeros((n, len(RESULT_COLS)))
        rows[:, 0] = group.rows[:, 0]
        rows[:, 2] = 1
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
        await asyncio.sleep(max(0.0, finish - loop.time()))
        self.inflight -= n
        self.images += n
        return ResultGroup(rows, {}, WorkerState(inflight=self.inflight)), loop.time()

    async def recover(self) -> None:
        if self.down_s is None:
            raise WorkerError(f"worker {self.name} is gone")
        await asyncio.sleep(self.down_s)
        self.dead = False
        self.die_at_call = None
        self._lane_free = [0.0] * self.lanes


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
