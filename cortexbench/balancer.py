"""Load balancing: which worker gets the next image.  The Balancer protocol and its four policies.

The driver calls ``pick(model, outstanding, alive)`` once per image, on its hot path, so each policy is a
few Python operations over plain lists (numpy arrays are accepted and turned into lists first).  The
caller owns ``outstanding`` (images in flight per worker) and ``alive`` and keeps them up to date.

- ``round-robin``: the next alive worker in turn, whatever the load.
- ``least-outstanding``: the alive worker with the fewest images in flight; ties go to the first such
  worker after the last one picked, so equal loads are spread exactly evenly.  Never picks a worker busier
  than another alive one.
- ``p2c`` (power of two choices): two distinct alive workers drawn from a seeded generator; the less
  loaded of the two (a coin decides ties).
- ``affinity``: each model has ``replicas`` home workers chosen by rendezvous (highest-random-weight)
  hashing with bounded load, so homes are stable, spread evenly and survive the loss of other workers.  The
  least loaded alive home is picked; the image spills to the least loaded alive worker overall only when
  every home has at least ``spill_at`` more images in flight than that worker.  This keeps each model on
  few workers and raises LRU hit ratios.  Default ``replicas`` = max(1, floor(n_workers * K / n_models))
  where K is the LRU capacity (1 when there is none): the homes of all models then fit in the workers'
  caches.  Default ``spill_at`` = 4.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from cortexbench.errors import ConfigError, WorkerError, did_you_mean

BALANCER_NAMES = ("round-robin", "least-outstanding", "p2c", "affinity")

_NO_LIVE = "no live worker to send to"


@runtime_checkable
class Balancer(Protocol):
    name: str

    def pick(self, model: int, outstanding: Sequence[int] | np.ndarray, alive: Sequence[bool] | np.ndarray) -> int:
        """Index of an alive worker for an image of model index ``model``; WorkerError if none is alive."""
        ...


def _lists(outstanding: Sequence[int] | np.ndarray, alive: Sequence[bool] | np.ndarray) -> tuple[list, list]:
    if isinstance(outstanding, np.ndarray):
        outstanding = outstanding.tolist()
    if isinstance(alive, np.ndarray):
        alive = alive.tolist()
    return outstanding, alive  # type: ignore[return-value]


class RoundRobin:
    """Cycle over the alive workers, ignoring load and model."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, model: int, outstanding: Sequence[int] | np.ndarray, alive: Sequence[bool] | np.ndarray) -> int:
        n = len(alive)
        start = self._next
        for k in range(n):
            i = (start + k) % n
            if alive[i]:
                self._next = i + 1
                return i
        raise WorkerError(_NO_LIVE)


def _least(outstanding: Sequence[float], alive: Sequence[bool], start: int) -> int:
    """The first alive worker with the fewest outstanding, searching from ``start`` (wrapping); -1 if none."""
    if all(alive):
        return _first_min(outstanding, start)
    if not any(alive):
        return -1
    big = float("inf")
    return _first_min([o if a else big for o, a in zip(outstanding, alive, strict=True)], start)


def _first_min(vals: Sequence[float], start: int) -> int:
    """Index of the first minimum of ``vals`` at or after ``start`` (wrapping round)."""
    m = min(vals)
    i = vals.index(m)
    start %= len(vals)
    if i >= start:
        return i
    tail = vals[start:]  # a later minimum comes first in rotation order
    return start + tail.index(m) if m in tail else i


class LeastOutstanding:
    """The alive worker with the fewest images in flight; equal loads rotate."""

    name = "least-outstanding"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, model: int, outstanding: Sequence[int] | np.ndarray, alive: Sequence[bool] | np.ndarray) -> int:
        out, live = _lists(outstanding, alive)
        if not out:
            raise WorkerError(_NO_LIVE)
        i = _least(out, live, self._next)
        if i < 0:
            raise WorkerError(_NO_LIVE)
        self._next = i + 1
        return i


class PowerOfTwo:
    """Two distinct random alive workers; the less loaded one (ties random).  ``last_pair`` records the draw."""

    name = "p2c"

    def __init__(self, seed: int = 0) -> None:
        self._random = random.Random(seed).random
        self.last_pair: tuple[int, int] = (-1, -1)

    def pick(self, model: int, outstanding: Sequence[int] | np.ndarray, alive: Sequence[bool] | np.ndarray) -> int:
        out, live = _lists(outstanding, alive)
        rnd = self._random
        if all(live):
            n = len(live)
            if n == 0:
                raise WorkerError(_NO_LIVE)
            if n == 1:
                self.last_pair = (0, 0)
                return 0
            a = int(rnd() * n)
            b = int(rnd() * (n - 1))
            if b >= a:
                b += 1
        else:
            idx = [i for i, x in enumerate(live) if x]
            n = len(idx)
            if n == 0:
                raise WorkerError(_NO_LIVE)
            if n == 1:
                self.last_pair = (idx[0], idx[0])
                return idx[0]
            ka = int(rnd() * n)
            kb = int(rnd() * (n - 1))
            if kb >= ka:
                kb += 1
            a, b = idx[ka], idx[kb]
        self.last_pair = (a, b)
        oa, ob = out[a], out[b]
        if oa < ob:
            return a
        if ob < oa:
            return b
        return a if rnd() < 0.5 else b


