"""A worker's lanes: ``n`` lanes (one CUDA stream each on a GPU, in the model) and a thread per lane.

The images of a group are shared out over free lanes, so several images are in flight at once, each run on
its own by ``process(model_idx, image_idx, arrived, lane, out)`` (the worker's per-image path).  ``run``
(called by a threaded Ray actor's threads or a compiled graph's execution thread, several at once) lets
the calling thread take a free lane itself when ``caller_runs`` allows it, so a group of one image crosses
no thread; groups start in the order they arrive.  ``run_bytes`` works on the wire form
(``protocol.RequestGroup.to_bytes`` in, ``ResultGroup.to_bytes`` out) and builds no arrays on the way.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from cortexbench.protocol import (
    BLANK_ROW,
    N_COLS,
    ONE_REQUEST,
    ONE_ROW,
    RequestGroup,
    ResultGroup,
    WorkerState,
    encode_result,
)

ProcessFn = Callable[[int, int, float, int, list], "str | None"]
BeginFn = Callable[[int, int, float, list, Any], Any]
EndFn = Callable[[Any, list], "str | None"]
PrepareFn = Callable[[list[list[int]]], list[Any]]


class Lanes:
    """See the module docstring.  ``counters()`` gives the WorkerState fields sent back with every group;
    ``inflight`` counts the images being run."""

    def __init__(self, n: int, name: str, process: ProcessFn, counters: Callable[[], tuple[int, ...]],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.n = n
        self.process = process
        self.counters = counters
        self.clock = clock
        self.caller_runs = True  # a caller's thread may run images itself
        # (begin, end): the launched path.  A group runs on one thread: ``begin`` queues each image without
        # waiting (the worker spreads them over the lanes' streams), then ``end`` collects each answer.
        self.pipeline: tuple[BeginFn, EndFn] | None = None
        # On the launched path, optionally: ``prepare(items)`` makes every image's input of a group at once
        # (a batched GPU decode) before ``begin`` queues them; ``begin`` gets the image's entry.
        self.prepare: PrepareFn | None = None
        self.inflight = 0
        self._lock = threading.Lock()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(n):
            self._free.put(lane)
        self._waiters = 0  # lane threads waiting for a free lane
        self._jobs: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()  # one entry per lane a job asks for
        self._threads = [threading.Thread(target=self._main, name=f"{name}-lane{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, group: RequestGroup, arrived_s: float | None = None) -> Future[ResultGroup]:
        """Share the group's images out over lanes (one lane thread runs it on the launched path); the
        future completes when all are done.  Never blocks the caller (suits an event loop)."""
        arrived = self.clock() if arrived_s is None else arrived_s
        lanes = 1 if self.pipeline is not None else min(len(group), self.n)
        job = _Job(group.rows.tolist(), arrived, self, lanes, Future(), False)
        for _ in range(job.lanes_left):
            self._jobs.put(job)
        if not job.lanes_left:  # an empty group
            job.lane_done()
        return job.future  # type: ignore[return-value]

    def run(self, group: RequestGroup) -> ResultGroup:
        """Run a group and wait for it.  Several threads may call this at once.  The calling thread takes a
        lane itself when one is free, ``caller_runs`` allows it and no earlier group is waiting for one."""
        return self._run(group.rows.tolist(), self.clock(), False)  # type: ignore[return-value]

    def run_bytes(self, data: bytes) -> bytes:
        """``run`` on the wire form.  One image with a lane free and nothing waiting for one (every call at
        low load) runs straight on the calling thread, with no job."""
        arrived = self.clock()
        if len(data) == ONE_REQUEST.size and self.pipeline is None and self.caller_runs and not self._waiters \
                and self._jobs.empty():
            try:
                lane = self._free.get_nowait()
            except queue.Empty:
                pass
            else:
                return self._run_one(ONE_REQUEST.unpack(data), arrived, lane)
        flat = np.frombuffer(data, np.int64).tolist()
        return self._run([flat[i:i + 3] for i in range(0, len(flat), 3)], arrived, True)  # type: ignore[return-value]

    def _run(self, items: list[list[int]], arrived: float, wire: bool) -> ResultGroup | bytes:
        if not items:
            job = _Job(items, arrived, self, 0, None, wire)
            job.lane_done()
            return job.result  # type: ignore[return-value]
        if self.pipeline is not None:  # the calling thread queues every image, then collects them
            job = _Job(items, arrived, self, 1, None, wire)
            try:
                job.work(0)
            finally:
                job.lane_done()
            return job.result  # type: ignore[return-value]
        lane: int | None = None
        if self.caller_runs and not self._waiters and self._jobs.empty():
            try:
                lane = self._free.get_nowait()
            except queue.Empty:
                pass
        lanes = min(len(items), self.n)
        helpers = lanes - (1 if lane is not None else 0)
        job = _Job(items, arrived, self, lanes, Future() if helpers else None, wire)
        for _ in range(helpers):
            self._jobs.put(job)
        if lane is not None:
            try:
                job.work(lane)
            finally:
                self._free.put(lane)
                job.lane_done()
        if job.future is None:
            assert job.result is not None
            return job.result
        return job.future.result()

    def _run_one(self, request: tuple[int, int, int], arrived: float, lane: int) -> bytes:
        item, model_idx, image_idx = request
        out = [item, *BLANK_ROW]
        with self._lock:
            self.inflight += 1
        try:
            msg = self.process(model_idx, image_idx, arrived, lane, out)
        except Exception as e:  # process counts framework errors itself; anything else still answers
            msg = f"{type(e).__name__}: {e}"
        finally:
            self._free.put(lane)
            with self._lock:
                self.inflight -= 1
        return encode_result(1, ONE_ROW.pack(*out), {} if msg is None else {0: msg}, self.counters())

    def _main(self) -> None:
        """A lane thread: helps one job after another until ``close``."""
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            job.lane_loop()

    def lane(self) -> int:
        """A free lane, waiting for one when every lane is busy."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            self._waiters += 1
        try:
            return self._free.get()
        finally:
            with self._lock:
                self._waiters -= 1

    def release(self, lane: int) -> None:
        self._free.put(lane)

    def on_every_lane(self, fn: Callable[[int], None]) -> None:
        """Run ``fn(lane)`` once on every lane, each from that lane's own thread, all at once."""
        barrier = threading.Barrier(self.n)

        def call() -> None:
            lane = self.lane()
            try:
                barrier.wait(timeout=600)  # every lane busy at once: each thread holds a different lane
                fn(lane)
            finally:
                self.release(lane)

        done: list[Future[None]] = [Future() for _ in range(self.n)]
        for f in done:  # each lane thread takes one (the barrier keeps a thread from taking two)
            self._jobs.put(_Call(call, f))
        for f in done:
            f.result()

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


