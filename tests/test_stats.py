"""LatencyHistogram, HistogramSet and the small statistics: checked against numpy's exact answers."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest

from cortexbench.stats import (
    HIGHEST_S,
    HistogramSet,
    LatencyHistogram,
    LatencySummary,
    _Geometry,
    enough_samples,
    rate_per_s,
    relative_spread,
    samples_note,
    t_quantile_975,
)


def _same_summary(a: LatencySummary, b: LatencySummary) -> None:
    """Equal, but for the last bits of the mean (sums added in another order)."""
    assert dataclasses.replace(a, mean_s=0.0) == dataclasses.replace(b, mean_s=0.0)
    assert a.mean_s == pytest.approx(b.mean_s, rel=1e-12)


PS = [0.1, 1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9, 99.99]


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    n = 200_000
    return {
        "lognormal_3ms": rng.lognormal(np.log(3e-3), 0.6, n),
        "uniform_1_10ms": rng.uniform(1e-3, 10e-3, n),
        "exponential_20ms": rng.exponential(20e-3, n) + 50e-6,
        # 70% cached, 30% cold: no percentile asked for falls in the gap, where interpolation is meaningless
        "bimodal_cached_cold": np.concatenate([rng.normal(2e-3, 2e-4, n * 7 // 10), rng.normal(0.8, 0.05, n * 3 // 10)]),
        "wide_10us_to_30s": np.exp(rng.uniform(np.log(10e-6), np.log(30.0), n)),
    }


@pytest.fixture(scope="module")
def recorded() -> dict[str, tuple[np.ndarray, LatencyHistogram]]:
    out = {}
    for name, values in _distributions().items():
        h = LatencyHistogram()
        h.record_many(values)
        out[name] = (values, h)
    return out


def test_geometry_tables_match_the_hdr_package():
    h = LatencyHistogram()._hdr
    geo = _Geometry()  # a fresh one, not the cached tables (built before a mutation test forks)
    assert geo.counts_len == h.counts_len
    idx = np.arange(h.counts_len)
    lowest = [h.get_value_from_index(int(i)) for i in idx]
    assert np.array_equal(geo.lowest_us, lowest)
    highest = [h.get_highest_equivalent_value(v) for v in lowest[:: 7]]
    assert np.array_equal(geo.highest_us[:: 7], highest)
    values = np.array([0, 1, 2, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 4097, 5000, 99_999, 1_234_567,
                       99_999_999, 100_000_000], dtype=np.int64)
    rng = np.random.default_rng(0)
    values = np.concatenate([values, rng.integers(0, 100_000_001, 5000)])
    floors = geo.bucket_floor(values)
    assert floors.tolist() == [h.get_lowest_equivalent_value(int(v)) for v in values]
    assert [geo.index_of(int(v)) for v in values] == [h.get_counts_array_index(int(v)) for v in values]


def test_percentiles_within_hdr_precision_of_numpy(recorded):
    for name, (values, h) in recorded.items():
        got = h.percentiles(PS)
        exact = np.percentile(values, PS)
        for p, g, e in zip(PS, got, exact, strict=True):
            # 3 significant digits: the bucket is at most 1/1024 of its value wide; +0.5 us rounding
            assert abs(g - e) <= e * 1e-3 + 1e-6, (name, p, g, e)


def test_percentile_is_the_hdr_rank_rule_exactly(recorded):
    values, h = recorded["lognormal_3ms"]
    q = np.sort(np.floor(values * 1e6 + 0.5).astype(np.int64))
    geo = _Geometry()  # a fresh one, not the cached tables (built before a mutation test forks)
    for p in PS:
        target = max(1, int(p * len(q) / 100 + 0.5))
        expect_us = geo.highest_us[geo.index_of(int(q[target - 1]))]
        expect = min(max(expect_us / 1e6, values.min()), values.max())
        assert h.percentile(p) == expect
        lib = h._hdr.get_value_at_percentile(p) / 1e6  # the package's own (slow) answer
        assert h.percentile(p) == min(max(lib, values.min()), values.max())


def test_extremes_are_exact_and_nothing_is_above_the_max(recorded):
    for values, h in recorded.values():
        assert h.percentile(100) == values.max()
        assert h.percentile(0) == values.min()
        assert h.min_s == values.min() and h.max_s == values.max()
        assert h.count == len(values)
        assert h.sum_s == pytest.approx(values.sum(), rel=1e-12)
        assert h.mean_s == pytest.approx(values.mean(), rel=1e-12)
        assert max(h.percentiles(PS)) <= values.max()
    one = LatencyHistogram()
    one.record(0.0012345)  # HDR's bucket for it reaches 0.0012349
    assert one.percentiles([50, 99, 99.9]) == [0.0012345] * 3
    s = one.summary()
    assert s.p999_s == s.max_s == s.min_s == s.mean_s == 0.0012345


def test_record_and_record_many_agree_including_clamping_and_zero():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.lognormal(np.log(5e-3), 1.0, 3000), [0.0, 1e-9, 4e-7, 6e-7, 99.9, 150.0, 1e4]])
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in values.tolist():
        one.record(v)
    many.record_many(values[:1000])
    many.record_many(list(values[1000:]))
    many.record_many(np.array([]))
    assert one == many
    assert one.clamped_count == many.clamped_count == 2
    assert many.max_s == 1e4 and many.percentile(100) == 1e4
    # clamped values (150 s, 1e4 s) are only known to be above 100 s: they count from the max on
    assert many.cumulative_counts([HIGHEST_S * 0.5, HIGHEST_S * 2, 1e4]) == [len(values) - 3, len(values) - 2,
                                                                           len(values)]
    _same_summary(one.summary(), many.summary())


@pytest.mark.parametrize("bad", [-1e-9, math.nan, math.inf])
def test_bad_values_are_refused(bad):
    h = LatencyHistogram()
    with pytest.raises(ValueError, match="finite number of seconds"):
        h.record(bad)
    with pytest.raises(ValueError, match="finite number of seconds"):
        h.record_many(np.array([1e-3, bad, 2e-3]))
    assert h.count == 0
    with pytest.raises(ValueError, match="between 0 and 100"):
        h.percentile(100.5)


def test_merge_is_recording_both_sets():
    rng = np.random.default_rng(2)
    a_vals = rng.lognormal(np.log(2e-3), 0.5, 20_000)
    b_vals = rng.exponential(0.3, 5_000)
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    a.record_many(a_vals)
    b.record_many(b_vals)
    both.record_many(np.concatenate([a_vals, b_vals]))
    b_before = b.to_bytes()
    a.merge(b)
    assert a == both
    _same_summary(a.summary(), both.summary())
    assert b.to_bytes() == b_before  # the other side is unchanged
    empty = LatencyHistogram()
    empty.merge(a)
    assert empty == both
    a.merge(LatencyHistogram())
    assert a == both


def test_merge_keeps_the_values_clamped_above_the_top():
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    a.record_many([0.001, 150.0])
    b.record_many([0.002, 1e4, 200.0])
    both.record_many([0.001, 150.0, 0.002, 1e4, 200.0])
    a.merge(b)
    assert a.clamped_count == both.clamped_count == 3
    assert a == both and a.max_s == 1e4 and a.count == 5


def test_pickle_and_bytes_round_trip(recorded):
    values, h = recorded["bimodal_cached_cold"]
    data = h.to_bytes()
    assert len(data) < 16_000  # compact: 200K values in a few KB
    back = pickle.loads(pickle.dumps(h))
    assert back == h
    assert back.summary() == h.summary()
    assert back.cumulative_counts([1e-3, 0.01, 1.0]) == h.cumulative_counts([1e-3, 0.01, 1.0])
    back.record(5.0)  # a decoded histogram records like a fresh one
    assert back.count == h.count + 1 and back.max_s == max(5.0, values.max())
    empty = pickle.loads(pickle.dumps(LatencyHistogram()))
    assert empty.count == 0 and math.isnan(empty.percentile(50))
    with pytest.raises(ValueError, match="not a serialised"):
        LatencyHistogram.from_bytes(b"nonsense")
    with pytest.raises(ValueError, match="not a serialised"):
        LatencyHistogram.from_bytes(data[:40] + b"\x00" * 30)


def test_cumulative_counts_match_numpy(recorded):
    bounds = [5e-6, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, math.inf]
    for name, (values, h) in recorded.items():
        got = h.cumulative_counts(bounds)
        assert got == sorted(got) and got[-1] == len(values)
        for b, g in zip(bounds, got, strict=True):
            exact = int(np.count_nonzero(values <= b))
            # values within HDR's resolution of the bound may land on either side
            near = int(np.count_nonzero((values > b * (1 - 1 / 1024) - 1e-6) & (values <= b * (1 + 1 / 1024) + 1e-6)))
            assert abs(g - exact) <= near, (name, b, g, exact, near)


def test_cumulative_counts_exact_where_buckets_are_one_microsecond():
    rng = np.random.default_rng(3)
    values = rng.integers(1, 2000, 50_000) / 1e6  # whole microseconds below 2048 us: 1 us buckets
    h = LatencyHistogram()
    h.record_many(values)
    bounds = [0.0, 1e-6, 1e-4, 2.5e-4, 5e-4, 1e-3, 1.5e-3, 1.999e-3, 1.0]
    assert h.cumulative_counts(bounds) == [int(np.count_nonzero(values <= b)) for b in bounds]


def test_empty_histogram():
    h = LatencyHistogram()
    assert h.count == 0 and h.sum_s == 0.0
    assert all(math.isnan(x) for x in (h.min_s, h.max_s, h.mean_s, h.percentile(99)))
    s = h.summary()
    assert s.count == 0 and math.isnan(s.p99_s)
    assert h.cumulative_counts([0.1, math.inf]) == [0, 0]
    assert set(s.to_dict()) == {"count", "mean_s", "p50_s", "p90_s", "p99_s", "p999_s", "min_s", "max_s"}


def test_summary_fields():
    h = LatencyHistogram()
    h.record_many(np.arange(1, 1001) / 1000)  # 1 ms .. 1 s
    s = h.summary()
    assert isinstance(s, LatencySummary)
    assert s.count == 1000 and s.min_s == 0.001 and s.max_s == 1.0
    assert s.mean_s == pytest.approx(0.5005)
    assert s.p50_s == pytest.approx(0.5, rel=1e-3)
    assert s.p90_s == pytest.approx(0.9, rel=1e-3)
    assert s.p99_s == pytest.approx(0.99, rel=1e-3)
    assert s.p999_s == pytest.approx(0.999, rel=1e-3)
    with pytest.raises(AttributeError):
        s.count = 3  # type: ignore[misc]


def test_histogram_set_rollup_merge_and_pickle():
    rng = np.random.default_rng(4)
    hs = HistogramSet()
    raw: dict[tuple, list] = {}
    for mode in ("cached", "cold"):
        for model in ("vgg16", "nin"):
            for worker in range(3):
                vals = rng.lognormal(np.log(1e-3 if mode == "cached" else 0.2), 0.3, 500)
                if worker == 0:
                    for v in vals.tolist():
                        hs.record((mode, model, worker), v)
                else:
                    hs.record_many((mode, model, worker), vals)
                raw[(mode, model, worker)] = list(vals)
    assert len(hs) == 12 and ("cold", "nin", 2) in hs and hs.get(("x",)) is None
    per_mode = hs.rollup(lambda k: k[:1])
    assert sorted(per_mode.keys()) == [("cached",), ("cold",)]
    for mode in ("cached", "cold"):
        expect = LatencyHistogram()
        expect.record_many(np.concatenate([raw[k] for k in raw if k[0] == mode]))
        assert per_mode.get((mode,)) == expect
    assert hs.get(("cached", "vgg16", 1)).count == 500  # rollup left the source alone
    total = hs.total()
    assert total.count == 12 * 500
    back = pickle.loads(pickle.dumps(hs))
    assert back.keys() == hs.keys()
    assert all(back.get(k) == h for k, h in hs.items())
    other = HistogramSet()
    other.record(("cold", "nin", 2), 0.5)
    other.record(("new",), 0.5)
    back.merge(other)
    assert back.get(("cold", "nin", 2)).count == 501 and back.get(("new",)).count == 1
    assert hs.get(("cold", "nin", 2)).count == 500


def test_sample_helpers_and_rate():
    assert enough_samples(300) and not enough_samples(299)
    assert enough_samples(10, minimum=10)
    assert samples_note(300) is None
    assert samples_note(42) == "p99 rests on 42 samples; at least 300 are needed"
    assert samples_note(1, 1000, "p99.9") == "p99.9 rests on 1 sample; at least 1000 are needed"
    assert rate_per_s(500, 2.0) == 250.0
    assert math.isnan(rate_per_s(5, 0.0))


def test_relative_spread():
    assert relative_spread([9.0, 11.0]) == pytest.approx(12.706 / 10)  # t(1) * s/sqrt(2) / mean
    assert relative_spread([2.0, 2.0, 2.0]) == 0.0
    assert relative_spread([1.0]) == math.inf and relative_spread([]) == math.inf
    assert relative_spread([-1.0, 1.0]) == math.inf
    rng = np.random.default_rng(5)
    x = rng.normal(100.0, 10.0, 10_000)
    assert relative_spread(x) == pytest.approx(1.96 * x.std(ddof=1) / 100.0 / x.mean(), rel=1e-3)
    assert relative_spread(x[:10]) > relative_spread(x[:100]) > relative_spread(x)
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042]  # Student's t, 97.5%, df 1..30, to 3 decimals
    assert [t_quantile_975(df) for df in range(1, 31)] == table
    # beyond the table: the expansion against the exact quantiles (6 decimals), within its 1e-4 and better
    for df, t in [(31, 2.039513), (40, 2.021075), (60, 2.000298), (120, 1.979930), (1000, 1.962339),
                  (10**6, 1.959966)]:
        assert t_quantile_975(df) == pytest.approx(t, abs=2e-6)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_the_edges_are_exact():
    top, many = LatencyHistogram(), LatencyHistogram()
    top.record(HIGHEST_S)
    many.record_many([HIGHEST_S])
    assert top.clamped_count == many.clamped_count == 0  # 100 s is the top, not above it
    one = LatencyHistogram()
    one.record(0.003)
    assert one.cumulative_counts([0.001, 0.003, 0.01]) == [0, 1, 1]
    assert LatencyHistogram().cumulative_counts([0.001, 1.0]) == [0, 0]
    # a bound one microsecond below an HDR bucket edge (2**19 us) must not take the next bucket in
    edge = LatencyHistogram()
    edge.record_many([0.4, 0.524287, 0.5243, 0.6])
    assert edge.cumulative_counts([0.524287]) == [2]


def test_from_bytes_refuses_what_is_not_a_histogram():
    from hdrh.histogram import HdrHistogram

    from cortexbench.stats import _HEADER, _MAGIC

    empty = LatencyHistogram().to_bytes()
    assert LatencyHistogram.from_bytes(empty[:_HEADER.size]) == LatencyHistogram()  # the header is enough
    with pytest.raises(ValueError, match=r"^not a serialised LatencyHistogram \(too short\)$"):
        LatencyHistogram.from_bytes(empty[:_HEADER.size - 1])
    with pytest.raises(ValueError, match=r"^not a serialised LatencyHistogram \(header b'XXXX' v1\)$"):
        LatencyHistogram.from_bytes(b"XXXX" + empty[len(_MAGIC):])
    h = LatencyHistogram()
    h.record_many([0.001, 0.002])
    other = HdrHistogram(1, 1_000_000, 2, b64_wrap=False)  # another layout, the same count
    other.record_value(1000)
    other.record_value(2000)
    forged = h.to_bytes()[:_HEADER.size] + bytes(other.encode())
    with pytest.raises(ValueError, match=r"^not a serialised LatencyHistogram \(layout or count does not match\)$"):
        LatencyHistogram.from_bytes(forged)


def test_rate_and_spread_below_one():
    assert rate_per_s(5, 0.5) == 10.0
    assert relative_spread([0.4, 0.6]) == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2) / 0.5)
