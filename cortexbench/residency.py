"""Model residency on a worker: which models stay loaded on the device between images.

- ``cached``: every model is loaded before the run and stays; inputs are decoded before the run too.
- ``cold``: for every image the model file and the image file are read from disk, the model is loaded
  onto the device, run once and freed.
- ``lru:K``: at most K models stay loaded; a miss loads the model (evicting the least recently used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cortexbench.errors import ConfigError

ModeKind = Literal["cached", "cold", "lru"]


@dataclass(frozen=True)
class Mode:
    kind: ModeKind
    capacity: int = 0  # lru only

    def __str__(self) -> str:
        return f"lru:{self.capacity}" if self.kind == "lru" else self.kind


def parse_mode(text: str, key: str = "mode") -> Mode:
    """'cached', 'cold' or 'lru:K' (K >= 1)."""
    t = text.strip().lower()
    if t in ("cached", "cold"):
        return Mode(t)  # type: ignore[arg-type]
    if t.startswith("lru"):
        _, _, k = t.partition(":")
        if k.isdigit() and int(k) >= 1:
            return Mode("lru", int(k))
        raise ConfigError(f"'{key}': '{text}' needs a capacity of 1 or more models, as in 'lru:2'")
    raise ConfigError(f"'{key}': unknown mode '{text}' (valid: cached, cold, lru:K)")