class _Call:
    """A one-off task for a lane thread (used to warm lanes up)."""

    def __init__(self, fn: Callable[[], None], future: Future[None]) -> None:
        self.fn = fn
        self.future = future

    def lane_loop(self) -> None:
        try:
            self.fn()
            self.future.set_result(None)
        except BaseException as e:
            self.future.set_exception(e)


class _Job:
    """One group being run: lanes take its images one by one (work sharing), the last one finishes it.
    Rows are Python lists while the lanes fill them (cheaper than numpy element writes); at the end they
    become the ResultGroup, or straight its wire form (``wire``)."""

    __slots__ = ("arrived", "errors", "future", "items", "lanes_left", "lock", "next", "out", "owner", "result",
                 "wire")

    def __init__(self, items: list[list[int]], arrived: float, owner: Lanes, lanes: int,
                 future: Future[Any] | None, wire: bool) -> None:
        self.arrived = arrived
        self.owner = owner
        self.items = items
        self.out: list[list[float]] = [[item, *BLANK_ROW] for item, _, _ in items]
        self.errors: dict[int, str] = {}
        self.next = itertools.count()  # atomic under the GIL
        self.future = future
        self.wire = wire
        self.result: ResultGroup | bytes | None = None
        self.lock = threading.Lock() if lanes > 1 else None
        self.lanes_left = lanes
        with owner._lock:
            owner.inflight += len(items)

    def work(self, lane: int) -> None:
        items, out, n = self.items, self.out, len(self.items)
        pipeline = self.owner.pipeline
        if pipeline is not None:
            begin, end = pipeline
            prepared = self.owner.prepare(items) if self.owner.prepare is not None else [None] * n
            begun = [(i, begin(items[i][1], items[i][2], self.arrived, out[i], prepared[i])) for i in range(n)]
            for i, b in begun:
                msg = end(b, out[i])
                if msg is not None:
                    self.errors[i] = msg
            return
        process, arrived, nxt = self.owner.process, self.arrived, self.next
        while (i := next(nxt)) < n:
            _, model_idx, image_idx = items[i]
            msg = process(model_idx, image_idx, arrived, lane, out[i])
            if msg is not None:
                self.errors[i] = msg

    def lane_loop(self) -> None:
        w = self.owner
        lane = w.lane()
        try:
            self.work(lane)
        except BaseException as e:  # never leave a future hanging
            if self.future is not None and not self.future.done():
                self.future.set_exception(e)
        finally:
            w.release(lane)
            self.lane_done()

    def lane_done(self) -> None:
        if self.lock is not None:
            with self.lock:
                self.lanes_left -= 1
                if self.lanes_left > 0:
                    return
        w = self.owner
        n = len(self.out)
        with w._lock:
            w.inflight -= n
        counters = w.counters()
        if self.wire:
            self.result = encode_result(n, array("d", itertools.chain.from_iterable(self.out)).tobytes(),
                                         self.errors, counters)
        else:
            self.result = ResultGroup(np.array(self.out, np.float64).reshape(n, N_COLS), self.errors,
                                      WorkerState(*counters))
        if self.future is not None and not self.future.done():
            self.future.set_result(self.result)
