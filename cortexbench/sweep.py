"""``--sweep lru:1,2,4,8``: the same seeded stream at each cache capacity, and what the capacity buys.

``sweep_modes`` turns the sweep and ``stream.modes`` into the run's passes: ``cold`` and ``swap`` (no model
resident on the device) first, then ``lru:K`` for each capacity K in ascending order, then ``cached`` (every
model resident), the ends only when ``stream.modes`` lists them (its ``lru:K`` modes are replaced by the
sweep's).  Every pass replays the same seeded schedule, so the curve is the capacity's effect alone.

``sweep_table`` reads the passes' summaries (results.json's ``modes``) into one row per pass: models resident
per worker, hit ratio, images/s, mean, p50, p99, loads; ``render_markdown``/``console`` print it and
``plot_cache_sweep`` draws ``cache_sweep.png``: hit ratio, images/s and p99 against models resident per
worker (log-2 x axis), the ends marked.

Plain Python (matplotlib, imported only to draw the picture).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cortexbench.errors import ConfigError
from cortexbench.report.tables import (
    console_table,
    format_percent,
    format_rate,
    format_seconds,
    markdown_table,
)
from cortexbench.residency import parse_mode

DPI = 110
ENDS_LOW = ("cold", "swap")


def parse_sweep(text: str, key: str = "stream.sweep") -> tuple[int, ...]:
    """'lru:1,2,4,8' -> (1, 2, 4, 8): capacities of 1 or more, sorted, each once."""
    t = text.strip().lower().replace(" ", "")
    kind, sep, rest = t.partition(":")
    caps: list[int] = []
    if kind == "lru" and sep:
        for part in rest.split(","):
            try:
                caps.append(int(part))
            except ValueError:
                caps = []
                break
    if not caps or min(caps) < 1:
        raise ConfigError(f"'{key}': '{text}' is not a sweep: use lru:K,K,... with capacities of 1 or more, "
                          "as in 'lru:1,2,4,8'")
    return tuple(sorted(set(caps)))


def sweep_modes(sweep: str, modes: Sequence[str]) -> tuple[str, ...]:
    """The passes of a sweep: see the module docstring."""
    caps = parse_sweep(sweep)
    kinds = {parse_mode(m).kind for m in modes}
    low = tuple(m for m in ENDS_LOW if m in kinds)
    return (*low, *(f"lru:{k}" for k in caps), *(("cached",) if "cached" in kinds else ()))


def resident(mode: str, n_models: int) -> int:
    """Models resident on a worker's device in ``mode``: 0 (cold, swap), K (lru:K, at most the models), all."""
    m = parse_mode(mode)
    if m.kind == "cached":
        return n_models
    if m.kind == "lru":
        return min(m.capacity, n_models)
    return 0


def sweep_table(modes: Mapping[str, Mapping[str, Any]], n_models: int) -> list[dict[str, Any]]:
    """One row per pass, in pass order (``modes``: results.json's ``modes``)."""
    rows = []
    for mode, m in modes.items():
        s = m["summary"]
        lat = s["latency"]
        rows.append({"mode": mode, "resident": resident(mode, n_models), "hit_ratio": s["hit_ratio"],
                     "images_per_s": s["throughput_images_per_s"], "mean_s": lat.get("mean_s"),
                     "p50_s": lat.get("p50_s"), "p99_s": lat.get("p99_s"), "loads": s["loads"],
                     "counted_ok": s["counted_ok"]})
    return rows


HEADER = ["mode", "resident", "hit ratio", "img/s", "mean", "p50", "p99", "loads"]


def _cells(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[r["mode"], str(r["resident"]), format_percent(r["hit_ratio"]), format_rate(r["images_per_s"]),
             format_seconds(r["mean_s"]), format_seconds(r["p50_s"]), format_seconds(r["p99_s"]), str(r["loads"])]
            for r in rows]


def render_markdown(rows: Sequence[Mapping[str, Any]], sweep: str) -> str:
    return "\n".join(["## Cache sweep", "", f"`--sweep {sweep}`: the same seeded stream at each capacity; "
                      "resident = models kept on each worker's device.", "",
                      markdown_table(HEADER, _cells(rows), "lrrrrrrr"), "", "![cache sweep](cache_sweep.png)", ""])


def console(rows: Sequence[Mapping[str, Any]]) -> str:
    return "cache sweep:\n" + console_table(HEADER, _cells(rows), "lrrrrrrr")


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def plot_cache_sweep(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``cache_sweep.png``: three panels against models resident per worker (0 drawn at 1/2 on the log axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only here: config checks import this module
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter

    fig = Figure(figsize=(11.5, 3.8))
    xs = [r["resident"] if r["resident"] > 0 else 0.5 for r in rows]
    panels = (("hit_ratio", "hit ratio", 100.0, "%"), ("images_per_s", "throughput", 1.0, "images/s"),
              ("p99_s", "p99 latency", 1e3, "ms"))
    for k, (key, title, scale, unit) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        ys = [_num(r[key]) * scale for r in rows]
        ax.plot(xs, ys, "-o", color="#4C72B0", ms=4)
        for x, y, r in zip(xs, ys, rows, strict=True):
            if not r["mode"].startswith("lru:"):
                ax.annotate(r["mode"], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points",
                            color="#DD8452")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(xs))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "0" if v == 0.5 else f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("models resident per worker")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if key == "hit_ratio":
            ax.set_ylim(-3, 103)
        else:
            ax.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path
