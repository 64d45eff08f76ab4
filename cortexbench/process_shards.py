"""Driver shards as processes of this host, for a target that has no placement of its own (the HTTP target).

``--drivers N`` against an HTTP server: one process per ``target.ShardJob`` (``multiprocessing``, spawned, no
Ray), each with its own event loop, its own handles (the target, pickled, makes them there: its own client and
connection pool) and its slice of the seeded schedule, running ``driver.drive`` exactly as a Ray shard actor
does.  The coordinator's side (``ProcessShards.run``) mirrors ``cluster.RayTarget.run_shards``: it folds the
shards' new ledger rows into the live view while they run and returns one ``DriverResult`` per shard, which
the coordinator merges.

The pipe protocol, one pickled tuple per message:

- shard -> coordinator: ``("ready", None)`` once its handles exist; ``("progress", Progress)`` at every fold
  (its new ledger rows; the last fold holds the last rows); ``("done", DriverResult)`` with an empty ledger
  (the rows came as progress); ``("failed", message)`` when the shard raised.
- coordinator -> shard: ``("go", start_wall)`` once every shard is ready (they start their schedules at the
  same ``time.time()``, so an open-loop stream stays one Poisson process); ``("stop", None)``.

Every image is accounted for, also when a shard process dies (killed, out of memory): its ledger is the rows
it reported; images its last report counted as sent without a row are recorded ``worker_died`` (sent, their
answers lost with the process; no times but the death's); the rest of its slice counts as not sent.  Images
it sent after its last report (at most ``fold_interval_s`` of them) therefore count as not sent.

Shutdown is bounded: Ctrl-C goes to the coordinator only (shards ignore SIGINT); ``stop`` asks every shard to
drain; a shard that has not answered ``drain_timeout_s`` + ``STOP_GRACE_S`` after the stop, or that is left when
``run`` is cancelled, is killed.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from cortexbench.driver import drive
from cortexbench.driver_types import DriverResult, Progress
from cortexbench.errors import WorkerError
from cortexbench.ledger import OUTCOMES, WORKER_STAGES, Ledger
from cortexbench.target import FoldFn, ShardJob

READY_S = 120.0  # a shard process imports, unpickles its target and makes its handles within this
STOP_GRACE_S = 5.0  # after a stop, beyond the drain time, before a silent shard is killed
WORKER_DIED = OUTCOMES.index("worker_died")


# --- in the shard process -----------------------------------------------------------------------------


def shard_main(conn: Connection, target: Any, job: ShardJob, worker_names: tuple[str, ...]) -> None:
    """A shard process's body: make the handles, wait for ``go``, drive the slice, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's: it asks shards to stop
    try:
        asyncio.run(_shard(conn, target, job, worker_names))
    except BaseException as e:  # the coordinator counts the slice; say why
        try:
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
    finally:
        conn.close()


async def _shard(conn: Connection, target: Any, job: ShardJob, worker_names: tuple[str, ...]) -> None:
    loop = asyncio.get_running_loop()
    go: asyncio.Future[float] = loop.create_future()
    driver: list[Any] = []
    stopped = [False]

    def on_message() -> None:
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):  # the coordinator is gone: stop, and do not start
            kind, value = "stop", None
            loop.remove_reader(conn.fileno())
        if kind == "go" and not go.done():
            go.set_result(float(value))
        elif kind == "stop":
            stopped[0] = True
            if not go.done():
                go.set_result(time.time())
            for d in driver:
                d.stop()

    def on_driver(d: Any) -> None:
        driver[:] = [d] if d is not None else []
        if d is not None and stopped[0]:
            d.stop()

    handles = target.handles(job.options.mode, job.handle_options, job.worker_ids)
    conn.send(("ready", None))
    loop.add_reader(conn.fileno(), on_message)
    start_wall = await go
    result = await drive(job.schedule, handles, job.options, balancer=job.balancer, seed=job.seed,
                         lru_capacity=job.lru_capacity, on_progress=lambda p: conn.send(("progress", p)),
                         on_driver=on_driver, start_at=time.monotonic() + (start_wall - time.time()),
                         worker_ids=job.worker_ids, worker_names=worker_names)
    loop.remove_reader(conn.fileno())
    empty = Ledger(result.ledger.models, result.ledger.workers, capacity=1)
    conn.send(("done", replace(result, ledger=empty)))


# --- in the coordinator -------------------------------------------------------------------------------


