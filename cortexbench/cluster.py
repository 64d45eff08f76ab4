"""The Ray target, with ray_handles.py and ray_shards.py the only modules that import Ray.

- ``WorkerActor`` wraps a ``ModelWorker``: one per GPU (``num_gpus=1``, placed through a placement group
  so a multi-node cluster gets one on every GPU), or CPU workers with a share of the cores.  Ray restarts
  a worker whose process dies (``recover_actor`` waits for it); the driver retries its images elsewhere
  meanwhile.
- ``RayTarget`` (``target.Target``): the actors, their handles (``ray_handles.py``: the ``actor``,
  ``grouped`` and ``compiled`` dispatch paths, which reach Ray only through this module), driver shards.
- Driver shards (``--drivers N``) live in ``ray_shards.py``, which builds on this module.
- ``RayAdapter`` is the one class that calls ``.remote()`` and builds compiled graphs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from cortexbench.driver_types import DriverResult
from cortexbench.errors import CortexbenchError, WorkerError, WorkerLostError
from cortexbench.gateway.channel import expire
from cortexbench.protocol import WorkerState
from cortexbench.target import FoldFn, HandleOptions, ShardJob, WorkerInfo
from cortexbench.worker import ModelWorker, WorkerSpec

LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)  # a worker died or restarts
# Calls one worker actor runs at once (its Ray threads).  More in flight wait in Ray's queue before the
# worker sees them, so their wait shows as transport, not as the worker's queue stage: drivers keep at
# most this many calls in flight per worker (the actor path's depth).
CALLS_PER_WORKER = 128


def init_ray(address: str | None, num_cpus: int | None = None) -> dict[str, float]:
    """Join ``address`` or start a local Ray; return the cluster's resources."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": True, "logging_level": "ERROR"}
        if address:
            kwargs["address"] = address
        else:
            # a Ray of our own, even when another run or `ray start` has one on this machine (a bare
            # ray.init() would join the newest and refuse num_cpus); RAY_ADDRESS (a Ray job) still joins
            kwargs["address"] = os.environ.get("RAY_ADDRESS") or "local"
            if num_cpus is not None and kwargs["address"] == "local":
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


def node_id() -> str:
    """This process's Ray node (to tell which workers share its machine)."""
    return str(ray.get_runtime_context().get_node_id())


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


class RayAdapter:
    """Every ``.remote()`` call of cortexbench goes through here."""

    def actor(self, cls: type, options: dict[str, Any], *args: Any) -> Any:
        return ray.remote(cls).options(**options).remote(*args)

    def call(self, actor: Any, method: str, *args: Any) -> Any:
        return getattr(actor, method).remote(*args)

    def kill(self, actor: Any) -> None:
        """End a worker's process; Ray restarts it (within its restarts)."""
        ray.kill(actor, no_restart=False)

    def compile(self, actor: Any, method: str, max_inflight: int) -> Any:
        """A Ray Compiled Graph that runs ``actor.method(input)``, ``max_inflight`` executions at once."""
        from ray.dag import InputNode

        with InputNode() as inp:
            dag = getattr(actor, method).bind(inp)
        return dag.experimental_compile(_max_inflight_executions=max_inflight)


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
        self._slots: Any = None  # the gateway's shared-memory slots, mapped on first use
        self._channel: Any = None  # the gateway's direct channel (gateway.channel), opened on first ask
        self._channel_lock = threading.Lock()

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

    def infer_tensor(self, data: bytes) -> bytes:
        """One input sent whole by the serving gateway (``ModelWorker.run_tensor``)."""
        return self.worker.run_tensor(data)

    def infer_tensor_shm(self, slot: bytes) -> bytes:
        """One input the gateway put in a shared-memory slot on this machine (``gateway.shm``); ``slot``:
        the slot's path and the request's length, as ``b"PATH LENGTH"`` (one bytes argument crosses Ray
        faster than a str and an int)."""
        if self._slots is None:
            from cortexbench.gateway.shm import SlotReader

            self._slots = SlotReader()
        path, _, length = slot.decode().rpartition(" ")
        return self.worker.run_tensor(self._slots.view(path, int(length)))

    def open_channel(self) -> Any:
        """Listen for a gateway on this machine (``gateway.channel``): its address and token (once per
        process; asked again, the same); None where it cannot listen (the gateway keeps the actor call)."""
        from cortexbench.gateway.channel import INLINE, ChannelServer

        def handle(kind: int, payload: bytes) -> bytes:
            return self.worker.run_tensor(payload) if kind == INLINE else self.infer_tensor_shm(payload)

        with self._channel_lock:
            if self._channel is None:
                try:
                    self._channel = ChannelServer(handle)
                except OSError:
                    return None
            return self._channel.address

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
        from cortexbench.ray_handles import make_handles  # it builds on this module

        ids = range(len(self.actors)) if ids is None else ids
        return make_handles([self.actors[i] for i in ids], [self.specs[i].name for i in ids], mode, options.dispatch,
                            options.depth, one_at_a_time=options.one_at_a_time)

    async def run_shards(self, jobs: Sequence[ShardJob], fold: FoldFn, stopping: Callable[[], bool]) -> list[DriverResult]:
        """Run the driver shards next to their workers (``ray_shards.run_shards``)."""
        from cortexbench.ray_shards import run_shards  # it builds on this module

        return await run_shards(self, jobs, fold, stopping)

    def stop_shards(self) -> None:
        from cortexbench.ray_shards import shard_stop

        for shard in self._shards:
            shard_stop(shard)

    async def infer_tensor(self, index: int, data: bytes | tuple[str, int], timeout_s: float) -> bytes:
        """Run one input on worker ``index`` (the serving gateway): the request's bytes, or the path and
        length of the shared-memory slot that holds them (a worker on this machine, ``gateway.shm``); the
        answer's bytes; WorkerLostError when the worker died or is restarting, WorkerError when it did not
        answer within ``timeout_s``."""
        name = self.specs[index].name
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        try:
            if isinstance(data, tuple):
                ref = ADAPTER.call(self.actors[index], "infer_tensor_shm", f"{data[0]} {data[1]}".encode())
            else:
                ref = ADAPTER.call(self.actors[index], "infer_tensor", data)
        except LOST as e:
            raise WorkerLostError(f"worker {name} is gone ({type(e).__name__})") from None
        # the answer handed to the loop from Ray's thread (as ray_handles.ActorHandle does), and a timer for
        # the timeout: no task and no wait_for per request (0.1-0.3 ms a request on the 2-core machine)
        ref.future().add_done_callback(lambda f: _to_loop(loop, fut, f))
        timer = loop.call_later(timeout_s, expire, fut)
        try:
            return await fut
        except LOST as e:
            raise WorkerLostError(f"worker {name} is gone ({type(e).__name__})") from None
        except asyncio.TimeoutError:
            ray.cancel(ref)
            raise WorkerError(f"worker {name} did not answer within {timeout_s:g} s") from None
        finally:
            timer.cancel()

    def open_channels(self, indices: Sequence[int], timeout_s: float = 60.0) -> list[Any]:
        """Each worker's direct channel for a gateway on its machine (``WorkerActor.open_channel``)."""
        return list(get([ADAPTER.call(self.actors[i], "open_channel") for i in indices], timeout_s))

    async def recover_worker(self, index: int, mode: str) -> None:
        """Wait for Ray to restart worker ``index`` and set its mode again (``recover_actor``)."""
        await recover_actor(self.actors[index], self.specs[index].name, mode)

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


