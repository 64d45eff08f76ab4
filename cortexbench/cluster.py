"""The only module that knows Ray: worker actors, placement, the three dispatch paths, driver shards.

- ``WorkerActor`` wraps a ``ModelWorker``: one per GPU (``num_gpus=1``, placed through a placement group
  so a multi-node cluster gets one on every GPU), or CPU workers with a share of the cores.  Ray restarts
  a worker whose process dies; the driver retries its images elsewhere meanwhile.
- Dispatch paths (``--dispatch``), all behind ``protocol.WorkerHandle``:
  ``actor``: one actor call per image (``ActorHandle``, groups of 1);
  ``grouped``: one actor call carries up to ``max_group`` images, each still run and timed on its own;
  ``compiled``: a Ray Compiled Graph per worker (``CompiledHandle``), several executions in flight, each
  carrying a group; the graph is driven from a thread owned by the handle (Ray's synchronous compiled
  graph calls are several times faster than its asyncio ones).  Ray's compiled-graph reader waits by
  spinning: a worker with a graph set up burns most of a core while idle, and so does the handle's
  thread while it waits for a result; leave cores for them (measured by ``bench/dispatch.py``).
  Groups cross Ray as bytes on every path (see ``WorkerActor``).
- ``ShardActor`` runs a ``Driver`` on a slice of the schedule and a share of the workers (``--drivers N``);
  the coordinator collects their new ledger rows while they run and merges ledgers and histograms at the end.
- ``RayAdapter`` is the one class that calls ``.remote()``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from cortexbench.driver import Driver, DriverResult, Progress, drive
from cortexbench.errors import CortexbenchError, WorkerError, WorkerLostError
from cortexbench.ledger import Ledger
from cortexbench.protocol import RequestGroup, ResultGroup, WorkerState
from cortexbench.target import FoldFn, HandleOptions, ShardJob, WorkerInfo
from cortexbench.worker import ModelWorker, WorkerSpec

_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# Calls one worker actor runs at once (its Ray threads).  More in flight wait in Ray's queue before the
# worker sees them, so their wait shows as transport, not as the worker's queue stage: drivers keep at
# most this many calls in flight per worker (the actor path's depth).
CALLS_PER_WORKER = 128
GET_TIMEOUT_S = 3600.0
# The longest a compiled handle waits for a result on the event loop's thread (one image in flight): long
# enough for a cached inference, short enough that progress and Ctrl-C are never held up noticeably.
INLINE_WAIT_S = 0.005  # a compiled graph's result: a group of cold loads of large models can take long


def init_ray(address: str | None, num_cpus: int | None = None) -> dict[str, float]:
    """Join ``address`` or start a local Ray; return the cluster's resources."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": True, "logging_level": "ERROR"}
        if address:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise WorkerError(f"cannot start or join Ray{f' at {address}' if address else ''}: "
                              f"{str(e).splitlines()[0]}") from None
    return dict(ray.cluster_resources())


def ray_running() -> bool:
    """Whether this process has joined or started a Ray already (a test's, a notebook's)."""
    return ray.is_initialized()


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


class RayAdapter:
    """Every ``.remote()`` call of cortexbench goes through here."""

    def actor(self, cls: type, options: dict[str, Any], *args: Any) -> Any:
        return ray.remote(cls).options(**options).remote(*args)

    def call(self, actor: Any, method: str, *args: Any) -> Any:
        return getattr(actor, method).remote(*args)


ADAPTER = RayAdapter()


def unwrap(e: BaseException) -> BaseException:
    """A CortexbenchError raised inside an actor, as itself (so the CLI prints its one line)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, CortexbenchError) else e


def get(refs: Any, timeout_s: float | None = None) -> Any:
    """ray.get that re-raises a worker's CortexbenchError as itself."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.RayTaskError as e:
        raise unwrap(e) from None
    except ray.exceptions.GetTimeoutError:
        raise WorkerError(f"workers did not answer within {timeout_s:g} s") from None


class WorkerActor:
    """A ModelWorker in a threaded Ray actor: each call runs ``ModelWorker.run`` on one of Ray's threads
    for the actor (up to ``CALLS_PER_WORKER`` at once), which takes a free lane itself and leaves the rest
    of a group to the worker's lane threads.  A threaded actor costs about half the CPU per call of an
    asyncio actor, whose every call crosses to its event loop and back.

    Groups travel as bytes both ways (``RequestGroup.to_bytes``, ``ResultGroup.to_bytes``): Ray passes
    bytes through as they are, while a numpy array or a dataclass costs a pickling round of several
    times the whole call on a compiled graph."""

    def __init__(self, spec: WorkerSpec, threads: int) -> None:
        if threads > 0 and spec.backend == "torch":
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:
                pass
        self.worker = ModelWorker(spec)

    def check(self) -> None:
        self.worker.check()

    def set_mode(self, mode: str) -> dict[str, float]:
        return self.worker.set_mode(mode)

    def infer(self, data: bytes) -> bytes:
        """One group (the actor and grouped paths)."""
        return self.worker.run_bytes(data)

    def execute(self, data: bytes) -> bytes:
        """One group (the compiled path: a compiled graph's execution thread calls this)."""
        return self.worker.run_bytes(data)

    def state(self) -> WorkerState:
        return self.worker.state()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(), "device": self.worker.spec.device,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


