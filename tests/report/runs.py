"""Run directories for the report tests, made the way a run makes them, in a second or two each.

``stream_run_dir`` runs the coordinator's own ``StreamRun`` (or ``LoadSweepRun``, ``PeakRun``) on
``tests.fakes`` workers (a fixed service time per image on the real clock, as in tests/test_peak.py), then
writes the run directory with ``stream_results.make_results`` and ``write_results``: results.json, report.md, the
plots.  ``single_run_dir`` is a real ``python -m cortexbench.single`` of the MXNet backend on mlp2.
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cortexbench import stream_results
from cortexbench.config import Config, StreamConfig
from cortexbench.coordinator import StreamPlan, StreamRun
from cortexbench.live import LiveView
from cortexbench.results import new_run_dir
from cortexbench.schedule import make_schedule
from cortexbench.sweep import base_rate
from cortexbench.worker import WorkerSpec
from tests.fakes import FakeTarget, FakeWorkerHandle

MODELS = ("null",)


def stream_run_dir(result_dir: Path, *, modes: tuple[str, ...] = ("cached",), sweep: str = "", count: int = 200,
                   service_s: float = 0.001, lanes: int = 2, concurrency: int = 4, rate: float | None = None,
                   find_peak: bool = False, slo: tuple[str, ...] = (), say: Any = None) -> Path:
    """A stream run on one fake worker, written to a new run directory under ``result_dir``."""
    st = StreamConfig(modes=modes, concurrency=concurrency, rate=rate, warmup=10, retries=1, sweep=sweep,
                      find_peak=find_peak, slo=slo, peak_precision=0.5, peak_late_ms=50.0,
                      gpu_hour_cost=2.0 if find_peak else None, records="none")
    cfg = Config(models=MODELS, times=count, result_dir=result_dir, stream=st)
    sched = make_schedule(count=count, models=MODELS, n_images=4, rate=base_rate(st), warmup=10, seed=0)
    workers = (WorkerSpec("w0", "cpu", "mxnet", "models", MODELS, ("a.jpg",), lanes=lanes),)
    run_modes = modes
    if sweep:
        from cortexbench.sweep import sweep_modes

        run_modes = sweep_modes(sweep, modes)
    depth = 4 if rate is None else 64
    plan = StreamPlan(cfg, "mxnet", MODELS, ("a.jpg",), workers, False, 1.0, 1, "grouped", 1, 1, depth, sched,
                      modes=run_modes if sweep else ())
    target = FakeTarget({"w0": FakeWorkerHandle("w0", service_s=service_s, lanes=lanes)})
    live = LiveView(MODELS, ["w0"], server=None, run_id="t", backend="x", quiet=True)
    run: StreamRun
    if find_peak:
        from cortexbench.peak import PeakRun

        run = PeakRun(plan, target, live, say=say or (lambda s: None))
    elif sweep and not sweep.startswith("lru"):
        from cortexbench.load_sweep import LoadSweepRun

        run = LoadSweepRun(plan, target, live)
    else:
        run = StreamRun(plan, target, live)
    started = time.time()
    asyncio.run(run.run())
    results = stream_results.make_results(run.plan, target, run, None, started, argv=["stream", *run_modes])
    run_dir = new_run_dir(result_dir, "stream")
    stream_results.write_results(run_dir, results, run)
    return run_dir


def single_run_dir(result_dir: Path, img_dir: Path, model_dir: Path, *, models: str = "mlp2",
                   batch_sizes: str = "1") -> Path:
    """A real ``single`` run (MXNet, CPU, 0.1 s a point); its run directory."""
    from cortexbench import single

    pytest.importorskip("mxnet", reason="the mxnet backend is not installed")
    before = set(result_dir.glob("*")) if result_dir.exists() else set()
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(result_dir.parent)
        mp.setattr(sys, "stdout", io.StringIO())
        rc = single.main(["--models", models, "--batch-sizes", batch_sizes, "--devices", "cpu", "--backend", "mxnet",
                          "--max-seconds", "0.1", "--img-dir", str(img_dir), "--model-dir", str(model_dir),
                          "--result-dir", str(result_dir), "--quiet"])
    finally:
        mp.undo()
    assert rc == 0
    (run_dir,) = set(result_dir.glob("*")) - before
    return run_dir


SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "results.schema.json"


def schema_errors(doc: dict) -> list[str]:
    """Where ``doc`` breaks docs/results.schema.json (Draft 2020-12); [] when it conforms."""
    import json

    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]
