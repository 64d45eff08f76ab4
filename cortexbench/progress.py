"""Progress on long work: a one-line bar on a terminal, a line every few seconds elsewhere (CI logs).

    with Progress("export", total=24) as bar:
        for item in items:
            ...
            bar.advance(1, note=item.name)

``Progress(..., enabled=False)`` prints nothing (``--quiet``).  Output goes to stderr so that stdout stays
for tables and file paths.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A progress bar with rate and time left; redraws at most ``interval_s`` apart."""

    def __init__(self, label: str, total: int | None = None, *, unit: str = "", enabled: bool = True,
                 stream: TextIO | None = None, interval_s: float | None = None) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.note = ""
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if interval_s is not None else (0.1 if self.tty else 5.0)
        self.start = time.monotonic()
        self._last = 0.0
        self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close(ok=et is None)

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        self._maybe_draw()

    def set(self, done: int, note: str | None = None) -> None:
        self.done = done
        if note is not None:
            self.note = note
        self._maybe_draw()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 20)
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            text = (f"{self.label} [{bar:<20}] {self.done}/{self.total}{unit} {frac:4.0%} "
                    f"{rate:,.1f}{unit}/s {_fmt_duration(elapsed)} elapsed, ~{_fmt_duration(left)} left")
        else:
            text = f"{self.label} {self.done}{unit} {rate:,.1f}{unit}/s {_fmt_duration(elapsed)}"
        return f"{text}  {self.note}" if self.note else text

    def _maybe_draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        text = self.line()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, ok: bool = True) -> None:
        if not self.enabled:
            return
        self._maybe_draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False