def _weight(seed: int, model: int, worker: int) -> int:
    """The rendezvous weight of (model, worker): a stable 64-bit hash, the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{model}:{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def default_replicas(n_workers: int, n_models: int, lru_capacity: int | None = None) -> int:
    """max(1, floor(n_workers * K / n_models)), capped at n_workers; K = LRU capacity, 1 without one."""
    k = lru_capacity if lru_capacity else 1
    return max(1, min(n_workers, (n_workers * k) // max(1, n_models)))


class Affinity:
    """Send each model to its home workers (rendezvous hashing); spill only when all homes are overloaded."""

    name = "affinity"

    def __init__(self, n_models: int, n_workers: int, replicas: int | None = None, *, spill_at: int = 4,
                 seed: int = 0, lru_capacity: int | None = None) -> None:
        if n_models < 1 or n_workers < 1:
            raise ConfigError(f"affinity balancer needs 1 or more models and workers, not {n_models} and {n_workers}")
        if replicas is None:
            replicas = default_replicas(n_workers, n_models, lru_capacity)
        if not 1 <= replicas <= n_workers:
            raise ConfigError(f"affinity: replicas must be between 1 and the {n_workers} workers, not {replicas}")
        if spill_at < 1:
            raise ConfigError(f"affinity: spill_at must be 1 or more images, not {spill_at}")
        self.n_models = n_models
        self.n_workers = n_workers
        self.replicas = replicas
        self.spill_at = spill_at
        self._rank = self._rankings(n_models, n_workers, replicas, seed)
        self._homes = [r[:replicas] for r in self._rank]
        self._next = [0] * n_models  # rotation among equally loaded homes, per model
        self._spill_next = 0
        self.spills = 0

    @staticmethod
    def _rankings(n_models: int, n_workers: int, replicas: int, seed: int) -> list[tuple[int, ...]]:
        """Per model: its homes first, then every other worker in rendezvous order (fallbacks).

        Bounded-load rendezvous: models in index order take their highest-weight workers that hold fewer
        than ceil(n_models * replicas / n_workers) homes, so no worker is home to many more models than another.
        """
        order = [sorted(range(n_workers), key=lambda w, m=m: _weight(seed, m, w), reverse=True)
                 for m in range(n_models)]
        cap = -(-n_models * replicas // n_workers)
        load = [0] * n_workers
        out = []
        for m in range(n_models):
            homes = [w for w in order[m] if load[w] < cap][:replicas]
            if len(homes) < replicas:  # cannot happen with cap as above, but keep homes distinct and complete
                homes += [w for w in order[m] if w not in homes][:replicas - len(homes)]
            for w in homes:
                load[w] += 1
            out.append(tuple(homes) + tuple(w for w in order[m] if w not in homes))
        return out

    def homes(self, model: int) -> tuple[int, ...]:
        """The model's home workers when every worker is alive."""
        return self._rank[model][:self.replicas]

    def pick(self, model: int, outstanding: Sequence[int] | np.ndarray, alive: Sequence[bool] | np.ndarray) -> int:
        out, live = _lists(outstanding, alive)
        if all(live):
            homes = self._homes[model]
        else:  # a dead home is replaced by the next alive worker of the model's ranking
            homes = []
            for w in self._rank[model]:
                if live[w]:
                    homes.append(w)
                    if len(homes) == self.replicas:
                        break
            if not homes:
                raise WorkerError(_NO_LIVE)
        rot = self._next[model]
        if len(homes) == 1:
            best = homes[0]
        else:
            loads = [out[w] for w in homes]
            best = homes[_first_min(loads, rot)]
        best_load = out[best]
        if best_load - self.spill_at >= min(out):  # cheap test first: min over all workers <= min over alive
            j = _least(out, live, self._spill_next)
            if out[j] + self.spill_at <= best_load:
                self._spill_next = j + 1
                self.spills += 1
                return j
        self._next[model] = rot + 1
        return best


def make_balancer(name: str, n_workers: int, n_models: int, seed: int = 0,
                  lru_capacity: int | None = None) -> Balancer:
    """The policy called ``name`` (round-robin, least-outstanding, p2c, affinity)."""
    if n_workers < 1:
        raise ConfigError(f"balancer '{name}': there are no workers to balance over (got {n_workers})")
    if name == "round-robin":
        return RoundRobin()
    if name == "least-outstanding":
        return LeastOutstanding()
    if name == "p2c":
        return PowerOfTwo(seed)
    if name == "affinity":
        return Affinity(n_models, n_workers, seed=seed, lru_capacity=lru_capacity)
    raise ConfigError(f"'stream.balancer': unknown balancer '{name}'{did_you_mean(name, BALANCER_NAMES)}")


def imbalance(counts: Sequence[int] | np.ndarray) -> float:
    """max/mean - 1 over workers: 0 when every worker got the same number of images."""
    c = np.asarray(counts, dtype=np.float64)
    if c.size == 0 or c.mean() <= 0:
        return 0.0
    return float(c.max() / c.mean() - 1.0)
