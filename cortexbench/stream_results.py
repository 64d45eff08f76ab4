"""What a stream run leaves: results.json's body (the modes' figures, their comparison, the tiers, the
workers, the run's plan, the sweep, peak and cost sections) in results.py's envelope, and the run directory
(records, results.json, report.md through ``report.render``, the plots).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortexbench import machine
from cortexbench.report import render, stream_plots
from cortexbench.report.stream_summary import compare_modes
from cortexbench.report.tiers import answers_agreement, load_figures
from cortexbench.results import envelope, write_json, write_text
from cortexbench.stream_plan import StreamPlan
from cortexbench.target import Target, describe

if TYPE_CHECKING:
    from cortexbench.coordinator import StreamRun


def make_results(plan: StreamPlan, target: Target, run: StreamRun, port: int | None,
             started: float, argv: list[str] | None = None) -> dict[str, Any]:
    cfg = plan.cfg
    modes = {m: r.summary for m, r in run.modes.items()}
    body = {
        "modes": modes,
        "comparison": compare_modes(modes),
        "tiers": {"answers": answers_agreement({m: r.result.ledger for m, r in run.modes.items()},
                                               run.plan.schedule.warmup, cfg.precision),
                  "loads": load_figures(modes),
                  "process_warm": "cold and swap: each model was loaded and run once per lane before the run (cuDNN "
                                  "plans, the network's structure and, on a GPU, CUDA graphs bound to the loader's "
                                  "weight slots are kept, as in a serving process that has run it before); the "
                                  "weights come from disk or host memory for every image"
                                  + ("; the structure is rebuilt for every load" if cfg.stream.cold_rebuild else "")},
        "workers": describe(target.workers),
        "run": {"passes": list(plan.run_modes), "dispatch": plan.dispatch, "drivers": plan.drivers, "balancer": cfg.stream.balancer,
                "loop": "open" if cfg.stream.rate is not None else "closed",
                "concurrency": cfg.stream.concurrency, "rate": cfg.stream.rate, "images": cfg.times,
                "warmup": cfg.stream.warmup, "popularity": cfg.stream.popularity,
                "arrivals": cfg.stream.arrivals, "metrics_port": port,
                "backend": plan.backend, "engine": plan.engine, "lanes": plan.workers[0].lanes if plan.workers else None,
                "max_group": plan.max_group, "inputs": cfg.stream.inputs, "decode": cfg.stream.decode,
                "depth": plan.depth, "image_files": len(plan.images), "models": list(plan.models),
                "interrupted": run.interrupted, "error": run.error},
    }
    if cfg.stream.sweep:
        from cortexbench import sweep

        body["sweep"] = sweep.section(cfg.stream.sweep, modes, len(plan.models))
    peaks = getattr(run, "peaks", None)
    if peaks is not None:  # --find-peak: the search per mode (the modes' figures are the peak's steps)
        body["peak"] = {m: p.to_dict() for m, p in peaks.items()}
    if cfg.stream.gpu_hour_cost is not None:
        from cortexbench.report.peak_report import costs

        body["cost"] = costs(body.get("peak"), modes, cfg.stream.gpu_hour_cost, max(1, len(plan.workers)))
    return envelope("stream", replace(cfg).to_dict(), machine.machine_info(), body,
                    complete=not run.interrupted and not run.error and len(run.modes) == len(plan.run_modes),
                    started_at=started, finished_at=time.time(), argv=argv)


def write_results(run_dir: Path, results: dict[str, Any], run: StreamRun) -> None:
    ledgers = {m: r.result.ledger for m, r in run.modes.items()}
    if run.plan.cfg.stream.records != "none":
        for mode, ledger in ledgers.items():
            ledger.save_csv_gz(run_dir / f"records-{mode.replace(':', '')}.csv.gz")
    write_json(run_dir / "results.json", results)
    render.draw_derived(results, run_dir)
    report = render.stream_markdown(results)
    write_text(run_dir / "report.md", report)
    if ledgers:
        stream_plots.plot_all(results, ledgers, run_dir, run.plan.schedule.warmup)
