"""``--sweep``: the same seeded stream at each cache capacity, concurrency or rate, and what each one buys.

Three kinds (``parse_sweep``):

- ``lru:1,2,4,8``: each LRU capacity.  ``sweep_modes`` turns it and ``stream.modes`` into the run's passes:
  ``cold`` and ``swap`` (no model resident on the device) first, then ``lru:K`` for each capacity K in
  ascending order, then ``cached`` (every model resident), the ends only when ``stream.modes`` lists them
  (its ``lru:K`` modes are replaced by the sweep's).  ``sweep_table`` reads the passes' summaries (results.json's
  ``modes``) into one row per pass: models resident per worker, the device memory they need, hit ratio,
  images/s, mean, p50, p99, loads; ``plot_cache_sweep`` draws ``cache_sweep.png``.
- ``concurrency:1,4,16``: a closed loop of each many images in flight; ``rate:50,100,200``: an open loop at
  each rate.  Each mode of ``stream.modes`` runs once per value (passes named ``cached@c4``, ``cached@r100``;
  ``load_sweep.LoadSweepRun`` runs them); ``load_table`` gives one row per pass (images/s, mean, p50, p99,
  late sends) and ``plot_load_sweep`` draws ``concurrency_sweep.png`` / ``rate_sweep.png``: images/s and
  p50/p99 against the swept value.

Every pass replays the same seeded schedule (a rate scales its arrival times), so the curve is the swept
value's effect alone.  Plain Python (matplotlib, imported only to draw the pictures).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortexbench.errors import ConfigError
from cortexbench.report.tables import (
    console_table,
    format_bytes,
    format_percent,
    format_rate,
    format_seconds,
    markdown_table,
)
from cortexbench.residency import parse_mode

DPI = 110
ENDS_LOW = ("cold", "swap")
KINDS = ("lru", "concurrency", "rate")
FORMS = ("lru:K,K,... (cache capacities of 1 or more, as in 'lru:1,2,4,8'), concurrency:C,C,... (images in "
         "flight, 1 or more, as in 'concurrency:1,4,16') or rate:R,R,... (images/s, more than 0, as in "
         "'rate:50,100,200')")
PASS_MARK = {"concurrency": "c", "rate": "r"}


@dataclass(frozen=True)
class Sweep:
    kind: str  # lru, concurrency or rate
    values: tuple[float, ...]  # ascending, each once (ints for lru and concurrency)


def parse_sweep(text: str, key: str = "stream.sweep") -> Sweep:
    """'lru:1,2,4,8', 'concurrency:1,4,16' or 'rate:50,100,200' -> the kind and its values, sorted, each once."""
    t = text.strip().lower().replace(" ", "")
    kind, sep, rest = t.partition(":")
    values: list[float] = []
    if kind in KINDS and sep:
        for part in rest.split(","):
            try:
                v: float = float(part) if kind == "rate" else int(part)
            except ValueError:
                values = []
                break
            if not (v > 0 and math.isfinite(v)):
                values = []
                break
            values.append(v)
    if not values:
        raise ConfigError(f"'{key}': '{text}' is not a sweep: use {FORMS}")
    return Sweep(kind, tuple(sorted(set(values))))


def check_sweep_config(st: Any) -> None:
    """config.py's check of ``stream.sweep`` against the other stream keys (``st``: a StreamConfig)."""
    if not st.sweep:
        return
    sw = parse_sweep(st.sweep)
    if st.find_peak:
        raise ConfigError("'stream.sweep' and 'stream.find_peak' both set: run one of them at a time")
    if sw.kind == "concurrency" and st.rate is not None:
        raise ConfigError(f"'stream.sweep' {st.sweep} sweeps a closed loop's images in flight: leave out "
                          f"'stream.rate' (--rate {st.rate:g}), or sweep rate:R,R,...")
    if sw.kind == "rate" and st.rate is not None:
        raise ConfigError(f"'stream.sweep' {st.sweep} sets the rate of each pass: leave out 'stream.rate' "
                          f"(--rate {st.rate:g})")


def base_rate(st: Any) -> float | None:
    """The rate of the stream's schedule as planned: ``stream.rate``, or a rate sweep's first rate."""
    if st.sweep and st.sweep.strip().lower().startswith("rate:"):
        return float(parse_sweep(st.sweep).values[0])
    return st.rate


def pass_name(mode: str, kind: str, value: float) -> str:
    """'cached@c4', 'cached@r100': a pass of a concurrency or rate sweep."""
    return f"{mode}@{PASS_MARK[kind]}{value:g}"


def split_pass(name: str) -> tuple[str, float | None]:
    """'cached@c4' -> ('cached', 4.0); a plain mode -> (mode, None)."""
    mode, sep, rest = name.rpartition("@")
    if not sep or rest[:1] not in PASS_MARK.values():
        return name, None
    try:
        return mode, float(rest[1:])
    except ValueError:
        return name, None


