"""What a driver run takes and gives back: ``DriverOptions``, ``Progress`` (the snapshots it folds into the
live view while it runs), ``DriverResult``, and ``merge_results`` (driver shards' results as one).

Plain dataclasses, shared by the driver, the coordinator and the targets that run driver shards (Ray shard
actors, shard processes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cortexbench.ledger import Ledger
from cortexbench.protocol import WorkerState


@dataclass(frozen=True)
class DriverOptions:
    """How a driver runs one mode (or one shard of it)."""

    mode: str
    concurrency: int | None = 64  # closed loop when rate is None
    max_group: int = 1
    depth: int = 64
    retries: int = 2
    duration_s: float | None = None
    drain_timeout_s: float = 10.0
    call_timeout_s: float | None = None  # a call's images fail as 'timeout' when it is not answered by then
    fold_interval_s: float = 0.5
    spin_s: float = 0.001  # open loop: wake this early and yield until due (asyncio timers are ms-coarse)


@dataclass(frozen=True)
class Progress:
    """A snapshot for the live line and the metrics: counts so far and the rows since the last fold."""

    mode: str
    scheduled: int
    sent: int
    done: int
    failed: int
    elapsed_s: float
    new_rows: Ledger
    outstanding: list[int]
    states: dict[str, WorkerState]
    workers: tuple[str, ...] = ()  # names of the workers ``outstanding`` counts for, in its order


@dataclass(frozen=True)
class DriverResult:
    """What a driver measured: every image sent has one ledger row; ``not_sent`` counts the rest."""

    mode: str
    ledger: Ledger
    sent: int
    not_sent: int
    started_s: float
    finished_s: float
    retries: int
    cancelled: int
    stopped_early: bool
    states: dict[str, WorkerState] = field(default_factory=dict)
    worker_losses: dict[str, int] = field(default_factory=dict)
    worker_hangs: dict[str, int] = field(default_factory=dict)  # of the losses: calls not answered in time
    # each loss: (worker, seconds into the run it was lost, seconds it took to come back or None)
    outages: tuple[tuple[str, float, float | None], ...] = ()
    error: str | None = None  # why the run could not go on (every worker gone), if so
    error_samples: dict[str, str] = field(default_factory=dict)  # outcome -> the first message of that kind


def merge_results(results: Sequence[DriverResult]) -> DriverResult:
    """Driver shards' results as one: their ledgers merged (sorted by item; an item in two shards raises
    WorkerError), counts summed, the earliest start and the latest end, each worker's newest counters (the
    last shard's that has it), its losses summed over the shards that saw them, each shard's error named."""
    if not results:
        raise ValueError("merge_results needs at least one result")
    losses: dict[str, int] = {}
    hangs: dict[str, int] = {}
    for r in results:
        for k, v in r.worker_losses.items():
            losses[k] = losses.get(k, 0) + v
        for k, v in r.worker_hangs.items():
            hangs[k] = hangs.get(k, 0) + v
    error = "; ".join(f"shard {i}: {r.error}" for i, r in enumerate(results) if r.error) or None
    return DriverResult(results[0].mode, Ledger.merge([r.ledger for r in results]), sum(r.sent for r in results),
                        sum(r.not_sent for r in results), min(r.started_s for r in results),
                        max(r.finished_s for r in results), sum(r.retries for r in results),
                        sum(r.cancelled for r in results), any(r.stopped_early for r in results),
                        {k: v for r in results for k, v in r.states.items()}, losses, hangs,
                        tuple(sorted((o for r in results for o in r.outages), key=lambda o: o[1])), error=error,
                        error_samples={k: v for r in reversed(results) for k, v in r.error_samples.items()})
