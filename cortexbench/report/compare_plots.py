"""``compare.png``: each run's throughput and p99 over the first run's, per pass or point, with the spread.

Two panels of grouped bars (one group per key, one bar per run, the baseline at 1×), error bars the
relative 95% confidence half-width of the repeats where there are repeats.  Drawn on matplotlib's Agg
canvas into memory and written atomically (``results.write_bytes``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cortexbench.report.compare import Row
from cortexbench.results import write_bytes

DPI = 110
COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
MAX_KEYS = 24  # more keys than that make unreadable bars: the first ones are drawn


def plot_compare(rows: Sequence[Row], runs: Sequence[str], path: Path) -> Path:
    keys = list(dict.fromkeys(r.key for r in rows))[:MAX_KEYS]
    by = {(r.key, r.run): r for r in rows}
    width = 0.8 / max(1, len(runs))
    fig = Figure(figsize=(max(7.0, min(16.0, 1.2 + 0.55 * len(keys) * max(1, len(runs)))), 6.4))
    panels = (("images_per_s", "throughput over the first run's (above 1 is faster)"),
              ("p99_s", "p99 latency over the first run's (above 1 is slower)"))
    for k, (metric, title) in enumerate(panels):
        ax = fig.add_subplot(2, 1, k + 1)
        for j, run in enumerate(runs):
            xs, ys, errs = [], [], []
            for i, key in enumerate(keys):
                r = by.get((key, run))
                if r is None or metric not in r.ratios:
                    continue
                xs.append(i + (j - (len(runs) - 1) / 2) * width)
                ys.append(r.ratios[metric])
                spread = r.figures[metric].spread if r.repeats > 1 else None
                errs.append(ys[-1] * spread if spread is not None else 0.0)
            ax.bar(xs, ys, width * 0.92, yerr=errs, capsize=3, color=COLOURS[j % len(COLOURS)], label=run)
        ax.axhline(1.0, color="#333333", lw=0.8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=20 if len(keys) > 4 else 0, ha="right" if len(keys) > 4 else "center",
                           fontsize=8)
        ax.set_ylabel("× first run")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_ylim(bottom=0)
        if k == 0:
            ax.legend(fontsize=8, ncols=min(4, len(runs)))
    fig.tight_layout()
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return write_bytes(path, buf.getvalue())
