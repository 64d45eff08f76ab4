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
from cortexbench.metrics import MEASURED, SETUP, WARMUP, MetricsState
from cortexbench.metrics_http import MetricsServer
from cortexbench.progress import Progress
from cortexbench.protocol import WorkerState
from cortexbench.stats import LatencyHistogram


class LiveView:
    """Folds progress of one run (all modes) into metrics and a progress bar.

    ``workers`` are the names the driver uses; ``worker_labels`` (same order) are what the metrics show
    (the coordinator passes ``<host>/<name>``, unique across hosts).  ``modes`` is how many modes the run
    has, for ``cortexbench_run_progress_ratio``.
    """

    def __init__(self, models: Sequence[str], workers: Sequence[str], *, server: MetricsServer | None,
                 run_id: str, backend: str, quiet: bool = False, host: str = "",
                 worker_labels: Sequence[str] | None = None, modes: int = 1) -> None:
        self.models = tuple(models)
        self.workers = tuple(workers)
        self.labels = tuple(worker_labels) if worker_labels is not None else self.workers
        if len(self.labels) != len(self.workers):
            raise ValueError("LiveView: one label per worker")
        self._label = dict(zip(self.workers, self.labels, strict=True))
        self.server = server
        self.quiet = quiet
        self.state = MetricsState(run_id=run_id, backend=backend, host=host, phase="preparing")
        self.bar: Progress | None = None
        self.mode = ""
        self.total = 0
        self.warmup = 0
        self.modes = max(1, modes)
        self.modes_done = 0
        self.hist = LatencyHistogram()
        self.done = self.failed = 0
        self._started = time.monotonic()
        self._publish()

    def start_mode(self, mode: str, total: int, warmup: int) -> None:
        """A mode begins: its workers are being set up (phase 'preparing') until ``sending``."""
        self.close_mode()
        self.mode, self.total, self.warmup = mode, total, warmup
        self.hist = LatencyHistogram()
        self.done = self.failed = 0
        self.state.mode = mode
        self.state.phase = "preparing"
        self.bar = Progress(f"stream {mode}", total=total, unit="img", enabled=not self.quiet)
        self._publish()

    def add_preload(self, models_per_worker: int) -> None:
        """Count the models every worker loaded while the mode was set up (cached mode's preload)."""
        for label in self.labels:
            self.state.add_model_loads(label, models_per_worker, mode=self.mode, phase=SETUP)
        self._publish()

    def sending(self) -> None:
        """The workers are ready and the mode's first images go out: warm-up (or measuring without one)."""
        self.state.phase = "warmup" if self.warmup > 0 else "measuring"
        self._publish()

    def finish(self) -> None:
        """The run is over (every mode, or stopped): phase 'done'."""
        self.close_mode()
        self.state.phase = "done"
        self._publish()

    def fold(self, p: DriverProgress, rows: Sequence[Ledger] | None = None) -> None:
        for ledger in ([p.new_rows] if rows is None else rows):
            self._fold_rows(ledger)
        self._fold_states(p.states, p.outstanding, p.workers or self.workers)
        self._publish()

    def _fold_rows(self, rows: Ledger) -> None:
        n = len(rows)
        if n == 0:
            return
        measured = rows.column("item") >= self.warmup
        for phase, sel in ((WARMUP, ~measured), (MEASURED, measured)):
            if sel.any():
                self._fold_phase(rows, sel, phase)
        if measured.any() and self.state.phase == "warmup":
            self.state.phase = "measuring"
        ok = rows.column("outcome") == 0
        self.hist.record_many(rows.column("latency_s")[ok & measured])
        self.failed += int((~ok).sum())
        self.done += n
        if self.bar is not None:
            self.bar.set(self.done, note=self.note())

    def _fold_phase(self, rows: Ledger, sel: np.ndarray, phase: str) -> None:
        """Add the rows ``sel`` picks to the metrics under ``phase``."""
        outcome = rows.column("outcome")[sel]
        worker = rows.column("worker")[sel]
        self.state.record_images(self.mode, rows.column("model_idx")[sel], worker, outcome,
                                 rows.column("latency_s")[sel], models=self.models, workers=self.labels,
                                 outcomes=OUTCOMES, phase=phase)
        self.state.record_residency(self.mode, worker, rows.column("hit")[sel], workers=self.labels, phase=phase)
        ok = outcome == 0
        raw = {s: rows.column(f"{s}_s")[sel][ok] for s in WORKER_STAGES}
        worker_sum = np.nansum(np.vstack(list(raw.values())), axis=0) if raw else 0.0
        # A worker stage that did not happen for an image (no read or decode with inputs in memory, no load
        # on a hit) is exactly 0 (or NaN): it is not observed, so a stage's histogram describes the
        # images that went through it.
        stages = {s: np.where(v == 0.0, np.nan, v) for s, v in raw.items()}
        sent, done, sched = (rows.column(c)[sel][ok] for c in ("sent_s", "done_s", "scheduled_s"))
        stages["send_delay"] = sent - sched
        stages["transport"] = np.maximum(done - sent - worker_sum, 0.0)
        self.state.record_stages(self.mode, stages, phase=phase)

    def _fold_states(self, states: dict[str, WorkerState], outstanding: Sequence[int],
                     workers: Sequence[str]) -> None:
        for name, st in states.items():
            label = self._label.get(name, name)
            if st.memory_bytes >= 0:
                self.state.set_device_memory(label, st.memory_bytes)
            if st.host_memory_bytes > 0:
                self.state.set_host_memory(label, st.host_memory_bytes)
        for name, n in zip(workers, outstanding, strict=False):
            self.state.set_inflight(self._label.get(name, name), int(n))

    def note(self) -> str:
        h = self.hist
        if h.count == 0:
            return f"failed {self.failed}" if self.failed else ""
        text = f"p50 {h.percentile(50) * 1e3:.3g} ms, p99 {h.percentile(99) * 1e3:.3g} ms"
        return text + (f", failed {self.failed}" if self.failed else "")

    def _publish(self) -> None:
        if self.total:
            ratio = min(1.0, self.done / self.total)
            self.state.mode_progress_ratio = ratio
            self.state.progress_ratio = min(1.0, (self.modes_done + ratio) / self.modes)
        if self.server is not None:
            self.server.update(self.state)

    def close_mode(self) -> None:
        """The mode is over (also when cut short: --duration, Ctrl-C): it counts as done in the run's progress."""
        if self.bar is not None:
            self.bar.set(self.done, note=self.note())
            self.bar.close()
            self.bar = None
        if self.total:
            self.modes_done += 1
            self.done, self.total = self.total, 0
            self.state.mode_progress_ratio = 1.0
            self.state.progress_ratio = min(1.0, self.modes_done / self.modes)
            if self.server is not None:
                self.server.update(self.state)
