"""report/compare.py on plain results dicts: keys per kind, means and spreads over repeats, ratios to the
first run, the config keys that differ, the command line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cortexbench.report.compare import Run, command, compare, config_differences, figures, run_figures
from cortexbench.stats import relative_spread


def _stream(tput: float, p99: float, config: dict | None = None, peak: float | None = None) -> dict:
    lat = {"mean_s": p99 / 3, "p50_s": p99 / 4, "p90_s": p99 / 2, "p99_s": p99}
    doc = {"kind": "stream", "config": config or {"stream": {"lanes": 1}},
           "modes": {"cached": {"summary": {"throughput_images_per_s": tput, "latency": lat}},
                     "cold": {"summary": {"throughput_images_per_s": tput / 2, "latency": {"p99_s": None}}}}}
    if peak is not None:
        doc["peak"] = {"cached": {"peak_rate": peak}}
    return doc


def _single(tput: float, spread: float) -> dict:
    lat = {"mean": 1 / tput, "p50": 0.9 / tput, "p90": 1.2 / tput, "p99": 2 / tput}
    return {"kind": "single", "points": [{"model": "mlp2", "device": "cpu", "batch_size": 4, "rel_spread": spread,
                                          "throughput_images_per_s": tput, "image_latency_s": lat}]}


def _run(label: str, *docs: dict) -> Run:
    return Run(label, Path(label), tuple(Path(f"{label}/{i}") for i in range(len(docs))), docs)


def test_figures_are_keyed_by_pass_for_stream_and_by_point_for_single():
    f = figures(_stream(100.0, 0.03, peak=95.0))
    assert list(f) == ["cached", "cold"] and f["cached"]["peak_rate"] == 95.0 and f["cached"]["p99_s"] == 0.03
    assert math.isnan(f["cold"]["p99_s"])  # null in results.json: not a figure
    assert figures(_single(500.0, 0.02)) == {"mlp2 cpu b4": {
        "images_per_s": 500.0, "mean_s": 1 / 500, "p50_s": 0.9 / 500, "p90_s": 1.2 / 500, "p99_s": 2 / 500,
        "rel_spread": 0.02}}


def test_repeats_give_the_mean_and_its_confidence_spread_and_a_single_point_its_own():
    run = _run("a", _stream(100.0, 0.03), _stream(110.0, 0.05), _stream(90.0, 0.04))
    f = run_figures(run)["cached"]
    assert f["images_per_s"].value == pytest.approx(100.0) and f["images_per_s"].repeats == 3
    assert f["images_per_s"].spread == pytest.approx(relative_spread([100.0, 110.0, 90.0]))
    assert f["p99_s"].spread == pytest.approx(relative_spread([0.03, 0.05, 0.04]))
    assert "p99_s" not in run_figures(run)["cold"]  # never measured: no figure, not a zero
    one = run_figures(_run("s", _single(500.0, 0.02)))["mlp2 cpu b4"]
    assert one["images_per_s"].spread == 0.02 and one["p99_s"].spread is None  # timed calls: the mean's spread
    two = run_figures(_run("s", _single(500.0, 0.02), _single(520.0, 0.5)))["mlp2 cpu b4"]
    assert two["images_per_s"].spread == pytest.approx(relative_spread([500.0, 520.0]))


def test_ratios_are_against_the_first_run_and_only_where_it_has_the_key():
    base = _run("base", _stream(100.0, 0.04), _stream(100.0, 0.04))
    new = _run("new", _stream(150.0, 0.02))
    extra = _run("extra", {**_stream(50.0, 0.08), "modes": {"lru:2": _stream(60.0, 0.1)["modes"]["cached"]}})
    rows = compare([base, new, extra])
    by = {(r.key, r.run): r for r in rows}
    assert [(r.key, r.run) for r in rows] == [("cached", "base"), ("cached", "new"), ("cold", "base"),
                                              ("cold", "new"), ("lru:2", "extra")]
    assert by["cached", "base"].ratios["images_per_s"] == 1.0
    assert by["cached", "new"].ratios["images_per_s"] == pytest.approx(1.5)
    assert by["cached", "new"].ratios["p99_s"] == pytest.approx(0.5)
    assert by["lru:2", "extra"].ratios == {}  # the baseline has no lru:2


def test_the_config_keys_that_differ_and_the_command_line():
    a = _run("a", _stream(1, 1, {"result_dir": "r1", "stream": {"lanes": 1, "metrics_port": 8000, "sweep": ""}}))
    b = _run("b", _stream(1, 1, {"result_dir": "r2", "stream": {"lanes": 2, "metrics_port": 0, "sweep": ""}}))
    assert config_differences([a, b]) == [("stream.lanes", ["1", "2"])]
    assert command(["/x/cortexbench/stream.py", "--lanes", "2"]) == "python -m cortexbench.stream --lanes 2"
    assert command(["/x/cortexbench/report/__main__.py", "a"]) == "python -m cortexbench.report a"
    assert command(["/usr/bin/cortexbench", "stream"]) == "/usr/bin/cortexbench stream" and command([]) == ""
