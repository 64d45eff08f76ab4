"""Request traces: one row per request (time offset in seconds, model name), read, written and synthesised.

A trace file is CSV with a header line ``time_s,model`` and one row per request::

    time_s,model
    0.000,squeezenet
    0.013,nin
    0.020,squeezenet

Times are seconds from any origin, nondecreasing (rows out of order are sorted, stably); the model names
are those of the run (``--models``).  This is the shape of the per-invocation serverless traces that
multi-model serving papers replay (Azure Functions 2021: ``app,func,end_timestamp,duration`` per
invocation; the start is ``end_timestamp - duration`` and each function is mapped to a model, see
docs/capacity.md).  ``schedule.make_schedule`` replays a trace scaled to ``--rate``: the trace's models
pick each image's model, so popularity that shifts over time in the trace shifts in the stream too.

``synth_trace`` writes a test trace with a popularity that shifts: the models' Zipf ranks rotate every
``phase_s`` seconds (``python -m cortexbench.traces synth --out trace.csv --models a,b,c``).

Plain Python and numpy.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cortexbench.errors import ConfigError, DatasetError

HEADER = ("time_s", "model")


@dataclass(frozen=True, eq=False)
class Trace:
    """A trace's requests in time order: ``time_s[k]`` (from the first request, 0) and ``model[k]``."""

    time_s: np.ndarray  # float64, nondecreasing, starting at 0
    model: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.model)

    @property
    def rate(self) -> float | None:
        """The trace's own mean rate (requests/s): (n - 1) over its span; None for a span of 0."""
        span = float(self.time_s[-1]) if len(self) else 0.0
        return (len(self) - 1) / span if span > 0 else None


def read_trace(path: Path | str) -> Trace:
    """Read a trace CSV (see the module docstring); a bad file raises DatasetError naming the line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise DatasetError(f"trace {p}: cannot read it ({e.strerror or e})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or tuple(c.strip() for c in rows[0][:2]) != HEADER:
        raise DatasetError(f"trace {p}: the first line must be the header 'time_s,model'")
    times: list[float] = []
    models: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[1].strip():
            raise DatasetError(f"trace {p}, line {line}: need 'time_s,model', got {','.join(row)!r}")
        try:
            t = float(row[0])
        except ValueError:
            t = float("nan")
        if not np.isfinite(t):
            raise DatasetError(f"trace {p}, line {line}: time {row[0]!r} is not a number of seconds")
        times.append(t)
        models.append(row[1].strip())
    if len(times) < 2:
        raise DatasetError(f"trace {p}: needs at least 2 requests, has {len(times)}")
    t_arr = np.asarray(times, dtype=np.float64)
    order = np.argsort(t_arr, kind="stable")
    t_arr = t_arr[order] - t_arr[order[0]]
    return Trace(t_arr, tuple(models[i] for i in order.tolist()))


def write_trace(path: Path | str, time_s: Sequence[float], model: Sequence[str]) -> Path:
    """Write a trace CSV (times with microsecond resolution)."""
    p = Path(path)
    if p.parent != Path(""):
        p.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(HEADER)] + [f"{t:.6f},{m}" for t, m in zip(time_s, model, strict=True)]
    p.write_text("\n".join(lines) + "\n")
    return p


def synth_trace(models: Sequence[str], *, count: int, rate: float, phase_s: float = 10.0, zipf_s: float = 1.1,
                cv: float = 1.0, seed: int = 0) -> Trace:
    """A trace of ``count`` requests at ``rate``/s (gamma gaps with coefficient of variation ``cv``; 1 =
    Poisson) whose model popularity shifts: Zipf(``zipf_s``) over ``models``, with the ranks rotated by one
    every ``phase_s`` seconds (in phase j, model (i + j) mod n has rank i + 1)."""
    if not models:
        raise ConfigError("a trace needs at least one model")
    if count < 2 or not rate > 0 or not phase_s > 0 or not cv > 0:
        raise ConfigError("a trace needs count >= 2, rate > 0, phase_s > 0 and cv > 0")
    rng = np.random.default_rng(seed)
    k = 1.0 / cv**2
    gaps = rng.standard_gamma(k, count - 1) / (k * rate)
    t = np.concatenate(([0.0], np.cumsum(gaps)))
    n = len(models)
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** zipf_s
    rank = np.searchsorted(np.cumsum(w / w.sum()), rng.random(count), side="right").clip(0, n - 1)
    phase = (t // phase_s).astype(np.int64)
    idx = (rank + phase) % n
    return Trace(t, tuple(models[i] for i in idx.tolist()))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cortexbench.traces synth --out FILE --models A,B [--count N] [--rate R] [--phase S] ...``"""
    from cortexbench.cli import ArgumentParser, run_main

    prog = "python -m cortexbench.traces"
    p = ArgumentParser(prog=prog, description="Write a test trace (time_s,model per request) whose model "
                                              "popularity shifts every --phase seconds.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic trace")
    s.add_argument("--out", required=True, metavar="FILE")
    s.add_argument("--models", required=True, metavar="A,B")
    s.add_argument("--count", type=int, default=10_000, metavar="N")
    s.add_argument("--rate", type=float, default=100.0, metavar="R", help="requests/s (default 100)")
    s.add_argument("--phase", type=float, default=10.0, metavar="S", help="seconds between popularity shifts")
    s.add_argument("--zipf", type=float, default=1.1, metavar="S", help="Zipf exponent of each phase")
    s.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps (1 = Poisson)")
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def body() -> int:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        tr = synth_trace(models, count=args.count, rate=args.rate, phase_s=args.phase, zipf_s=args.zipf,
                         cv=args.cv, seed=args.seed)
        write_trace(args.out, tr.time_s.tolist(), tr.model)
        print(f"{args.out}: {len(tr)} requests over {tr.time_s[-1]:.1f} s ({tr.rate or 0:.1f}/s), "
              f"{len(set(tr.model))} models")
        return 0

    return run_main(body, prog)


if __name__ == "__main__":
    sys.exit(main())
