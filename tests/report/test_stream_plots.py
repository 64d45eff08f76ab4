"""stream_plots: every figure is written as a real PNG, also for a mode without a successful image."""

from __future__ import annotations

import matplotlib.image as mpimg

from cortexbench.report.stream_plots import plot_all
from tests.report.test_stream_report import make_results, mode_summary
from tests.report.test_stream_summary import make_ledger

NAMES = ["latency_cdf.png", "per_model_latency.png", "timeline.png", "worker_balance.png", "stage_breakdown.png"]


def check_pngs(paths, out_dir):
    assert [p.name for p in paths] == NAMES
    for p in paths:
        assert p.parent == out_dir
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600 and img.shape[2] in (3, 4)
        assert img[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_plots_with_a_zero_ok_mode(tmp_path):
    ledgers = {"cached": make_ledger(3000, latency_scale_s=0.003),
               "cold": make_ledger(1500, latency_scale_s=0.1, rate_per_s=50.0),
               "lru:2": make_ledger(400, failed_every=1)}
    modes = {m: mode_summary(m, led) for m, led in ledgers.items()}
    paths = plot_all(make_results(modes), ledgers, tmp_path, 100)
    check_pngs(paths, tmp_path)


def test_plots_when_no_mode_succeeded(tmp_path):
    ledgers = {"cold": make_ledger(300, failed_every=1)}
    paths = plot_all(make_results({"cold": mode_summary("cold", ledgers["cold"])}), ledgers, tmp_path / "out", 100)
    check_pngs(paths, tmp_path / "out")


def test_every_stage_has_a_colour_of_its_own():
    from cortexbench.report.stream_plots import STAGE_COLOURS
    from cortexbench.report.stream_summary import STAGES

    assert len(set(STAGE_COLOURS[:len(STAGES)])) == len(STAGES)
