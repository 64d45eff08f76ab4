"""Tables for reports: markdown and console renderings of one header + rows, and numbers with their units.

Every figure a report prints goes through one of the ``format_*`` functions, so that the console, report.md
and the plots agree on how a number looks: three significant digits, an SI prefix, the unit spelled out.
A missing figure (None, NaN, infinity) is written as an en dash.

    print(console_table(["model", "latency"], [["squeezenet", format_seconds(0.0123)]], align="lr"))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MISSING = "–"

_SECOND_STEPS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _sig(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits, without an exponent and without trailing noise."""
    if x == 0:
        return "0"
    x = float(f"{x:.{digits - 1}e}")  # round first: 0.9996 is 1.00, not 1.000
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def format_seconds(seconds: float | None, digits: int = 3) -> str:
    """A duration with the prefix that keeps it between 1 and 1000: '850 ns', '12.3 µs', '4.56 ms', '1.23 s'."""
    if not _finite(seconds):
        return MISSING
    assert seconds is not None
    if seconds == 0:
        return "0 s"
    for scale, unit in _SECOND_STEPS:
        if abs(seconds) >= scale * 0.9995:
            return f"{_sig(seconds / scale, digits)} {unit}"
    return f"{_sig(seconds / 1e-9, digits)} ns"


def format_bytes(n: float | None, digits: int = 3) -> str:
    """A size in decimal units: '512 B', '4.80 kB', '61.1 MB', '1.23 GB'."""
    if not _finite(n):
        return MISSING
    assert n is not None
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= scale * 0.9995:
            return f"{_sig(n / scale, digits)} {unit}"
    return f"{int(n)} B"


def format_count(n: float | None, digits: int = 3) -> str:
    """A count with a prefix: '842', '12.5 k', '1.23 M', '4.56 G'."""
    if not _finite(n):
        return MISSING
    assert n is not None
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale * 0.9995:
            return f"{_sig(n / scale, digits)} {unit}"
    return f"{n:.0f}" if float(n).is_integer() else _sig(n, digits)


def format_rate(per_s: float | None, unit: str = "img/s", digits: int = 3) -> str:
    """A rate: '0.512 img/s', '87.3 img/s', '12,345 img/s' (thousands get separators, not prefixes)."""
    if not _finite(per_s):
        return MISSING
    assert per_s is not None
    if abs(per_s) >= 10 ** digits:
        return f"{per_s:,.0f} {unit}"
    return f"{_sig(per_s, digits)} {unit}"


def format_ratio(x: float | None, digits: int = 3) -> str:
    """A speed-up or ratio: '3.21×'."""
    if not _finite(x):
        return MISSING
    assert x is not None
    return f"{_sig(x, digits)}×"


def format_percent(fraction: float | None, digits: int = 3) -> str:
    """A fraction as a percentage with ``digits`` significant digits: 0.01984 -> '1.98%', 0.13 -> '13.0%'."""
    if not _finite(fraction):
        return MISSING
    assert fraction is not None
    pct = fraction * 100
    if abs(pct) >= 10 ** digits:
        return f"{pct:,.0f}%"
    return f"{_sig(pct, digits)}%"


def _cells(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[list[str]]:
    out = []
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, the header {len(header)}")
        out.append([MISSING if c is None else str(c) for c in row])
    return out


def _aligns(header: Sequence[str], align: str | None) -> str:
    if align is None:
        return "l" * len(header)
    if len(align) != len(header) or set(align) - set("lrc"):
        raise ValueError(f"align must be one of l, r, c per column ({len(header)}), not {align!r}")
    return align


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` is one letter per column: l, r or c."""
    al = _aligns(header, align)
    cells = _cells(header, rows)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(rule[a] for a in al) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def console_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None,
                  indent: str = "") -> str:
    """A plain-text table padded with spaces, with a rule under the header, for a terminal."""
    al = _aligns(header, align)
    cells = _cells(header, rows)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        parts = []
        for v, w, a in zip(values, widths, al, strict=True):
            parts.append(v.rjust(w) if a == "r" else v.center(w) if a == "c" else v.ljust(w))
        return (indent + "  ".join(parts)).rstrip()

    out = [line(list(header)), indent + "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out) + "\n"
