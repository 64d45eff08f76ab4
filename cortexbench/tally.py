"""The driver's tally of its schedule: per image when it was due and sent, its attempts and its worker, and,
once its outcome is known, its ledger row; the first message of each failure kind; each worker's newest
counters.

Plain numpy.  ``Driver`` decides what happens to an image; ``Tally`` writes it down: answered calls are kept
as they come (a callback's cost is a list append) and appended to the ledger in batches (``flush``: at every
fold, before a failure row, at the end), so the ledger keeps rows in the order their outcome was known.
Times in the ledger are seconds since ``t0`` (the driver's start on its clock).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cortexbench.ledger import OUTCOMES, WORKER_STAGES, Ledger
from cortexbench.protocol import WorkerState
from cortexbench.schedule import Schedule

BATCH = 1024  # answered calls kept before they go into the ledger at once


class Tally:
    """See the module docstring.  ``worker_ids``: each handle's index among ``worker_names`` (a shard's
    workers are a part of the target's)."""

    def __init__(self, schedule: Schedule, worker_ids: np.ndarray, worker_names: Sequence[str]) -> None:
        n = len(schedule)
        self.item = np.asarray(schedule.item, np.int64)
        self.model_idx = np.asarray(schedule.model_idx, np.int64)
        self.image_idx = np.asarray(schedule.image_idx, np.int64)
        self.scheduled_s = np.full(n, np.nan)
        self.sent_s = np.full(n, np.nan)
        self.attempts = np.zeros(n, np.int64)
        self.worker_of = np.full(n, -1, np.int64)
        self.worker_ids = worker_ids
        self.ledger = Ledger(capacity=max(n, 1), models=schedule.models, workers=worker_names)
        self.states: dict[str, WorkerState] = {}
        self.error_samples: dict[str, str] = {}
        self.t0 = 0.0
        self._answered: list[tuple[int, list[int], np.ndarray, float]] = []  # not yet in the ledger

    def answered(self, w: int, positions: list[int], rows: np.ndarray, received: float) -> None:
        """A call to handle ``w`` came back with ``rows`` (``protocol.RESULT_COLS``) at ``received``."""
        self._answered.append((w, positions, rows, received))
        if len(self._answered) >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Append the answered calls' rows to the ledger, in one go."""
        if not self._answered:
            return
        done, self._answered = self._answered, []
        counts = [len(p) for _, p, _, _ in done]
        pos = np.fromiter((p for _, ps, _, _ in done for p in ps), np.int64, sum(counts))
        rows = np.concatenate([r for _, _, r, _ in done]) if len(done) > 1 else done[0][2]
        worker = np.repeat(self.worker_ids[[w for w, _, _, _ in done]], counts)
        received = np.repeat(np.array([t for _, _, _, t in done]), counts)
        t0 = self.t0
        self.ledger.add_many(
            item=self.item[pos], model_idx=self.model_idx[pos], image_idx=self.image_idx[pos],
            worker=worker, outcome=rows[:, 1].astype(np.int8), attempts=self.attempts[pos],
            hit=rows[:, 2].astype(np.int8), scheduled_s=self.scheduled_s[pos] - t0,
            sent_s=self.sent_s[pos] - t0, done_s=received - t0,
            stages=rows[:, 3:3 + len(WORKER_STAGES)], answers=rows[:, 3 + len(WORKER_STAGES):])

    def failed(self, positions: list[int], outcome: int, now: float, msg: str = "") -> int:
        """Rows for images that failed as ``outcome`` at ``now`` (no stage times, no answer); returns how many."""
        pos = np.asarray(positions, np.int64)
        n = len(pos)
        if not n:
            return 0
        self.sample_error(outcome, msg)
        self.flush()  # the ledger keeps rows in the order their outcome was known
        t0 = self.t0
        self.ledger.add_many(
            item=self.item[pos], model_idx=self.model_idx[pos], image_idx=self.image_idx[pos],
            worker=self.worker_ids[np.maximum(self.worker_of[pos], 0)], outcome=np.full(n, outcome, np.int8),
            attempts=self.attempts[pos], hit=np.full(n, -1, np.int8), scheduled_s=self.scheduled_s[pos] - t0,
            sent_s=self.sent_s[pos] - t0, done_s=np.full(n, now - t0),
            stages=np.full((n, len(WORKER_STAGES)), np.nan))
        return n

    def sample_error(self, outcome: int, msg: str) -> None:
        """Keep the first message of each failure kind (one line) for the results."""
        lines = [line.strip() for line in str(msg).splitlines() if line.strip()]
        if lines and 0 <= outcome < len(OUTCOMES):
            self.error_samples.setdefault(OUTCOMES[outcome], lines[0][:300])

    def keep_state(self, name: str, state: WorkerState, restarted: bool) -> None:
        """Keep the newest counters of a worker.  Replies to calls in flight together may arrive in any
        order; the counters only grow within a mode, so the one that has served most images is the newest
        (after a restart, ``restarted``, the worker counts from zero again)."""
        prev = self.states.get(name)
        if prev is None or restarted or _served(state) >= _served(prev):
            self.states[name] = state


def _served(state: WorkerState) -> int:
    return state.hits_total + state.misses_total
