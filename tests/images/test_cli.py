"""python -m cortexbench.images: subcommands, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cortexbench.images.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err


def test_synth_then_info(tmp_path, capsys):
    d = tmp_path / "imgs"
    assert main(["synth", "--count", "3", "--out", str(d), "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 written, 0 already there" in out and "mean file size" in out
    assert main(["synth", "--count", "3", "--out", str(d), "--quiet"]) == 0
    assert "0 written, 3 already there" in capsys.readouterr().out
    assert main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "files         3" in out and "decode ok     3" in out and "decode bad    0" in out


def test_info_missing_dir_exits_2_with_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    _one_line_error(captured.err)
    assert "does not exist" in captured.err and "synth --count 500" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("argv", [
    [],
    ["nope"],
    ["synth", "--out", "x"],
    ["synth", "--count", "many", "--out", "x"],
    ["synth", "--count", "0", "--out", "{tmp}/x"],
    ["fetch", "--urls", "{tmp}/none.txt", "--out", "{tmp}/o", "--count", "3"],
    ["fetch", "--urls", "{tmp}/none.txt", "--out", "{tmp}/o", "--count", "3", "--timeout", "0"],
])
def test_bad_input_exits_2(tmp_path, capsys, argv):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    _one_line_error(capsys.readouterr().err)


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "synth" in capsys.readouterr().out


def test_module_entry_point_missing_dir(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cortexbench.images", "info", str(tmp_path / "missing")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    _one_line_error(r.stderr)


def test_cortexbench_images_command_is_wired(tmp_path, capsys):
    from cortexbench.cli import main as cli_main

    assert cli_main(["images", "info", str(tmp_path)]) == 2
    assert "no images" in capsys.readouterr().err
