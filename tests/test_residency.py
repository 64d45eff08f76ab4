"""Residency policies: LRU against a brute-force reference, cold never hits, cached always hits."""

from __future__ import annotations

import random

import pytest

from cortexbench.errors import ConfigError
from cortexbench.residency import Access, Cached, Cold, Lru, Mode, Residency, make_residency, parse_mode

MODELS = [f"m{i}" for i in range(7)]


class ReferenceLru:
    """LRU the slow, obvious way: a list of (last use time, model)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.last_use: dict[str, int] = {}
        self.clock = 0

    def access(self, model: str) -> tuple[bool, list[str]]:
        self.clock += 1
        hit = model in self.last_use
        self.last_use[model] = self.clock
        evicted = []
        while len(self.last_use) > self.capacity:
            oldest = min(self.last_use, key=self.last_use.__getitem__)
            del self.last_use[oldest]
            evicted.append(oldest)
        return hit, evicted


def test_parse_mode_kept():
    assert parse_mode("lru:3") == Mode("lru", 3)
    assert parse_mode(" LRU:1 ") == Mode("lru", 1) and parse_mode("Cold") == Mode("cold")
    with pytest.raises(ConfigError, match=r"^'mode': 'lru:0' needs a capacity of 1 or more models, as in 'lru:2'$"):
        parse_mode("lru:0")
    with pytest.raises(ConfigError, match=r"^'stream\.modes': 'lru:2:3' needs a capacity"):
        parse_mode("lru:2:3", "stream.modes")
    with pytest.raises(ConfigError, match=r"^'mode': unknown mode 'warm'( \(did you mean '\w+'\?\))? "
                                          r"\(valid: cached, swap, cold, lru:K\)$"):
        parse_mode("warm")
    with pytest.raises(ConfigError, match=r"did you mean 'swap'"):
        parse_mode("swpa")


def test_swap_loads_for_every_image_like_cold():
    assert parse_mode("Swap") == Mode("swap") and str(Mode("swap")) == "swap"
    res = make_residency("swap", ["a", "b"])
    assert res.mode == Mode("swap")
    for m in ("a", "b", "a"):
        access = res.access(m)
        assert not access.hit and not access.keep and not access.evict
    assert res.resident() == () and res.misses == 3 and res.hits == 0


@pytest.mark.parametrize("capacity", [1, 2, 3, 6, 10])
def test_lru_matches_reference(capacity):
    rng = random.Random(capacity)
    lru, ref = Lru(capacity), ReferenceLru(capacity)
    hits = evictions = 0
    for _ in range(3000):
        m = rng.choice(MODELS[: rng.choice([3, 7])])  # mix of phases with small and large working sets
        got = lru.access(m)
        hit, evicted = ref.access(m)
        assert got.hit == hit
        assert got.keep is True
        assert list(got.evict) == evicted
        assert m not in got.evict
        hits += hit
        evictions += len(evicted)
        assert set(lru.resident()) == set(ref.last_use)
        assert len(lru.resident()) <= capacity
    assert (lru.hits, lru.misses, lru.evictions) == (hits, 3000 - hits, evictions)
    assert lru.hit_ratio == pytest.approx(hits / 3000)


def test_lru_order_and_forget():
    lru = Lru(2)
    lru.access("a")
    lru.access("b")
    assert lru.access("a").hit  # a is now most recent
    assert lru.access("c").evict == ("b",)
    assert lru.resident() == ("a", "c")
    lru.forget("c")  # its load failed
    lru.forget("never-loaded")  # nothing to forget: no error
    assert not lru.access("c").hit
    assert lru.access("c").hit


def test_cold_never_hits():
    cold = Cold()
    for m in MODELS * 10:
        a = cold.access(m)
        assert a == Access(hit=False, keep=False, evict=())
    assert cold.resident() == () and cold.hits == 0 and cold.misses == 70


def test_cached_always_hits_its_models():
    cached = Cached(MODELS)
    assert cached.resident() == tuple(MODELS)
    for m in MODELS * 10:
        a = cached.access(m)
        assert a.hit and a.keep and a.evict == ()
    assert cached.misses == 0 and cached.hits == 70
    other = cached.access("new")  # not loaded up front: miss, then kept
    assert not other.hit and other.keep
    assert cached.access("new").hit
    assert not cached.access("newer").hit
    assert (cached.hits, cached.misses) == (71, 2)
    cached.forget("never-loaded")  # nothing to forget: no error
    cached.forget("m0")
    assert not cached.access("m0").hit
    cached.reset_counters()
    assert (cached.hits, cached.misses, cached.evictions) == (0, 0, 0)


def test_make_residency():
    for text, cls in [("cached", Cached), ("cold", Cold), ("lru:3", Lru)]:
        r = make_residency(parse_mode(text), MODELS)
        assert isinstance(r, cls) and isinstance(r, Residency)
        assert str(r.mode) == text
    assert make_residency("lru:4", MODELS).capacity == 4
    with pytest.raises(ConfigError):
        Lru(0)


def test_messages_and_defaults_exactly():
    with pytest.raises(ConfigError, match=r"^'mode': unknown mode 'qqq' \(valid: cached, swap, cold, lru:K\)$"):
        parse_mode("qqq")
    with pytest.raises(ConfigError, match=r"^lru capacity must be 1 or more models, not 0$"):
        Lru(0)
    assert Cold().mode == Mode("cold") and str(Cold().mode) == "cold"
