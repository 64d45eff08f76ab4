"""Per-image accounting: one row for every scheduled item that was sent, ok or failed, and why.

The ``Ledger`` is columnar: preallocated numpy arrays that double when full.  ``add_many`` (numpy arrays
or scalars, one call per group of results a worker returns) is the main path; ``add`` appends one row.
Times are seconds from the start of the run: ``scheduled_s`` (when the image was due; in the closed loop,
when its slot came free), ``sent_s`` (first send), ``done_s`` (result or final failure known), and
``latency_s = done_s - scheduled_s``.  Workers measure the stage durations of ``WORKER_STAGES``
(``queue_s``, ``read_s``, ...; NaN when unknown) and say which input they ran (``input_idx``: the image
file actually used) and what the model answered (``top1``, and ``checksum``: the sum of the logits), so
that runs of different residency tiers can be checked against each other for the same (model, input).

At the end of a run ``check_complete(sent)`` proves that every image sent is accounted for exactly once;
shards' ledgers are joined with ``Ledger.merge``.  Ledgers pickle as their filled rows only, so they are
cheap to send between processes.  ``save_csv_gz`` writes one row per image with model, worker and outcome
names (not indices) and units in the column names; ``from_csv_gz`` reads such a file back.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cortexbench.errors import WorkerError

OUTCOMES = ("ok", "input_error", "model_error", "worker_died", "timeout", "cancelled", "error")
OUTCOME_CODE = {name: code for code, name in enumerate(OUTCOMES)}
# The stages of one image in a worker, in order (docs/metrics.md): queue (waiting for a lane), input
# (reading the image file), decode, wait (for the loader or another lane's load of the same model), read
# (the model file, disk to host), build (the network's structure and binding weights to it), copy (host to
# device, the part not overlapped with the read, and any precision conversion), infer, free.
WORKER_STAGES = ("queue", "input", "decode", "wait", "read", "build", "copy", "infer", "free")
STAGE_COLUMNS = tuple(f"{s}_s" for s in WORKER_STAGES)
TIME_COLUMNS = ("scheduled_s", "sent_s", "done_s", "latency_s")
ANSWER_COLUMNS = ("input_idx", "top1", "checksum")  # what a worker ran and answered (-1 / NaN: unknown)

COLUMNS: dict[str, type] = {
    "item": np.int64, "model_idx": np.int16, "image_idx": np.int32, "worker": np.int16, "outcome": np.int8,
    "attempts": np.int8, "hit": np.int8,
    **{c: np.float64 for c in TIME_COLUMNS},
    **{c: np.float32 for c in STAGE_COLUMNS},  # durations: float32 keeps 0.1 us resolution up to 1 s
    "input_idx": np.int32, "top1": np.int32, "checksum": np.float64,
}
_FILL = {"hit": -1, "input_idx": -1, "top1": -1, "checksum": np.nan, **{c: np.nan for c in TIME_COLUMNS + STAGE_COLUMNS}}
_CSV_DECIMALS = 7  # 0.1 us


def _check_stage_names(stage_s: dict[str, Any]) -> None:
    unknown = [k for k in stage_s if k not in STAGE_COLUMNS]
    if unknown:
        raise TypeError(f"Ledger: unknown stage column '{unknown[0]}' (valid: {', '.join(STAGE_COLUMNS)})")


class Ledger:
    """Columnar per-image records; see the module docstring."""

    def __init__(self, models: Sequence[str], workers: Sequence[str], capacity: int = 4096) -> None:
        self.models = tuple(models)
        self.workers = tuple(workers)
        self._n = 0
        self._cols = {name: np.full(max(1, capacity), _FILL.get(name, 0), dtype=dt) for name, dt in COLUMNS.items()}

    # ---------------------------------------------------------------- filling
    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._cols["item"])

    def _reserve(self, extra: int) -> None:
        need = self._n + extra
        cap = self.capacity
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name, old in self._cols.items():
            new = np.full(cap, _FILL.get(name, 0), dtype=old.dtype)
            new[:self._n] = old[:self._n]
            self._cols[name] = new

    def add(self, item: int, model_idx: int, image_idx: int, worker: int, outcome: int | str, *,
            attempts: int = 1, hit: bool | int | None = None, scheduled_s: float, sent_s: float, done_s: float,
            input_idx: int = -1, top1: int = -1, checksum: float = math.nan, **stage_s: float) -> None:
        """Append one row.  ``outcome`` is a name of OUTCOMES or its code; ``hit`` None means unknown;
        stage durations by keyword (``queue_s=...``, names from STAGE_COLUMNS), NaN where not given."""
        _check_stage_names(stage_s)
        n = self._n
        if n == len(self._cols["item"]):
            self._reserve(1)
        c = self._cols
        c["item"][n] = item
        c["model_idx"][n] = model_idx
        c["image_idx"][n] = image_idx
        c["worker"][n] = worker
        c["outcome"][n] = OUTCOME_CODE[outcome] if isinstance(outcome, str) else outcome
        c["attempts"][n] = attempts
        c["hit"][n] = -1 if hit is None else int(hit)
        c["scheduled_s"][n] = scheduled_s
        c["sent_s"][n] = sent_s
        c["done_s"][n] = done_s
        c["latency_s"][n] = done_s - scheduled_s
        for name in STAGE_COLUMNS:
            c[name][n] = stage_s.get(name, math.nan)
        c["input_idx"][n] = input_idx
        c["top1"][n] = top1
        c["checksum"][n] = checksum
        self._n = n + 1

    def add_many(self, item: Any, model_idx: Any, image_idx: Any, worker: Any, outcome: Any, *,
                 attempts: Any = 1, hit: Any = -1, scheduled_s: Any, sent_s: Any, done_s: Any,
                 stages: Any = None, answers: Any = None, **stage_s: Any) -> None:
        """Append len(item) rows from numpy arrays (any other argument may be a scalar, broadcast).

        ``outcome`` holds codes (or one name for all rows); ``hit`` holds 1, 0 or -1 (unknown).  The stage
        durations come either one keyword per stage (``queue_s=...``) or as ``stages``, an array of shape
        (rows, len(WORKER_STAGES)) in WORKER_STAGES order, which replaces the keywords.  ``answers``, if
        given, is (rows, 3) in ANSWER_COLUMNS order.
        """
        _check_stage_names(stage_s)
        if stages is not None:
            st = np.asarray(stages, dtype=np.float64)
            if st.ndim != 2 or st.shape[1] != len(WORKER_STAGES):
                raise ValueError(f"Ledger.add_many: stages must have shape (rows, {len(WORKER_STAGES)}), not {st.shape}")
            stage_s = dict(zip(STAGE_COLUMNS, st.T, strict=True))
        item = np.asarray(item)
        k = item.shape[0] if item.ndim else 1
        if k == 0:
            return
        self._reserve(k)
        n = self._n
        end = n + k
        c = self._cols
        if isinstance(outcome, str):
            outcome = OUTCOME_CODE[outcome]
        scheduled_s = np.asarray(scheduled_s, dtype=np.float64)
        done_s = np.asarray(done_s, dtype=np.float64)
        try:
            c["item"][n:end] = item
            c["model_idx"][n:end] = model_idx
            c["image_idx"][n:end] = image_idx
            c["worker"][n:end] = worker
            c["outcome"][n:end] = outcome
            c["attempts"][n:end] = attempts
            c["hit"][n:end] = hit
            c["scheduled_s"][n:end] = scheduled_s
            c["sent_s"][n:end] = sent_s
            c["done_s"][n:end] = done_s
            np.subtract(c["done_s"][n:end], c["scheduled_s"][n:end], out=c["latency_s"][n:end])
            for name in STAGE_COLUMNS:
                c[name][n:end] = stage_s.get(name, math.nan)
            if answers is not None:
                ans = np.asarray(answers, dtype=np.float64)
                c["input_idx"][n:end] = ans[:, 0]
                c["top1"][n:end] = ans[:, 1]
                c["checksum"][n:end] = ans[:, 2]
            else:
                c["input_idx"][n:end] = -1
                c["top1"][n:end] = -1
                c["checksum"][n:end] = math.nan
        except (ValueError, IndexError) as e:  # a column of the wrong length: leave the ledger as it was
            for name, col in c.items():
                col[n:end] = _FILL.get(name, 0)
            raise ValueError(f"Ledger.add_many: every column must have {k} rows or be a scalar ({e})") from None
        self._n = end

    # ---------------------------------------------------------------- reading
    def column(self, name: str) -> np.ndarray:
        """The filled part of a column (a view: valid until the next add)."""
        if name not in self._cols:
            raise KeyError(f"no ledger column '{name}' (columns: {', '.join(COLUMNS)})")
        return self._cols[name][:self._n]

    def columns(self) -> dict[str, np.ndarray]:
        return {name: col[:self._n] for name, col in self._cols.items()}

    def outcome_counts(self) -> dict[str, int]:
        """Images per outcome name (every name present, 0 where none)."""
        counts = np.bincount(self.column("outcome").astype(np.intp), minlength=len(OUTCOMES))
        return {name: int(counts[i]) for i, name in enumerate(OUTCOMES)}

    def ok_mask(self) -> np.ndarray:
        return self.column("outcome") == 0

    def check_complete(self, sent: int) -> None:
        """Raise WorkerError unless every one of ``sent`` images has exactly one row, ok or failed."""
        outcome = self.column("outcome")
        bad = np.count_nonzero((outcome < 0) | (outcome >= len(OUTCOMES)))
        if bad:
            raise WorkerError(f"ledger: {bad} images have an unknown outcome code (valid: 0..{len(OUTCOMES) - 1})")
        items = np.sort(self.column("item"))
        dup = items[1:][items[1:] == items[:-1]]
        if dup.size:
            first = ", ".join(str(int(x)) for x in np.unique(dup)[:5])
            raise WorkerError(f"ledger: {dup.size} images recorded twice (items {first}); "
                              "a result was counted more than once")
        ok = int(np.count_nonzero(outcome == 0))
        failed = self._n - ok
        if self._n != sent:
            what = "unaccounted for (lost)" if self._n < sent else "recorded but never sent"
            raise WorkerError(f"ledger: {ok} ok + {failed} failed = {self._n} images, but {sent} were sent: "
                              f"{abs(sent - self._n)} {what}")

    # ---------------------------------------------------------------- building new ledgers
    @classmethod
    def _from_columns(cls, models: Sequence[str], workers: Sequence[str], cols: dict[str, np.ndarray]) -> Ledger:
        n = len(cols["item"])
        led = cls(models, workers, capacity=max(1, n))
        for name, dt in COLUMNS.items():
            led._cols[name][:n] = cols[name].astype(dt, copy=False)
        led._n = n
        return led

    def select(self, mask: np.ndarray) -> Ledger:
        """A new ledger of the rows where ``mask`` is True (or of the given row indices)."""
        return Ledger._from_columns(self.models, self.workers, {k: v[mask] for k, v in self.columns().items()})

    def slice(self, start: int, stop: int | None = None) -> Ledger:
        """A new ledger of rows ``start:stop`` in the order they were added (e.g. the rows new since a mark)."""
        stop = self._n if stop is None else min(stop, self._n)
        return Ledger._from_columns(self.models, self.workers,
                                    {k: v[start:stop] for k, v in self.columns().items()})

    def excluding_warmup(self, warmup: int) -> Ledger:
        """A new ledger without the warm-up items (global item ids below ``warmup``)."""
        return self.select(self.column("item") >= warmup)

    @classmethod
    def merge(cls, ledgers: Sequence[Ledger]) -> Ledger:
        """Shards' ledgers as one, sorted by item.  Model and worker names are unified (first seen first);
        an item in two ledgers raises WorkerError."""
        if not ledgers:
            raise ValueError("Ledger.merge needs at least one ledger")
        models: dict[str, int] = {}
        workers: dict[str, int] = {}
        parts: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
        for led in ledgers:
            m_map = np.array([models.setdefault(m, len(models)) for m in led.models] or [0], dtype=np.int64)
            w_map = np.array([workers.setdefault(w, len(workers)) for w in led.workers] or [0], dtype=np.int64)
            for name, col in led.columns().items():
                if name == "model_idx":
                    col = m_map[col]
                elif name == "worker":
                    col = w_map[col]
                parts[name].append(col)
        cols = {name: np.concatenate(p) for name, p in parts.items()}
        order = np.argsort(cols["item"], kind="stable")
        cols = {name: c[order] for name, c in cols.items()}
        items = cols["item"]
        dup = items[1:][items[1:] == items[:-1]]
        if dup.size:
            raise WorkerError(f"merging ledgers: {dup.size} items appear in more than one shard "
                              f"(first: {int(dup[0])}); each item must be sent by one shard only")
        return cls._from_columns(tuple(models), tuple(workers), cols)

    # ---------------------------------------------------------------- pickling: filled rows only
    def __getstate__(self) -> dict[str, Any]:
        return {"models": self.models, "workers": self.workers, "cols": self.columns()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        n = len(state["cols"]["item"])
        self.models = state["models"]
        self.workers = state["workers"]
        self._cols = {name: np.array(state["cols"][name], dtype=dt) if n else
                      np.full(1, _FILL.get(name, 0), dtype=dt) for name, dt in COLUMNS.items()}
        self._n = n

    # ---------------------------------------------------------------- CSV
    @staticmethod
    def header() -> list[str]:
        """CSV column names (units in the names; model, worker and outcome as names)."""
        return ["item", "model", "image_idx", "worker", "outcome", "attempts", "hit", *TIME_COLUMNS, *STAGE_COLUMNS,
                "input_idx", "top1", "checksum"]

    def to_rows(self) -> Iterator[tuple[Any, ...]]:
        """One tuple of plain values per row, in ``header()`` order; unknown values are ''."""
        c = self.columns()
        models = np.array([*self.models, ""], dtype=object)
        workers = np.array([*self.workers, ""], dtype=object)
        outcomes = np.array([*OUTCOMES, ""], dtype=object)

        def names(table: np.ndarray, idx: np.ndarray) -> list[Any]:
            idx = idx.astype(np.intp)
            idx = np.where((idx >= 0) & (idx < len(table) - 1), idx, len(table) - 1)
            return table[idx].tolist()

        def floats(col: np.ndarray) -> list[Any]:
            values = np.round(col.astype(np.float64), _CSV_DECIMALS).tolist()
            if np.isnan(col).any():
                values = ["" if v != v else v for v in values]
            return values

        hit = c["hit"].tolist()
        out = [
            c["item"].tolist(), names(models, c["model_idx"]), c["image_idx"].tolist(), names(workers, c["worker"]),
            names(outcomes, c["outcome"]), c["attempts"].tolist(), ["" if h < 0 else h for h in hit],
            *(floats(c[name]) for name in TIME_COLUMNS + STAGE_COLUMNS),
            ["" if v < 0 else v for v in c["input_idx"].tolist()], ["" if v < 0 else v for v in c["top1"].tolist()],
            ["" if v != v else v for v in c["checksum"].tolist()],
        ]
        return zip(*out, strict=True)

    def save_csv_gz(self, path: Path | str) -> Path:
        """Write the ledger as gzip-compressed CSV, atomically (temporary file, then rename).

        Fast compression (level 1): about 3 MB and 1 s per 100K rows on one core.
        """
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with gzip.open(tmp, "wt", compresslevel=1, newline="") as f:
                w = csv.writer(f)
                w.writerow(self.header())
                w.writerows(self.to_rows())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def from_csv_gz(cls, path: Path | str, models: Sequence[str] | None = None,
                    workers: Sequence[str] | None = None) -> Ledger:
        """Read a file written by ``save_csv_gz``.  Without ``models``/``workers`` their names are numbered in
        order of first appearance; with them, the given order is used (names not listed are appended)."""
        with gzip.open(path, "rt", newline="") as f:
            text = f.read()
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or rows[0] != cls.header():
            raise ValueError(f"{path}: not a cortexbench ledger (expected header {','.join(cls.header())})")
        body = rows[1:]
        cols_t = list(zip(*body, strict=True)) if body else [() for _ in rows[0]]
        raw = dict(zip(rows[0], cols_t, strict=True))
        model_ids = {m: i for i, m in enumerate(models or ())}
        worker_ids = {w: i for i, w in enumerate(workers or ())}

        def index(ids: dict[str, int], names: Sequence[str]) -> np.ndarray:
            return np.array([ids.setdefault(x, len(ids)) for x in names], dtype=np.int64)

        def floats(values: Sequence[str]) -> np.ndarray:
            return np.array([float(v) if v else math.nan for v in values], dtype=np.float64)

        def ints(values: Sequence[str]) -> np.ndarray:
            return np.array([int(v) for v in values], dtype=np.int64)

        cols = {
            "item": ints(raw["item"]),
            "model_idx": index(model_ids, raw["model"]),
            "image_idx": ints(raw["image_idx"]),
            "worker": index(worker_ids, raw["worker"]),
            "outcome": np.array([OUTCOME_CODE[o] for o in raw["outcome"]], dtype=np.int64),
            "attempts": ints(raw["attempts"]),
            "hit": np.array([int(h) if h else -1 for h in raw["hit"]], dtype=np.int64),
            **{name: floats(raw[name]) for name in TIME_COLUMNS + STAGE_COLUMNS},
            "input_idx": np.array([int(v) if v else -1 for v in raw["input_idx"]], dtype=np.int64),
            "top1": np.array([int(v) if v else -1 for v in raw["top1"]], dtype=np.int64),
            "checksum": floats(raw["checksum"]),
        }
        return cls._from_columns(tuple(model_ids), tuple(worker_ids), cols)
