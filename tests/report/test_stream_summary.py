"""stream_summary: histograms of a ledger, one mode's figures, and modes against cached, on synthetic ledgers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cortexbench.ledger import OUTCOME_CODE, WORKER_STAGES, Ledger
from cortexbench.report.stream_summary import (
    REFERENCE,
    STAGES,
    compare_modes,
    histograms,
    summarize_mode,
)

MODELS = ("alexnet", "resnet18", "vgg16")
WORKERS = ("gpu0", "gpu1", "gpu2", "gpu3")
HDR = 1e-3  # HDR keeps 3 significant digits: relative error below 0.1%, plus 1 us of rounding


def make_ledger(n: int = 4000, *, seed: int = 0, failed_every: int = 0, late_every: int = 0,
                rate_per_s: float = 1000.0, workers: tuple[str, ...] = WORKERS,
                worker_of: np.ndarray | None = None, latency_scale_s: float = 0.005) -> Ledger:
    """A ledger of ``n`` images due every 1/rate s with known latencies and stage times.

    Per image: send delay 0.1 ms (2 ms for every ``late_every``-th), worker stages and transport each an
    equal share of the rest, so that the stages add up to the latency."""
    rng = np.random.default_rng(seed)
    item = np.arange(n)
    sched = item / rate_per_s
    lat = rng.lognormal(math.log(latency_scale_s), 0.6, n) + 0.003
    delay = np.full(n, 1e-4)
    if late_every:
        delay[::late_every] = 2e-3
    sent = sched + delay
    done = sched + lat
    per_stage = (lat - delay) / (len(WORKER_STAGES) + 1)  # the worker stages + transport
    stages = np.repeat(per_stage[:, None], len(WORKER_STAGES), axis=1)
    outcome = np.zeros(n, np.int8)
    if failed_every:
        outcome[::failed_every] = OUTCOME_CODE["model_error"]
        stages[::failed_every] = np.nan
    led = Ledger(models=MODELS, workers=workers, capacity=n)
    led.add_many(item=item, model_idx=item % len(MODELS), image_idx=item,
                 worker=worker_of if worker_of is not None else item % len(workers), outcome=outcome,
                 hit=np.where(item % 4 == 0, 0, 1), scheduled_s=sched, sent_s=sent, done_s=done, stages=stages)
    return led


def summarize(led: Ledger, hs=None, warmup: int = 100, **kw):
    hs = hs if hs is not None else histograms(led, warmup)
    args = {"sent": len(led), "not_sent": 0, "retries": 0, "cancelled": 0} | kw
    return summarize_mode("cached", led, hs, warmup=warmup, **args)


def counted_ok_latency(led: Ledger, warmup: int) -> np.ndarray:
    mask = (led.column("item") >= warmup) & (led.column("outcome") == 0)
    return led.column("latency_s")[mask]


def test_percentiles_match_numpy_within_hdr_precision():
    led = make_ledger(20_000)
    out = summarize(led)
    lat = counted_ok_latency(led, 100)
    got = out["summary"]["latency"]
    assert got["count"] == lat.size == 19_900
    for key, p in (("p50_s", 50), ("p90_s", 90), ("p99_s", 99), ("p999_s", 99.9)):
        want = float(np.percentile(lat, p, method="inverted_cdf"))
        assert got[key] == pytest.approx(want, rel=HDR, abs=2e-6), key
    assert got["mean_s"] == pytest.approx(float(lat.mean()), rel=1e-12)
    assert got["min_s"] == pytest.approx(float(lat.min()), rel=1e-12)
    assert got["max_s"] == pytest.approx(float(lat.max()), rel=1e-12)


def test_histogram_keys_by_model_and_worker_and_stage():
    led = make_ledger(1200)
    hs = histograms(led, 0)
    lat_keys = {k for k in hs.keys() if k[0] == "latency"}
    assert lat_keys == {("latency", m, w) for m in MODELS for w in WORKERS}
    assert {k[1] for k in hs.keys() if k[0] == "stage"} == set(STAGES)
    # item % 3 is the model and item % 4 the worker: every (model, worker) pair gets 1200 / 12 images.
    assert all(hs.get(k).count == 100 for k in lat_keys)
    lat = led.column("latency_s")
    mask = (led.column("model_idx") == 1) & (led.column("worker") == 2)
    assert hs.get(("latency", "resnet18", "gpu2")).max_s == pytest.approx(float(lat[mask].max()))


def test_stages_add_up_to_the_latency():
    led = make_ledger(3000, late_every=7)
    out = summarize(led)
    stages = out["stages"]
    assert list(stages) == list(STAGES)
    assert sum(s["share"] for s in stages.values()) == pytest.approx(1.0, rel=1e-6)
    mask = led.column("item") >= 100
    delay = (led.column("sent_s") - led.column("scheduled_s"))[mask]
    assert stages["send_delay"]["mean_s"] == pytest.approx(float(delay.mean()), rel=1e-9)
    # transport = done - sent - sum(worker stages) = one share of (latency - delay) here
    lat = led.column("latency_s")[mask]
    share = len(WORKER_STAGES) + 1
    assert stages["transport"]["mean_s"] == pytest.approx(float(((lat - delay) / share).mean()), rel=1e-5)


def test_transport_is_clamped_at_zero():
    led = Ledger(models=MODELS, workers=WORKERS, capacity=4)
    # worker stages add up to more than done - sent (clock noise): transport must be 0, not negative
    led.add(0, 0, 0, 0, "ok", scheduled_s=0.0, sent_s=0.0, done_s=0.010, infer_s=0.012)
    hs = histograms(led, 0)
    assert hs.get(("stage", "transport")).max_s == 0.0


def test_warmup_rows_excluded():
    led = make_ledger(1000)
    lat = led.column("latency_s")
    lat[:300] = 5.0  # huge warm-up latencies: must not appear anywhere
    out = summarize(led, warmup=300)
    s = out["summary"]
    assert s["warmup_excluded"] == 300
    assert s["counted"] == s["counted_ok"] == 700
    assert s["latency"]["count"] == 700
    assert s["latency"]["max_s"] < 1.0
    assert s["images_sent"] == 1000 and s["ok"] == 1000  # the warm-up is still counted as sent and ok
    assert sum(out["timeline"]["count"]) == 700


def test_failed_rows_are_counted_but_not_in_latency():
    led = make_ledger(2000, failed_every=10)
    lat = led.column("latency_s")
    lat[led.column("outcome") != 0] = 50.0  # a failure's time must not leak into the latency
    out = summarize(led, warmup=0)
    s = out["summary"]
    assert s["failed"] == 200 and s["ok"] == 1800
    assert s["by_outcome"]["model_error"] == 200 and s["by_outcome"]["ok"] == 1800
    assert s["latency"]["count"] == 1800
    assert s["latency"]["max_s"] < 1.0
    per_model = out["per_model"]
    assert sum(m["failed"] for m in per_model.values()) == 200
    assert sum(m["latency"]["count"] for m in per_model.values()) == 1800
    assert sum(w["count"] for w in out["per_worker"].values()) == 2000


def test_throughput_over_the_counted_window():
    led = make_ledger(5000, rate_per_s=500.0)
    out = summarize(led, warmup=1000)
    s = out["summary"]
    sched, done = led.column("scheduled_s"), led.column("done_s")
    counted = led.column("item") >= 1000
    window = float(done[counted].max() - sched[counted].min())
    assert s["window_s"] == pytest.approx(window)
    assert s["throughput_images_per_s"] == pytest.approx(4000 / window)
    assert 480 < s["throughput_images_per_s"] < 500  # 500 images/s scheduled, a few ms of tail


def test_timeline_windows_sum_to_counted_ok_and_stay_small():
    led = make_ledger(6000, rate_per_s=10.0, failed_every=13)  # 600 s of run
    out = summarize(led, warmup=200)
    tl = out["timeline"]
    ok = counted_ok_latency(led, 200).size
    assert sum(tl["count"]) == ok == out["summary"]["counted_ok"]
    assert tl["window_s"] == pytest.approx(out["summary"]["window_s"] / 200)
    assert len(tl["t_s"]) <= 201
    assert len(tl["t_s"]) == len(tl["images_per_s"]) == len(tl["p50_s"]) == len(tl["p99_s"])
    full = np.array(tl["images_per_s"][1:-1])
    assert np.all(np.abs(full - 10 * 12 / 13) < 3)  # about 10 images/s less the failures
    # a window's p99 is the p99 of the latencies completing in it
    done = led.column("done_s")
    mask = (led.column("item") >= 200) & (led.column("outcome") == 0)
    t0 = led.column("scheduled_s")[led.column("item") >= 200].min()
    k = 50
    in_win = mask & (done - t0 >= tl["t_s"][k]) & (done - t0 < tl["t_s"][k] + tl["window_s"])
    lat = led.column("latency_s")[in_win]
    assert tl["p99_s"][k] == pytest.approx(float(np.percentile(lat, 99, method="inverted_cdf")))


def test_short_run_uses_one_second_windows():
    led = make_ledger(3000, rate_per_s=1000.0)  # 3 s of run
    tl = summarize(led)["timeline"]
    assert tl["window_s"] == 1.0
    assert len(tl["t_s"]) == 3 or len(tl["t_s"]) == 4


def test_imbalance_and_shares():
    n = 1000
    worker_of = np.zeros(n, np.int64)
    worker_of[500:] = 1
    worker_of[800:] = 2
    worker_of[900:] = 3  # counts 500, 300, 100, 100
    led = make_ledger(n, worker_of=worker_of)
    out = summarize(led, warmup=0)
    assert out["imbalance"] == pytest.approx(500 / 250 - 1)
    pw = out["per_worker"]
    assert [pw[w]["count"] for w in WORKERS] == [500, 300, 100, 100]
    assert pw["gpu0"]["share"] == pytest.approx(0.5)
    assert pw["gpu0"]["hit_ratio"] == pytest.approx(0.75)  # every 4th image is a miss


def test_hit_ratio_late_sends_and_loads():
    led = make_ledger(4000, late_every=20)
    out = summarize(led, warmup=0, worker_states={w: {"loads_total": 7} for w in WORKERS})
    s = out["summary"]
    assert s["hit_ratio"] == pytest.approx(0.75)
    assert s["late_share"] == pytest.approx(1 / 20)
    assert s["late_p99_s"] == pytest.approx(2e-3, rel=HDR)
    assert s["loads"] == 28
    assert summarize(led, warmup=0)["summary"]["loads"] == 1000  # from the ledger's misses without states


def test_few_samples_are_flagged():
    out = summarize(make_ledger(250), warmup=50)
    s = out["summary"]
    assert s["latency"]["count"] == 200
    assert s["p99_enough_samples"] is False
    assert "200" in s["p99_note"]
    assert all(not m["latency"]["p99_enough_samples"] for m in out["per_model"].values())
    big = summarize(make_ledger(2000))
    assert big["summary"]["p99_enough_samples"] is True and big["summary"]["p99_note"] is None


def test_merged_shard_histograms_equal_the_whole():
    led = make_ledger(3000)
    whole = histograms(led, 100)
    shards = [led.select(led.column("item") % 3 == i) for i in range(3)]
    merged = histograms(shards[0], 100)
    for sh in shards[1:]:
        merged.merge(histograms(sh, 100))
    assert summarize(led, merged)["summary"]["latency"] == summarize(led, whole)["summary"]["latency"]


def test_zero_ok_images_and_json_ready():
    led = make_ledger(500, failed_every=1)
    out = summarize(led)
    s = out["summary"]
    assert s["ok"] == 0 and s["latency"]["count"] == 0
    assert s["latency"]["p50_s"] is None and s["throughput_images_per_s"] == 0
    assert out["timeline"]["count"] == []
    json.dumps(out, allow_nan=False)  # no NaN, no numpy types
    empty = summarize(Ledger(MODELS, WORKERS), sent=0)
    assert empty["summary"]["rows"] == 0 and empty["imbalance"] is None
    json.dumps(empty, allow_nan=False)


def test_compare_modes_ratios_and_reference():
    cached = summarize(make_ledger(3000, latency_scale_s=0.003))
    cold = summarize(make_ledger(3000, latency_scale_s=0.1, rate_per_s=100.0))
    cmp = compare_modes({"cached": cached, "cold": cold, "lru:2": cached})
    c, k = cached["summary"], cold["summary"]
    assert cmp["cold_over_cached_mean"] == pytest.approx(k["latency"]["mean_s"] / c["latency"]["mean_s"])
    assert cmp["cold_over_cached_p50"] == pytest.approx(k["latency"]["p50_s"] / c["latency"]["p50_s"])
    assert cmp["cold_over_cached_p99"] == pytest.approx(k["latency"]["p99_s"] / c["latency"]["p99_s"])
    assert cmp["cold_over_cached_throughput"] == pytest.approx(
        k["throughput_images_per_s"] / c["throughput_images_per_s"])
    assert cmp["cold_over_cached_ms_per_image"] == pytest.approx(1 / cmp["cold_over_cached_throughput"])
    assert cmp["cold_over_cached_mean"] > 10
    assert cmp["ratios"]["lru:2"]["mean"] == pytest.approx(1.0)
    assert cmp["reference"]["cached_ms_per_image"] == 3.16 and cmp["reference"]["cold_ms_per_image"] == 113.3
    assert "113.3 ms per image" in REFERENCE["text"]
    json.dumps(cmp, allow_nan=False)


def test_compare_without_cached_says_so():
    cmp = compare_modes({"cold": summarize(make_ledger(400))})
    assert cmp["ratios"] == {} and "cached" in cmp["note"]
