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


# --- exact behaviour, pinned against references (written against mutation survivors) ---

from cortexbench.schedule import _arrivals, _choose, _weights, shard_workers  # noqa: E402


def _reference(seed, count, n_models, n_images, p, rate=None, warmup=0):
    """The three streams by the module's definition: models, image ids, gaps from PCG64(seed) and its jumps."""
    bits = np.random.PCG64(seed)
    rng_model, rng_image, rng_time = (np.random.Generator(b) for b in (bits, bits.jumped(1), bits.jumped(2)))
    n = warmup + count
    times = None
    if rate is not None:
        gaps = rng_time.standard_exponential(n) / rate
        times = np.concatenate(([0.0], np.cumsum(gaps[:-1])))
    cdf = np.cumsum(p) / np.sum(p)
    models = np.searchsorted(cdf, rng_model.random(n), side="right")
    images = rng_image.integers(0, n_images, n, dtype=np.int64)
    return models, images, times


def test_make_schedule_is_exactly_the_three_seeded_streams():
    s = make_schedule(count=300, models=MODELS, n_images=17, weights=(1, 2, 3, 4), rate=250, warmup=5, seed=11)
    models, images, times = _reference(11, 300, 4, 17, np.array([1, 2, 3, 4.0]), rate=250.0, warmup=5)
    assert np.array_equal(s.model_idx, models) and np.array_equal(s.image_idx, images)
    assert np.array_equal(s.send_at_s, times)
    assert np.array_equal(s.item, np.arange(305)) and s.item.dtype == np.int64
    assert s.rate == 250.0 and isinstance(s.rate, float) and s.seed == 11 and s.warmup == 5
    assert s.models == MODELS and s.popularity == "weights"
    z = make_schedule(count=50, models=MODELS, n_images=3, popularity="zipf:1.1", seed=2)
    assert z.popularity == "zipf:1.1" and z.seed == 2 and z.rate is None and z.send_at_s is None
    one = make_schedule(count=20, models=["only"], n_images=1, seed=3)
    assert one.models == ("only",) and not one.model_idx.any() and not one.image_idx.any()
    assert one.model_idx.dtype == np.int16


def test_weights_are_normalised_and_named():
    p, name = _weights(4, "zipf:1", ())
    assert name == "zipf:1" and np.allclose(p, [12 / 25, 6 / 25, 4 / 25, 3 / 25])
    p, name = _weights(4, Popularity("zipf", 2.0), ())
    assert name == "zipf:2" and np.allclose(p, np.array([1, 1 / 4, 1 / 9, 1 / 16]) / (1 + 1 / 4 + 1 / 9 + 1 / 16))
    p, name = _weights(4, "uniform", ())
    assert name == "uniform" and p.tolist() == [0.25] * 4
    p, name = _weights(4, Popularity("uniform"), [0, 3, 1, 0])
    assert name == "weights" and p.tolist() == [0, 0.75, 0.25, 0]
    for bad in ([1, -1, 1, 1], [1, np.inf, 1, 1], [1, np.nan, 1, 1], [0, 0, 0, 0]):
        with pytest.raises(ConfigError, match=r"^'stream.model_weights' must be 0 or more each, with at least one above 0$"):
            _weights(4, "uniform", bad)
    with pytest.raises(ConfigError, match=r"^'stream.model_weights' has 3 weights for 4 models: give one weight per "
                                          r"model, in the order of 'models'$"):
        _weights(4, "uniform", [1, 2, 3])
    with pytest.raises(ConfigError, match=r"^'stream.model_weights' and 'stream.popularity' = 'zipf:1' both set: "
                                          r"give one of them$"):
        _weights(4, "zipf:1", [1, 1, 1, 1])


def test_choose_is_the_inverse_cdf_and_widens_its_dtype():
    p = np.array([0.0, 0.5, 0.0, 0.25, 0.25])
    got = _choose(np.random.default_rng(5), p, 1000)
    u = np.random.default_rng(5).random(1000)
    assert np.array_equal(got, np.searchsorted(np.cumsum(p), u, side="right"))
    assert set(got.tolist()) == {1, 3, 4} and got.dtype == np.int16
    assert _choose(np.random.default_rng(0), np.full(32767, 1 / 32767), 3).dtype == np.int16
    assert _choose(np.random.default_rng(0), np.full(32768, 1 / 32768), 3).dtype == np.int32
    assert _choose(np.random.default_rng(0), np.array([1.0]), 4).tolist() == [0, 0, 0, 0]


