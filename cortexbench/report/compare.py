"""Runs side by side: throughput and latency of each run against the first, with the spread of repeats.

A *run* is one run directory, or a folder of run directories: the repeats of one configuration (each run
with ``--result-dir FOLDER``).  ``load_run`` reads them (``results.read_results``: the schema version is
checked); all runs compared are of one kind.

``figures`` reads one results.json into keyed figures: for ``stream`` one key per pass (``modes``: the
mode, each sweep pass, a peak search's step at the peak), for ``single`` one per (model, device, batch
size).  Each figure is images/s and the mean, p50, p90 and p99 latency per image (``peak_rate`` too, for
a peak search).  Over repeats a figure is the mean of the repeats and its spread the relative half-width
of the 95% confidence interval of that mean (``stats.relative_spread``); a single run's point carries
its own spread over its timed calls (``rel_spread``), which is shown when there are no repeats.

``compare`` gives one row per (key, run) with each figure's ratio to the first run's (the baseline);
``render_markdown`` writes the report, ``console`` the terminal's table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cortexbench.errors import UsageError
from cortexbench.report.single_report import point_label
from cortexbench.report.tables import (
    console_table,
    format_percent,
    format_rate,
    format_ratio,
    format_seconds,
    markdown_table,
)
from cortexbench.results import RESULTS_FILE, read_results
from cortexbench.stats import relative_spread

METRICS = ("images_per_s", "mean_s", "p50_s", "p90_s", "p99_s", "peak_rate")
SHOWN = ("images_per_s", "p50_s", "p99_s", "mean_s")  # the table's columns, each with its ratio
PLOT_NAME = "compare.png"
CONFIG_DIFF_MAX = 12


@dataclass(frozen=True)
class Run:
    """One compared run: a run directory, or a folder of repeats."""

    label: str
    path: Path
    dirs: tuple[Path, ...]
    docs: tuple[Mapping[str, Any], ...]

    @property
    def kind(self) -> str:
        return str(self.docs[0].get("kind"))

    @property
    def repeats(self) -> int:
        return len(self.docs)


@dataclass(frozen=True)
class Figure:
    """One figure of one run: the mean over its repeats, and the spread (None when not known)."""

    value: float
    spread: float | None
    repeats: int


@dataclass(frozen=True)
class Row:
    key: str
    run: str
    repeats: int
    figures: dict[str, Figure] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / RESULTS_FILE).is_file()


def load_run(path: Path) -> Run:
    """A run directory, or a folder whose subdirectories are run directories (repeats of one run)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such directory")
    if path.is_file():
        if path.name == RESULTS_FILE:
            path = path.parent
        else:
            raise UsageError(f"{path}: not a run directory; give a directory holding {RESULTS_FILE}")
    if is_run_dir(path):
        dirs: tuple[Path, ...] = (path,)
    else:
        dirs = tuple(sorted(d for d in path.iterdir() if d.is_dir() and is_run_dir(d)))
        if not dirs:
            raise UsageError(f"{path}: no {RESULTS_FILE}; give a run directory, or a folder of run directories "
                             "(the repeats of one run)")
    docs = tuple(read_results(d) for d in dirs)
    kinds = {str(d.get("kind")) for d in docs}
    if len(kinds) > 1:
        raise UsageError(f"{path}: its runs are of different kinds ({', '.join(sorted(kinds))}); repeats are runs "
                         "of one configuration")
    return Run(path.name or str(path), path, dirs, docs)


def load_runs(paths: Sequence[Path]) -> list[Run]:
    runs = [load_run(p) for p in paths]
    kinds = list(dict.fromkeys(r.kind for r in runs))
    if len(kinds) > 1:
        raise UsageError(f"cannot compare runs of different kinds ({' and '.join(kinds)}): compare single runs "
                         "with single runs, stream runs with stream runs")
    seen: dict[str, int] = {}
    out = []
    for r in runs:  # labels are the directory names, numbered when two are alike
        n = seen.get(r.label, 0) + 1
        seen[r.label] = n
        out.append(r if n == 1 else Run(f"{r.label} ({n})", r.path, r.dirs, r.docs))
    return out


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else math.nan


