"""cortexbench.live: what the metrics say while a stream runs, folded from ledger rows (no Ray here)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cortexbench.driver import Progress as DriverProgress
from cortexbench.ledger import Ledger
from cortexbench.live import LiveView
from cortexbench.metrics_http import MetricsServer
from cortexbench.protocol import WorkerState

MODELS = ("a", "b")
WORKERS = ("cpu0", "cpu1")
LABELS = ("node-a/cpu0", "node-a/cpu1")
WARMUP = 4


def _rows(items: range, *, hit: int, input_s: float, load_s: float, outcome: str = "ok") -> Ledger:
    """Rows as a worker fills them: 0 for the stages it skipped (input and decode with inputs in memory;
    wait, read, build and copy when the model was resident)."""
    rows = Ledger(MODELS, WORKERS)
    for i in items:
        rows.add(i, i % 2, i, i % 2, outcome, hit=hit, scheduled_s=float(i), sent_s=i + 0.001, done_s=i + 0.1,
                 queue_s=0.01, input_s=input_s, decode_s=input_s, wait_s=0.0, read_s=load_s, build_s=load_s,
                 copy_s=load_s, infer_s=0.05, free_s=1e-6)
    return rows


def _progress(rows: Ledger, memory: int = -1) -> DriverProgress:
    states = {w: WorkerState(memory_bytes=memory, host_memory_bytes=1000 + i) for i, w in enumerate(WORKERS)}
    return DriverProgress("m", 0, 0, 0, 0, 0.0, rows, [2, 3], states, WORKERS)


def _view(server: MetricsServer | None = None, modes: int = 2) -> LiveView:
    return LiveView(MODELS, WORKERS, server=server, run_id="r", backend="x", quiet=True, host="node-a",
                    worker_labels=LABELS, modes=modes)


def _sum(view: LiveView, table: str, mode: str, phase: str) -> float:
    return sum(v if isinstance(v, int) else v.count for k, v in getattr(view.state, table).items()
               if k[0] == mode and k[1] == phase)


def test_warm_up_images_are_labelled_apart_from_the_measured_ones():
    view = _view()
    view.start_mode("cold", total=10, warmup=WARMUP)
    view.sending()
    assert view.state.phase == "warmup"
    view.fold(_progress(_rows(range(0, 3), hit=0, input_s=0.002, load_s=0.03)))
    assert view.state.phase == "warmup"  # no measured image yet
    view.fold(_progress(_rows(range(3, 10), hit=0, input_s=0.002, load_s=0.03)))
    assert view.state.phase == "measuring"
    assert (_sum(view, "images", "cold", "warmup"), _sum(view, "images", "cold", "measured")) == (4, 6)
    assert (_sum(view, "latency", "cold", "warmup"), _sum(view, "latency", "cold", "measured")) == (4, 6)
    assert view.hist.count == 6  # the progress line's percentiles: measured images only, as the report
    # cold: every image loaded its model; the loads follow the images' phases
    assert (_sum(view, "model_loads", "cold", "warmup"), _sum(view, "model_loads", "cold", "measured")) == (4, 6)
    assert not view.state.cache_hits
    assert view.state.stage[("cold", "measured", "read")].count == 6
    assert ("cold", "measured", "wait") not in view.state.stage  # no wait: not observed
    assert {k[1] for k in view.state.images} == {"warmup", "measured"}
    assert {k[3] for k in view.state.images} == set(LABELS)  # worker names unique across hosts


def test_stages_that_did_not_happen_are_not_observed_and_the_preload_counts_as_loads():
    view = _view()
    view.start_mode("cached", total=6, warmup=0)
    view.add_preload(len(MODELS))
    view.sending()
    assert view.state.phase == "measuring"
    view.fold(_progress(_rows(range(6), hit=1, input_s=0.0, load_s=0.0)))
    stages = {k[2]: h.count for k, h in view.state.stage.items()}
    assert not {"input", "decode", "wait", "read", "build", "copy"} & set(stages)  # in memory, resident
    assert stages["infer"] == stages["queue"] == stages["send_delay"] == stages["transport"] == 6
    assert view.state.model_loads == {("cached", "setup", w): len(MODELS) for w in LABELS}
    assert _sum(view, "cache_hits", "cached", "measured") == 6


def test_failed_images_are_counted_but_not_timed():
    view = _view()
    view.start_mode("cold", total=4, warmup=0)
    view.sending()
    view.fold(_progress(_rows(range(4), hit=-1, input_s=0.002, load_s=0.0, outcome="model_error")))
    assert _sum(view, "images", "cold", "measured") == 4
    assert not view.state.latency and not view.state.stage and not view.state.model_loads


def test_progress_is_given_per_mode_and_over_the_run():
    view = _view(modes=2)
    view.start_mode("cached", total=10, warmup=0)
    view.sending()
    view.fold(_progress(_rows(range(5), hit=1, input_s=0.0, load_s=0.0)))
    assert (view.state.mode_progress_ratio, view.state.progress_ratio) == (0.5, 0.25)
    view.close_mode()
    assert (view.state.mode_progress_ratio, view.state.progress_ratio) == (1.0, 0.5)
    view.start_mode("cold", total=10, warmup=0)
    assert view.state.phase == "preparing" and view.state.mode == "cold"
    view.sending()
    view.fold(_progress(_rows(range(2), hit=0, input_s=0.002, load_s=0.03)))
    assert view.state.mode_progress_ratio == 0.2 and view.state.progress_ratio == pytest.approx(0.6)
    view.finish()
    assert (view.state.progress_ratio, view.state.phase) == (1.0, "done")


def test_device_memory_only_for_workers_that_have_a_device_and_host_memory_for_all():
    view = _view()
    view.start_mode("cached", total=2, warmup=0)
    view.fold(_progress(Ledger(MODELS, WORKERS), memory=-1))
    assert view.state.device_memory_bytes == {}
    assert view.state.host_memory_bytes == {"node-a/cpu0": 1000, "node-a/cpu1": 1001}
    assert view.state.inflight == {"node-a/cpu0": 2, "node-a/cpu1": 3}
    view.fold(_progress(Ledger(MODELS, WORKERS), memory=5 << 30))
    assert view.state.device_memory_bytes == {"node-a/cpu0": 5 << 30, "node-a/cpu1": 5 << 30}


def test_the_server_shows_the_run_phase_from_the_first_fold_to_done():
    with MetricsServer(0) as server:
        view = _view(server)

        def phase() -> str:
            text = httpx.get(server.url, timeout=5.0).text
            (fam,) = [f for f in text_string_to_metric_families(text) if f.name == "cortexbench_run_phase"]
            (on,) = [s.labels["phase"] for s in fam.samples if s.value == 1]
            return on

        assert phase() == "preparing"
        view.start_mode("cold", total=6, warmup=2)
        view.sending()
        assert phase() == "warmup"
        view.fold(_progress(_rows(range(6), hit=0, input_s=0.002, load_s=0.03)))
        assert phase() == "measuring"
        view.finish()
        assert phase() == "done"
