"""The figures of ``python -m cortexbench.stream``, drawn on matplotlib's Agg canvas (no pyplot, no display).

``plot_all(results, ledgers, out_dir, warmup)`` writes five PNGs and returns their paths:

    latency_cdf.png        share of images under each latency, per mode (log x), p50 and p99 marked
    per_model_latency.png  p50 per model and mode as bars, whiskers up to p99 (log y)
    timeline.png           throughput and p99 over time, per mode, two stacked axes
    worker_balance.png     images per worker, per mode, with the mean as a dashed line
    stage_breakdown.png    mean time per stage, stacked, per mode: in milliseconds and as shares

The CDF is drawn from the ledgers (ok images after the warm-up); everything else from results.json.  A mode
without a successful image is named in the figure instead of drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator

from cortexbench.ledger import Ledger
from cortexbench.report.stream_summary import STAGES

DPI = 110
MODE_COLOURS = {"cached": "#4C72B0", "cold": "#DD8452"}
OTHER_COLOURS = ("#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")
# One colour per stage of stream_summary.STAGES (send_delay, the worker's stages, transport): 11 apart.
STAGE_COLOURS = ("#8C8C8C", "#CCB974", "#64B5CD", "#55A868", "#DD8452", "#4C72B0", "#8172B3", "#C44E52",
                 "#DA8BC3", "#937860", "#2F2F2F")
CDF_POINTS = 2000  # points drawn per CDF line (the tail keeps its own points)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _colours(modes: Sequence[str]) -> dict[str, str]:
    out, k = {}, 0
    for m in modes:
        if m in MODE_COLOURS:
            out[m] = MODE_COLOURS[m]
        else:
            out[m] = OTHER_COLOURS[k % len(OTHER_COLOURS)]
            k += 1
    return out


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#444444",
            bbox={"boxstyle": "round", "facecolor": "#F4F4F4", "edgecolor": "#BBBBBB"})


def _plain_log(ax: Axes, axis: str = "y") -> None:
    """Log scale with plain tick labels (2, 5, 10, 20 ...) instead of powers of ten."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = (ax.get_ylim() if axis == "y" else ax.get_xlim())
    narrow = lo > 0 and hi / lo < 8  # less than a decade: label the minor ticks too
    target.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if narrow else ""))
    if narrow:
        target.set_tick_params(which="minor", labelsize=8)


def _ok_latency(ledger: Ledger, warmup: int) -> np.ndarray:
    mask = (ledger.column("item") >= warmup) & (ledger.column("outcome") == 0)
    lat = ledger.column("latency_s")[mask]
    return np.sort(np.maximum(lat[np.isfinite(lat)], 1e-7))


def _cdf_points(n: int) -> np.ndarray:
    """Row indices to draw: evenly spread, plus dense towards the top so the tail keeps its shape."""
    if n <= 2 * CDF_POINTS:
        return np.arange(n)
    body = np.linspace(0, n - 1, CDF_POINTS)
    tail = n - np.geomspace(1, n, CDF_POINTS)
    return np.unique(np.concatenate([body, tail]).round().astype(np.int64).clip(0, n - 1))


