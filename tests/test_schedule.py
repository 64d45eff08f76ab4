"""The seeded stream: replayable, right distributions, Poisson arrivals, warm-up and sharding."""

from __future__ import annotations

import numpy as np
import pytest

from cortexbench.errors import ConfigError, DatasetError
from cortexbench.schedule import Popularity, Schedule, make_schedule, model_shares, parse_popularity

MODELS = ("a", "b", "c", "d")


def test_parse_popularity_kept():
    assert parse_popularity("zipf:1.5") == Popularity("zipf", 1.5)
    assert str(parse_popularity("uniform")) == "uniform"
    with pytest.raises(ConfigError):
        parse_popularity("zipf:-1")
    for spelling in ("zipfian", "zipf", "zipf1.1", "Uniformly"):  # unknown spellings are refused, not guessed
        with pytest.raises(ConfigError, match="popularity"):
            parse_popularity(spelling)


def test_same_arguments_same_schedule_and_seed_changes_it():
    kw = dict(count=500, models=MODELS, n_images=50, popularity="zipf:1.1", rate=300.0, warmup=20, seed=7)
    s1, s2 = make_schedule(**kw), make_schedule(**kw)
    assert s1 == s2
    assert np.array_equal(s1.send_at_s, s2.send_at_s)
    s3 = make_schedule(**{**kw, "seed": 8})
    assert s3 != s1
    assert not np.array_equal(s3.model_idx, s1.model_idx)


def test_columns_types_and_lengths():
    s = make_schedule(count=100, models=MODELS, n_images=10, warmup=5, seed=1)
    assert len(s) == 105 and s.counted() == 100
    assert s.item.dtype == np.int64 and s.model_idx.dtype == np.int16 and s.image_idx.dtype == np.int32
    assert np.array_equal(s.item, np.arange(105))
    assert s.send_at_s is None and s.rate is None
    assert s.image_idx.min() >= 0 and s.image_idx.max() < 10
    assert s.model_idx.min() >= 0 and s.model_idx.max() < len(MODELS)
    with pytest.raises(ValueError):
        s.model_idx[0] = 1  # read-only: a schedule is frozen
    assert list(s.is_warmup(np.array([0, 4, 5, 104]))) == [True, True, False, False]


def test_shorter_schedule_is_a_prefix_and_models_do_not_depend_on_rate():
    long = make_schedule(count=1000, models=MODELS, n_images=30, seed=3)
    short = make_schedule(count=100, models=MODELS, n_images=30, seed=3)
    assert np.array_equal(long.model_idx[:100], short.model_idx)
    assert np.array_equal(long.image_idx[:100], short.image_idx)
    opened = make_schedule(count=1000, models=MODELS, n_images=30, seed=3, rate=50.0)
    assert np.array_equal(opened.model_idx, long.model_idx)


def test_uniform_zipf_and_weight_shares():
    n = 40_000
    u = make_schedule(count=n, models=MODELS, n_images=5, seed=2)
    shares = model_shares(u)
    assert set(shares) == set(MODELS)
    assert all(abs(v - 0.25) < 0.015 for v in shares.values())

    z = make_schedule(count=n, models=MODELS, n_images=5, popularity="zipf:1.2", seed=2)
    p = 1 / np.arange(1, 5) ** 1.2
    p /= p.sum()
    got = np.array([model_shares(z)[m] for m in MODELS])
    assert np.allclose(got, p, atol=0.015)
    assert got[0] > got[1] > got[2] > got[3]  # rank order is the order given

    w = make_schedule(count=n, models=MODELS, n_images=5, weights=(0, 3, 1, 0), seed=2)
    sw = model_shares(w)
    assert sw["a"] == 0 and sw["d"] == 0  # zero weight: never chosen
    assert abs(sw["b"] - 0.75) < 0.015
    assert w.popularity == "weights"


