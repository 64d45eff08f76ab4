"""How a driver reaches a Ray worker: the ``protocol.WorkerHandle``s of the Ray target's dispatch paths.

- ``ActorHandle``: plain actor calls, ``actor`` dispatch (groups of 1) and ``grouped`` dispatch (groups of up
  to ``max_group``); the reply is taken on the Ray thread that receives it.
- ``CompiledHandle``: ``compiled`` dispatch, a Ray Compiled Graph per worker with several executions in flight,
  driven from a thread the handle owns (Ray's synchronous compiled-graph calls are several times faster than
  its asyncio ones).  Ray's compiled-graph reader waits by spinning: a worker with a graph set up burns most
  of a core while idle, and so does the handle's thread while it waits for a result (``bench/dispatch.py``).
- ``make_handles``: the handles of a driver (the Ray target's ``handles``, its shard actors, the benches).

Groups cross Ray as bytes on every path.  Every Ray call goes through ``cluster`` (``ADAPTER``, ``LOST``,
``recover_actor``): this module imports no Ray itself.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from cortexbench.cluster import ADAPTER, LOST, recover_actor, unwrap
from cortexbench.errors import WorkerError, WorkerLostError
from cortexbench.protocol import RequestGroup, ResultGroup

GET_TIMEOUT_S = 3600.0  # a compiled graph's result: a group of cold loads of large models can take long
# The longest a compiled handle waits for a result on the event loop's thread (one image in flight): long
# enough for a cached inference, short enough that progress and Ctrl-C are never held up noticeably.
INLINE_WAIT_S = 0.005


class ActorHandle:
    """Plain actor calls: ``actor`` dispatch (groups of 1) and ``grouped`` dispatch.  The reply is taken
    on the Ray thread that receives it (its time is the received time) and handed to the event loop."""

    def __init__(self, name: str, actor: Any, mode: str) -> None:
        self.name = name
        self.actor = actor
        self.mode = mode

    async def start(self) -> None:
        pass

    def submit(self, group: RequestGroup) -> asyncio.Future[tuple[ResultGroup, float]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[ResultGroup, float]] = loop.create_future()
        try:
            ref = ADAPTER.call(self.actor, "infer", group.to_bytes())
        except LOST as e:
            fut.set_exception(WorkerLostError(f"worker {self.name} died: {type(e).__name__}"))
            return fut
        ref.future().add_done_callback(lambda f: self._landed(f, fut, loop))
        return fut

    def _landed(self, f: Any, fut: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        received = time.monotonic()
        try:
            value: Any = (ResultGroup.from_bytes(f.result()), received)
            settle = _answer
        except LOST as e:
            value, settle = WorkerLostError(f"worker {self.name} died: {type(e).__name__}"), _reject
        except BaseException as e:
            value, settle = unwrap(e), _reject
        try:
            loop.call_soon_threadsafe(settle, fut, value)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    async def recover(self) -> None:
        await recover_actor(self.actor, self.name, self.mode)

    async def replace(self) -> None:
        ADAPTER.kill(self.actor)
        await self.recover()

    async def close(self) -> None:
        pass


class _Waiter:
    """A result the event loop's thread waits for itself, for a while (``CompiledHandle`` inline)."""

    __slots__ = ("abandoned", "lock", "ready", "value")

    def __init__(self) -> None:
        self.ready = threading.Lock()
        self.ready.acquire()  # released by the pump once ``value`` is set
        self.lock = threading.Lock()  # guards ``value`` and ``abandoned``
        self.value: Any = None
        self.abandoned = False