class _Shard:
    """The coordinator's view of one shard process."""

    def __init__(self, index: int, job: ShardJob, proc: Any, conn: Connection) -> None:
        self.index, self.job, self.proc, self.conn = index, job, proc, conn
        self.ready = False
        self.rows: list[Ledger] = []
        self.last: Progress | None = None
        self.result: DriverResult | None = None
        self.failure: str | None = None  # why it ended without a result (died, raised, killed)
        self.ended = asyncio.Event()

    def send(self, kind: str, value: Any = None) -> None:
        if not self.ended.is_set():
            try:
                self.conn.send((kind, value))
            except OSError:
                pass  # it died: its end shows on the pipe


class ProcessShards:
    """Runs ``jobs`` in processes of this host; see the module docstring.  ``target`` must pickle: each
    shard calls ``target.handles(mode, job.handle_options, job.worker_ids)`` in its own process."""

    def __init__(self, target: Any, jobs: Sequence[ShardJob], worker_names: Sequence[str]) -> None:
        self.target = target
        self.jobs = list(jobs)
        self.names = tuple(worker_names)
        self.shards: list[_Shard] = []
        self._stop_at: float | None = None
        self._t0 = math.nan  # the shards' start on this host's monotonic clock
        self._start_wall = math.nan
        self._fold: FoldFn | None = None
        self._changed = asyncio.Event()  # a shard reported or ended

    def stop(self) -> None:
        """Ask every shard to stop dispatching and drain (bounded: see ``run``)."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        for s in self.shards:
            s.send("stop")

    def kill(self, index: int) -> None:
        """Kill one shard's process at once (fault tests)."""
        proc = self.shards[index].proc
        if proc.pid is not None and proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)

    @property
    def pids(self) -> list[int | None]:
        return [s.proc.pid for s in self.shards]

    async def run(self, fold: FoldFn, stopping: Callable[[], bool]) -> list[DriverResult]:
        """Start the shards, start them together, fold their progress, return one result per job."""
        loop = asyncio.get_running_loop()
        self._fold = fold
        try:
            self._start(loop)
            await self._until(lambda: all(s.ready or s.ended.is_set() for s in self.shards), stopping, READY_S)
            self._start_wall = time.time() + 0.05
            self._t0 = time.monotonic() + 0.05
            for s in self.shards:
                s.send("go", self._start_wall)
            await self._until(lambda: all(s.ended.is_set() for s in self.shards), stopping, None)
            return [self._result_of(s) for s in self.shards]
        finally:
            for s in self.shards:
                if not s.ended.is_set():  # cancelled (a second Ctrl-C): no more waiting
                    self.kill(s.index)
                    self._end(s, "stopped with the run; killed")
            for s in self.shards:
                s.proc.join(timeout=STOP_GRACE_S)
                if s.proc.exitcode is None:
                    s.proc.kill()
                    s.proc.join(timeout=STOP_GRACE_S)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        ctx = mp.get_context("spawn")
        # Shards ignore SIGINT from their first instruction: a Python started with SIGINT ignored keeps it so.
        try:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: the shard sets it itself
            previous = None
        try:
            for i, job in enumerate(self.jobs):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=shard_main, args=(theirs, self.target, job, self.names),
                                   name=f"cortexbench-shard-{i}", daemon=True)
                proc.start()
                theirs.close()  # the shard's end lives in the shard only: its death shows as EOF here
                shard = _Shard(i, job, proc, mine)
                self.shards.append(shard)
                loop.add_reader(mine.fileno(), self._readable, shard)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    async def _until(self, cond: Callable[[], bool], stopping: Callable[[], bool], within_s: float | None) -> None:
        """Wait for ``cond`` (looked at whenever a shard reports or ends, and every 0.25 s), passing a stop on;
        kill the shards not ready within ``within_s``, and, once stopping, those that overstay the drain."""
        started = time.monotonic()
        drain = max((j.options.drain_timeout_s for j in self.jobs), default=0.0) + STOP_GRACE_S
        while True:
            self._changed.clear()
            if cond():
                return
            if stopping():
                self.stop()
            now = time.monotonic()
            for s in self.shards:
                if s.ended.is_set():
                    continue
                if within_s is not None and not s.ready and now - started > within_s:
                    self.kill(s.index)
                    self._end(s, f"was not ready within {within_s:g} s; killed")
                elif self._stop_at is not None and now - self._stop_at > drain:
                    self.kill(s.index)
                    self._end(s, f"did not stop within {drain:g} s; killed")
            try:
                await asyncio.wait_for(self._changed.wait(), 0.25)  # 0.25 s: to look at stopping() and the clock
            except asyncio.TimeoutError:
                pass

    def _readable(self, s: _Shard) -> None:
        """A shard's pipe has a message, or the shard is gone (EOF)."""
        self._changed.set()
        try:
            kind, value = s.conn.recv()
        except (EOFError, OSError):
            s.proc.join(timeout=1.0)  # its pipe closed as it exited: the exit code follows at once
            self._end(s, f"died (exit code {s.proc.exitcode if s.proc.exitcode is not None else 'unknown'})")
            return
        except Exception as e:  # a message that does not unpickle: the shard is of no more use
            self.kill(s.index)
            self._end(s, f"sent an unreadable message ({type(e).__name__}: {e}); killed")
            return
        if kind == "ready":
            s.ready = True
            if self._stop_at is not None:
                s.send("stop")
        elif kind == "progress":
            s.rows.append(value.new_rows)
            s.last = value
            if self._fold is not None:
                self._fold(self._combined(value), [value.new_rows])
        elif kind == "done":
            s.result = value
            self._end(s, None)
        elif kind == "failed":
            self._end(s, f"failed: {value}")

    def _end(self, s: _Shard, failure: str | None) -> None:
        if s.ended.is_set():
            return
        if s.result is None:
            s.failure = failure or "ended without a result"
        self._changed.set()
        try:
            asyncio.get_running_loop().remove_reader(s.conn.fileno())
        except (RuntimeError, ValueError, OSError):
            pass
        s.ended.set()
        s.conn.close()

    def _combined(self, p: Progress) -> Progress:
        """``p`` with the images in flight of every shard's last report, summed per worker (the shards of an
        HTTP target all send to its one server)."""
        totals: dict[str, int] = {}
        for s in self.shards:
            if s.last is not None:
                for name, n in zip(s.last.workers, s.last.outstanding, strict=False):
                    totals[name] = totals.get(name, 0) + int(n)
        return replace(p, outstanding=list(totals.values()), workers=tuple(totals))

    def _result_of(self, s: _Shard) -> DriverResult:
        """The shard's result with its ledger made of the rows it reported; for a shard that ended without a
        result, the rows it reported and its lost images (module docstring)."""
        if s.result is not None:
            return replace(s.result, ledger=_concat(s.rows, self.names, s.job.schedule.models))
        return lost_shard_result(s.index, s.job, s.rows, s.last, self.names, self._t0, s.failure or "ended")