def test_model_shares_ignore_warmup():
    s = make_schedule(count=10, models=MODELS, n_images=5, warmup=1000, seed=0)
    assert sum(model_shares(s).values()) == pytest.approx(1.0)
    counted = s.model_idx[s.warmup:]
    assert model_shares(s)["a"] == pytest.approx(np.mean(counted == 0))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="3 weights for 4 models"):
        make_schedule(count=10, models=MODELS, n_images=5, weights=(1, 2, 3))
    with pytest.raises(ConfigError, match="one of them"):
        make_schedule(count=10, models=MODELS, n_images=5, weights=(1, 1, 1, 1), popularity="zipf:1")
    with pytest.raises(ConfigError):
        make_schedule(count=10, models=MODELS, n_images=5, weights=(0, 0, 0, 0))
    with pytest.raises(ConfigError):
        make_schedule(count=10, models=MODELS, n_images=5, rate=0.0)
    with pytest.raises(ConfigError):
        make_schedule(count=0, models=MODELS, n_images=5)
    with pytest.raises(ConfigError):
        make_schedule(count=10, models=(), n_images=5)
    with pytest.raises(DatasetError):
        make_schedule(count=10, models=MODELS, n_images=0)


def test_poisson_arrivals():
    rate = 2000.0
    s = make_schedule(count=50_000, models=MODELS, n_images=5, rate=rate, seed=4)
    t = s.send_at_s
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # exponential gaps: standard deviation equals the mean, P(gap > mean) = 1/e
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)
    assert np.mean(gaps > 1 / rate) == pytest.approx(np.exp(-1), abs=0.01)
    # counts per 50 ms window are Poisson: variance close to the mean
    counts = np.bincount((t / 0.05).astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.15)


def test_duration_cuts_counted_part_after_warmup():
    rate, dur, warm = 1000.0, 2.0, 300
    s = make_schedule(count=10**6, models=MODELS, n_images=5, rate=rate, duration_s=dur, warmup=warm, seed=5)
    t = s.send_at_s
    end = t[warm - 1] + dur
    assert np.all(t < end)
    assert s.counted() == pytest.approx(rate * dur, rel=0.1)
    full = make_schedule(count=10**4, models=MODELS, n_images=5, rate=rate, warmup=warm, seed=5)
    # the cut schedule is the prefix of the uncut one that ends before `end`
    assert np.array_equal(full.send_at_s[:len(s)], t)
    assert full.send_at_s[len(s)] >= end
    # at most `count` counted items even when the duration would allow more
    capped = make_schedule(count=50, models=MODELS, n_images=5, rate=rate, duration_s=dur, warmup=warm, seed=5)
    assert capped.counted() == 50 and np.array_equal(capped.send_at_s, t[:warm + 50])


def test_closed_loop_duration_keeps_count():
    s = make_schedule(count=300, models=MODELS, n_images=5, duration_s=1.0, seed=0)
    assert len(s) == 300 and s.send_at_s is None


def test_shards_partition_the_stream():
    s = make_schedule(count=1001, models=MODELS, n_images=5, rate=100.0, warmup=10, seed=9)
    shards = [s.shard(i, 3) for i in range(3)]
    assert sum(len(x) for x in shards) == len(s)
    assert sum(x.counted() for x in shards) == s.counted()
    both = np.concatenate([x.item for x in shards])
    assert np.array_equal(np.sort(both), s.item)
    for i, x in enumerate(shards):
        assert np.array_equal(x.item, s.item[i::3])
        assert np.array_equal(x.send_at_s, s.send_at_s[x.item])
        assert np.array_equal(x.model_idx, s.model_idx[x.item])
        assert np.all(np.diff(x.send_at_s) >= 0)
        assert isinstance(x, Schedule) and x.warmup == 10
    with pytest.raises(ValueError):
        s.shard(3, 3)


def test_shard_workers_keeps_each_shards_workers_on_one_node():
    from cortexbench.schedule import shard_workers

    nodes = ["a", "b", "a", "b", "a", "b", "a", "b"]  # a placement group spreading workers over two nodes
    got = shard_workers(nodes, 2)
    assert got == [((0, 2, 4, 6), "a"), ((1, 3, 5, 7), "b")]
    got4 = shard_workers(nodes, 4)
    assert [node for _, node in got4] == ["a", "a", "b", "b"]
    assert sorted(w for ids, _ in got4 for w in ids) == list(range(8))  # every worker in exactly one shard
    uneven = shard_workers(["a"] * 5, 3)  # one node: sizes differ by one at most
    assert [len(ids) for ids, _ in uneven] == [2, 2, 1] and {n for _, n in uneven} == {"a"}
    mixed = shard_workers(["a", "a", "a", "b", "b"], 2)  # a shard spanning nodes runs where most are
    assert mixed == [((0, 1, 2), "a"), ((3, 4), "b")]
    with pytest.raises(ValueError, match="3 driver shards for 2 workers"):
        shard_workers(["a", "b"], 3)
