"""The figures of ``python -m cortexbench.experiments``, drawn from the body of its results.json (Agg canvas,
no pyplot).

    mnist.png        seconds per sample against batch size, log-log, inference and training, per model
    digits_ops.png   digits_cnn's share of time in each operator type, stacked, per device and batch size
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from cortexbench.report.single_plots import _save, plot_op_profile


def plot_mnist(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(6 * len(models), 4.5), layout="constrained")
    fig.suptitle("Seconds per sample against batch size (log-log)")
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for key in dict.fromkeys((r["what"], r["backend"], r["device"]) for r in mine):
            line = sorted((r["batch_size"], r["sample_s"]) for r in mine if (r["what"], r["backend"], r["device"]) == key)
            ax.plot(*zip(*line, strict=True), marker="o", linestyle="-" if key[0] == "inference" else "--",
                    label=" ".join(key))
        ax.set(yscale="log", title=model, xlabel="batch size", ylabel="seconds per sample")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_digits_ops(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """single's op profile figure (share of each operator type per batch, the summed time above each bar),
    one panel per backend, a bar per device and batch size."""
    return plot_op_profile([{**r, "model": f"digits_cnn, {r['backend']}"} for r in rows], path)


def write_plots(body: Mapping[str, Any], out_dir: Path) -> list[Path]:
    out = []
    if body.get("mnist"):
        out.append(plot_mnist(body["mnist"], Path(out_dir) / "mnist.png"))
    if body.get("digits"):
        out.append(plot_digits_ops(body["digits"], Path(out_dir) / "digits_ops.png"))
    return out
