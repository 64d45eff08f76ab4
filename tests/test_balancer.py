"""Balancing policies: fairness, their defining properties, dead workers, and affinity's LRU benefit."""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest

from cortexbench.balancer import (
    Affinity,
    Balancer,
    LeastOutstanding,
    PowerOfTwo,
    RoundRobin,
    default_replicas,
    imbalance,
    make_balancer,
)
from cortexbench.errors import ConfigError, WorkerError
from cortexbench.residency import Lru

NAMES = ("round-robin", "least-outstanding", "p2c", "affinity")


def test_make_balancer_names_and_errors():
    for name in NAMES:
        b = make_balancer(name, n_workers=4, n_models=8)
        assert b.name == name and isinstance(b, Balancer)
    with pytest.raises(ConfigError, match="did you mean 'least-outstanding'"):
        make_balancer("least_outstanding", 4, 8)
    with pytest.raises(ConfigError, match="no workers"):
        make_balancer("p2c", 0, 8)


def test_imbalance():
    assert imbalance([5, 5, 5]) == 0.0
    assert imbalance([2, 4, 6]) == pytest.approx(0.5)
    assert imbalance([]) == 0.0 and imbalance([0, 0]) == 0.0


@pytest.mark.parametrize("cls", [RoundRobin, LeastOutstanding])
def test_equal_loads_spread_exactly_evenly(cls):
    b = cls()
    counts = [0] * 6
    for k in range(6000):
        counts[b.pick(k % 3, [2] * 6, [True] * 6)] += 1
    assert counts == [1000] * 6
    # with a dead worker the rest still share exactly evenly
    alive = [True, True, False, True, True, True]
    counts = [0] * 6
    for k in range(5000):
        counts[b.pick(k % 3, [0] * 6, alive)] += 1
    assert counts == [1000, 1000, 0, 1000, 1000, 1000]


def test_least_outstanding_even_in_a_closed_loop():
    b = LeastOutstanding()
    out = [0] * 5
    counts = [0] * 5
    rng = random.Random(0)
    inflight = []
    for _ in range(20_000):
        if len(inflight) >= 12:  # finish a random image in flight
            w = inflight.pop(rng.randrange(len(inflight)))
            out[w] -= 1
        w = b.pick(0, out, [True] * 5)
        out[w] += 1
        counts[w] += 1
        inflight.append(w)
    assert imbalance(counts) < 0.02


def test_least_outstanding_never_picks_a_busier_worker():
    b = LeastOutstanding()
    rng = np.random.default_rng(1)
    for _ in range(3000):
        n = int(rng.integers(1, 12))
        out = rng.integers(0, 4, n)
        alive = rng.random(n) < 0.7
        if not alive.any():
            alive[rng.integers(n)] = True
        # lists and numpy arrays are both accepted
        args = (out, alive) if rng.random() < 0.5 else (out.tolist(), alive.tolist())
        w = b.pick(0, *args)
        assert alive[w]
        assert out[w] == out[alive].min()


def test_p2c_never_picks_the_busier_of_its_two_samples():
    b = PowerOfTwo(seed=3)
    rng = np.random.default_rng(2)
    for _ in range(3000):
        n = int(rng.integers(2, 12))
        out = rng.integers(0, 5, n).tolist()
        alive = (rng.random(n) < 0.8).tolist()
        if sum(alive) < 2:
            alive = [True] * n
        w = b.pick(0, out, alive)
        a, c = b.last_pair
        assert a != c and alive[a] and alive[c]
        assert w in (a, c)
        assert out[w] == min(out[a], out[c])


def test_p2c_is_even_and_better_than_random():
    n, balls = 10, 20_000
    b = PowerOfTwo(seed=0)
    two = [0] * n
    for _ in range(balls):
        two[b.pick(0, two, [True] * n)] += 1  # balls into bins: load = balls so far
    rnd = np.bincount(np.random.default_rng(0).integers(0, n, balls), minlength=n)
    assert imbalance(two) < 0.01
    assert max(two) - min(two) < (rnd.max() - rnd.min()) / 3
    # equal loads: ties are random, so counts are roughly even
    counts = [0] * n
    for _ in range(balls):
        counts[b.pick(0, [1] * n, [True] * n)] += 1
    assert imbalance(counts) < 0.1
    # seeded: the same seed gives the same picks
    b1, b2 = PowerOfTwo(seed=5), PowerOfTwo(seed=5)
    assert [b1.pick(0, [0] * 7, [True] * 7) for _ in range(50)] == [b2.pick(0, [0] * 7, [True] * 7) for _ in range(50)]