class _ConstantGaps:
    """A stand-in generator: every gap is ``gap`` (standard exponential units), or with ``cycle`` the gaps
    gap, 2 gap, ..., cycle gap, gap, ... in stream order; records the chunk sizes."""

    def __init__(self, gap: float, cycle: int = 1) -> None:
        self.gap, self.cycle, self.drawn = gap, cycle, 0
        self.sizes: list[int] = []

    def standard_exponential(self, k: int) -> np.ndarray:
        self.sizes.append(k)
        out = self.gap * (1 + (np.arange(self.drawn, self.drawn + k) % self.cycle))
        self.drawn += k
        return out


def test_arrivals_are_the_prefix_of_the_uncut_stream_whatever_the_chunks():
    for seed, rate, n_max, warmup, dur in [(1, 100.0, 5000, 0, 2.0), (2, 50.0, 5000, 30, 1.0), (3, 10.0, 40, 5, 100.0),
                                           (4, 1000.0, 3000, 3000, 0.5)]:
        full = _arrivals(np.random.default_rng(seed), rate, n_max, 0, None)
        assert full[0] == 0.0 and len(full) == n_max
        gaps = np.random.default_rng(seed).standard_exponential(n_max) / rate
        assert np.array_equal(full, np.concatenate(([0.0], np.cumsum(gaps[:-1]))))
        cut = _arrivals(np.random.default_rng(seed), rate, n_max, warmup, dur)
        end = (full[warmup - 1] if warmup else 0.0) + dur
        want = full[:max(int(np.searchsorted(full, end, side="left")), warmup)]
        assert np.allclose(cut, want, rtol=0, atol=1e-9) and len(cut) == len(want)
    assert len(_arrivals(np.random.default_rng(0), 1.0, 0, 0, None)) == 0


def test_arrivals_draw_more_chunks_when_the_stream_runs_ahead():
    # gaps of 0.01 s at rate 1: the duration holds 100x the expected count, so several chunks are drawn
    rng = _ConstantGaps(0.01)
    t = _arrivals(rng, 1.0, 10_000, 2, 3.0)
    assert len(rng.sizes) > 1
    assert np.allclose(t, np.arange(len(t)) * 0.01)
    assert len(t) == 301  # the last warm-up arrival at 0.01 s, the end at 3.01 s (excluded)
    assert t[-1] < 3.01 - 1e-9
    # a stream that ends on n_max before the duration is up
    assert np.allclose(_arrivals(_ConstantGaps(0.01), 1.0, 120, 0, 10.0), np.arange(120) * 0.01)
    # chunk boundaries lose no gap: the times are those of the stream drawn in one go, cut at the end
    rng = _ConstantGaps(0.01, cycle=3)
    t = _arrivals(rng, 1.0, 10_000, 0, 5.0)
    assert len(rng.sizes) > 1
    full = _arrivals(_ConstantGaps(0.01, cycle=3), 1.0, 10_000, 0, None)
    assert np.allclose(t, full[:len(t)], rtol=0, atol=1e-9) and full[len(t)] >= 5.0 > t[-1]
    # exactly on the end: excluded
    assert len(_arrivals(_ConstantGaps(0.5), 1.0, 100, 0, 2.0)) == 4


def test_schedule_checks_its_columns_and_freezes_them():
    item, m, img = np.arange(3), np.zeros(3, np.int16), np.zeros(3, np.int32)
    kw = dict(models=("a",), warmup=0, rate=None, seed=0, popularity="uniform")
    msg = r"^Schedule: item, model_idx, image_idx and send_at_s must have the same length$"
    with pytest.raises(ValueError, match=msg):
        Schedule(item=item, model_idx=m[:2], image_idx=img, send_at_s=None, **kw)
    with pytest.raises(ValueError, match=msg):
        Schedule(item=item, model_idx=m, image_idx=img[:2], send_at_s=None, **kw)
    with pytest.raises(ValueError, match=msg):
        Schedule(item=item, model_idx=m, image_idx=img, send_at_s=np.zeros(4), **kw)
    s = Schedule(item=item, model_idx=m, image_idx=img, send_at_s=np.zeros(3), **kw)
    for col in (s.item, s.model_idx, s.image_idx, s.send_at_s):
        assert not col.flags.writeable
    assert s.open_loop and s.duration_s() == 0.0
    empty = Schedule(item=item[:0], model_idx=m[:0], image_idx=img[:0], send_at_s=np.zeros(0), **kw)
    assert empty.duration_s() == 0.0 and len(empty) == 0


