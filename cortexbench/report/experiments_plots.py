"""The figures of ``python -m cortexbench.experiments``, drawn from the body of its results.json (Agg canvas,
no pyplot).

    mnist.png        seconds per sample against batch size, log-log, inference and training, per model
    digits_ops.png   digits_cnn's seconds per sample in each operator type, stacked, against batch size
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cortexbench.report.experiments_report import label, op_types
from cortexbench.report.single_plots import OP_COLOURS, _save


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
        ax.set(xscale="log", yscale="log", title=model, xlabel="batch size", ylabel="seconds per sample")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_digits_ops(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    cols = list(dict.fromkeys((r["backend"], r["device"]) for r in rows))
    ops = op_types(rows)
    fig = Figure(figsize=(6 * len(cols), 4.5), layout="constrained")
    fig.suptitle("digits_cnn: seconds per sample in each operator type (profiled)")
    for ax, col in zip(fig.subplots(1, len(cols), squeeze=False)[0], cols, strict=True):
        mine = [r for r in rows if (r["backend"], r["device"]) == col]
        x = [str(r["batch_size"]) for r in mine]
        bottom = [0.0] * len(mine)
        for k, op in enumerate(ops):
            h = [r["op_s"].get(op, 0.0) / r["batch_size"] for r in mine]
            ax.bar(x, h, bottom=bottom, label=op, color=OP_COLOURS[k % len(OP_COLOURS)])
            bottom = [b + v for b, v in zip(bottom, h, strict=True)]
        ax.set(title=label(col), xlabel="batch size", ylabel="seconds per sample")
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(body: Mapping[str, Any], out_dir: Path) -> list[Path]:
    out = []
    if body.get("mnist"):
        out.append(plot_mnist(body["mnist"], Path(out_dir) / "mnist.png"))
    if body.get("digits"):
        out.append(plot_digits_ops(body["digits"], Path(out_dir) / "digits_ops.png"))
    return out