@pytest.mark.parametrize("name", NAMES)
def test_dead_workers_never_picked_and_all_dead_raises(name):
    b = make_balancer(name, n_workers=6, n_models=4, seed=1)
    rng = np.random.default_rng(4)
    for k in range(2000):
        alive = rng.random(6) < 0.5
        if not alive.any():
            continue
        out = rng.integers(0, 10, 6)
        assert alive[b.pick(k % 4, out, alive)]
    with pytest.raises(WorkerError, match="no live worker"):
        b.pick(0, [0] * 6, [False] * 6)


def test_affinity_homes_are_spread_and_stable():
    a = Affinity(n_models=8, n_workers=4, seed=0, lru_capacity=2)
    assert a.replicas == 1
    homes = [a.homes(m) for m in range(8)]
    assert np.bincount([h[0] for h in homes], minlength=4).tolist() == [2, 2, 2, 2]
    assert homes == [Affinity(8, 4, seed=0, lru_capacity=2).homes(m) for m in range(8)]
    a2 = Affinity(n_models=6, n_workers=8, replicas=3, seed=1)
    for m in range(6):
        assert len(set(a2.homes(m))) == 3
    assert max(np.bincount([w for m in range(6) for w in a2.homes(m)], minlength=8)) <= 3
    assert default_replicas(4, 8, 2) == 1 and default_replicas(8, 8, 2) == 2 and default_replicas(4, 8) == 1
    assert default_replicas(4, 2, 8) == 4


def test_affinity_uses_homes_unless_overloaded():
    a = Affinity(n_models=8, n_workers=4, replicas=2, spill_at=4, seed=2)
    for m in range(8):
        homes = a.homes(m)
        assert len(homes) == 2
        out = [3, 3, 3, 3]
        picks = [a.pick(m, out, [True] * 4) for _ in range(10)]
        assert sorted(picks) == sorted(list(homes) * 5)  # equal loads: both homes in turn, never another worker
        others = [w for w in range(4) if w not in homes]
        out = [0] * 4
        for w in homes:
            out[w] = 3  # busier, but by less than spill_at: stays home
        assert a.pick(m, out, [True] * 4) in homes
        out[homes[0]] = 5
        assert a.pick(m, out, [True] * 4) == homes[1]  # the less loaded home
        out = [0] * 4
        for w in homes:
            out[w] = 4  # every home spill_at above the least loaded: spill there
        out[others[0]] = 1
        assert a.pick(m, out, [True] * 4) == others[1]
    assert a.spills == 8


def test_affinity_replaces_a_dead_home():
    a = Affinity(n_models=8, n_workers=4, seed=0)
    m = 0
    home = a.homes(m)[0]
    alive = [True] * 4
    alive[home] = False
    w = a.pick(m, [0] * 4, alive)
    assert w != home
    assert {a.pick(m, [0] * 4, alive) for _ in range(20)} == {w}  # the same substitute every time


def _simulate(balancer, n_models=8, n_workers=4, capacity=2, n=20_000, concurrency=8, seed=0):
    """Closed loop with equal-speed workers: hit ratio of per-worker LRU caches and images per worker."""
    rng = random.Random(seed)
    caches = [Lru(capacity) for _ in range(n_workers)]
    queues = [deque() for _ in range(n_workers)]
    out = [0] * n_workers
    counts = [0] * n_workers
    alive = [True] * n_workers
    sent = 0
    while sent < n:
        while sum(out) < concurrency and sent < n:
            m = rng.randrange(n_models)
            w = balancer.pick(m, out, alive)
            out[w] += 1
            counts[w] += 1
            queues[w].append(m)
            sent += 1
        for w in range(n_workers):  # every busy worker finishes one image per tick
            if queues[w]:
                caches[w].access(queues[w].popleft())
                out[w] -= 1
    hits = sum(c.hits for c in caches)
    return hits / sum(c.hits + c.misses for c in caches), counts


def test_affinity_raises_lru_hit_ratio_over_round_robin():
    rr_hit, _ = _simulate(make_balancer("round-robin", 4, 8))
    af_hit, af_counts = _simulate(make_balancer("affinity", 4, 8, lru_capacity=2))
    assert rr_hit < 0.35  # each worker sees all 8 models through a cache of 2: about 1/4
    assert af_hit > 0.75
    assert af_hit > rr_hit + 0.4
    assert imbalance(af_counts) < 0.2  # spilling keeps the load reasonably even


def _reference_order(seed: int, model: int, n_workers: int) -> list[int]:
    """Rendezvous order: workers by a 64-bit blake2b of 'seed:model:worker' (little-endian), highest first."""
    import hashlib

    def weight(w: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"{seed}:{model}:{w}".encode(), digest_size=8).digest(), "little")

    return sorted(range(n_workers), key=weight, reverse=True)


