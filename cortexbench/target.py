"""What the stream drives: a ``Target`` (its workers, their residency mode, handles to reach them).

Plain Python: the coordinator holds a ``Target`` and never a Ray object.  ``cluster.RayTarget`` is the
target of cortexbench's own Ray workers (one per GPU or CPU share); ``tests.fakes.FakeTarget`` is the
unit tests'.  A target:

- names its workers (``workers``: ``WorkerInfo``, known once it has started);
- switches them to a residency mode before each mode's run (``set_mode``: setup figures per worker);
- hands out one ``protocol.WorkerHandle`` per worker for a driver (``handles``);
- may run driver shards next to its workers (``run_shards``; ``shards_supported`` False: the coordinator
  runs one driver itself);
- frees what it holds (``close``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from cortexbench.driver import DriverOptions, DriverResult, Progress
    from cortexbench.ledger import Ledger
    from cortexbench.protocol import WorkerHandle
    from cortexbench.schedule import Schedule


@dataclass(frozen=True)
class WorkerInfo:
    """One worker of a target: its name, device, and where it runs."""

    name: str
    device: str = "cpu"
    node: str | None = None  # address of the node it runs on
    node_id: str = ""  # the target's id of that node (driver shards are placed by it)
    pid: int | None = None
    host: str | None = None  # host name, for metric labels unique across hosts


@dataclass(frozen=True)
class HandleOptions:
    """How a driver's handles reach the workers: the dispatch path, calls in flight per worker, and whether
    the driver keeps one image in flight (a compiled handle may then wait for the answer inline)."""

    dispatch: str = "grouped"
    depth: int = 4
    one_at_a_time: bool = False


@dataclass(frozen=True)
class ShardJob:
    """What one driver shard runs: its slice of the schedule, its workers (indices into the target's
    workers) and how to drive them."""

    schedule: Schedule
    worker_ids: tuple[int, ...]
    node_id: str
    options: DriverOptions
    handle_options: HandleOptions
    balancer: str
    seed: int
    lru_capacity: int | None
    start_wall: float  # time.time() at which every shard starts its schedule


FoldFn = Callable[["Progress", Sequence["Ledger"]], None]


@runtime_checkable
class Target(Protocol):
    """See the module docstring."""

    workers: Sequence[WorkerInfo]
    shards_supported: bool

    def set_mode(self, mode: str) -> list[dict[str, float]]:
        """Switch every worker to residency ``mode`` (cached loads, swap fills the host tier, ...) and wait
        for it; returns each worker's setup figures."""
        ...

    def handles(self, mode: str, options: HandleOptions, ids: Sequence[int] | None = None) -> list[WorkerHandle]:
        """One handle per worker (or per worker in ``ids``), for a driver running ``mode``."""
        ...

    async def run_shards(self, jobs: Sequence[ShardJob], fold: FoldFn, stopping: Callable[[], bool]) -> list[DriverResult]:
        """Run one driver per job next to its workers; call ``fold`` with their progress while they run;
        stop them when ``stopping()`` turns True.  Returns each shard's result (ledger, counts)."""
        ...

    def stop_shards(self) -> None:
        """Ask the shards running now to stop (they drain and return what they measured)."""
        ...

    def close(self) -> None:
        ...


def worker_names(target: Target) -> list[str]:
    return [w.name for w in target.workers]


def worker_labels(workers: Sequence[WorkerInfo], host: str) -> list[str]:
    """The worker label of the metrics: ``<host it runs on>/<name>``, unique across the hosts that one
    Prometheus scrapes (every run calls its first worker cpu0 or gpu0)."""
    return [f"{w.host or host}/{w.name}" for w in workers]


def describe(workers: Sequence[WorkerInfo]) -> list[dict[str, Any]]:
    """The workers as results.json lists them."""
    return [{"name": w.name, "device": w.device, "node": w.node, "pid": w.pid} for w in workers]
