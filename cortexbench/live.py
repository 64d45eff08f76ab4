"""What a user sees while the stream runs: the progress line and the Prometheus metrics.

``LiveView.fold`` takes each batch of new ledger rows (from the in-process driver, or collected from the
driver shards) and adds them, vectorised, to the metrics state and to a running latency histogram; the
line shows images/s, p50 and p99 so far, and failures.  Plain Python: no Ray here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from cortexbench.driver import Progress as DriverProgress
from cortexbench.ledger import OUTCOMES, WORKER_STAGES, Ledger
from cortexbench.metrics import MetricsServer, MetricsState
from cortexbench.progress import Progress
from cortexbench.stats import LatencyHistogram
from cortexbench.worker import WorkerState


class LiveView:
    """Folds progress of one run (all modes) into metrics and a progress bar."""

    def __init__(self, models: Sequence[str], workers: Sequence[str], *, server: MetricsServer | None,
                 run_id: str, backend: str, quiet: bool = False) -> None:
        self.models = tuple(models)
        self.workers = tuple(workers)
        self.server = server
        self.quiet = quiet
        self.state = MetricsState(run_id=run_id, backend=backend)
        self.bar: Progress | None = None
        self.mode = ""
        self.total = 0
        self.warmup = 0
        self.hist = LatencyHistogram()
        self.done = self.failed = 0
        self._worker_base: dict[str, tuple[int, int]] = {}  # counters at the start of the mode
        self._worker_seen: dict[str, tuple[int, int]] = {}
        self._started = time.monotonic()

    def start_mode(self, mode: str, total: int, warmup: int) -> None:
        self.close_mode()
        self.mode, self.total, self.warmup = mode, total, warmup
        self.hist = LatencyHistogram()
        self.done = self.failed = 0
        self._worker_base = {w: self._totals(w) for w in self.workers}
        self._worker_seen = {}
        self.state.mode = mode
        self.state.progress_ratio = 0.0
        self.bar = Progress(f"stream {mode}", total=total, unit="img", enabled=not self.quiet)
        self._publish()

    def _totals(self, worker: str) -> tuple[int, int]:
        return self.state.model_loads.get(worker, 0), self.state.cache_hits.get(worker, 0)

    def fold(self, p: DriverProgress, rows: Sequence[Ledger] | None = None) -> None:
        for ledger in ([p.new_rows] if rows is None else rows):
            self._fold_rows(ledger)
        self._fold_states(p.states, p.outstanding, p.workers or self.workers)
        self._publish()

    def _fold_rows(self, rows: Ledger) -> None:
        n = len(rows)
        if n == 0:
            return
        outcome = rows.column("outcome")
        lat = rows.column("latency_s")
        self.state.record_images(self.mode, rows.column("model_idx"), rows.column("worker"), outcome, lat,
                                 models=self.models, workers=self.workers, outcomes=OUTCOMES)
        ok = outcome == 0
        stages = {s: rows.column(f"{s}_s")[ok] for s in WORKER_STAGES}
        sent, done, sched = rows.column("sent_s")[ok], rows.column("done_s")[ok], rows.column("scheduled_s")[ok]
        worker_sum = np.nansum(np.vstack(list(stages.values())), axis=0) if stages else 0.0
        stages["send_delay"] = sent - sched
        stages["transport"] = np.maximum(done - sent - worker_sum, 0.0)
        self.state.record_stages(self.mode, stages)
        counted = ok & (rows.column("item") >= self.warmup)
        self.hist.record_many(lat[counted])
        self.failed += int((~ok).sum())
        self.done += n
        if self.bar is not None:
            self.bar.set(self.done, note=self.note())

    def _fold_states(self, states: dict[str, WorkerState], outstanding: Sequence[int],
                     workers: Sequence[str]) -> None:
        for name, st in states.items():
            base = self._worker_base.get(name, (0, 0))
            self.state.model_loads[name] = base[0] + st.loads_total
            self.state.cache_hits[name] = base[1] + st.hits_total
            self.state.device_memory_bytes[name] = st.memory_bytes
        for name, n in zip(workers, outstanding, strict=False):
            self.state.inflight[name] = int(n)

    def note(self) -> str:
        h = self.hist
        if h.count == 0:
            return f"failed {self.failed}" if self.failed else ""
        text = f"p50 {h.percentile(50) * 1e3:.3g} ms, p99 {h.percentile(99) * 1e3:.3g} ms"
        return text + (f", failed {self.failed}" if self.failed else "")

    def _publish(self) -> None:
        if self.total:
            self.state.progress_ratio = min(1.0, self.done / self.total)
        if self.server is not None:
            self.server.update(self.state)

    def close_mode(self) -> None:
        if self.bar is not None:
            self.bar.set(self.done, note=self.note())
            self.bar.close()
            self.bar = None
