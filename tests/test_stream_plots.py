"""The stream's figures draw the right columns: what is drawn is read back from each figure and checked
against the ledgers it came from (not only that a PNG was written)."""

from __future__ import annotations

import numpy as np
import pytest

from cortexbench.ledger import Ledger
from cortexbench.report import stream_plots
from cortexbench.report.stream_summary import histograms, summarize_mode

MODELS = ("squeeze", "nin")
WORKERS = ("w0", "w1", "w2")
WARMUP = 20


def _ledger(seed: int, infer_s: float) -> Ledger:
    """300 images (20 warm-up): latencies that differ per model, a few failures, uneven workers."""
    rng = np.random.default_rng(seed)
    n = 300
    model = rng.integers(0, 2, n)
    worker = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    outcome = np.where(rng.random(n) < 0.05, 2, 0)
    scheduled = np.arange(n) * 0.01
    sent = scheduled + rng.uniform(0, 2e-4, n)
    lat = np.where(model == 0, 1.0, 3.0) * infer_s + rng.exponential(1e-3, n)
    led = Ledger(MODELS, WORKERS)
    led.add_many(item=np.arange(n), model_idx=model, image_idx=0, worker=worker, outcome=outcome, hit=1,
                 scheduled_s=scheduled, sent_s=sent, done_s=scheduled + lat, queue_s=5e-4, infer_s=infer_s)
    return led


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory):
    ledgers = {"cached": _ledger(0, 0.004), "cold": _ledger(1, 0.02)}
    modes = {m: summarize_mode(m, led, histograms(led, WARMUP), warmup=WARMUP, sent=len(led), not_sent=0,
                               retries=0, cancelled=0) for m, led in ledgers.items()}
    figures = {}
    save = stream_plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    mp = pytest.MonkeyPatch()
    mp.setattr(stream_plots, "_save", keep)
    try:
        out = tmp_path_factory.mktemp("plots")
        paths = stream_plots.plot_all({"modes": modes}, ledgers, out, WARMUP)
    finally:
        mp.undo()
    assert sorted(p.name for p in paths) == sorted(figures)
    assert all(p.stat().st_size > 0 for p in paths)
    return ledgers, modes, figures


def _counted_ok(led: Ledger) -> np.ndarray:
    return (led.column("item") >= WARMUP) & (led.column("outcome") == 0)


def test_the_cdf_draws_every_successful_counted_latency_of_each_mode(drawn):
    ledgers, _, figures = drawn
    ax = figures["latency_cdf.png"].axes[0]
    for mode, led in ledgers.items():
        (line,) = [ln for ln in ax.lines if ln.get_label().startswith(f"{mode}: p50")]
        lat = np.sort(led.column("latency_s")[_counted_ok(led)])
        n = lat.size
        np.testing.assert_allclose(line.get_xdata(), lat * 1e3)
        np.testing.assert_allclose(line.get_ydata(), np.arange(1, n + 1) / n * 100)
        assert f"({n:,} images)" in line.get_label()


def test_per_model_bars_are_each_models_p50(drawn):
    ledgers, modes, figures = drawn
    ax = figures["per_model_latency.png"].axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == len(MODELS) * len(ledgers)  # one bar per model and mode, in mode order
    for j, (mode, led) in enumerate(ledgers.items()):
        ok = _counted_ok(led)
        for i, model in enumerate(MODELS):
            p50 = modes[mode]["per_model"][model]["latency"]["p50_s"] * 1e3
            assert heights[j * len(MODELS) + i] == pytest.approx(p50)
            lat = led.column("latency_s")[ok & (led.column("model_idx") == i)]
            assert p50 == pytest.approx(np.percentile(lat, 50, method="inverted_cdf") * 1e3, rel=2e-3)


def test_worker_balance_bars_count_each_workers_counted_images(drawn):
    ledgers, _, figures = drawn
    axes = figures["worker_balance.png"].axes
    for ax, (mode, led) in zip(axes, ledgers.items(), strict=True):
        counted = led.column("item") >= WARMUP
        expect = np.bincount(led.column("worker")[counted], minlength=len(WORKERS))
        assert [p.get_height() for p in ax.patches] == expect.tolist()
        (mean,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert mean.get_ydata()[0] == pytest.approx(expect.mean())
        assert ax.get_title(loc="left").startswith(mode)


def test_stage_breakdown_bars_are_the_mean_stage_times(drawn):
    ledgers, modes, figures = drawn
    left = figures["stage_breakdown.png"].axes[0]
    stages = [s for s in stream_plots.STAGES if s in modes["cached"]["stages"]]
    assert {"queue", "infer", "send_delay"} <= set(stages)
    bars = left.patches  # stage by stage, one bar per mode
    for k, stage in enumerate(stages):
        for j, (mode, led) in enumerate(ledgers.items()):
            width = bars[k * len(ledgers) + j].get_width()
            assert width == pytest.approx(modes[mode]["stages"][stage]["mean_s"] * 1e3)
            if stage == "infer":
                assert width == pytest.approx(led.column("infer_s")[0] * 1e3, rel=2e-3)
            if stage == "send_delay":
                ok = _counted_ok(led)
                delay = (led.column("sent_s") - led.column("scheduled_s"))[ok]
                assert width == pytest.approx(delay.mean() * 1e3, rel=5e-3)


def test_the_timeline_draws_the_throughput_of_each_window(drawn):
    ledgers, modes, figures = drawn
    top = figures["timeline.png"].axes[0]
    for mode, led in ledgers.items():
        (line,) = [ln for ln in top.lines if ln.get_label().startswith(mode)]
        tl = modes[mode]["timeline"]
        np.testing.assert_allclose(line.get_ydata(), tl["images_per_s"])
        assert sum(tl["count"]) == int(_counted_ok(led).sum())
