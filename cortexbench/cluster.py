"""The only module that knows Ray: worker actors, placement, the three dispatch paths, driver shards.

- ``WorkerActor`` wraps a ``ModelWorker``: one per GPU (``num_gpus=1``, placed through a placement group
  so a multi-node cluster gets one on every GPU), or CPU workers with a share of the cores.  Ray restarts
  a worker whose process dies; the driver retries its images elsewhere meanwhile.
- Dispatch paths (``--dispatch``), all behind ``driver.WorkerHandle``:
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
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions

from cortexbench.balancer import make_balancer
from cortexbench.driver import Driver, DriverOptions, DriverResult, Progress
from cortexbench.errors import CortexbenchError, WorkerError, WorkerLostError
from cortexbench.ledger import Ledger
from cortexbench.schedule import Schedule
from cortexbench.worker import ModelWorker, RequestGroup, ResultGroup, WorkerSpec, WorkerState

_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# Calls one worker actor runs at once (its Ray threads).  More in flight wait in Ray's queue before the
# worker sees them, so their wait shows as transport, not as the worker's queue stage: drivers keep at
# most this many calls in flight per worker (the actor path's depth).
CALLS_PER_WORKER = 128
GET_TIMEOUT_S = 3600.0  # a compiled graph's result: a group of cold loads of large models can take long


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
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": self.worker.spec.device,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


@dataclass
class WorkerPool:
    """The worker actors of a run, with their names and devices."""

    actors: list[Any]
    specs: list[WorkerSpec]
    infos: list[dict[str, Any]]
    placement_group: Any = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def set_mode(self, mode: str, timeout_s: float = 3600) -> list[dict[str, float]]:
        return get([ADAPTER.call(a, "set_mode", mode) for a in self.actors], timeout_s)

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
                  max_restarts: int = 4, timeout_s: float = 120.0) -> WorkerPool:
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
    infos = get([ADAPTER.call(a, "info") for a in actors], timeout_s)
    pool = WorkerPool(actors, list(specs), infos, pg)
    get([ADAPTER.call(a, "check") for a in actors], timeout_s * 10)
    return pool


# --- handles: how a driver reaches a worker ---------------------------------------------------------


class ActorHandle:
    """Plain actor calls: ``actor`` dispatch (groups of 1) and ``grouped`` dispatch."""

    def __init__(self, name: str, actor: Any, mode: str) -> None:
        self.name = name
        self.actor = actor
        self.mode = mode

    async def start(self) -> None:
        pass

    async def call(self, group: RequestGroup) -> tuple[ResultGroup, float]:
        try:
            data = await ADAPTER.call(self.actor, "infer", group.to_bytes())
        except _LOST as e:
            raise WorkerLostError(f"worker {self.name} died: {type(e).__name__}") from None
        return ResultGroup.from_bytes(data), time.monotonic()

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


class CompiledHandle:
    """A Ray Compiled Graph to one worker with ``depth`` executions in flight, for an asyncio driver.

    Ray's synchronous graph calls are several times faster than its asyncio ones, but ``ref.get()``
    blocks, and a graph must not be used by two threads at once.  So a thread of the handle (the pump)
    waits for the results, in order, and hands each to the event loop; whoever uses the graph holds
    ``_graph_lock``: the pump from the moment it has an execution in flight until it has none.  When the
    pump is idle, ``call`` submits on the event loop's own thread (``execute`` does not block while
    fewer than ``depth`` are in flight), so a call at low load crosses threads once, not twice; under
    load the pump submits the queued groups between its waits."""

    def __init__(self, name: str, actor: Any, mode: str, depth: int = 4) -> None:
        self.name = name
        self.actor = actor
        self.mode = mode
        self.depth = depth
        # (execution already submitted, or None) | (group bytes to submit, or None) | the caller's future
        self._q: queue.SimpleQueue[tuple[Any, bytes | None, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._graph_lock = threading.Lock()
        self._inflight = 0  # executions handed out and not yet answered (event loop side)
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
        self._inflight = 0
        self._failed = None
        self._thread = threading.Thread(target=self._pump, name=f"cgraph-{self.name}", daemon=True)
        self._thread.start()

    async def call(self, group: RequestGroup) -> tuple[ResultGroup, float]:
        if self._failed is not None:
            raise self._failed
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        data = group.to_bytes()
        if self._inflight < self.depth and self._graph_lock.acquire(blocking=False):
            try:  # the pump is idle: submit here, it waits for the result
                ref = self._dag.execute(data)
            except Exception as e:
                raise WorkerLostError(f"worker {self.name} died: {type(e).__name__}") from None
            finally:
                self._graph_lock.release()
            self._q.put((ref, None, fut))
        else:
            self._q.put((None, data, fut))
        self._inflight += 1
        return await fut

    def _pump(self) -> None:
        loop, dag, q, depth = self._loop, self._dag, self._q, self.depth
        assert loop is not None
        inflight: deque[tuple[Any, asyncio.Future[Any]]] = deque()
        clock = time.monotonic
        err: BaseException | None = None
        try:
            while (item := q.get()) is not None:
                with self._graph_lock:
                    inflight.append((item[0] if item[0] is not None else dag.execute(item[1]), item[2]))
                    while inflight:
                        while len(inflight) < depth:
                            try:
                                item = q.get_nowait()
                            except queue.Empty:
                                break
                            if item is None:
                                return
                            inflight.append((item[0] if item[0] is not None else dag.execute(item[1]), item[2]))
                        ref, fut = inflight[0]
                        data = ref.get(timeout=GET_TIMEOUT_S)
                        inflight.popleft()  # only now: if the get raised, _fail answers this one too
                        loop.call_soon_threadsafe(self._answer, fut, (ResultGroup.from_bytes(data), clock()))
        except Exception as e:
            err = WorkerLostError(f"worker {self.name} died: {type(e).__name__}")
        finally:
            loop.call_soon_threadsafe(self._fail, q, [f for _, f in inflight], err or WorkerError("closed"))

    def _answer(self, fut: asyncio.Future[Any], value: Any) -> None:
        self._inflight -= 1
        if not fut.done():
            fut.set_result(value)

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


def _reject(fut: asyncio.Future[Any], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)


def make_handles(pool_actors: Sequence[Any], names: Sequence[str], mode: str, dispatch: str,
                 depth: int) -> list[Any]:
    if dispatch == "compiled":
        return [CompiledHandle(n, a, mode, depth) for n, a in zip(names, pool_actors, strict=True)]
    return [ActorHandle(n, a, mode) for n, a in zip(names, pool_actors, strict=True)]


# --- driver shards -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """What one driver shard runs: its slice of the schedule and its workers."""

    schedule: Schedule
    actors: tuple[Any, ...]
    names: tuple[str, ...]
    worker_ids: tuple[int, ...]
    all_workers: tuple[str, ...]
    options: DriverOptions
    balancer: str
    seed: int
    lru_capacity: int | None
    dispatch: str
    start_wall: float


class ShardActor:
    """A driver shard: runs a Driver on its slice, hands over new ledger rows while it runs."""

    def __init__(self) -> None:
        self.driver: Driver | None = None
        self.rows: list[Ledger] = []
        self.last: Progress | None = None

    async def run(self, plan: ShardPlan) -> DriverResult:
        handles = make_handles(plan.actors, plan.names, plan.options.mode, plan.dispatch, plan.options.depth)
        for h in handles:
            await h.start()
        balancer = make_balancer(plan.balancer, len(handles), len(plan.schedule.models), seed=plan.seed,
                                 lru_capacity=plan.lru_capacity)
        start_at = time.monotonic() + (plan.start_wall - time.time())
        self.driver = Driver(plan.schedule, handles, balancer, plan.options, on_progress=self._progress,
                             start_at=start_at, worker_ids=plan.worker_ids, worker_names=plan.all_workers)
        try:
            result = await self.driver.run()
            from cortexbench.report.stream_summary import histograms

            result.hists = histograms(result.ledger, plan.schedule.warmup)
            return result
        finally:
            for h in handles:
                await h.close()

    def _progress(self, p: Progress) -> None:
        self.rows.append(p.new_rows)
        self.last = p

    def take(self) -> tuple[Progress | None, list[Ledger]]:
        rows, self.rows = self.rows, []
        return self.last, rows

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.stop()


def start_shards(n: int) -> list[Any]:
    return [ADAPTER.actor(ShardActor, {"num_cpus": 0, "max_concurrency": 16, "max_restarts": 0}) for _ in range(n)]


def shard_run(shard: Any, plan: ShardPlan) -> Any:
    return ADAPTER.call(shard, "run", plan)


def shard_take(shard: Any) -> Any:
    return ADAPTER.call(shard, "take")


def shard_stop(shard: Any) -> Any:
    return ADAPTER.call(shard, "stop")