def test_schedule_equality_compares_every_field():
    base = make_schedule(count=20, models=MODELS, n_images=5, rate=10.0, warmup=2, seed=1)
    same = make_schedule(count=20, models=MODELS, n_images=5, rate=10.0, warmup=2, seed=1)
    assert base == same and not (base != same)
    assert base.__eq__(3) is NotImplemented and base != 3
    with pytest.raises(TypeError):
        hash(base)
    import dataclasses

    variants = [
        dataclasses.replace(base, models=("a", "b", "c", "e")),
        dataclasses.replace(base, warmup=3),
        dataclasses.replace(base, rate=11.0),
        dataclasses.replace(base, seed=2),
        dataclasses.replace(base, popularity="weights"),
        dataclasses.replace(base, send_at_s=None),
        dataclasses.replace(base, send_at_s=base.send_at_s + 1),
        dataclasses.replace(base, item=base.item + 1),
        dataclasses.replace(base, model_idx=(base.model_idx + 1) % 4),
        dataclasses.replace(base, image_idx=(base.image_idx + 1) % 5),
    ]
    for v in variants:
        assert v != base and base != v
    closed = make_schedule(count=20, models=MODELS, n_images=5, warmup=2, seed=1)
    assert closed == make_schedule(count=20, models=MODELS, n_images=5, warmup=2, seed=1)
    assert closed != dataclasses.replace(closed, send_at_s=np.zeros(22))


def test_schedule_repr_and_views():
    o = make_schedule(count=10, models=MODELS, n_images=5, rate=2.5, warmup=1, seed=4, popularity="zipf:1.5")
    assert repr(o) == "Schedule(11 items, warmup=1, 4 models, open loop at 2.5/s, popularity=zipf:1.5, seed=4)"
    c = make_schedule(count=10, models=MODELS, n_images=5, seed=4)
    assert repr(c) == "Schedule(10 items, warmup=0, 4 models, closed loop, popularity=uniform, seed=4)"
    assert o.open_loop and not c.open_loop
    assert c.duration_s() is None and o.duration_s() == float(o.send_at_s[-1]) > 0
    assert o.is_warmup(0) and not o.is_warmup(1)


def test_head_is_the_warmup_and_the_first_counted_items():
    s = make_schedule(count=50, models=MODELS, n_images=5, rate=20.0, warmup=4, seed=6, popularity="zipf:1.2")
    h = s.head(10)
    assert len(h) == 14 and h.counted() == 10
    for col in ("item", "model_idx", "image_idx", "send_at_s"):
        assert np.array_equal(getattr(h, col), getattr(s, col)[:14])
    assert (h.models, h.warmup, h.rate, h.seed, h.popularity) == (s.models, 4, 20.0, 6, "zipf:1.2")
    assert s.head(50) is s and s.head(10**6) is s
    assert len(s.head(49)) == 53
    assert len(s.head(-3)) == 4 and s.head(0).counted() == 0
    c = make_schedule(count=50, models=MODELS, n_images=5, seed=6)
    assert c.head(5).send_at_s is None and len(c.head(5)) == 5


def test_shard_keeps_the_fields_and_checks_its_arguments():
    s = make_schedule(count=30, models=MODELS, n_images=5, rate=20.0, warmup=4, seed=6, popularity="zipf:1.2")
    x = s.shard(1, 4)
    assert np.array_equal(x.item, np.arange(1, 34, 4)) and np.array_equal(x.image_idx, s.image_idx[1::4])
    assert (x.models, x.warmup, x.rate, x.seed, x.popularity) == (s.models, 4, 20.0, 6, "zipf:1.2")
    assert len(x) == 9 and x.counted() == 8  # items 5, 9, ..., 33
    assert s.shard(0, 1) == s
    c = make_schedule(count=30, models=MODELS, n_images=5, seed=6)
    assert c.shard(0, 2).send_at_s is None
    for i, n in [(0, 0), (-1, 3), (3, 3)]:
        with pytest.raises(ValueError, match=rf"^shard {i} of {n}: need 0 <= i < n_shards$"):
            s.shard(i, n)
    assert model_shares(make_schedule(count=2, models=MODELS, n_images=5, warmup=4, seed=0).shard(3, 4)) == \
        {m: 0.0 for m in MODELS}  # a shard with no counted item


