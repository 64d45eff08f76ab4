"""``--sweep lru:K,...``: its passes, its table and picture, and on real Ray workers: each capacity's hit ratio
equals a replay of the seeded model sequence through a reference LRU of that capacity."""

from __future__ import annotations

import json

import pytest

from cortexbench.config import Config, StreamConfig, load_config
from cortexbench.errors import ConfigError
from cortexbench.schedule import make_schedule
from cortexbench.sweep import (
    parse_sweep,
    plot_cache_sweep,
    render_markdown,
    resident,
    sweep_modes,
    sweep_table,
)
from tests.fakes import reference_lru_hits


def test_parse_sweep_and_its_passes():
    assert parse_sweep("lru:8,1,2,4,2") == (1, 2, 4, 8) and parse_sweep(" LRU:3 ") == (3,)
    for bad in ("lru:", "lru:0,1", "lru:a", "fifo:1,2", "1,2,4", "lru:1,,2"):
        with pytest.raises(ConfigError, match=rf"^'stream.sweep': '{bad}' is not a sweep: use lru:K,K,... with "
                                              r"capacities of 1 or more, as in 'lru:1,2,4,8'$"):
            parse_sweep(bad)
    assert sweep_modes("lru:4,1", ("cached", "swap", "cold", "lru:2")) == ("cold", "swap", "lru:1", "lru:4", "cached")
    assert sweep_modes("lru:2", ("lru:3",)) == ("lru:2",)
    assert [resident(m, 4) for m in ("cold", "swap", "lru:2", "lru:9", "cached")] == [0, 0, 2, 4, 4]


def test_config_checks_the_sweep_and_names_the_flag():
    flags = {"stream.sweep": "--sweep"}
    assert load_config(None, {"stream.sweep": "lru:1,2"}, has_gpu=False, flags=flags).stream.sweep == "lru:1,2"
    with pytest.raises(ConfigError, match=r"^--sweep: 'stream.sweep': 'lru' is not a sweep"):
        load_config(None, {"stream.sweep": "lru"}, has_gpu=False, flags=flags)
    with pytest.raises(ConfigError, match=r"'stream.sweep' and 'stream.find_peak' both set"):
        load_config(None, {"stream.sweep": "lru:1", "stream.find_peak": True, "stream.slo": ["p99=5ms"]},
                    has_gpu=False)


def _summary(hit: float, tput: float, p99: float) -> dict:
    return {"summary": {"hit_ratio": hit, "throughput_images_per_s": tput, "loads": 3, "counted_ok": 100,
                        "latency": {"mean_s": p99 / 3, "p50_s": p99 / 4, "p99_s": p99}}}


def test_the_table_report_and_picture_of_a_sweep(tmp_path):
    modes = {"cold": _summary(0.0, 50.0, 0.05), "lru:1": _summary(0.3, 80.0, 0.04),
             "lru:2": _summary(0.6, 120.0, 0.03), "cached": _summary(1.0, 200.0, 0.01)}
    rows = sweep_table(modes, 4)
    assert [(r["mode"], r["resident"], r["hit_ratio"]) for r in rows] == [
        ("cold", 0, 0.0), ("lru:1", 1, 0.3), ("lru:2", 2, 0.6), ("cached", 4, 1.0)]
    md = render_markdown(rows, "lru:1,2")
    assert "## Cache sweep" in md and "| lru:2 | 2 | 60.0% |" in md and "cache_sweep.png" in md
    png = plot_cache_sweep(rows, tmp_path / "cache_sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


MODELS = ("null", "digits_cnn", "mnist_cnn", "mlp2")


@pytest.mark.ray
def test_a_sweeps_hit_ratios_equal_a_reference_lru_replay(ray_session, model_dir, image_dir, tmp_path):
    """One worker, one image in flight (the worker sees the schedule's order), Zipf popularity: each lru:K's
    hit ratio over the counted images is the reference LRU's over the same seeded sequence; cold and cached
    are the ends (0 and 1)."""
    from cortexbench.coordinator import run_stream

    count, warmup = 150, 10
    cfg = Config(models=MODELS, model_dir=model_dir, img_dir=image_dir, result_dir=tmp_path, times=count, seed=3,
                 stream=StreamConfig(modes=("cached", "cold"), sweep="lru:1,2,3", popularity="zipf:1.1",
                                     concurrency=1, warmup=warmup, cpu_workers=1, lanes=1, metrics_port=0,
                                     records="none"))
    run_dir = run_stream(cfg, quiet=True)
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["modes"]) == ["cold", "lru:1", "lru:2", "lru:3", "cached"] and results["complete"]
    sched = make_schedule(count=count, models=MODELS, n_images=8, popularity="zipf:1.1", warmup=warmup, seed=3)
    names = [MODELS[m] for m in sched.model_idx]
    rows = {r["mode"]: r for r in results["sweep"]["rows"]}
    for k in (1, 2, 3):
        hits = reference_lru_hits(names, k) - reference_lru_hits(names[:warmup], k)
        assert rows[f"lru:{k}"]["hit_ratio"] == pytest.approx(hits / count, abs=1e-12), k
        assert rows[f"lru:{k}"]["resident"] == k
    assert rows["cold"]["hit_ratio"] == 0.0 and rows["cached"]["hit_ratio"] == 1.0
    assert rows["lru:1"]["hit_ratio"] < rows["lru:2"]["hit_ratio"] < rows["lru:3"]["hit_ratio"] < 1.0
    assert (run_dir / "cache_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Cache sweep" in (run_dir / "report.md").read_text()