def figures(doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Key -> metric -> value of one results.json (see the module docstring); the within-run spread of a
    single point under ``rel_spread``."""
    out: dict[str, dict[str, float]] = {}
    if doc.get("kind") == "stream":
        peaks = doc.get("peak") or {}
        for mode, m in (doc.get("modes") or {}).items():
            s = m.get("summary") or {}
            lat = s.get("latency") or {}
            f = {"images_per_s": _num(s.get("throughput_images_per_s"))}
            f.update({k: _num(lat.get(k)) for k in ("mean_s", "p50_s", "p90_s", "p99_s")})
            if mode in peaks:
                f["peak_rate"] = _num(peaks[mode].get("peak_rate"))
            out[mode] = f
    else:
        for p in doc.get("points") or []:
            lat = p.get("image_latency_s") or {}
            key = f"{p.get('model')} {point_label(p) if p.get('device') else None} b{p.get('batch_size')}"
            out[key] = {"images_per_s": _num(p.get("throughput_images_per_s")), "mean_s": _num(lat.get("mean")),
                        "p50_s": _num(lat.get("p50")), "p90_s": _num(lat.get("p90")), "p99_s": _num(lat.get("p99")),
                        "rel_spread": _num(p.get("rel_spread"))}
    return out


def run_figures(run: Run) -> dict[str, dict[str, Figure]]:
    """Key -> metric -> Figure of a run, over its repeats (a key missing from some repeats uses those
    that have it)."""
    per_doc = [figures(d) for d in run.docs]
    keys = list(dict.fromkeys(k for f in per_doc for k in f))
    out: dict[str, dict[str, Figure]] = {}
    for key in keys:
        have = [f[key] for f in per_doc if key in f]
        entry: dict[str, Figure] = {}
        for metric in METRICS:
            values = [v[metric] for v in have if math.isfinite(v.get(metric, math.nan))]
            if not values:
                continue
            mean = sum(values) / len(values)
            if len(values) >= 2:
                spread: float | None = relative_spread(values)
            else:
                own = have[0].get("rel_spread", math.nan) if len(have) == 1 else math.nan
                spread = own if math.isfinite(own) and metric in ("images_per_s", "mean_s") else None
            entry[metric] = Figure(mean, spread if spread is None or math.isfinite(spread) else None, len(values))
        out[key] = entry
    return out


def compare(runs: Sequence[Run]) -> list[Row]:
    """One row per (key, run), keys in the order they first appear; ratios against the first run (the
    baseline; none for a key the baseline lacks)."""
    per_run = [(r, run_figures(r)) for r in runs]
    keys = list(dict.fromkeys(k for _, f in per_run for k in f))
    rows = []
    for key in keys:
        base = per_run[0][1].get(key, {})
        for run, f in per_run:
            if key not in f:
                continue
            mine = f[key]
            ratios = {m: mine[m].value / base[m].value for m in mine
                      if m in base and base[m].value > 0}
            rows.append(Row(key, run.label, run.repeats, mine, ratios))
    return rows


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


IGNORED_CONFIG = ("result_dir", "img_dir", "model_dir", "cpu_fallback.", "stream.metrics_port")


def config_differences(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    """The config keys whose value differs between runs (first repeat of each), with each run's value;
    paths and ports left out."""
    flats = [_flat(r.docs[0].get("config") or {}) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    out = []
    for k in keys:
        if k.startswith(IGNORED_CONFIG):
            continue
        values = [repr(f.get(k, "–")) if not isinstance(f.get(k), str) else f.get(k, "") for f in flats]
        if len(set(values)) > 1:
            out.append((k, [v or "''" for v in values]))
    return out


def _cell(metric: str, f: Figure | None) -> str:
    if f is None:
        return "–"
    text = format_rate(f.value) if metric in ("images_per_s", "peak_rate") else format_seconds(f.value)
    return text + (f" ±{format_percent(f.spread, 2)}" if f.spread is not None else "")


def _table(rows: Sequence[Row], kind: str) -> tuple[list[str], list[list[str]], str]:
    peak = any("peak_rate" in r.figures for r in rows)
    metrics = (("peak_rate",) if peak else ()) + SHOWN
    names = {"images_per_s": "img/s", "peak_rate": "peak", "mean_s": "mean", "p50_s": "p50", "p99_s": "p99"}
    header = ["point" if kind == "single" else "pass", "run", "n"]
    for m in metrics:
        header += [names[m], "×"]
    cells = []
    for r in rows:
        line = [r.key, r.run, str(r.repeats)]
        for m in metrics:
            line += [_cell(m, r.figures.get(m)), format_ratio(r.ratios.get(m))]
        cells.append(line)
    return header, cells, "llr" + "rr" * len(metrics)


def _run_lines(runs: Sequence[Run]) -> list[list[str]]:
    out = []
    for r in runs:
        d = r.docs[0]
        mach = d.get("machine") or {}
        gpus = ", ".join(g.get("name", "?") for g in mach.get("gpus") or []) or "no GPU"
        complete = sum(1 for x in r.docs if x.get("complete"))
        out.append([r.label, str(r.repeats), f"{complete}/{r.repeats}", str(d.get("started_at") or "–"),
                    f"{mach.get('cpu_model', '?')}, {mach.get('usable_cores', '?')} cores, {gpus}",
                    "`" + command(d.get("argv") or []).replace("`", "'") + "`"])
    return out


def command(argv: Sequence[Any]) -> str:
    """The command line of a run: ``python -m cortexbench.X ...`` for what ``sys.argv`` shows as
    ``.../cortexbench/X.py ...``."""
    words = [str(a) for a in argv]
    if words:
        path = Path(words[0])
        if path.suffix == ".py" and path.parent.name == "cortexbench":
            words[0] = f"python -m cortexbench.{path.stem}"
        elif path.name == "__main__.py" and path.parent.parent.name == "cortexbench":
            words[0] = f"python -m cortexbench.{path.parent.name}"
    return " ".join(words)


def render_markdown(runs: Sequence[Run], rows: Sequence[Row], *, plot: str | None = PLOT_NAME) -> str:
    kind = runs[0].kind if runs else "?"
    lines = [f"# cortexbench compare: {', '.join(r.label for r in runs)}", "",
             f"{len(runs)} {kind} run(s); the first, **{runs[0].label}**, is the baseline: each × is the run's "
             "figure over the baseline's (above 1× is faster for img/s, slower for latency).  n is the number "
             "of repeats; ±x% is the relative half-width of the 95% confidence interval of their mean"
             + (" (with one repeat: of the point's timed calls)" if kind == "single" else "") + ".", "",
             "## Runs", "",
             markdown_table(["run", "repeats", "complete", "started", "machine", "command"], _run_lines(runs),
                            "lrrlll")]
    diff = config_differences(runs)
    if len(runs) > 1:
        lines += ["## What differs", ""]
        if diff:
            shown = diff[:CONFIG_DIFF_MAX]
            lines += [markdown_table(["config key", *(r.label for r in runs)], [[k, *v] for k, v in shown],
                                     "l" * (len(runs) + 1))]
            if len(diff) > len(shown):
                lines += [f"and {len(diff) - len(shown)} more key(s).", ""]
        else:
            lines += ["Their configs are equal (paths and ports aside): any difference is the machine's or "
                      "the noise's.", ""]
    lines += ["## Throughput and latency against the first run", ""]
    if rows:
        header, cells, align = _table(rows, kind)
        lines += [markdown_table(header, cells, align)]
    else:
        lines += ["No figures: the runs measured nothing.", ""]
    if plot:
        lines += [f"![throughput and p99 of each run over the first's]({plot})", ""]
    return "\n".join(lines).rstrip() + "\n"


def console(rows: Sequence[Row], kind: str) -> str:
    header, cells, align = _table(rows, kind)
    return console_table(header, cells, align)
