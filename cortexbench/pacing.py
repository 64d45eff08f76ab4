"""When each image of a driver's schedule is due.

- Open loop (the schedule has send times: ``--rate``): image k is due at ``t0 + send_at_s[k]``, one seeded
  Poisson process; the pacer sleeps until ``spin_s`` before that (asyncio's timers are millisecond-coarse)
  and yields to the event loop for the last stretch, so an image goes out on time, and its latency counts
  from that time whatever the system does.
- Closed loop (``concurrency`` C): C slots; an image is due when a slot is free, at that moment.  The driver
  gives a slot back (``release``) for every image whose outcome is known.
- ``duration_s``: no image is due at or after the deadline (closed loop: ``t0 + duration``; open loop: that
  long after the first counted arrival, as ``schedule.make_schedule`` cuts the stream); ``expired`` says so.

Plain asyncio; the driver's clock (a virtual one in tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from cortexbench.schedule import Schedule


class Pacer:
    """See the module docstring.  ``stop`` is the driver's: once set, nothing more is due."""

    def __init__(self, schedule: Schedule, concurrency: int | None, duration_s: float | None, spin_s: float,
                 clock: Callable[[], float], stop: asyncio.Event) -> None:
        self.schedule = schedule
        self.send_at = schedule.send_at_s
        self.concurrency = concurrency
        self.duration_s = duration_s
        self.spin_s = spin_s
        self.clock = clock
        self.stop = stop
        self.closed_loop = False
        self.free = 0  # closed loop: slots free now
        self.expired = False  # the duration is up
        self.t0 = 0.0
        self.deadline: float | None = None
        self._slot = asyncio.Event()

    def start(self, t0: float) -> None:
        """The schedule starts at ``t0`` (on the clock)."""
        self.t0 = t0
        sched = self.schedule
        if self.concurrency is not None and self.send_at is None:
            self.closed_loop = True
            self.free = self.concurrency
        deadline = t0 + self.duration_s if self.duration_s else None
        if deadline is not None and self.send_at is not None:
            # open loop: the duration is the measured part, after the warm-up (as make_schedule cuts it)
            counted = np.flatnonzero(sched.item >= sched.warmup)
            if len(counted):
                deadline += float(self.send_at[counted[0]])
        self.deadline = deadline

    def release(self, n: int) -> None:
        """``n`` images are done (ok or failed): in the closed loop, their slots are free again."""
        if self.closed_loop:
            self.free += n
            self._slot.set()

    def wake(self) -> None:
        """Wake ``due`` (the driver is stopping)."""
        self._slot.set()

    async def due(self, pos: int) -> float | None:
        """Wait until the image at schedule position ``pos`` is due; its scheduled time, or None when the
        driver is stopping or the duration is up (``expired``)."""
        stop, clock = self.stop, self.clock
        if stop.is_set():
            return None
        if self.send_at is not None:
            due = self.t0 + float(self.send_at[pos])
            if due - clock() > self.spin_s:
                await _sleep_until(due - self.spin_s, clock, stop)
            while clock() < due and not stop.is_set():
                await asyncio.sleep(0)  # the last stretch: asyncio's timers are too coarse
            if stop.is_set():
                return None
            scheduled = due
        else:
            while self.free <= 0 and not stop.is_set():
                self._slot.clear()
                await self._slot.wait()
            if stop.is_set():
                return None
            self.free -= 1
            scheduled = clock()
        if self.deadline is not None and scheduled >= self.deadline:
            self.expired = True
            return None
        return scheduled


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