class CompiledHandle:
    """A Ray Compiled Graph to one worker with ``depth`` executions in flight, for an asyncio driver.

    Ray's synchronous graph calls are several times faster than its asyncio ones, but ``ref.get()``
    blocks, and a graph must not be used by two threads at once: whoever executes holds
    ``_graph_lock``.  A thread of the handle (the pump) reads the results: ``submit`` queues the group
    (a few microseconds on the event loop); the pump executes what is queued, up to ``depth`` at once,
    waits for the results in order, takes each one's receive time at once and hands it to the event
    loop.  (``execute`` called on the event loop's thread while the pump is busy cost 35-40 us on an H200
    host against 14 us in a bare loop: the two threads fought for the GIL.)

    With ``inline_wait_s`` > 0 (the driver keeps one image in flight: closed loop, concurrency 1) and
    the pump idle, ``submit`` executes on the event loop's thread, hands the execution to the pump, and
    waits up to ``inline_wait_s`` for the pump's answer with the GIL released, so the pump wakes while
    the worker runs, not after, and the answer skips the event loop's wake-up.  A longer call is
    answered through the event loop as usual.  (Reading with a timeout on the event loop's thread
    itself is not safe: Ray 2.x drops a result read just as the timeout expires.)"""

    def __init__(self, name: str, actor: Any, mode: str, depth: int = 4, inline_wait_s: float = 0.0) -> None:
        self.name = name
        self.actor = actor
        self.mode = mode
        self.depth = depth
        self.inline_wait_s = inline_wait_s
        # (group bytes to execute, None, future, None) or, from an inline submit that executed itself and
        # holds the graph lock for the pump, (None, the execution, future, its waiter); None stops the pump
        self._q: queue.SimpleQueue[tuple[bytes | None, Any, asyncio.Future[Any], _Waiter | None] | None] = \
            queue.SimpleQueue()
        self._graph_lock = threading.Lock()
        self._failed: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._dag: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._dag = ADAPTER.compile(self.actor, "execute", self.depth)
        self._q = queue.SimpleQueue()
        self._graph_lock = threading.Lock()
        self._failed = None
        self._thread = threading.Thread(target=self._pump, name=f"cgraph-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, group: RequestGroup) -> asyncio.Future[tuple[ResultGroup, float]]:
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self._failed is not None:
            fut.set_exception(self._failed)
            return fut
        data = group.to_bytes()
        if self.inline_wait_s > 0 and self._graph_lock.acquire(blocking=False):
            self._run_inline(data, fut)
        else:
            self._q.put((data, None, fut, None))
        return fut

    def _run_inline(self, data: bytes, fut: asyncio.Future[Any]) -> None:
        """With the graph lock held (the pump is idle): execute, hand the execution and the lock to the
        pump, and wait for its answer here for up to ``inline_wait_s``."""
        try:
            ref = self._dag.execute(data)
        except Exception as e:
            self._graph_lock.release()
            fut.set_exception(WorkerLostError(f"worker {self.name} died: {type(e).__name__}"))
            return
        waiter = _Waiter()
        self._q.put((None, ref, fut, waiter))
        answered = waiter.ready.acquire(timeout=self.inline_wait_s)
        if not answered:
            with waiter.lock:
                answered = waiter.value is not None  # the pump answered just as the wait ran out
                waiter.abandoned = not answered  # then the pump answers through the event loop
        if answered:
            ok, value = waiter.value
            (fut.set_result if ok else fut.set_exception)(value)

    def _pump(self) -> None:
        loop, dag, q, depth, lock = self._loop, self._dag, self._q, self.depth, self._graph_lock
        assert loop is not None
        inflight: deque[tuple[Any, asyncio.Future[Any], _Waiter | None]] = deque()
        clock = time.monotonic
        err: BaseException | None = None
        try:
            while (item := q.get()) is not None:
                data, ref, fut, waiter = item
                if ref is None:  # else an inline submit executed it and handed the lock over
                    lock.acquire()
                try:
                    inflight.append((dag.execute(data) if ref is None else ref, fut, waiter))
                    while inflight:
                        while len(inflight) < depth:
                            try:
                                item = q.get_nowait()
                            except queue.Empty:
                                break
                            if item is None:
                                return
                            inflight.append((dag.execute(item[0]), item[2], None))
                        ref, fut, waiter = inflight[0]
                        out = ref.get(timeout=GET_TIMEOUT_S)
                        received = clock()
                        inflight.popleft()  # only now: if the get raised, _fail answers this one too
                        self._deliver(fut, waiter, True, (ResultGroup.from_bytes(out), received))
                finally:
                    lock.release()
        except Exception as e:
            err = WorkerLostError(f"worker {self.name} died: {type(e).__name__}")
        finally:
            for _, f, w in inflight:
                if w is not None:
                    self._deliver(f, w, False, err or WorkerError("closed"))
            rest = [f for _, f, w in inflight if w is None]
            loop.call_soon_threadsafe(self._fail, q, rest, err or WorkerError("closed"))

    def _deliver(self, fut: asyncio.Future[Any], waiter: _Waiter | None, ok: bool, value: Any) -> None:
        """From the pump: to the event loop's thread if it is still waiting inline, else via the loop."""
        if waiter is not None:
            with waiter.lock:
                if not waiter.abandoned:
                    waiter.value = (ok, value)
                    waiter.ready.release()
                    return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_answer if ok else _reject, fut, value)

    def _fail(self, q: queue.SimpleQueue[Any], futures: list[asyncio.Future[Any]], err: BaseException) -> None:
        """On the event loop: fail what was in flight or queued; later calls fail at once until ``recover``."""
        if q is self._q:
            self._failed = err
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                futures.append(item[2])
        for f in futures:
            _reject(f, err)

    async def recover(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._teardown)
        await recover_actor(self.actor, self.name, self.mode)
        await self.start()

    async def replace(self) -> None:
        ADAPTER.kill(self.actor)
        await self.recover()

    def _teardown(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout=10)
        self._thread = None
        if self._dag is not None:
            try:
                self._dag.teardown()
            except Exception:
                pass
            self._dag = None

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._teardown)


def _answer(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: asyncio.Future[Any], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)


def make_handles(pool_actors: Sequence[Any], names: Sequence[str], mode: str, dispatch: str,
                 depth: int, *, one_at_a_time: bool = False) -> list[Any]:
    """Handles for a driver; ``one_at_a_time``: it keeps one image in flight (closed loop, concurrency
    1), so compiled handles may wait for a result inline (``CompiledHandle``)."""
    if dispatch == "compiled":
        wait = INLINE_WAIT_S if one_at_a_time else 0.0
        return [CompiledHandle(n, a, mode, depth, wait) for n, a in zip(names, pool_actors, strict=True)]
    return [ActorHandle(n, a, mode) for n, a in zip(names, pool_actors, strict=True)]
