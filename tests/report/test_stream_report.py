"""stream_report: report.md and the console summary from a results dict built from synthetic ledgers."""

from __future__ import annotations

import json

import pytest

from cortexbench.report.stream_report import console_summary, ms, render_markdown, warnings
from cortexbench.report.stream_summary import compare_modes, histograms, summarize_mode
from cortexbench.results import to_jsonable
from tests.report.test_stream_summary import WORKERS, make_ledger


def mode_summary(mode: str, led, warmup: int = 100, **kw):
    args = {"sent": len(led), "not_sent": 0, "retries": 0, "cancelled": 0} | kw
    return summarize_mode(mode, led, histograms(led, warmup), warmup=warmup, **args)


def make_results(modes: dict, *, complete: bool = True, planned: tuple[str, ...] = ("cached", "cold")) -> dict:
    return {
        "schema_version": 1, "kind": "stream", "complete": complete,
        "config": {"models": ["alexnet", "resnet18", "vgg16"], "stream": {"modes": list(planned)}},
        "machine": {"cpu_model": "Test CPU", "usable_cores": 2, "memory_bytes": 24e9,
                    "gpus": [{"index": i, "name": "NVIDIA H200", "memory_bytes": 1} for i in range(4)]},
        "modes": modes, "comparison": compare_modes(modes),
        "workers": [{"name": w, "device": f"cuda:{i}", "node": "node-a"} for i, w in enumerate(WORKERS)],
        "run": {"dispatch": "grouped", "drivers": 1, "balancer": "least-outstanding", "loop": "closed",
                "concurrency": 64, "rate": None, "images": 4000, "warmup": 100, "popularity": "uniform",
                "metrics_port": 8000},
    }


@pytest.fixture(scope="module")
def good() -> dict:
    modes = {"cached": mode_summary("cached", make_ledger(4000, latency_scale_s=0.003)),
             "cold": mode_summary("cold", make_ledger(4000, latency_scale_s=0.1, rate_per_s=100.0))}
    return make_results(modes)


def test_ms_keeps_three_significant_digits():
    assert ms(0.00316) == "3.16"
    assert ms(0.1133) == "113"
    assert ms(0.0000456) == "0.0456"
    assert ms(1.23456) == "1235"
    assert ms(None) == ms(float("nan")) == "–"


def test_markdown_has_the_tables_and_no_warnings_for_a_clean_run(good):
    md = render_markdown(good)
    for heading in ("## Summary per mode", "## Modes against cached", "## Mode cached", "## Mode cold",
                    "### Per model", "### Per worker", "### Where the time goes", "## Warnings",
                    "## How to read this"):
        assert heading in md
    assert "| mode | sent | ok | failed | throughput (img/s) | mean (ms) | p50 (ms) | p90 (ms) | p99 (ms) |" in md
    cached = good["modes"]["cached"]["summary"]["latency"]
    assert f"| {ms(cached['p99_s'])} |" in md
    assert "| cold / cached |" in md
    assert "3.16" in md and "113.3" in md and "not measured on this machine" in md
    assert "Test CPU" in md and "NVIDIA H200" in md and "closed loop, 64 images in flight" in md
    assert "| gpu0 | cuda:0 |" in md and "Imbalance" in md
    assert "| infer |" in md and "| transport |" in md
    assert warnings(good) == []
    assert "Partial run" not in md


def test_warnings_for_few_samples_late_sends_failures_and_partial_run():
    few = mode_summary("cached", make_ledger(300), warmup=100)  # 200 counted
    late = mode_summary("cold", make_ledger(2000, late_every=10, failed_every=50), not_sent=3, cancelled=2)
    res = make_results({"cached": few, "cold": late}, complete=False, planned=("cached", "cold", "lru:2"))
    md = render_markdown(res)
    assert "**Partial run**" in md and "modes not run: lru:2" in md
    assert "cached: p99 rests on 200 samples" in md
    assert "p99 (ms)" in md and "(few)" in md
    assert "the driver could not keep the schedule; the latency includes its lateness" in md
    assert "cold: 10.0% of images were sent more than 1 ms after" in md
    assert "cold: 40 image(s) failed (model_error 40)" in md
    assert "3 image(s) were scheduled but never sent" in md and "2 image(s) were cancelled" in md
    assert "p99 on 66 samples" in md  # per-model flag
    text = console_summary(res)
    assert "warning(s), see report.md" in text


def test_a_mode_without_successful_images_renders(good):
    dead = mode_summary("lru:2", make_ledger(500, failed_every=1))
    res = make_results(dict(good["modes"]) | {"lru:2": dead})
    md = render_markdown(res)
    assert "lru:2: no image succeeded after the warm-up" in md
    assert "| lru:2 / cached |" in md


def test_renders_the_same_after_a_json_round_trip(good):
    back = json.loads(json.dumps(to_jsonable(good), allow_nan=False))
    assert render_markdown(back) == render_markdown(good)
    assert console_summary(back) == console_summary(good)


def test_console_summary_is_compact(good):
    text = console_summary(good)
    lines = text.strip().splitlines()
    assert lines[0].split()[:5] == ["mode", "sent", "ok", "failed", "img/s"]
    assert lines[2].startswith("cached") and lines[3].startswith("cold")
    ratio = good["comparison"]["cold_over_cached_mean"]
    assert any(line.startswith("cold/cached: mean") and f"{ratio:.3g}" in line and "35.9×" in line for line in lines)
    assert len(lines) <= 6


def test_no_modes_at_all():
    res = make_results({}, complete=False)
    assert "No mode finished." in render_markdown(res)
    assert "no mode finished" in console_summary(res)