@dataclass
class RayTarget:
    """The Ray target (``target.Target``): cortexbench's worker actors, one per GPU or CPU share, their
    handles, and driver shards placed next to them."""

    actors: list[Any]
    specs: list[WorkerSpec]
    infos: list[dict[str, Any]]
    placement_group: Any = None
    shards_supported = True
    _shards: list[Any] = field(default_factory=list)

    @property
    def workers(self) -> tuple[WorkerInfo, ...]:
        return tuple(WorkerInfo(s.name, s.device, i.get("node"), str(i.get("node_id", "")), i.get("pid"), i.get("host"))
                     for s, i in zip(self.specs, self.infos, strict=True))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def node_ids(self) -> list[str]:
        """The Ray node each worker runs on (where a driver shard for it should run)."""
        return [str(i.get("node_id", "")) for i in self.infos]

    def set_mode(self, mode: str, timeout_s: float = 3600) -> list[dict[str, float]]:
        return get([ADAPTER.call(a, "set_mode", mode) for a in self.actors], timeout_s)

    def handles(self, mode: str, options: HandleOptions, ids: Sequence[int] | None = None) -> list[Any]:
        ids = range(len(self.actors)) if ids is None else ids
        return make_handles([self.actors[i] for i in ids], [self.specs[i].name for i in ids], mode, options.dispatch,
                            options.depth, one_at_a_time=options.one_at_a_time)

    async def run_shards(self, jobs: Sequence[ShardJob], fold: FoldFn, stopping: Callable[[], bool]) -> list[DriverResult]:
        shards = start_shards([j.node_id for j in jobs])
        self._shards = shards
        names = tuple(s.name for s in self.specs)
        refs = [shard_run(shard, ShardPlan(job, tuple(self.actors[i] for i in job.worker_ids),
                                           tuple(names[i] for i in job.worker_ids), names))
                for shard, job in zip(shards, jobs, strict=True)]
        tasks = [asyncio.ensure_future(wait_ref(r)) for r in refs]
        try:
            pending: set[asyncio.Future[Any]] = set(tasks)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=0.5)
                if stopping():  # again: a shard whose driver had not started yet missed the first stop
                    self.stop_shards()
                takes = await asyncio.gather(*[wait_ref(shard_take(s)) for s in shards])
                for progress, rows in takes:
                    if progress is not None:
                        fold(progress, rows)
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            self._shards = []
            for shard in shards:
                ray.kill(shard)

    def stop_shards(self) -> None:
        for shard in self._shards:
            shard_stop(shard)

    def kill(self, index: int) -> None:
        """Kill one worker's process (fault tests); Ray restarts it."""
        ray.kill(self.actors[index], no_restart=False)

    def close(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)