def _reference_homes(seed: int, n_models: int, n_workers: int, replicas: int):
    """Per model: its rendezvous order and its homes under bounded load (the reference for Affinity)."""
    cap = -(-n_models * replicas // n_workers)
    load = [0] * n_workers
    for m in range(n_models):
        order = _reference_order(seed, m, n_workers)
        homes = [w for w in order if load[w] < cap][:replicas]
        for w in homes:
            load[w] += 1
        yield m, order, homes


def test_affinity_rankings_are_bounded_load_rendezvous_order():
    for seed, n_models, n_workers, replicas in [(0, 8, 4, 1), (5, 6, 8, 3), (1, 3, 5, 2)]:
        a = Affinity(n_models, n_workers, replicas, seed=seed)
        for m, order, homes in _reference_homes(seed, n_models, n_workers, replicas):
            assert a.homes(m) == tuple(homes)
            assert a._rank[m] == tuple(homes) + tuple(w for w in order if w not in homes)
    assert Affinity(8, 4).homes(0) == Affinity(8, 4, seed=0).homes(0)  # seed 0 by default
    assert Affinity(8, 4, lru_capacity=2).replicas == default_replicas(4, 8, 2) == 1
    assert Affinity(4, 8, lru_capacity=2).replicas == default_replicas(8, 4, 2) == 4


def test_affinity_checks_its_arguments():
    assert Affinity(1, 1).homes(0) == (0,)
    assert Affinity(2, 3, replicas=3, spill_at=1).replicas == 3
    with pytest.raises(ConfigError, match=r"^affinity balancer needs 1 or more models and workers, not 0 and 2$"):
        Affinity(0, 2)
    with pytest.raises(ConfigError, match=r"not 2 and 0$"):
        Affinity(2, 0)
    with pytest.raises(ConfigError, match=r"^affinity: replicas must be between 1 and the 3 workers, not 4$"):
        Affinity(2, 3, replicas=4)
    with pytest.raises(ConfigError, match=r"^affinity: spill_at must be 1 or more images, not 0$"):
        Affinity(2, 3, spill_at=0)


def test_default_replicas_without_an_lru_and_for_one_model():
    assert default_replicas(8, 4) == 2 and default_replicas(8, 4, None) == 2
    assert default_replicas(3, 1) == 3 and default_replicas(3, 0) == 3


# --- exact behaviour, pinned against reference implementations (written against mutation survivors) ---


def _p2c_reference(seed: int, calls: list[tuple[list[int], list[bool]]]) -> list[tuple[int, tuple[int, int]]]:
    """p2c by its definition: two distinct alive workers drawn with random(), the less loaded, a coin on ties."""
    rnd = random.Random(seed).random
    got = []
    for out, alive in calls:
        idx = [i for i, x in enumerate(alive) if x]
        n = len(idx)
        if n == 1:
            got.append((idx[0], (idx[0], idx[0])))
            continue
        ka = int(rnd() * n)
        kb = int(rnd() * (n - 1))
        if kb >= ka:
            kb += 1
        a, b = idx[ka], idx[kb]
        if out[a] != out[b]:
            w = a if out[a] < out[b] else b
        else:
            w = a if rnd() < 0.5 else b
        got.append((w, (a, b)))
    return got


@pytest.mark.parametrize("seed", [0, 7])
def test_p2c_draws_and_breaks_ties_exactly_as_defined(seed):
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(400):
        n = int(rng.integers(1, 9))
        out = rng.integers(0, 3, n).tolist()  # few load levels: many ties
        alive = [True] * n if rng.random() < 0.5 else (rng.random(n) < 0.7).tolist()
        if not any(alive):
            alive[0] = True
        calls.append((out, alive))
    b = PowerOfTwo(seed)
    got = [(b.pick(0, out, alive), b.last_pair) for out, alive in calls]
    assert got == _p2c_reference(seed, calls)
    # make_balancer passes the seed on
    b2 = make_balancer("p2c", 8, 3, seed=seed)
    assert [b2.pick(0, out, alive) for out, alive in calls] == [w for w, _ in got]


def test_p2c_with_one_alive_worker_picks_it_without_a_draw():
    b = PowerOfTwo(0)
    assert b.pick(0, [5], [True]) == 0 and b.last_pair == (0, 0)
    assert b.pick(0, [5, 0, 1], [False, False, True]) == 2 and b.last_pair == (2, 2)
    assert b.pick(0, [3, 2], [True, True]) == 1  # the first draw is still the first of the seeded stream


@pytest.mark.parametrize("cls", [RoundRobin, LeastOutstanding])
def test_rotation_starts_at_the_first_worker(cls):
    b = cls()
    assert [b.pick(0, [0] * 3, [True] * 3) for _ in range(4)] == [0, 1, 2, 0]


def test_affinity_rotates_over_equally_loaded_homes_in_order():
    a = Affinity(n_models=2, n_workers=5, replicas=3, seed=0)
    for m in range(2):
        h = a.homes(m)
        assert [a.pick(m, [1] * 5, [True] * 5) for _ in range(6)] == list(h) * 2
    assert a.spills == 0


def test_affinity_spills_exactly_at_spill_at_and_rotates_its_spills():
    a = Affinity(n_models=1, n_workers=4, replicas=1, spill_at=3, seed=0)
    (h,) = a.homes(0)
    others = [w for w in range(4) if w != h]
    out = [1] * 4
    out[h] = 3  # spill_at - 1 above the others: stays home
    assert a.pick(0, out, [True] * 4) == h and a.spills == 0
    out[h] = 4  # exactly spill_at above: spills to the least loaded, rotating from the first worker
    assert [a.pick(0, out, [True] * 4) for _ in range(3)] == others
    assert a.spills == 3
    # a dead idle worker does not count: the least loaded alive one is only 1 below the home
    alive = [True] * 4
    dead = others[0]
    alive[dead] = False
    out = [3] * 4
    out[dead] = 0
    out[h] = 4
    assert a.pick(0, out, alive) == h and a.spills == 3


def test_affinity_rankings_match_the_reference_for_uneven_shapes():
    for seed in range(4):
        for n_models, n_workers, replicas in [(3, 2, 1), (5, 2, 1), (5, 3, 2), (7, 4, 3), (2, 5, 2)]:
            a = Affinity(n_models, n_workers, replicas, seed=seed)
            for m, order, homes in _reference_homes(seed, n_models, n_workers, replicas):
                assert a._rank[m] == tuple(homes) + tuple(w for w in order if w not in homes)


def test_make_balancer_passes_seed_and_lru_capacity_to_affinity():
    b = make_balancer("affinity", n_workers=8, n_models=4, seed=3, lru_capacity=2)
    ref = Affinity(4, 8, seed=3, lru_capacity=2)
    assert b.replicas == ref.replicas == 4
    assert [b.homes(m) for m in range(4)] == [ref.homes(m) for m in range(4)]
    assert [b.homes(m) for m in range(4)] != [Affinity(4, 8, seed=0, lru_capacity=2).homes(m) for m in range(4)]


def test_no_live_worker_errors_name_the_problem_exactly():
    msg = r"^no live worker to send to$"
    for b in (RoundRobin(), LeastOutstanding(), PowerOfTwo(0)):
        with pytest.raises(WorkerError, match=msg):
            b.pick(0, [], [])
        with pytest.raises(WorkerError, match=msg):
            b.pick(0, [0, 0], [False, False])
    with pytest.raises(WorkerError, match=msg):
        Affinity(2, 2).pick(0, [0, 0], [False, False])
    with pytest.raises(ConfigError, match=r"^balancer 'p2c': there are no workers to balance over \(got 0\)$"):
        make_balancer("p2c", 0, 8)
    with pytest.raises(ConfigError,
                       match=r"^'stream.balancer': unknown balancer 'least_outstanding' \(did you mean 'least-outstanding'\?\)$"):
        make_balancer("least_outstanding", 4, 8)


def test_defaults_and_attributes():
    calls = [([0, 0, 1], [True] * 3)] * 30
    assert [PowerOfTwo().pick(0, *c) for c in calls] == [PowerOfTwo(0).pick(0, *c) for c in calls]
    p_default, p0 = make_balancer("p2c", 3, 2), PowerOfTwo(0)
    assert [p_default.pick(0, *c) for c in calls] == [p0.pick(0, *c) for c in calls]
    assert [make_balancer("affinity", 5, 7).homes(m) for m in range(7)] == [Affinity(7, 5, seed=0).homes(m) for m in range(7)]
    a = Affinity(n_models=8, n_workers=4)
    assert (a.n_models, a.n_workers, a.spill_at) == (8, 4, 4)
    assert imbalance([0, 1]) == 1.0 and imbalance([1, 1, 4]) == 1.0


def test_affinity_spills_rotate_from_the_first_worker():
    a = Affinity(n_models=4, n_workers=4, replicas=1, spill_at=1, seed=0)
    m = next(m for m in range(4) if a.homes(m)[0] != 0)
    (h,) = a.homes(m)
    out = [0] * 4
    out[h] = 5
    others = [w for w in range(4) if w != h]
    assert [a.pick(m, out, [True] * 4) for _ in range(3)] == others  # starting at worker 0