def sweep_modes(sweep: str, modes: Sequence[str]) -> tuple[str, ...]:
    """The passes of a sweep: see the module docstring."""
    sw = parse_sweep(sweep)
    if sw.kind != "lru":
        return tuple(pass_name(m, sw.kind, v) for m in modes for v in sw.values)
    kinds = {parse_mode(m).kind for m in modes}
    low = tuple(m for m in ENDS_LOW if m in kinds)
    return (*low, *(f"lru:{int(k)}" for k in sw.values), *(("cached",) if "cached" in kinds else ()))


def resident(mode: str, n_models: int) -> int:
    """Models resident on a worker's device in ``mode``: 0 (cold, swap), K (lru:K, at most the models), all."""
    m = parse_mode(mode)
    if m.kind == "cached":
        return n_models
    if m.kind == "lru":
        return min(m.capacity, n_models)
    return 0


def model_weight_bytes(modes: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Each model's weight bytes as the workers measured their files (each pass's ``setup_s``)."""
    out: dict[str, float] = {}
    for m in modes.values():
        for setup in m.get("setup_s") or []:
            for k, v in (setup or {}).items():
                if k.startswith("model_bytes.") and isinstance(v, (int, float)) and v > 0:
                    out[k.removeprefix("model_bytes.")] = float(v)
    return out


def device_memory(mode: Mapping[str, Any], resident_models: int, weights: Mapping[str, float]) -> tuple[Any, str]:
    """(bytes, basis) a worker's device needs in a pass: the most any worker's process held, as measured
    (GPU workers), else the weights of the ``resident_models`` largest models (None when unknown)."""
    measured = [w["device_memory_bytes"] for w in (mode.get("per_worker") or {}).values()
                if isinstance(w.get("device_memory_bytes"), (int, float))]
    if measured:
        return max(measured), "measured"
    if resident_models == 0:
        return 0.0, "weights"
    if len(weights) < resident_models:
        return None, "unknown"
    return sum(sorted(weights.values(), reverse=True)[:resident_models]), "weights"


def sweep_table(modes: Mapping[str, Mapping[str, Any]], n_models: int) -> list[dict[str, Any]]:
    """One row per pass of a cache sweep, in pass order (``modes``: results.json's ``modes``)."""
    weights = model_weight_bytes(modes)
    rows = []
    for mode, m in modes.items():
        s = m["summary"]
        lat = s["latency"]
        k = resident(mode, n_models)
        memory, basis = device_memory(m, k, weights)
        rows.append({"mode": mode, "resident": k, "device_memory_bytes": memory, "memory_basis": basis,
                     "hit_ratio": s["hit_ratio"], "images_per_s": s["throughput_images_per_s"],
                     "mean_s": lat.get("mean_s"), "p50_s": lat.get("p50_s"), "p99_s": lat.get("p99_s"),
                     "loads": s["loads"], "counted_ok": s["counted_ok"]})
    return rows


def load_table(modes: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per pass of a concurrency or rate sweep, in pass order."""
    rows = []
    for name, m in modes.items():
        mode, value = split_pass(name)
        s = m["summary"]
        lat = s["latency"]
        rows.append({"pass": name, "mode": mode, "value": value, "images_per_s": s["throughput_images_per_s"],
                     "mean_s": lat.get("mean_s"), "p50_s": lat.get("p50_s"), "p99_s": lat.get("p99_s"),
                     "late_share": s.get("late_share"), "counted_ok": s["counted_ok"]})
    return rows


def section(sweep: str, modes: Mapping[str, Mapping[str, Any]], n_models: int) -> dict[str, Any]:
    """results.json's ``sweep``: the flag, its kind and the table."""
    kind = parse_sweep(sweep).kind
    rows = sweep_table(modes, n_models) if kind == "lru" else load_table(modes)
    return {"sweep": sweep, "kind": kind, "rows": rows}


def _kind(sec: Mapping[str, Any]) -> str:
    return str(sec.get("kind") or "lru")  # results written before the load sweeps had only lru


HEADER = ["mode", "resident", "device memory", "from", "hit ratio", "img/s", "mean", "p50", "p99", "loads"]
LOAD_HEADER = {"concurrency": ["pass", "in flight", "img/s", "mean", "p50", "p99", "sent late"],
               "rate": ["pass", "offered", "img/s", "mean", "p50", "p99", "sent late"]}


def _cells(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[r["mode"], str(r["resident"]), format_bytes(r.get("device_memory_bytes")), r.get("memory_basis", "–"),
             format_percent(r["hit_ratio"]), format_rate(r["images_per_s"]), format_seconds(r["mean_s"]),
             format_seconds(r["p50_s"]), format_seconds(r["p99_s"]), str(r["loads"])]
            for r in rows]


def _load_cells(rows: Sequence[Mapping[str, Any]], kind: str) -> list[list[str]]:
    return [[r["pass"], format_rate(r["value"]) if kind == "rate" else f"{_num(r['value']):g}",
             format_rate(r["images_per_s"]), format_seconds(r["mean_s"]), format_seconds(r["p50_s"]),
             format_seconds(r["p99_s"]), format_percent(r.get("late_share"))] for r in rows]


MEMORY_NOTE = ("device memory: what a worker's device holds in that pass; 'measured' is the most any "
               "worker's process held (GPU workers), 'weights' the weight files of the K largest models "
               "resident (a bound for the weights alone; cold and swap keep none resident, but each load "
               "needs room for one model more)")


def plot_name(sec: Mapping[str, Any]) -> str:
    """The sweep's picture: cache_sweep.png, concurrency_sweep.png or rate_sweep.png."""
    kind = _kind(sec)
    return "cache_sweep.png" if kind == "lru" else f"{kind}_sweep.png"


def render_markdown(sec: Mapping[str, Any]) -> str:
    """The report.md section of results.json's ``sweep``."""
    kind, rows, flag = _kind(sec), sec["rows"], sec["sweep"]
    if kind == "lru":
        return "\n".join(["## Cache sweep", "", f"`--sweep {flag}`: the same seeded stream at each capacity; "
                          f"resident = models kept on each worker's device; {MEMORY_NOTE}.", "",
                          markdown_table(HEADER, _cells(rows), "lrrlrrrrrr"), "",
                          f"![cache sweep]({plot_name(sec)})", ""])
    what = "images in flight (closed loop)" if kind == "concurrency" else "offered rate (open loop)"
    return "\n".join([f"## {kind.capitalize()} sweep", "", f"`--sweep {flag}`: the same seeded stream at each "
                      f"{what}; sent late = share of images sent more than 1 ms after their scheduled time.", "",
                      markdown_table(LOAD_HEADER[kind], _load_cells(rows, kind), "lrrrrrr"), "",
                      f"![{kind} sweep]({plot_name(sec)})", ""])


def console(sec: Mapping[str, Any]) -> str:
    kind, rows = _kind(sec), sec["rows"]
    if kind == "lru":
        return "cache sweep:\n" + console_table(HEADER, _cells(rows), "lrrlrrrrrr")
    return f"{kind} sweep:\n" + console_table(LOAD_HEADER[kind], _load_cells(rows, kind), "lrrrrrr")


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def plot(sec: Mapping[str, Any], path: Path) -> Path:
    """The sweep's picture at ``path`` (see ``plot_name``)."""
    if _kind(sec) == "lru":
        return plot_cache_sweep(sec["rows"], path)
    return plot_load_sweep(sec["rows"], _kind(sec), path)


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from cortexbench.results import write_bytes

    fig.tight_layout()
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return write_bytes(path, buf.getvalue())


def plot_cache_sweep(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``cache_sweep.png``: hit ratio, images/s, p99 and device memory against models resident per worker
    (0 drawn at 1/2 on the log axis)."""
    from matplotlib.figure import Figure  # only here: config checks import this module
    from matplotlib.ticker import FixedLocator, FuncFormatter

    fig = Figure(figsize=(14.5, 3.8))
    xs = [r["resident"] if r["resident"] > 0 else 0.5 for r in rows]
    basis = sorted({r.get("memory_basis", "unknown") for r in rows} - {"unknown"})
    panels = (("hit_ratio", "hit ratio", 100.0, "%"), ("images_per_s", "throughput", 1.0, "images/s"),
              ("p99_s", "p99 latency", 1e3, "ms"),
              ("device_memory_bytes", f"device memory ({', '.join(basis) or 'unknown'})", 1e-6, "MB"))
    for k, (key, title, scale, unit) in enumerate(panels):
        ax = fig.add_subplot(1, 4, k + 1)
        ys = [_num(r.get(key)) * scale for r in rows]
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
    return _save(fig, path)


def plot_load_sweep(rows: Sequence[Mapping[str, Any]], kind: str, path: Path) -> Path:
    """``concurrency_sweep.png`` / ``rate_sweep.png``: images/s, and p50 and p99, against the swept value
    (log-2 axis), one line per mode."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.5, 3.9))
    xlabel = "images in flight" if kind == "concurrency" else "offered rate (images/s)"
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    colours = ("#4C72B0", "#DD8452", "#55A868", "#8172B3", "#937860", "#DA8BC3")
    ax_t, ax_l = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for j, mode in enumerate(modes):
        mine = [r for r in rows if r["mode"] == mode]
        xs = [_num(r["value"]) for r in mine]
        c = colours[j % len(colours)]
        ax_t.plot(xs, [_num(r["images_per_s"]) for r in mine], "-o", color=c, ms=4, label=mode)
        ax_l.plot(xs, [_num(r["p50_s"]) * 1e3 for r in mine], "--o", color=c, ms=3, label=f"{mode} p50")
        ax_l.plot(xs, [_num(r["p99_s"]) * 1e3 for r in mine], "-s", color=c, ms=4, label=f"{mode} p99")
    if kind == "rate":  # through every swept rate: y = x is a curve on the log axis
        offered = sorted({_num(r["value"]) for r in rows})
        ax_t.plot(offered, offered, ":", color="#8C8C8C", lw=1, label="offered")
    for ax, title, unit in ((ax_t, "throughput", "images/s"), (ax_l, "latency: p50 (dashed), p99", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    xs_all = sorted({_num(r["value"]) for r in rows})
    for ax in (ax_t, ax_l):
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{v:g}" for v in xs_all])
        ax.minorticks_off()
    return _save(fig, path)