def start_workers(specs: Sequence[WorkerSpec], *, gpu: bool, cpus_each: float, threads_each: int,
                  max_restarts: int = 4, timeout_s: float = 120.0) -> RayTarget:
    """One actor per spec, placed with a placement group (one bundle per worker)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [{"GPU": 1.0, "CPU": cpus_each} if gpu else {"CPU": cpus_each} for _ in specs]
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
        what = f"{len(specs)} GPU" if gpu else f"{len(specs) * cpus_each:g} CPU"
        raise WorkerError(f"the cluster cannot place {len(specs)} workers ({what}) within {timeout_s:g} s: "
                          f"it has {ray.cluster_resources()}; ask for fewer with --gpus / --cpu-workers") from None
    actors = []
    env = {"OMP_NUM_THREADS": str(threads_each), "MXNET_CPU_WORKER_NTHREADS": str(threads_each),
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    for i, spec in enumerate(specs):
        opts: dict[str, Any] = {
            "num_cpus": cpus_each, "num_gpus": 1 if gpu else 0, "max_restarts": max_restarts,
            "max_task_retries": 0, "max_concurrency": CALLS_PER_WORKER, "name": None,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=i),
            "runtime_env": {"env_vars": env},
        }
        actors.append(ADAPTER.actor(WorkerActor, opts, spec, threads_each))
    pool = RayTarget(actors, list(specs), [], pg)
    try:
        pool.infos = get([ADAPTER.call(a, "info") for a in actors], timeout_s)
        get([ADAPTER.call(a, "check") for a in actors], timeout_s * 10)
    except BaseException:  # a worker that cannot set up (or Ctrl-C): free the actors and the GPUs they hold
        pool.close()
        raise
    return pool


# --- handles: how a driver reaches a worker ---------------------------------------------------------


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
        except _LOST as e:
            fut.set_exception(WorkerLostError(f"worker {self.name} died: {type(e).__name__}"))
            return fut
        ref.future().add_done_callback(lambda f: self._landed(f, fut, loop))
        return fut

    def _landed(self, f: Any, fut: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        received = time.monotonic()
        try:
            value: Any = (ResultGroup.from_bytes(f.result()), received)
            settle = _answer
        except _LOST as e:
            value, settle = WorkerLostError(f"worker {self.name} died: {type(e).__name__}"), _reject
        except BaseException as e:
            value, settle = unwrap(e), _reject
        try:
            loop.call_soon_threadsafe(settle, fut, value)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    async def recover(self) -> None:
        await _recover(self.actor, self.name, self.mode)

    async def close(self) -> None:
        pass


async def _recover(actor: Any, name: str, mode: str, timeout_s: float = 120.0, dead_s: float = 2.0) -> None:
    """Wait for Ray to restart a worker, then set its mode again.  A restarting actor answers
    ActorUnavailableError (or takes the call once it is back); one dead for good (no restarts left, or
    killed for good) answers ActorDiedError at once: after ``dead_s`` of those, give up."""
    deadline = time.monotonic() + timeout_s
    died_since: float | None = None
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(ADAPTER.call(actor, "set_mode", mode), timeout=timeout_s)
            return
        except ray.exceptions.ActorDiedError:
            now = time.monotonic()
            died_since = now if died_since is None else died_since
            if now - died_since >= dead_s:
                raise WorkerError(f"worker {name} is dead for good (no restarts left); the run goes on "
                                  f"without it") from None
            await asyncio.sleep(0.2)
        except (*_LOST, asyncio.TimeoutError):
            died_since = None
            await asyncio.sleep(0.2)  # restarting: poll again
        except ray.exceptions.RayTaskError as e:
            raise WorkerError(f"worker {name} restarted but cannot set up: {unwrap(e)}") from None
    raise WorkerError(f"worker {name} did not come back within {timeout_s:g} s")


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
        from ray.dag import InputNode

        self._loop = asyncio.get_running_loop()
        with InputNode() as inp:
            dag = self.actor.execute.bind(inp)
        self._dag = dag.experimental_compile(_max_inflight_executions=self.depth)
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
        await _recover(self.actor, self.name, self.mode)
        await self.start()

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


# --- driver shards -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """What one driver shard runs: its job, and the actors and names of its workers."""

    job: ShardJob
    actors: tuple[Any, ...]
    names: tuple[str, ...]
    all_workers: tuple[str, ...]


class ShardActor:
    """A driver shard: runs a Driver on its slice, hands over new ledger rows while it runs."""

    def __init__(self) -> None:
        self.driver: Driver | None = None
        self.rows: list[Ledger] = []
        self.last: Progress | None = None

    async def run(self, plan: ShardPlan) -> DriverResult:
        job = plan.job
        handles = make_handles(plan.actors, plan.names, job.options.mode, job.handle_options.dispatch,
                               job.handle_options.depth, one_at_a_time=job.handle_options.one_at_a_time)
        return await drive(job.schedule, handles, job.options, balancer=job.balancer, seed=job.seed,
                           lru_capacity=job.lru_capacity, on_progress=self._progress, on_driver=self._set_driver,
                           start_at=time.monotonic() + (job.start_wall - time.time()), worker_ids=job.worker_ids,
                           worker_names=plan.all_workers)

    def _set_driver(self, driver: Driver | None) -> None:
        self.driver = driver

    def _progress(self, p: Progress) -> None:
        self.rows.append(p.new_rows)
        self.last = p

    def take(self) -> tuple[Progress | None, list[Ledger]]:
        rows, self.rows = self.rows, []
        return self.last, rows

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.stop()


def start_shards(nodes: Sequence[str]) -> list[Any]:
    """One driver shard per entry of ``nodes``, each placed on that node when it can be (soft affinity:
    co-located with its workers on a cluster of several nodes)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    shards = []
    for node in nodes:
        opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 16, "max_restarts": 0}
        if node:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        shards.append(ADAPTER.actor(ShardActor, opts))
    return shards


def shard_run(shard: Any, plan: ShardPlan) -> Any:
    return ADAPTER.call(shard, "run", plan)


def shard_take(shard: Any) -> Any:
    return ADAPTER.call(shard, "take")


def shard_stop(shard: Any) -> Any:
    return ADAPTER.call(shard, "stop")


async def wait_ref(ref: Any) -> Any:
    """Await a Ray object ref, re-raising a worker's CortexbenchError as itself."""
    try:
        return await ref
    except Exception as e:
        raise unwrap(e) from None
