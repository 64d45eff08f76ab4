"""``python -m cortexbench.report``: one run's report.md and self-contained report.html, several runs compared
against the first (the spread of repeats included), and one line and exit 2 for a bad directory."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from cortexbench import cli
from cortexbench.report.__main__ import main
from cortexbench.stats import relative_spread

IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+\.png)\)")


def _embedded(page: str) -> list[bytes]:
    return [base64.b64decode(u) for u in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def _assert_self_contained(run_dir: Path) -> str:
    """report.html holds every picture report.md shows, byte for byte, and reaches for nothing else."""
    md = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    shown = IMAGE.findall(md)
    assert shown and _embedded(page) == [(run_dir / name).read_bytes() for name in shown]
    assert 'class="missing"' not in page and not re.search(r"<(link|script)\b|src=\"(?!data:)", page)
    return page


@pytest.mark.parametrize("which", ["lru", "concurrency", "rate"])
def test_one_stream_run_renders_its_report_again_and_as_one_html_page(stream_runs, which, tmp_path, capsys):
    run_dir = _copy(stream_runs[which], tmp_path)
    written = (run_dir / "report.md").read_text()
    assert main([str(run_dir)]) == 0
    assert capsys.readouterr().out == f"report: {run_dir / 'report.html'}\n"
    assert (run_dir / "report.md").read_text() == written  # the same report the run wrote, from results.json
    page = _assert_self_contained(run_dir)
    sweep = {"lru": "cache_sweep.png", "concurrency": "concurrency_sweep.png", "rate": "rate_sweep.png"}.get(which)
    if sweep:
        assert f"({sweep})" in written and "<h2 id=\"" + which.replace("lru", "cache") + "-sweep\">" in page


def test_a_sweeps_picture_that_is_missing_is_drawn_from_results_json(stream_runs, tmp_path):
    run_dir = _copy(stream_runs["lru"], tmp_path)
    (run_dir / "cache_sweep.png").unlink()
    assert main([str(run_dir), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert (run_dir / "cache_sweep.png").is_file() and (out / "cache_sweep.png").is_file()
    _assert_self_contained(out)  # report.md and the plots it shows copied beside report.html


def test_a_single_run_renders_with_its_plots(single_run, tmp_path):
    run_dir = _copy(single_run, tmp_path)
    written = (run_dir / "report.md").read_text()
    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == written
    page = _assert_self_contained(run_dir)
    assert "model_size.png" in written and "<h1 id=\"cortexbench-single-" in page


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_runs_compared_against_the_first_with_the_spread_of_repeats(stream_runs, tmp_path, capsys):
    """'repeats' (two runs) is the baseline; 'slower' (2 ms an image instead of 1) is set against it: its
    ratios are its figures over the repeats' means, the repeats' spread is stats.relative_spread of them."""
    out = tmp_path / "cmp"
    assert main([str(stream_runs["repeats"]), str(stream_runs["slower"].parent), "--out", str(out)]) == 0
    console = capsys.readouterr().out
    assert console.endswith(f"report: {out / 'report.html'}\n") and "cached  slower" in console
    reps = [_results(stream_runs[k])["modes"]["cached"]["summary"] for k in ("repeat1", "repeat2")]
    slow = _results(stream_runs["slower"])["modes"]["cached"]["summary"]
    tput = [r["throughput_images_per_s"] for r in reps]
    p99 = [r["latency"]["p99_s"] for r in reps]
    md = (out / "report.md").read_text()
    from cortexbench.report.tables import format_percent, format_rate, format_ratio, format_seconds

    mean_t, mean_p99 = sum(tput) / 2, sum(p99) / 2
    base_row = (f"| cached | repeats | 2 | {format_rate(mean_t)} ±{format_percent(relative_spread(tput), 2)} | 1.00× "
                f"| ")
    assert base_row in md
    ratio_t = format_ratio(slow["throughput_images_per_s"] / mean_t)
    ratio_p99 = format_ratio(slow["latency"]["p99_s"] / mean_p99)
    slow_row = re.search(r"^\| cached \| slower \| 1 \| (.*)$", md, re.M)
    assert slow_row is not None
    cells = [c.strip() for c in slow_row.group(1).split("|")]
    assert cells[:2] == [format_rate(slow["throughput_images_per_s"]), ratio_t]
    assert cells[4:6] == [format_seconds(slow["latency"]["p99_s"]), ratio_p99]
    assert "| stream.sweep |" not in md and "## What differs" in md  # only the model differs: null vs null
    page = _assert_self_contained(out)
    assert "compare.png" in md and "<h2 id=\"throughput-and-latency-against-the-first-run\">" in page


def test_several_runs_go_to_a_new_compare_directory_by_default(stream_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(stream_runs["repeats"]), str(stream_runs["lru"].parent)]) == 0
    (made,) = (tmp_path / "results").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-compare", made.name)
    assert capsys.readouterr().out.endswith(f"report: {Path('results') / made.name / 'report.html'}\n")
    md = (made / "report.md").read_text()
    assert "| lru:1 | lru | 1 |" in md and "| cold | lru | 1 |" in md and "| cached | repeats | 2 |" in md
    assert "| stream.sweep | '' | lru:1 |" in md


def _bad(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "results.json").write_text(json.dumps({"schema_version": 99, "kind": "stream"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{\"schema_version\": 1, ")
    return {"missing": ([str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such directory"),
            "empty": ([str(empty)], f"{empty}: no results.json; give a run directory, or a folder of run "
                                    "directories (the repeats of one run)"),
            "newer": ([str(newer)], f"{newer / 'results.json'}: results schema_version 99 is not the one this "
                                    "cortexbench reads (1); upgrade cortexbench"),
            "broken": ([str(broken)], f"{broken / 'results.json'}: not valid JSON")}


@pytest.mark.parametrize("case", ["missing", "empty", "newer", "broken", "kinds"])
def test_a_bad_directory_is_one_line_and_exit_2(case, stream_runs, single_run, tmp_path, capsys):
    if case == "kinds":
        argv, says = [str(stream_runs["lru"]), str(single_run)], \
            "cannot compare runs of different kinds (stream and single)"
    else:
        argv, says = _bad(tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m cortexbench.report: error: {says}") and err.count("\n") == 1, err
    assert not list(tmp_path.glob("**/report.html"))
