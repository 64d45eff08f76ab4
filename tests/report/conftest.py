"""Run directories shared by the report tests (made once per session, see ``tests/report/runs.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.runs import stream_run_dir


@pytest.fixture(scope="session")
def stream_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stream runs on a fake worker (1 ms an image, 2 lanes), each in a folder of its own: 'lru' (cold,
    lru:1, cached), 'concurrency' (1, 4), 'rate' (100/s, 300/s), 'repeat1' and 'repeat2' (in the folder
    'repeats': two runs of one config) and 'slower' (that config at 2 ms an image); treat as read-only."""
    out = tmp_path_factory.mktemp("stream-runs")
    runs = {
        "lru": stream_run_dir(out / "lru", modes=("cached", "cold"), sweep="lru:1", count=100),
        "concurrency": stream_run_dir(out / "concurrency", sweep="concurrency:1,4", count=100),
        "rate": stream_run_dir(out / "rate", sweep="rate:100,300", count=100),
        "repeat1": stream_run_dir(out / "repeats", count=100),
        "repeat2": stream_run_dir(out / "repeats", count=100),
        "slower": stream_run_dir(out / "slower", count=100, service_s=0.002),
    }
    return {**runs, "repeats": out / "repeats"}


@pytest.fixture(scope="session")
def single_run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path, model_dir: Path) -> Path:
    """A real single run (MXNet, CPU, mlp2 and digits_cnn at batch 1); treat as read-only."""
    from tests.report.runs import single_run_dir

    return single_run_dir(tmp_path_factory.mktemp("single") / "results", image_dir, model_dir,
                          models="mlp2,digits_cnn")
