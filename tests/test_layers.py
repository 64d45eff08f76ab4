"""The layering that docs/architecture.md states: the core imports no Ray, framework, FastAPI or uvicorn, and
only ``cluster`` imports Ray (checked in a fresh interpreter, as an import made by a test would hide it)."""

from __future__ import annotations

import json
import subprocess
import sys

CORE = ("schedule", "balancer", "residency", "worker", "driver", "driver_types", "pacing", "tally",
        "process_shards", "ledger", "stats", "timing", "config", "config_checks", "results", "errors", "protocol", "target",
        "report.stream_summary", "report.stream_report", "report.single_report", "models.registry",
        "models.backends.base", "traces", "peak_search", "sweep", "report.render", "report.html", "report.compare",
        "report.__main__", "models.engines", "single_engines", "experiments", "report.experiments_report")
HEAVY = ("ray", "torch", "mxnet", "onnxruntime", "openvino", "fastapi", "uvicorn")


def _loaded_after(modules: tuple[str, ...]) -> list[str]:
    code = (f"import sys, json\nfor m in {[f'cortexbench.{m}' for m in modules]!r}:\n    __import__(m)\n"
            f"print(json.dumps([h for h in {list(HEAVY)!r} if h in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_core_imports_no_ray_framework_or_web_server():
    assert _loaded_after(CORE) == []


def test_the_http_target_and_its_driver_shards_need_no_ray():
    assert _loaded_after(("http_target", "http_client", "process_shards", "coordinator", "peak",
                          "report.peak_report", "stream_plan", "stream_results", "load_sweep")) == []


def test_the_gateway_reaches_ray_only_through_cluster_and_fastapi_only_in_its_app():
    assert _loaded_after(("gateway.v2", "gateway.pool", "gateway.channel", "gateway.shm", "serve")) == []
    assert "ray" not in _loaded_after(("gateway.app",))