def _to_loop(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], done: Any) -> None:
    """From Ray's thread: settle ``fut`` on its loop with a finished call's value or error."""
    try:
        loop.call_soon_threadsafe(_settle, fut, done)
    except RuntimeError:  # the loop is closed: nobody waits for this any more
        pass


def _settle(fut: asyncio.Future[Any], done: Any) -> None:
    if fut.done():
        return
    if done.cancelled():
        fut.cancel()
        return
    err = done.exception()
    if err is None:
        fut.set_result(done.result())
    else:
        fut.set_exception(unwrap(err))


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


def start_gateways(cls: type, n: int, target: RayTarget, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """``n`` gateway replicas (``serve.GatewayReplica``: ``cls(index, target, *args)``), actors on this
    process's machine (they share its port) that take no CPU from the workers; ready when this returns."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict[str, Any] = {
        "num_cpus": 0, "max_restarts": 0, "max_concurrency": 2,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id(), soft=False),
        "runtime_env": {"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}},
    }
    actors = [ADAPTER.actor(cls, opts, i, target, *args) for i in range(n)]
    try:
        get([ADAPTER.call(a, "__ray_ready__") for a in actors], timeout_s)
    except BaseException:
        drop_actors(actors)
        raise
    return actors


def settle(refs: Sequence[Any], timeout_s: float) -> list[Any]:
    """Each call's value, or the exception it ended with (a gateway replica that died answers its error, and
    the others still count)."""
    out: list[Any] = []
    for ref in refs:
        try:
            out.append(get(ref, timeout_s))
        except Exception as e:
            out.append(e)
    return out


def drop_actors(actors: Sequence[Any]) -> None:
    """End actors for good (no restart)."""
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass


# --- a lost worker -------------------------------------------------------------------------------


async def recover_actor(actor: Any, name: str, mode: str, timeout_s: float = 120.0, dead_s: float = 2.0) -> None:
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
        except (*LOST, asyncio.TimeoutError):
            died_since = None
            await asyncio.sleep(0.2)  # restarting: poll again
        except ray.exceptions.RayTaskError as e:
            raise WorkerError(f"worker {name} restarted but cannot set up: {unwrap(e)}") from None
    raise WorkerError(f"worker {name} did not come back within {timeout_s:g} s")


async def wait_ref(ref: Any) -> Any:
    """Await a Ray object ref, re-raising a worker's CortexbenchError as itself."""
    try:
        return await ref
    except Exception as e:
        raise unwrap(e) from None
