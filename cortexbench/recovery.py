"""The driver's fault handling: a worker lost (its process died, or a call of it was not answered in time)
is taken out of the balancer's choice, its images are retried elsewhere or parked while no worker is alive,
and it is brought back (``WorkerHandle.recover``, or ``replace`` for a hung one); each loss is counted and
its outage timed.

``Recovery`` is a part of ``driver.Driver`` (a mixin): it works on the driver's state and is not used
alone; the driver's module docstring has the whole picture.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from cortexbench.driver_types import DriverOptions
from cortexbench.errors import WorkerError
from cortexbench.ledger import OUTCOMES
from cortexbench.pacing import Pacer
from cortexbench.protocol import WorkerHandle

WORKER_DIED, TIMEOUT = (OUTCOMES.index(n) for n in ("worker_died", "timeout"))


class Recovery:
    """Lost workers and their images (see the module docstring).  The attributes below are the driver's."""

    handles: list[WorkerHandle]
    opt: DriverOptions
    clock: Callable[[], float]
    pacer: Pacer
    alive: np.ndarray
    outstanding: np.ndarray
    attempts: np.ndarray
    scheduled_s: np.ndarray
    pending: list[deque[int]]
    losses: dict[str, int]
    hangs: dict[str, int]
    n_retries: int
    error: str | None
    _life: list[int]
    _n_down: int
    _restarted: list[bool]
    _parked: deque[int]
    _gone: int
    _alive_ev: asyncio.Event
    _room: asyncio.Event
    _outages: list[list[Any]]
    _down_since: dict[int, list[Any]]
    _t0: float

    # provided by the driver
    def _assign(self, pos: int, scheduled: float) -> None: ...
    def _flush(self, w: int) -> None: ...
    def _spawn(self, coro: object) -> asyncio.Task[None]: ...
    def _record_failed(self, positions: list[int], outcome: int, now: float, msg: str = "") -> None: ...
    def stop(self) -> None: ...

    def _worker_lost(self, w: int, positions: list[int], life: int, hung: bool = False) -> None:
        """A call failed because its worker died, or (``hung``) timed out.  One death fails every call in
        flight on the worker; the first failure of a life counts the loss and starts the recovery (a hung
        worker is replaced), the others only retry their images (a call sent before the death fails as
        part of it, even if it is answered after the worker is back)."""
        name = self.handles[w].name
        if life == self._life[w] and self.alive[w]:  # the first failure of this life: the worker is lost
            self._life[w] += 1
            self.losses[name] = self.losses.get(name, 0) + 1
            if hung:
                self.hangs[name] = self.hangs.get(name, 0) + 1
            self._down_since[w] = outage = [name, self.clock() - self._t0, None]
            self._outages.append(outage)
            self.alive[w] = False
            self._n_down += 1
            self._restarted[w] = True
            self._spawn(self._recover(w, replace=hung))
        self.outstanding[w] -= len(positions)
        retry = [p for p in positions if self.attempts[p] <= self.opt.retries]
        give_up = [p for p in positions if self.attempts[p] > self.opt.retries]
        if give_up:
            if hung:
                why = f"worker {name} did not answer within {self.opt.call_timeout_s:g} s; retries ran out"
            else:
                why = f"worker {name} died; retries ran out"
            self._record_failed(give_up, TIMEOUT if hung else WORKER_DIED, self.clock(), why)
            self.pacer.release(len(give_up))
        # the worker's queued images go elsewhere too
        queued = list(self.pending[w])
        self.pending[w].clear()
        self.outstanding[w] -= len(queued)
        self.n_retries += len(retry)
        self._reassign([*retry, *queued])
        self._room.set()  # parked images left the queues: the dispatcher may have room again

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
        self.pacer.release(len(parked))

    async def _recover(self, w: int, replace: bool = False) -> None:
        try:
            await (self.handles[w].replace() if replace else self.handles[w].recover())
        except WorkerError as e:
            self._gone += 1  # stays dead; the others carry on
            if self._gone >= len(self.handles):
                self.error = f"every worker is gone (last: {e})"
                self._fail_parked()
                self.stop()
            return
        self.alive[w] = True
        self._n_down -= 1
        outage = self._down_since.pop(w, None)
        if outage is not None:
            outage[2] = self.clock() - self._t0 - outage[1]
        self._alive_ev.set()
        self._flush(w)
        parked = list(self._parked)
        self._parked.clear()
        self._reassign(parked)
