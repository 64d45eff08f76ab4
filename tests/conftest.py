"""Shared fixtures: one local Ray for the whole session, tiny exported models, a few synthetic images.

Ray starts once (``ray_session``) and is shared by every ``ray`` test; the command-line tests run
``python -m cortexbench.stream`` in a subprocess with a Ray of its own, and ``run_stream`` called
in-process reuses the session's Ray and leaves it running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SMALL_MODELS = ("mlp2", "digits_cnn", "mnist_cnn", "null")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray (2 CPUs, no dashboard) for every test that asks; shut down at the end."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mlp2, digits_cnn, mnist_cnn and null exported for mxnet (random weights); treat as read-only."""
    from cortexbench.models.export import export_models

    out = tmp_path_factory.mktemp("models")
    export_models(SMALL_MODELS, ["mxnet"], out, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight synthetic JPEGs; treat as read-only."""
    from cortexbench.images.synth import synthesize

    out = tmp_path_factory.mktemp("images")
    synthesize(out, 8, seed=0, workers=1, progress=False)
    return out
