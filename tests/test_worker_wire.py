"""The worker's wire format (groups as bytes both ways) and its many-callers path, without Ray."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np

from cortexbench.ledger import OUTCOMES, WORKER_STAGES
from cortexbench.models.backends.base import export_null
from cortexbench.protocol import RESULT_COLS, RequestGroup, ResultGroup, WorkerState
from cortexbench.worker import ModelWorker, WorkerSpec

OK = OUTCOMES.index("ok")


def test_a_request_group_survives_the_wire():
    g = RequestGroup.of([7, 8, 2**40], [0, 3, 1], [5, 0, 9])
    back = RequestGroup.from_bytes(g.to_bytes())
    assert back.rows.dtype == np.int64 and np.array_equal(back.rows, g.rows)
    assert len(RequestGroup.from_bytes(RequestGroup.of([], [], []).to_bytes())) == 0


def test_a_result_group_survives_the_wire_with_errors_nans_and_state():
    rows = np.arange(3 * len(RESULT_COLS), dtype=np.float64).reshape(3, len(RESULT_COLS)) / 7
    rows[1, 4] = math.nan
    state = WorkerState(1, 2, 3, 4 << 33, 5, 6, 7 << 30, 9 << 30)
    res = ResultGroup(rows, {1: "model 'x': cannot load /m/x.params: bad magic"}, state)
    back = ResultGroup.from_bytes(res.to_bytes())
    assert np.array_equal(back.rows, rows, equal_nan=True)
    assert back.errors == res.errors and back.state == state
    empty = ResultGroup.from_bytes(ResultGroup(np.zeros((0, len(RESULT_COLS)))).to_bytes())
    assert len(empty) == 0 and empty.errors == {} and empty.state == WorkerState()


def test_memory_is_the_device_s_on_a_gpu_and_the_rss_on_the_host():
    """A CPU worker has no device memory (-1: not exported); the host figure is this process's RSS."""
    from cortexbench.machine import device_memory_bytes, host_memory_bytes

    assert device_memory_bytes("cpu") == -1
    rss = host_memory_bytes()
    status = Path("/proc/self/status").read_text()
    vm_rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
    assert rss > 10e6 and abs(rss - vm_rss) < 0.05 * vm_rss


def test_many_callers_at_once_each_get_their_own_images_timed(tmp_path: Path, image_dir: Path):
    """As a threaded actor's calls arrive: several threads in run() at once over fewer lanes."""
    from cortexbench.images.dataset import list_images

    export_null(tmp_path)
    spec = WorkerSpec(name="w", device="cpu", backend="onnxruntime", model_dir=str(tmp_path),
                      models=("null:0.002",), images=tuple(str(p) for p in list_images(image_dir)), lanes=2,
                      image_pool=2)
    w = ModelWorker(spec, backend=_NullBackend())
    w.set_mode("cached")
    results: dict[int, ResultGroup] = {}

    def caller(k: int) -> None:
        results[k] = w.run(RequestGroup.of(range(10 * k, 10 * k + 5), [0] * 5, range(5)))

    try:
        threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(results) == list(range(6))
        for k, res in results.items():
            assert res.rows[:, 0].tolist() == list(range(10 * k, 10 * k + 5))
            assert (res.rows[:, 1] == OK).all() and (res.rows[:, 2] == 1).all()
            infer = res.rows[:, 3 + WORKER_STAGES.index("infer")]
            assert (infer >= 0.002).all()  # each image ran on its own for its service time
            assert (res.rows[:, 3:] >= 0).all()
        assert w.state().hits_total == 30 and w.state().inflight == 0
    finally:
        w.close()


class _NullBackend:
    """The null model without importing a framework."""

    name = "onnxruntime"

    def load(self, spec, model_dir, device, options=None):  # type: ignore[no-untyped-def]
        from cortexbench.models.backends.base import load_null

        return load_null(spec, Path(model_dir), device)

    def model_files(self, spec, model_dir):  # type: ignore[no-untyped-def]
        return []
