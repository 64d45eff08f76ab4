"""The figures of ``python -m cortexbench.single``, drawn from the body of its results.json.

Each function takes plain data (the ``points``, ``models`` and ``op_profile`` entries that results.json
holds), writes one PNG and returns its path, so that the plots can be redrawn from a results file alone.
Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global state).

    model_size.png        parameters and megabytes per model (bars, log scale)
    speed_comparison.png  per-image latency per model, CPU against GPU, at batch 1 and at the best batch
    batch_scaling.png     per-image latency against batch size, log-log, one line per model x device
    op_profile.png        share of time per operator type, stacked, per model/device (with --profile-ops)
    speed_fidelity.png    per model, images/s (log) against top-1 agreement with the fp32 eager reference,
                          one marker per engine x precision x device (with --engines)

With an engine axis a point's "device" in the figures is its device, engine and precision
(``single_report.point_label``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cortexbench.report.single_report import point_label
from cortexbench.report.tables import format_bytes, format_count, format_seconds

DPI = 110
# Colours by device kind, so that CPU and GPU read the same in every figure.
CPU_COLOURS = ("#4C72B0", "#8FAADC")
GPU_COLOURS = ("#DD8452", "#F2BE94")
OP_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
              "#CCB974", "#64B5CD", "#2F4B7C", "#A05195", "#D3D3D3")


# One colour per model in line plots; the device sets the line style (CPU solid, GPU dashed).
LINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf")


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _is_gpu(device: str) -> bool:
    return device.startswith("gpu")


def _image_mean_s(point: Mapping[str, Any]) -> float:
    return float(point["image_latency_s"]["mean"])


def plot_model_size(models: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Two bar charts side by side: parameters and megabytes on disk per model (log scale)."""
    names = list(models)
    params = [max(1, int(models[m].get("param_count") or 0)) for m in names]
    megabytes = [max(1e-6, float(models[m].get("size_bytes") or 0) / 1e6) for m in names]
    fig = Figure(figsize=(11, 1.8 + 0.45 * max(3, len(names))), layout="constrained")
    fig.suptitle("Model size: parameters and bytes on disk", fontsize=13)
    for ax, values, label, colour, fmt in (
        (fig.add_subplot(1, 2, 1), params, "parameters (count, log scale)", "#4C72B0", format_count),
        (fig.add_subplot(1, 2, 2), megabytes, "size on disk (MB, log scale)", "#55A868",
         lambda mb: format_bytes(mb * 1e6)),
    ):
        y = list(range(len(names)))
        ax.barh(y, values, color=colour)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(axis="x", which="major", alpha=0.3)
        for yi, v in zip(y, values, strict=True):
            ax.annotate(fmt(v), (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlim(min(values) / 2, max(values) * 12)
    return _save(fig, path)


def _best(points: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    return max(points, key=lambda p: float(p["throughput_images_per_s"]))


def plot_speed_comparison(points: Sequence[Mapping[str, Any]], path: Path, *, gpu_on_machine: bool) -> Path:
    """Per model: per-image latency on each device at the smallest batch and at the best batch (log scale).

    Without any GPU point the figure shows the CPU bars alone and its title says why.
    """
    models = list(dict.fromkeys(p["model"] for p in points))
    devices = sorted(dict.fromkeys(point_label(p) for p in points), key=lambda d: (_is_gpu(d), d))
    series: list[tuple[str, str, list[tuple[float, int] | None]]] = []  # label, colour, (s, batch) per model
    for device in devices:
        colours = GPU_COLOURS if _is_gpu(device) else CPU_COLOURS
        first: list[tuple[float, int] | None] = []
        best: list[tuple[float, int] | None] = []
        first_bs: set[int] = set()
        for m in models:
            mine = [p for p in points if p["model"] == m and point_label(p) == device]
            if not mine:
                first.append(None)
                best.append(None)
                continue
            smallest = min(mine, key=lambda p: int(p["batch_size"]))
            first_bs.add(int(smallest["batch_size"]))
            first.append((_image_mean_s(smallest), int(smallest["batch_size"])))
            top = _best(mine)
            best.append((_image_mean_s(top), int(top["batch_size"])))
        bs_label = f"batch {first_bs.pop()}" if len(first_bs) == 1 else "smallest batch"
        series.append((f"{device.upper()}, {bs_label}", colours[0], first))
        series.append((f"{device.upper()}, best batch", colours[1], best))

    fig = Figure(figsize=(max(7.0, 1.6 + 1.3 * len(models) * max(1, len(devices))), 5.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    has_gpu_points = any(_is_gpu(d) for d in devices)
    title = "Per-image latency: CPU vs GPU (lower is better)"
    if not has_gpu_points:
        title = ("Per-image latency on CPU (no GPU on this machine)" if not gpu_on_machine
                 else "Per-image latency on CPU (GPU not measured in this run)")
    ax.set_title(title, fontsize=13)
    width = 0.8 / max(1, len(series))
    for i, (label, colour, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(models))]
        kept = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None and v[0] > 0]
        if not kept:
            continue
        bars = ax.bar([x for x, _ in kept], [v for _, (v, _) in kept], width=width * 0.95, color=colour, label=label)
        for bar, (_, (v, bs)) in zip(bars, kept, strict=True):
            ax.annotate(f"{format_seconds(v, 2)} (b{bs})", (bar.get_x() + bar.get_width() / 2, v), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_yscale("log")
    ax.set_xticks(range(len(models)), models, rotation=20 if len(models) > 5 else 0)
    ax.set_xlabel("model")
    ax.set_ylabel("per-image latency (seconds, log scale)")
    shown = [v for _, _, values in series for item in values if item is not None and (v := item[0]) > 0]
    if shown:
        ax.set_ylim(min(shown) / 2, max(shown) * 12)  # room above the tallest bar for its label
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(4, len(series)))
    return _save(fig, path)


def plot_batch_scaling(points: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Per-image latency against batch size, log-log, one line per model x device."""
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title("Per-image latency against batch size (log-log; CPU solid, GPU dashed)", fontsize=12)
    keys = list(dict.fromkeys((p["model"], point_label(p)) for p in points))
    models = list(dict.fromkeys(m for m, _ in keys))
    batch_sizes: set[int] = set()
    for model, device in keys:
        mine = sorted((p for p in points if p["model"] == model and point_label(p) == device),
                      key=lambda p: int(p["batch_size"]))
        xs = [int(p["batch_size"]) for p in mine]
        batch_sizes.update(xs)
        style = "--" if _is_gpu(device) else "-"
        ax.plot(xs, [_image_mean_s(p) for p in mine], style, marker="s" if _is_gpu(device) else "o", markersize=4,
                color=LINE_COLOURS[models.index(model) % len(LINE_COLOURS)], label=f"{model} @ {device}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if batch_sizes:
        ticks = sorted(batch_sizes)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlim(min(ticks) / 1.3, max(ticks) * 1.3)
    ax.set_xlabel("batch size (images per call, log scale)")
    ax.set_ylabel("per-image latency (seconds, log scale)")
    ax.grid(which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(keys) > 8 else 1, loc="best")
    return _save(fig, path)


def plot_op_profile(profiles: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Stacked bars, one panel per model: the share of each operator type in one batch, per device and batch.

    ``profiles`` entries hold ``model``, ``device``, ``batch_size`` and ``op_s`` (operator type -> seconds
    per batch); the summed operator time per batch is written above each bar.
    """
    models = list(dict.fromkeys(p["model"] for p in profiles))
    ops = sorted({op for p in profiles for op, s in p["op_s"].items() if s > 0},
                 key=lambda op: -sum(float(p["op_s"].get(op, 0.0)) / max(1e-30, sum(p["op_s"].values()))
                                     for p in profiles))
    colours = {op: OP_COLOURS[i % len(OP_COLOURS)] for i, op in enumerate(ops)}
    cols = min(3, len(models))
    rows = (len(models) + cols - 1) // cols
    per_model = max(len([p for p in profiles if p["model"] == m]) for m in models)
    fig = Figure(figsize=(1.2 + cols * max(3.0, 0.55 * per_model + 1.0) + 1.8, 0.6 + 3.6 * rows),
                 layout="constrained")
    fig.suptitle("Time per operator type: share of one batch (summed operator time above each bar)", fontsize=13)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for k, model in enumerate(models):
        ax = axes[k // cols][k % cols]
        mine = sorted((p for p in profiles if p["model"] == model),
                      key=lambda p: (_is_gpu(p["device"]), p["device"], int(p["batch_size"])))
        totals = [sum(float(v) for v in p["op_s"].values()) for p in mine]
        bottoms = [0.0] * len(mine)
        for op in ops:
            shares = [100.0 * float(p["op_s"].get(op, 0.0)) / t if t > 0 else 0.0
                      for p, t in zip(mine, totals, strict=True)]
            ax.bar(range(len(mine)), shares, bottom=bottoms, color=colours[op], label=op if k == 0 else None)
            bottoms = [b + s for b, s in zip(bottoms, shares, strict=True)]
        for x, t in enumerate(totals):
            ax.annotate(format_seconds(t, 2), (x, 100), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, rotation=90 if len(mine) > 6 else 0)
        ax.set_xticks(range(len(mine)), [f"{p['device']}\nb{p['batch_size']}" for p in mine], fontsize=7)
        ax.set_title(model, fontsize=11)
        ax.set_ylim(0, 125)
        ax.set_yticks(range(0, 101, 20))
        if k % cols == 0:
            ax.set_ylabel("share of operator time (%)")
        if k // cols == rows - 1 or k + cols >= len(models):
            ax.set_xlabel("device, batch size")
    for k in range(len(models), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.legend(title="operator type", fontsize=8, loc="outside right center")
    return _save(fig, path)


MARKERS = {"eager": "o", "graphs": "s", "compile": "D", "ort": "^", "ort-basic": "v", "ort-none": "<",
           "openvino": "P", "tensorrt": "*"}
PRECISION_COLOURS = {"fp32": "#4C72B0", "fp16": "#DD8452", "bf16": "#55A868", "int8": "#C44E52"}


def plot_speed_fidelity(points: Sequence[Mapping[str, Any]], fidelity: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Per model (a column): best images/s (log) against top-1 agreement with the reference (top row) and
    against the logits' mean difference relative to the reference (bottom row, log; the reference itself,
    0, at the floor).  A marker per engine (shape), precision (colour) and device (filled on the CPU,
    hollow on a GPU)."""
    models = list(dict.fromkeys(f["model"] for f in fidelity))
    floor = 1e-9
    fig = Figure(figsize=(max(9.0, 2.8 + 4.2 * len(models)), 7.5), layout="constrained")
    fig.suptitle("Speed against fidelity to fp32 eager on the CPU (right: faster; top: up is closer, bottom: down is closer)", fontsize=12)
    axes = fig.subplots(2, len(models), squeeze=False)
    seen: dict[str, Any] = {}
    for k, model in enumerate(models):
        top, bottom = axes[0][k], axes[1][k]
        lows = [100.0]
        for f in (f for f in fidelity if f["model"] == model):
            mine = [p for p in points if (p["model"], p["device"], p.get("engine"), p["precision"])
                    == (f["model"], f["device"], f["engine"], f["precision"])]
            if not mine:
                continue
            rate = max(float(p["throughput_images_per_s"]) for p in mine)
            colour = PRECISION_COLOURS.get(f["precision"], "#8C8C8C")
            gpu = _is_gpu(f["device"])
            style = dict(marker=MARKERS.get(f["engine"], "X"), s=70, color=colour if not gpu else "none",
                         edgecolors=colour, linewidths=1.5, alpha=0.85)
            agreement = 100.0 * float(f["top1_agreement"])
            lows.append(agreement)
            handle = top.scatter([rate], [agreement], **style)
            bottom.scatter([rate], [max(floor, float(f["logits_rel_mad"] or 0.0))], **style)
            seen.setdefault(f"{f['engine']} {f['precision']} {'GPU' if gpu else 'CPU'}", handle)
        top.set_title(model, fontsize=11)
        top.set_ylabel("top-1 agreement (%)")
        top.set_ylim(max(0.0, min(lows) - 5), 101.5)
        bottom.set_yscale("log")
        bottom.set_ylim(floor / 3, None)
        bottom.set_ylabel("logits: mean |diff| / mean |reference|")
        bottom.set_xlabel("images/s at the best batch size (log scale)")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(which="major", alpha=0.3)
            _readable_log_x(ax)
    fig.legend(list(seen.values()), list(seen), fontsize=7, loc="outside right center",
               title="engine precision device\n(hollow: GPU)")
    return _save(fig, path)


def _readable_log_x(ax: Any) -> None:
    """Plain numbers on a log x axis, at powers of ten, or for a narrow axis at a few steps between them
    (matplotlib labels every minor tick of a narrow axis, and they run into each other)."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_xlim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 3.0
    subs = tuple(range(1, 10)) if decades < 0.5 else (1, 2, 3, 5) if decades < 2 else (1,)
    ax.xaxis.set_major_locator(LogLocator(subs=tuple(float(k) for k in subs)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def write_plots(body: Mapping[str, Any], out_dir: Path, *, gpu_on_machine: bool) -> list[Path]:
    """All figures for one results body (``models``, ``points``, optional ``op_profile``) into ``out_dir``."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    if body.get("models"):
        written.append(plot_model_size(body["models"], out_dir / "model_size.png"))
    points = body.get("points") or []
    if points:
        written.append(plot_speed_comparison(points, out_dir / "speed_comparison.png", gpu_on_machine=gpu_on_machine))
        written.append(plot_batch_scaling(points, out_dir / "batch_scaling.png"))
    if points and body.get("fidelity"):
        written.append(plot_speed_fidelity(points, body["fidelity"], out_dir / "speed_fidelity.png"))
    profiles = [p for p in body.get("op_profile") or [] if p.get("op_s")]
    if profiles:
        written.append(plot_op_profile(profiles, out_dir / "op_profile.png"))
    return written