def lost_shard_result(index: int, job: ShardJob, rows: Sequence[Ledger], last: Progress | None,
                      names: Sequence[str], t0: float, failure: str) -> DriverResult:
    """The result of a driver shard that ended without one (its process or Ray actor died): the rows it
    reported (``rows``), the images its last report (``last``) counted as sent without a row recorded as
    ``worker_died``, the rest of its slice not sent; ``error`` names the shard.  ``t0``: the shards' start on
    this host's monotonic clock (NaN: unknown).  Shared by ``ProcessShards`` and ``cluster.RayTarget``."""
    ledger = _concat(rows, names, job.schedule.models)
    sched = job.schedule
    sent = max(last.sent if last is not None else 0, len(ledger))
    known = set(ledger.column("item").tolist())
    lost = [k for k, item in enumerate(sched.item.tolist()) if item not in known][:sent - len(ledger)]
    now = time.monotonic()
    if lost:
        pos = np.asarray(lost, np.int64)
        n = len(pos)
        ledger.add_many(item=sched.item[pos], model_idx=np.asarray(sched.model_idx, np.int64)[pos],
                        image_idx=np.asarray(sched.image_idx, np.int64)[pos],
                        worker=job.worker_ids[0] if job.worker_ids else 0,
                        outcome=np.full(n, WORKER_DIED, np.int8), attempts=1, hit=-1,
                        scheduled_s=np.full(n, np.nan), sent_s=np.full(n, np.nan),
                        done_s=np.full(n, now - t0 if math.isfinite(t0) else np.nan),
                        stages=np.full((n, len(WORKER_STAGES)), np.nan))
    why = f"driver shard {index} {failure}"
    started = t0 if math.isfinite(t0) else now
    return DriverResult(job.options.mode, ledger, sent, len(sched) - sent, started, now, 0, 0, True,
                        dict(last.states) if last is not None else {}, {}, error=why,
                        error_samples={"worker_died": f"{why}; {len(lost)} images in flight lost with it"}
                        if lost else {})


def _concat(rows: Sequence[Ledger], workers: Sequence[str], models: Sequence[str]) -> Ledger:
    parts = [r for r in rows if len(r)]
    if not parts:
        return Ledger(models, workers, capacity=1)
    ledger = Ledger.merge(parts)
    if len(ledger) != sum(len(r) for r in parts):
        raise WorkerError("a driver shard reported an image twice")
    return ledger
