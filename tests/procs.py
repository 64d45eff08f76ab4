"""Tests that act on a running command (a signal, a node killed) wait for a line it prints: ``read_until``."""

from __future__ import annotations

import re
import subprocess

import pytest


def read_until(proc: subprocess.Popen[str], pattern: re.Pattern[str], what: str) -> list[str]:
    """The stderr lines of ``proc`` up to and including the first that ``pattern`` matches.  It blocks: the
    line is the synchronisation point, no sleeps.  The test fails, with the tail of what came, when the
    command ends without printing one."""
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if pattern.match(line):
            return seen
    pytest.fail(f"no {what} line: " + "".join(seen)[-2000:])
