"""Model residency on a worker: which models stay loaded on the device between images.

- ``cached``: every model is loaded before the run and stays; inputs are decoded before the run too.
- ``swap``: the weights of every model are held in host memory (pinned on a GPU) before the run; for every
  image they are copied to the device, the model is run once and its device copy freed (the host-memory
  tier of multi-model servers).  Inputs are held in memory, as in cached mode.
- ``cold``: for every image the model file and the image file are read from disk, the model is loaded
  onto the device, run once and freed.
- ``lru:K``: at most K models stay loaded; a miss loads the model (evicting the least recently used).

A worker asks its ``Residency`` (``make_residency(mode, models)``) before each image: ``access(model)``
says whether the model is already loaded (hit), whether to keep it after the image, and which models to
free to make room.  If loading then fails the worker calls ``forget(model)`` so that the model is not
counted as resident.  Plain Python, no framework: the same policies drive the unit tests' simulations.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from cortexbench.errors import ConfigError, did_you_mean

ModeKind = Literal["cached", "swap", "cold", "lru"]
MODE_KINDS: tuple[str, ...] = ("cached", "swap", "cold", "lru:K")


@dataclass(frozen=True)
class Mode:
    kind: ModeKind
    capacity: int = 0  # lru only

    def __str__(self) -> str:
        return f"lru:{self.capacity}" if self.kind == "lru" else self.kind


def parse_mode(text: str, key: str = "mode") -> Mode:
    """'cached', 'swap', 'cold' or 'lru:K' (K >= 1)."""
    t = text.strip().lower()
    if t in ("cached", "swap", "cold"):
        return Mode(t)  # type: ignore[arg-type]
    if t.startswith("lru"):
        _, _, k = t.partition(":")
        if k.isdigit() and int(k) >= 1:
            return Mode("lru", int(k))
        raise ConfigError(f"'{key}': '{text}' needs a capacity of 1 or more models, as in 'lru:2'")
    near = did_you_mean(t, MODE_KINDS)
    raise ConfigError(f"'{key}': unknown mode '{text}'{near if 'did you' in near else ''} "
                      f"(valid: {', '.join(MODE_KINDS)})")


@dataclass(frozen=True)
class Access:
    """What a worker does for one image: use the resident model (hit) or load it; keep it or free it."""

    hit: bool  # the model is resident and can be used at once
    keep: bool  # keep it loaded after this image (False in cold mode: free it after use)
    evict: tuple[str, ...] = ()  # models to free (before loading this one, to make room)


# The accesses that carry no eviction are shared constants: access() allocates nothing on its usual paths.
HIT = Access(hit=True, keep=True)
MISS_KEEP = Access(hit=False, keep=True)
MISS_FREE = Access(hit=False, keep=False)


@runtime_checkable
class Residency(Protocol):
    """Which models a worker keeps loaded.  ``hits``, ``misses`` and ``evictions`` count accesses."""

    mode: Mode
    hits: int
    misses: int
    evictions: int

    def access(self, model: str) -> Access: ...

    def resident(self) -> tuple[str, ...]: ...

    def forget(self, model: str) -> None: ...


class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def reset_counters(self) -> None:
        """Zero the counters (after warm-up), keeping what is resident."""
        self.hits = self.misses = self.evictions = 0

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class Cached(_Counters):
    """Every model is loaded before the run and stays: always a hit.  A model not in the list is a miss that
    is then kept (so it hits from then on)."""

    def __init__(self, models: Sequence[str]) -> None:
        self.mode = Mode("cached")
        self._resident = dict.fromkeys(models)

    def access(self, model: str) -> Access:
        if model in self._resident:
            self.hits += 1
            return HIT
        self.misses += 1
        self._resident[model] = None
        return MISS_KEEP

    def resident(self) -> tuple[str, ...]:
        return tuple(self._resident)

    def forget(self, model: str) -> None:
        self._resident.pop(model, None)


class Cold(_Counters):
    """Nothing stays on the device: every image loads its model (from disk, or from host memory in swap
    mode) and frees it afterwards."""

    def __init__(self, mode: Mode | None = None) -> None:
        self.mode = mode or Mode("cold")

    def access(self, model: str) -> Access:
        self.misses += 1
        return MISS_FREE

    def resident(self) -> tuple[str, ...]:
        return ()

    def forget(self, model: str) -> None:
        return None


class Lru(_Counters):
    """At most ``capacity`` models stay; a miss admits the model and evicts the least recently used."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"lru capacity must be 1 or more models, not {capacity}")
        self.mode = Mode("lru", capacity)
        self.capacity = capacity
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._evicting: dict[str, Access] = {}  # the (immutable) miss that evicts a given model, reused

    def access(self, model: str) -> Access:
        lru = self._lru
        if model in lru:
            lru.move_to_end(model)
            self.hits += 1
            return HIT
        self.misses += 1
        lru[model] = None
        if len(lru) <= self.capacity:
            return MISS_KEEP
        old = lru.popitem(last=False)[0]  # one admission evicts exactly one model
        self.evictions += 1
        access = self._evicting.get(old)
        if access is None:
            access = self._evicting[old] = Access(hit=False, keep=True, evict=(old,))
        return access

    def resident(self) -> tuple[str, ...]:
        """Resident models, least recently used first."""
        return tuple(self._lru)

    def forget(self, model: str) -> None:
        self._lru.pop(model, None)


def make_residency(mode: Mode | str, models: Sequence[str]) -> Cached | Cold | Lru:
    """The residency policy of ``mode`` ('cached', 'swap', 'cold', 'lru:K' or a parsed Mode) over ``models``."""
    m = parse_mode(mode) if isinstance(mode, str) else mode
    if m.kind == "cached":
        return Cached(models)
    if m.kind in ("cold", "swap"):
        return Cold(m)
    return Lru(m.capacity)
