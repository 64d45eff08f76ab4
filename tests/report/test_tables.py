"""Number formatting with units, and markdown / console tables."""

from __future__ import annotations

import math

import pytest

from cortexbench.report.tables import (
    MISSING,
    console_table,
    format_bytes,
    format_count,
    format_percent,
    format_rate,
    format_ratio,
    format_seconds,
    markdown_table,
)


@pytest.mark.parametrize("seconds, text", [
    (1.234, "1.23 s"), (12.5, "12.5 s"), (0.0123, "12.3 ms"), (0.000456, "456 µs"), (4.2e-7, "420 ns"),
    (0.0009996, "1.00 ms"), (0.00099949, "999 µs"), (0.0, "0 s"), (250.0, "250 s"), (1e-10, "0.100 ns"),
])
def test_format_seconds_picks_the_prefix_that_keeps_three_digits(seconds, text):
    assert format_seconds(seconds) == text


@pytest.mark.parametrize("missing", [None, math.nan, math.inf, -math.inf])
def test_missing_figures_are_a_dash(missing):
    for fmt in (format_seconds, format_bytes, format_count, format_rate, format_ratio, format_percent):
        assert fmt(missing) == MISSING


def test_format_bytes_uses_decimal_units():
    assert format_bytes(512) == "512 B"
    assert format_bytes(31_500) == "31.5 kB"
    assert format_bytes(4_810_000) == "4.81 MB"
    assert format_bytes(553_000_000) == "553 MB"
    assert format_bytes(1.5e9) == "1.50 GB"


def test_format_count_rate_ratio_percent():
    assert format_count(842) == "842"
    assert format_count(6120) == "6.12 k"
    assert format_count(1_199_882) == "1.20 M"
    assert format_count(0) == "0"
    assert format_rate(0.5123) == "0.512 img/s"
    assert format_rate(87.34) == "87.3 img/s"
    assert format_rate(32486.2) == "32,486 img/s"
    assert format_rate(12.0, unit="req/s") == "12.0 req/s"
    assert format_ratio(3.214) == "3.21×"
    assert format_percent(0.01984) == "1.98%"
    assert format_percent(0.13) == "13.0%"
    assert format_percent(0.0) == "0%"
    assert format_percent(25.0) == "2,500%"


def test_markdown_table_aligns_and_escapes():
    text = markdown_table(["model", "latency"], [["a|b", "1 ms"], ["c", None]], align="lr")
    lines = text.splitlines()
    assert lines[0] == "| model | latency |"
    assert lines[1] == "|:---|---:|"
    assert lines[2] == "| a\\|b | 1 ms |"
    assert lines[3] == f"| c | {MISSING} |"


def test_console_table_pads_columns_and_right_aligns_numbers():
    text = console_table(["model", "n"], [["squeezenet", "1"], ["nin", "100"]], align="lr")
    lines = text.splitlines()
    assert lines[0] == "model         n"
    assert lines[1] == "----------  ---"
    assert lines[2] == "squeezenet    1"
    assert lines[3] == "nin         100"
    assert len({len(line) for line in lines}) == 1


def test_tables_reject_ragged_rows_and_bad_alignments():
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["1"]])
    with pytest.raises(ValueError):
        console_table(["a", "b"], [["1", "2"]], align="lx")
    with pytest.raises(ValueError):
        console_table(["a", "b"], [["1", "2"]], align="l")
