"""The seeded image stream: arrival times, model choices and image ids, replayable for every mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cortexbench.errors import ConfigError


@dataclass(frozen=True)
class Popularity:
    kind: Literal["uniform", "zipf"]
    s: float = 0.0

    def __str__(self) -> str:
        return f"zipf:{self.s:g}" if self.kind == "zipf" else "uniform"


def parse_popularity(text: str, key: str = "popularity") -> Popularity:
    """'uniform' or 'zipf:S' with S > 0."""
    t = text.strip().lower()
    if t == "uniform":
        return Popularity("uniform")
    if t.startswith("zipf"):
        _, _, s = t.partition(":")
        try:
            value = float(s) if s else 1.0
        except ValueError:
            value = -1.0
        if value > 0:
            return Popularity("zipf", value)
        raise ConfigError(f"'{key}': '{text}' needs an exponent above 0, as in 'zipf:1.1'")
    raise ConfigError(f"'{key}': unknown popularity '{text}' (valid: uniform, zipf:S)")
