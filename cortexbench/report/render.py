"""report.md of any run, from its results.json alone: the one place that puts a run's sections together.

``run_markdown(doc, run_dir)`` is what a run writes as report.md and what ``python -m cortexbench.report DIR``
renders again: for ``stream`` the stream report, then the peak search, the cost and the sweep when the run
had them; for ``single`` and ``experiments`` its report with the plots that are in ``run_dir``.  ``draw_derived`` draws the
pictures that follow from results.json alone (``rate_latency.png``, the sweep's) when they are missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cortexbench.errors import UsageError

SINGLE_PLOTS = ("model_size.png", "speed_comparison.png", "batch_scaling.png", "op_profile.png")
EXPERIMENTS_PLOTS = ("mnist.png", "digits_ops.png")
KINDS = ("single", "stream", "experiments")


def stream_markdown(results: Mapping[str, Any]) -> str:
    """report.md of a stream run: the stream report, then its peak, cost and sweep sections."""
    from cortexbench.report import stream_report

    report = stream_report.render_markdown(results)
    if results.get("peak"):
        from cortexbench.report import peak_report

        report = report.rstrip("\n") + "\n\n" + peak_report.render_markdown(results["peak"])
    if results.get("cost"):
        from cortexbench.report.peak_report import cost_lines

        report = report.rstrip("\n") + "\n\n## Cost\n\n" + "\n".join(f"- {x}" for x in cost_lines(results["cost"])) + "\n"
    if results.get("sweep") and results["sweep"].get("rows"):
        from cortexbench import sweep

        report = report.rstrip("\n") + "\n\n" + sweep.render_markdown(results["sweep"])
    return report


def draw_derived(results: Mapping[str, Any], run_dir: Path, *, missing_only: bool = False) -> list[Path]:
    """The stream pictures drawn from results.json alone (the peak search's, the sweep's) into ``run_dir``;
    with ``missing_only`` only those not there yet.  The others need the run's ledgers and are drawn by it."""
    out: list[Path] = []
    if results.get("kind") != "stream":
        return out
    if results.get("peak"):
        from cortexbench.report import peak_report

        path = run_dir / "rate_latency.png"
        if not (missing_only and path.exists()):
            out.append(peak_report.plot_rate_latency(results["peak"], path))
    if results.get("sweep") and results["sweep"].get("rows"):
        from cortexbench import sweep

        path = run_dir / sweep.plot_name(results["sweep"])
        if not (missing_only and path.exists()):
            out.append(sweep.plot(results["sweep"], path))
    return out


def run_markdown(doc: Mapping[str, Any], run_dir: Path) -> str:
    """report.md of the run in ``run_dir`` whose results.json is ``doc``."""
    kind = doc.get("kind")
    if kind == "stream":
        return stream_markdown(doc)
    if kind == "single":
        from cortexbench.report.single_report import markdown_report

        plots = [name for name in SINGLE_PLOTS if (Path(run_dir) / name).exists()]
        return markdown_report(doc, Path(run_dir).name, plots)
    if kind == "experiments":
        from cortexbench.report.experiments_report import markdown_report as experiments_markdown

        plots = [name for name in EXPERIMENTS_PLOTS if (Path(run_dir) / name).exists()]
        return experiments_markdown(doc, Path(run_dir).name, plots)
    raise UsageError(f"{run_dir}: results of kind {kind!r}; this cortexbench reports {', '.join(KINDS)} runs")