def test_shard_workers_sizes_ties_and_errors():
    assert shard_workers(["a", "b", "b", "a"], 1) == [((0, 1, 2, 3), "a")]  # a tie: the node seen first
    assert shard_workers(["b", "a", "a", "b"], 1) == [((0, 1, 2, 3), "b")]
    assert shard_workers(["x"] * 7, 3) == [((0, 1, 2), "x"), ((3, 4), "x"), ((5, 6), "x")]
    assert shard_workers(["a", "b", "a", "b", "b"], 2) == [((0, 1, 2), "a"), ((3, 4), "b")]
    assert shard_workers(["a", "b"], 2) == [((0,), "a"), ((1,), "b")]
    with pytest.raises(ValueError, match=r"^0 driver shards for 2 workers: need 1 to 2$"):
        shard_workers(["a", "b"], 0)
    with pytest.raises(ValueError, match=r"^3 driver shards for 2 workers: need 1 to 2$"):
        shard_workers(["a", "b"], 3)


def test_make_schedule_and_popularity_error_messages():
    kw = dict(count=10, models=MODELS, n_images=5)
    cases = [
        (dict(models=()), ConfigError, r"^'models' is empty: name at least one model to send images to$"),
        (dict(count=0), ConfigError, r"^'times' must be 1 or more images, not 0$"),
        (dict(warmup=-1), ConfigError, r"^'stream.warmup' must be 0 or more, not -1$"),
        (dict(n_images=0), DatasetError, r"^no images to send: the image set is empty \(check 'img_dir'\)$"),
        (dict(rate=0.0), ConfigError, r"^'stream.rate' must be more than 0 images/s, not 0.0$"),
        (dict(rate=-5.0), ConfigError, r"not -5.0$"),
        (dict(rate=float("inf")), ConfigError, r"not inf$"),
        (dict(duration_s=0.0), ConfigError, r"^'stream.duration_s' must be more than 0 seconds, not 0.0$"),
        (dict(duration_s=-1.0), ConfigError, r"not -1.0$"),
    ]
    for extra, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            make_schedule(**{**kw, **extra})
    assert len(make_schedule(**kw, warmup=0, rate=1e-3, duration_s=1e-3)) == 1
    assert parse_popularity("  ZIPF:2 ") == Popularity("zipf", 2.0) and parse_popularity(" Uniform") == Popularity("uniform")
    assert Popularity("uniform").s == 0.0 and str(Popularity("zipf", 1.5)) == "zipf:1.5"
    for text in ("zipf", "zipf:0", "zipf:-1", "zipf:abc"):
        with pytest.raises(ConfigError, match=rf"^'stream.popularity': '{text}' needs an exponent above 0, "
                                              r"as in 'zipf:1.1'$"):
            parse_popularity(text, "stream.popularity")
    with pytest.raises(ConfigError, match=r"^'popularity': unknown popularity 'Zipfian' \(did you mean 'zipf:1.1'\?\)$"):
        parse_popularity("Zipfian")


def test_popularity_spellings_near_the_valid_ones():
    with pytest.raises(ConfigError, match=r"needs an exponent above 0"):
        parse_popularity("zipf:1:2")  # one exponent, not the last of several
    with pytest.raises(ConfigError, match=r"^'popularity': unknown popularity 'uniformm' \(did you mean 'uniform'\?\)$"):
        parse_popularity("uniformm")


def test_defaults_and_edges_of_weights_choices_and_shards():
    assert make_schedule(count=30, models=MODELS, n_images=5) == make_schedule(count=30, models=MODELS, n_images=5,
                                                                             seed=0)
    p, _ = _weights(2, "uniform", [0.25, 0.25])  # weights summing to less than 1 are fine
    assert p.tolist() == [0.5, 0.5]
    two = _choose(np.random.default_rng(1), np.array([0.5, 0.5]), 200)
    assert set(two.tolist()) == {0, 1}
    assert shard_workers(["a", "b", "b"], 1) == [((0, 1, 2), "b")]  # the node most workers are on
