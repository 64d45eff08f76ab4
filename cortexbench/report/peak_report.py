"""The report of ``--find-peak``: the peak per mode, the latency-against-rate table, ``rate_latency.png``.

Everything is drawn from results.json's ``peak`` section (``peak.PeakResult.to_dict`` per mode), so a report
can be rebuilt from the file alone:

- ``peak_lines``: one line per mode (the console and report.md): the peak with its bracket, or why none;
- ``curve_table``: each step of the search in rate order (offered rate, throughput, mean, p50, p90, p99,
  share sent late, windows' spread, verdict), as markdown or console text;
- ``plot_rate_latency``: p50, p90, p99 (and the mean, dotted) against the offered rate (log-log), one panel
  per mode; the SLO limits as horizontal lines, the peak and the knee as vertical ones.  The **knee** is the lowest measured
  rate whose p99 is more than twice the p99 at the lowest rate measured (where queueing takes over).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator

from cortexbench.report.tables import (
    console_table,
    format_percent,
    format_rate,
    format_seconds,
    markdown_table,
)

DPI = 110
LINES = (("p50", "#4C72B0", "-"), ("p90", "#55A868", "--"), ("p99", "#C44E52", "-"), ("mean", "#8172B3", ":"))


def peak_lines(peaks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """'cached: peak 152 img/s (between 152 and 159 img/s) for p99=20ms, ...' per mode."""
    out = []
    for mode, p in peaks.items():
        slo = ", ".join(p["slo"])
        lo, hi = p["bracket"]
        if p["peak_rate"] is None:
            low = min((s["rate"] for s in p["steps"]), default=math.nan)
            out.append(f"{mode}: no rate met {slo} (lowest tried {format_rate(low)})")
        elif hi is None:
            out.append(f"{mode}: {slo} met up to {format_rate(lo)}, the highest rate tried (no rate missed them "
                       "within the steps allowed)")
        else:
            note = "" if p["converged"] else f", not narrowed to {p['precision']:.0%}"
            out.append(f"{mode}: peak {format_rate(lo)} for {slo} (met at {format_rate(lo)}, missed at "
                       f"{format_rate(hi)}: +{(hi / lo - 1):.1%}{note})")
    return out


def _rows(p: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for s in p["steps"]:
        st = s["stats_s"]
        rows.append([format_rate(s["rate"]), format_rate(s["throughput"]), format_seconds(st.get("mean")),
                     format_seconds(st.get("p50")), format_seconds(st.get("p90")), format_seconds(st.get("p99")),
                     format_percent(s["late_share"]), f"{s['spread']:.0%}" if math.isfinite(s["spread"]) else "–",
                     str(s["samples"]), s["verdict"]])
    return rows


HEADER = ["offered", "img/s", "mean", "p50", "p90", "p99", "late", "spread", "samples", "verdict"]


def curve_table(p: Mapping[str, Any], *, markdown: bool = True) -> str:
    """The search's steps in rate order."""
    align = "rrrrrrrrrl"
    return markdown_table(HEADER, _rows(p), align) if markdown else console_table(HEADER, _rows(p), align)


def render_markdown(peaks: Mapping[str, Mapping[str, Any]]) -> str:
    """The section appended to report.md."""
    parts = ["## Peak rate under the SLOs", ""]
    parts += [f"- {line}" for line in peak_lines(peaks)]
    any_peak = next(iter(peaks.values()), None)
    if any_peak is not None:
        parts += ["", f"Each step: {any_peak['windows']} windows of at least {any_peak['samples_per_window']} "
                      f"counted images; accepted when each window's median latency and throughput lie within "
                      f"{any_peak['tolerance']:.0%} of their median and at most {any_peak['late_limit']:.0%} "
                      f"of the images were sent more than {any_peak.get('late_ms', 1.0):g} ms late; bisection on "
                      "a log scale until the bracket is within "
                      f"{any_peak['precision']:.0%}."]
    for mode, p in peaks.items():
        parts += ["", f"### Latency against offered rate: {mode}", "", curve_table(p)]
    parts += ["", "![latency against offered rate](rate_latency.png)", ""]
    return "\n".join(parts)