def plot_latency_cdf(ledgers: Mapping[str, Ledger], warmup: int, path: Path, colours: Mapping[str, str],
                     modes: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """One CDF line per mode; p50 and p99 marked with the figures of results.json where given (the HDR
    percentiles the report shows), else computed from the ledger."""
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("Latency per image, cumulative (successful images after the warm-up)")
    ax.set_xlabel("latency per image (ms, log scale)")
    ax.set_ylabel("share of images at or below (%)")
    empty = []
    for k, (mode, ledger) in enumerate(ledgers.items()):
        lat = _ok_latency(ledger, warmup)
        if lat.size == 0:
            empty.append(mode)
            ax.plot([], [], color=colours[mode], label=f"{mode}: no successful images")
            continue
        idx = _cdf_points(lat.size)
        x_ms = lat[idx] * 1e3
        y = (idx + 1) / lat.size * 100.0
        lat_summary = (((modes or {}).get(mode) or {}).get("summary") or {}).get("latency") or {}
        p50, p99 = (float(v) * 1e3 for v in np.percentile(lat, [50, 99]))
        p50 = _num(lat_summary.get("p50_s")) * 1e3 if math.isfinite(_num(lat_summary.get("p50_s"))) else p50
        p99 = _num(lat_summary.get("p99_s")) * 1e3 if math.isfinite(_num(lat_summary.get("p99_s"))) else p99
        ax.plot(x_ms, y, color=colours[mode], lw=1.8,
                label=f"{mode}: p50 {p50:.3g} ms, p99 {p99:.3g} ms ({lat.size:,} images)")
        ax.plot([p50, p99], [50, 99], "o", color=colours[mode], ms=6)
        for value, level in ((p50, 50), (p99, 99)):
            ax.annotate(f"p{level} {value:.3g} ms", (value, level), xytext=(6, -12 - 11 * k),
                        textcoords="offset points", fontsize=8, color=colours[mode])
    if len(empty) == len(ledgers):
        _note(ax, "no successful images in any mode: nothing to draw")
        ax.set_xlim(0.1, 1000)
    _plain_log(ax, "x")
    ax.set_ylim(0, 101)
    for level in (50, 99):
        ax.axhline(level, color="#999999", lw=0.8, ls=":")
    ax.grid(which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def plot_per_model(modes: Mapping[str, Mapping[str, Any]], path: Path, colours: Mapping[str, str]) -> Path:
    models: list[str] = []
    for mode in modes.values():
        models += [m for m in (mode.get("per_model") or {}) if m not in models]
    fig = Figure(figsize=(max(8.0, 1.2 + 0.9 * len(models) * max(1, len(modes)) ** 0.5), 6), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("Latency per model: bar p50, whisker up to p99 (successful images after the warm-up)")
    ax.set_ylabel("latency per image (ms, log scale)")
    ax.set_xlabel("model")
    width = 0.8 / max(1, len(modes))
    x = np.arange(len(models))
    drawn = False
    handles = []
    for j, (name, mode) in enumerate(modes.items()):
        per = mode.get("per_model") or {}
        p50 = np.array([_num((per.get(m, {}).get("latency") or {}).get("p50_s")) * 1e3 for m in models])
        p99 = np.array([_num((per.get(m, {}).get("latency") or {}).get("p99_s")) * 1e3 for m in models])
        ok = np.isfinite(p50) & (p50 > 0)
        handles.append(Patch(color=colours[name], label=name if ok.any() else f"{name}: no successful images"))
        if not ok.any():
            continue
        drawn = True
        upper = np.where(np.isfinite(p99), np.maximum(p99 - p50, 0), 0)
        pos = x - 0.4 + width * (j + 0.5)
        ax.bar(pos[ok], p50[ok], width * 0.92, color=colours[name],
               yerr=[np.zeros(int(ok.sum())), upper[ok]], capsize=3, error_kw={"elinewidth": 1, "ecolor": "#333333"})
    ax.set_xticks(x, models, rotation=30 if len(models) > 6 else 0, ha="right" if len(models) > 6 else "center")
    if drawn:
        _plain_log(ax)
    else:
        _note(ax, "no successful images in any mode: nothing to draw")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=9)
    return _save(fig, path)


def plot_timeline(modes: Mapping[str, Mapping[str, Any]], path: Path, colours: Mapping[str, str]) -> Path:
    fig = Figure(figsize=(11, 7), layout="constrained")
    top = fig.add_subplot(2, 1, 1)
    bottom = fig.add_subplot(2, 1, 2, sharex=top)
    fig.suptitle("Over time: throughput and p99 latency per window of completion time", fontsize=12)
    top.set_ylabel("throughput (images/s)")
    bottom.set_ylabel("p99 latency (ms, log scale)")
    bottom.set_xlabel("time since the first counted image was due (s)")
    drawn = False
    for name, mode in modes.items():
        tl = mode.get("timeline") or {}
        t = np.array([_num(v) for v in tl.get("t_s") or []])
        rate = np.array([_num(v) for v in tl.get("images_per_s") or []])
        p99 = np.array([_num(v) for v in tl.get("p99_s") or []]) * 1e3
        if t.size == 0 or not np.isfinite(rate).any():
            top.plot([], [], color=colours[name], label=f"{name}: no successful images")
            continue
        drawn = True
        window = _num(tl.get("window_s"))
        mid = t + (window / 2 if math.isfinite(window) else 0.0)
        top.plot(mid, rate, color=colours[name], lw=1.5, label=f"{name} (windows of {window:.3g} s)")
        good = np.isfinite(p99) & (p99 > 0)
        bottom.plot(mid[good], p99[good], color=colours[name], lw=1.2, marker="." if good.sum() < 60 else None)
    if drawn:
        _plain_log(bottom)
    else:
        _note(top, "no successful images in any mode: nothing to draw")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.set_ylim(bottom=0)
    top.legend(fontsize=9, loc="best")
    return _save(fig, path)


def plot_worker_balance(modes: Mapping[str, Mapping[str, Any]], path: Path, colours: Mapping[str, str]) -> Path:
    """One row of bars per mode (each with its own scale, so a short mode stays readable)."""
    workers: list[str] = []
    for mode in modes.values():
        workers += [w for w in (mode.get("per_worker") or {}) if w not in workers]
    rows = max(1, len(modes))
    fig = Figure(figsize=(max(8.0, 1.5 + 0.45 * len(workers)), 1.2 + 2.3 * rows), layout="constrained")
    fig.suptitle("Images per worker, per mode (counted images, any outcome); dashed: the mean", fontsize=12)
    x = np.arange(len(workers))
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    for ax, (name, mode) in zip(axes, modes.items(), strict=False):  # no modes: one empty axes
        per = mode.get("per_worker") or {}
        counts = np.array([_num(per.get(w, {}).get("count")) for w in workers])
        counts = np.where(np.isfinite(counts), counts, 0)
        imb = _num(mode.get("imbalance"))
        ax.set_title(f"{name}: imbalance {imb * 100:.3g}% (busiest worker over the mean)" if math.isfinite(imb)
                     else f"{name}", fontsize=10, loc="left")
        ax.set_ylabel("images (count)")
        ax.bar(x, counts, 0.7, color=colours[name])
        if counts.size and counts.sum() > 0:
            ax.axhline(counts.mean(), color="#333333", lw=1, ls="--")
        else:
            _note(ax, f"{name}: no worker handled a counted image")
        ax.set_xticks(x, workers if ax is axes[-1] else [""] * len(workers),
                      rotation=45 if len(workers) > 8 else 0, ha="right" if len(workers) > 8 else "center")
        ax.grid(axis="y", alpha=0.3)
    if not modes:
        _note(axes[0], "no mode finished")
    axes[-1].set_xlabel("worker")
    return _save(fig, path)


def plot_stage_breakdown(modes: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    names = list(modes)
    stages = [s for s in STAGES if any(s in (m.get("stages") or {}) for m in modes.values())]
    fig = Figure(figsize=(12, 1.8 + 0.7 * max(2, len(names))), layout="constrained")
    fig.suptitle("Where the time of an image goes: mean per stage (successful images after the warm-up)",
                 fontsize=12)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.set_xlabel("mean time per image (ms)")
    right.set_xlabel("share of the stages' total (%)")
    y = np.arange(len(names))
    means = np.array([[_num(((modes[m].get("stages") or {}).get(s) or {}).get("mean_s")) * 1e3 for s in stages]
                      for m in names]).reshape(len(names), len(stages))
    means = np.where(np.isfinite(means), means, 0.0)
    totals = means.sum(axis=1)
    shares = np.divide(means, totals[:, None], out=np.zeros_like(means), where=totals[:, None] > 0) * 100
    for ax, values in ((left, means), (right, shares)):
        start = np.zeros(len(names))
        for k, stage in enumerate(stages):
            ax.barh(y, values[:, k], left=start, color=STAGE_COLOURS[k % len(STAGE_COLOURS)],
                    label=stage if ax is left else None)
            start += values[:, k]
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    for i, total in enumerate(totals):
        if total > 0:
            left.annotate(f"{total:.3g} ms", (total, i), xytext=(3, 0), textcoords="offset points", va="center",
                          fontsize=8)
        else:
            left.annotate("no successful images", (0, i), xytext=(3, 0), textcoords="offset points", va="center",
                          fontsize=9, color="#444444")
    if totals.size and totals.max() > 0:
        left.set_xlim(0, totals.max() * 1.18)
    right.set_xlim(0, 100)
    if stages:
        fig.legend(loc="outside lower center", ncols=min(len(stages), 8), fontsize=9)
    else:
        _note(left, "no stage times recorded")
    return _save(fig, path)


def plot_all(results: Mapping[str, Any], ledgers: Mapping[str, Ledger], out_dir: Path, warmup: int) -> list[Path]:
    """Write the five figures into ``out_dir`` and return their paths (see the module docstring)."""
    out_dir = Path(out_dir)
    modes = dict(results.get("modes") or {})
    order = list(modes) + [m for m in ledgers if m not in modes]
    colours = _colours(order)
    return [
        plot_latency_cdf({m: ledgers[m] for m in order if m in ledgers}, warmup, out_dir / "latency_cdf.png", colours,
                         modes),
        plot_per_model(modes, out_dir / "per_model_latency.png", colours),
        plot_timeline(modes, out_dir / "timeline.png", colours),
        plot_worker_balance(modes, out_dir / "worker_balance.png", colours),
        plot_stage_breakdown(modes, out_dir / "stage_breakdown.png"),
    ]
