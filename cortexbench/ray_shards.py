"""Driver shards on a Ray cluster (``--drivers N``), a part of the Ray target (``cluster.py``).

- ``ShardActor`` runs a ``Driver`` on a slice of the schedule and a share of the workers; the coordinator
  collects its new ledger rows while it runs and merges ledgers and histograms at the end.
- ``start_shards`` places one on each worker's node (hard node affinity while the node is alive).
- ``run_shards`` runs them for ``RayTarget.run_shards``: folds their rows as they come; a shard lost with
  its node ends with the rows it reported (``process_shards.lost_shard_result``) while the others run on.

Like ``cluster.py`` it imports Ray; it calls ``.remote()`` only through ``cluster.ADAPTER``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from cortexbench.cluster import ADAPTER, LOST, wait_ref
from cortexbench.driver import Driver, drive
from cortexbench.driver_types import DriverResult, Progress
from cortexbench.ledger import Ledger
from cortexbench.target import FoldFn, ShardJob

if TYPE_CHECKING:
    from cortexbench.cluster import RayTarget


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
        from cortexbench.ray_handles import make_handles  # it builds on this module

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
    """One driver shard per entry of ``nodes``, each placed on that node (co-located with its workers on a
    cluster of several nodes) while the node is alive, anywhere once it is gone.  The affinity is hard: a
    soft one let Ray put a shard on another node although its own was alive (Ray 2.60, fake-GPU nodes whose
    CPUs the workers hold: tests/test_multinode.py)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    shards = []
    for node in nodes:
        opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 16, "max_restarts": 0}
        if node and node in alive:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        shards.append(ADAPTER.actor(ShardActor, opts))
    return shards


def shard_run(shard: Any, plan: ShardPlan) -> Any:
    return ADAPTER.call(shard, "run", plan)


def shard_take(shard: Any) -> Any:
    return ADAPTER.call(shard, "take")


def shard_stop(shard: Any) -> Any:
    return ADAPTER.call(shard, "stop")


async def run_shards(target: RayTarget, jobs: Sequence[ShardJob], fold: FoldFn,
                     stopping: Callable[[], bool]) -> list[DriverResult]:
    """Run the shards, folding their new rows while they run.  A shard whose actor dies (its node was
    lost) ends with the rows it reported and its images in flight as ``worker_died``
    (``process_shards.lost_shard_result``); the others run on."""
    from cortexbench.process_shards import lost_shard_result

    shards = start_shards([j.node_id for j in jobs])
    target._shards = shards
    names = tuple(s.name for s in target.specs)
    refs = [shard_run(shard, ShardPlan(job, tuple(target.actors[i] for i in job.worker_ids),
                                       tuple(names[i] for i in job.worker_ids), names))
            for shard, job in zip(shards, jobs, strict=True)]
    tasks = [asyncio.ensure_future(wait_ref(r)) for r in refs]
    rows: list[list[Ledger]] = [[] for _ in shards]
    last: list[Progress | None] = [None] * len(shards)
    dead: set[int] = set()
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.5)
            if stopping():  # again: a shard whose driver had not started yet missed the first stop
                target.stop_shards()
            live = [i for i in range(len(shards)) if i not in dead]
            takes = await asyncio.gather(*[wait_ref(shard_take(shards[i])) for i in live], return_exceptions=True)
            for i, took in zip(live, takes, strict=True):
                if isinstance(took, LOST):
                    dead.add(i)
                    continue
                if isinstance(took, BaseException):
                    raise took
                progress, new = took
                rows[i].extend(new)
                if progress is not None:
                    last[i] = progress
                    fold(progress, new)
        results = []
        t0 = time.monotonic() - (time.time() - min(j.start_wall for j in jobs)) if jobs else time.monotonic()
        for i, t in enumerate(tasks):
            err = t.exception()
            if err is None:
                results.append(t.result())
            elif isinstance(err, LOST):
                results.append(lost_shard_result(i, jobs[i], rows[i], last[i], names, t0,
                                                 f"died with its node ({type(err).__name__})"))
            else:
                raise err
        return results
    finally:
        for t in tasks:
            t.cancel()
        target._shards = []
        for shard in shards:
            try:
                ray.kill(shard)
            except Exception:  # already gone with its node
                pass