def console(peaks: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for mode, p in peaks.items():
        parts += [f"find-peak {mode}:", curve_table(p, markdown=False)]
    return "\n".join(parts + peak_lines(peaks))


def knee(steps: Sequence[Mapping[str, Any]]) -> float | None:
    """The lowest rate whose p99 is more than twice the p99 at the lowest rate measured (see the docstring)."""
    pts = [(s["rate"], s["stats_s"].get("p99")) for s in sorted(steps, key=lambda s: s["rate"])]
    pts = [(r, v) for r, v in pts if v is not None and math.isfinite(v) and v > 0]
    if len(pts) < 2:
        return None
    base = pts[0][1]
    return next((r for r, v in pts[1:] if v > 2 * base), None)


def plot_rate_latency(peaks: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """``rate_latency.png``: see the module docstring."""
    n = max(1, len(peaks))
    fig = Figure(figsize=(6.4 * min(n, 2), 4.4 * math.ceil(n / 2)))
    for k, (mode, p) in enumerate(peaks.items()):
        ax = fig.add_subplot(math.ceil(n / 2), min(n, 2), k + 1)
        steps = sorted(p["steps"], key=lambda s: s["rate"])
        rates = [s["rate"] for s in steps]
        for stat, colour, style in LINES:
            ys = [s["stats_s"].get(stat, math.nan) * 1e3 for s in steps]
            ax.plot(rates, ys, style, color=colour, marker="o", ms=3, label=stat)
        missed = [s for s in steps if s["verdict"] != "met"]
        if missed:
            ax.plot([s["rate"] for s in missed], [s["stats_s"].get("p99", math.nan) * 1e3 for s in missed], "x",
                    color="black", ms=6, label="missed")
        for i, slo in enumerate(p["slo"]):
            stat, _, limit = slo.partition("=")
            ms = float(limit[:-2])
            ax.axhline(ms, color="#8C8C8C", ls=":", lw=1.2)
            ax.annotate(f"SLO {stat} {ms:g} ms", (0.99, ms), xycoords=("axes fraction", "data"), fontsize=8,
                        ha="right", va="bottom", color="#555555", xytext=(0, 2 + 10 * i), textcoords="offset points")
        if p["peak_rate"]:
            ax.axvline(p["peak_rate"], color="#4C72B0", lw=1.5, alpha=0.7)
            ax.annotate(f"peak {p['peak_rate']:.3g}/s", (p["peak_rate"], 0.97), xycoords=("data", "axes fraction"),
                        fontsize=8, ha="right", va="top", rotation=90, color="#4C72B0")
        kn = knee(steps)
        if kn is not None:
            ax.axvline(kn, color="#DD8452", ls="--", lw=1.2)
            ax.annotate(f"knee {kn:.3g}/s", (kn, 0.03), xycoords=("data", "axes fraction"), fontsize=8,
                        ha="left", va="bottom", rotation=90, color="#DD8452")
        if rates:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(rates))  # the rates measured
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
                axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("offered rate (images/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{mode}: latency against offered rate", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def costs(peaks: Mapping[str, Mapping[str, Any]] | None, modes: Mapping[str, Mapping[str, Any]], price: float,
          workers: int) -> dict[str, Any]:
    """``--gpu-hour-cost``: per mode, the cost of a million images at the peak rate (``--find-peak``), else at
    the measured throughput: price x workers / (rate x 3600) x 10^6 (a worker is a GPU, or a CPU worker)."""
    out: dict[str, Any] = {"price_per_worker_hour": price, "workers": workers, "modes": {}}
    for mode, m in modes.items():
        peak = (peaks or {}).get(mode, {}).get("peak_rate")
        rate = peak if peak else m["summary"].get("throughput_images_per_s")
        basis = "peak" if peak else "throughput"
        ok = isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0
        out["modes"][mode] = {"basis": basis, "images_per_s": rate if ok else None,
                              "cost_per_million": price * workers / (rate * 3600) * 1e6 if ok else None}
    return out


def cost_lines(cost: Mapping[str, Any]) -> list[str]:
    """'cached: 1.23 per million images at the peak (152 img/s on 8 workers at 2.5 per worker-hour)'."""
    out = []
    for mode, c in cost["modes"].items():
        if c["cost_per_million"] is None:
            out.append(f"{mode}: no cost (no rate measured)")
            continue
        at = "the peak" if c["basis"] == "peak" else "the measured throughput"
        out.append(f"{mode}: {c['cost_per_million']:.4g} per million images at {at} "
                   f"({format_rate(c['images_per_s'])} on {cost['workers']} worker(s) at "
                   f"{cost['price_per_worker_hour']:g} per worker-hour)")
    return out
