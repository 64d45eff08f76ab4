"""Run directories, atomic writers and the results.json envelope."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from cortexbench import results
from cortexbench.errors import ConfigError, CortexbenchError, UsageError
from cortexbench.results import (
    SCHEMA_VERSION,
    envelope,
    new_run_dir,
    read_results,
    to_jsonable,
    write_bytes,
    write_csv,
    write_csv_gz,
    write_json,
    write_text,
)
from cortexbench.stats import LatencyHistogram

NOW = dt.datetime(2024, 5, 6, 7, 8, 9)


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_new_run_dir_names_and_never_reuses(tmp_path):
    root = tmp_path / "results" / "nested"
    a = new_run_dir(root, "stream", now=NOW)
    b = new_run_dir(root, "stream", now=NOW)
    (root / "20240506-070809-single").mkdir()
    c = new_run_dir(root, "single", now=NOW)
    d = new_run_dir(root, "stream", now=NOW)
    assert [p.name for p in (a, b, c, d)] == ["20240506-070809-stream", "20240506-070809-stream-2",
                                             "20240506-070809-single-2", "20240506-070809-stream-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in (a, b, c, d))
    now_dir = new_run_dir(root, "single")
    assert now_dir.name.endswith("-single") and now_dir.name[:8].isdigit()


def test_new_run_dir_unusable_result_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as e:
        new_run_dir(blocker / "results", "stream")
    msg = str(e.value)
    assert "\n" not in msg and str(blocker / "results") in msg and "--result-dir" in msg


def test_write_json_converts_and_reads_back(tmp_path):
    h = LatencyHistogram()
    h.record_many(np.array([1e-3, 2e-3, 3e-3]))
    obj = {
        "i": np.int64(7), "f": np.float32(0.5), "nan": math.nan, "inf": -math.inf, "b": np.bool_(True),
        "arr": np.array([1.0, np.nan, 3.0]), "iarr": np.arange(3, dtype=np.uint8), "path": Path("/x/y"),
        "summary": h.summary(), "empty": LatencyHistogram().summary(), "tuple": (1, 2), 3: "int key",
        "when": dt.datetime(2024, 1, 2, 3, 4, 5), "set": {"b", "a"},
    }
    path = write_json(tmp_path / "out.json", obj)
    data = json.loads(path.read_text())
    assert data["i"] == 7 and data["f"] == 0.5 and data["nan"] is None and data["inf"] is None
    assert data["b"] is True and data["arr"] == [1.0, None, 3.0] and data["iarr"] == [0, 1, 2]
    assert data["path"] == "/x/y" and data["tuple"] == [1, 2] and data["3"] == "int key"
    assert data["summary"]["count"] == 3 and data["summary"]["max_s"] == 3e-3
    assert data["empty"]["p99_s"] is None and data["when"] == "2024-01-02T03:04:05" and data["set"] == ["a", "b"]
    assert "NaN" not in path.read_text()
    assert _leftovers(tmp_path) == []
    with pytest.raises(TypeError, match="object"):
        to_jsonable(object())


def test_failed_writes_leave_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = write_text(tmp_path / "results.json", "old\n")
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})  # fails before anything is written
    assert path.read_text() == "old\n"

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(CortexbenchError) as e:
        write_text(path, "new\n" * 1000)
    assert "No space left" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CortexbenchError):
        write_csv_gz(tmp_path / "r.csv.gz", ["a"], {"a": np.arange(3)})
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path) == [] and not (tmp_path / "r.csv.gz").exists()


def test_written_files_are_complete_and_readable_by_others(tmp_path):
    p = write_bytes(tmp_path / "sub" / "blob.bin", b"\x00\x01" * 10)
    assert p.read_bytes() == b"\x00\x01" * 10
    assert os.stat(p).st_mode & 0o044  # not mkstemp's 0600


def test_write_csv(tmp_path):
    p = write_csv(tmp_path / "t.csv", ["name", "latency_s", "note"],
                  [("a", 0.5, None), ("b,c", math.nan, 'say "hi"')])
    rows = list(csv.reader(p.open()))
    assert rows == [["name", "latency_s", "note"], ["a", "0.5", ""], ["b,c", "", 'say "hi"']]


def _read_gz(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.reader(f))


def test_write_csv_gz_columns_and_rows_agree(tmp_path):
    rng = np.random.default_rng(0)
    n = 1000
    cols = {
        "t_s": rng.random(n) * 1e4,
        "latency_s": rng.lognormal(-6, 1, n),
        "worker": rng.integers(0, 8, n),
        "ok": rng.random(n) > 0.1,
        "model": np.array(["vgg16", "nin", "squeeze,net"])[rng.integers(0, 3, n)],
        "mode": np.array(["cached", 'co"ld'], dtype=object)[rng.integers(0, 2, n)],
    }
    cols["latency_s"][5] = math.nan
    header = list(cols)
    a = write_csv_gz(tmp_path / "a.csv.gz", header, cols)
    b = write_csv_gz(tmp_path / "b.csv.gz", header, [cols[h] for h in header])
    rows = [[*r[:3], int(r[3]), *r[4:]] for r in zip(*[cols[h].tolist() for h in header], strict=True)]
    c = write_csv_gz(tmp_path / "c.csv.gz", header, rows)
    ra, rb, rc = _read_gz(a), _read_gz(b), _read_gz(c)
    assert ra == rb == rc
    assert ra[0] == header and len(ra) == n + 1
    latency = [float(r[1]) if r[1] else math.nan for r in ra[1:]]
    assert np.array_equal(np.array(latency), cols["latency_s"], equal_nan=True)  # exact round trip
    assert [float(r[0]) for r in ra[1:]] == cols["t_s"].tolist()
    assert [r[4] for r in ra[1:]] == cols["model"].tolist() and [r[5] for r in ra[1:]] == cols["mode"].tolist()
    assert ra[6][1] == "" and {r[3] for r in ra[1:]} == {"0", "1"}
    assert a.read_bytes() == write_csv_gz(tmp_path / "d.csv.gz", header, cols).read_bytes()  # no timestamp


def test_write_csv_gz_edge_cases(tmp_path):
    p = write_csv_gz(tmp_path / "e.csv.gz", ["a", "b"], {"a": np.array([]), "b": np.array([])})
    assert _read_gz(p) == [["a", "b"]]
    with pytest.raises(ValueError, match="no column for b"):
        write_csv_gz(tmp_path / "x.csv.gz", ["a", "b"], {"a": np.arange(2)})
    with pytest.raises(ValueError, match="different lengths"):
        write_csv_gz(tmp_path / "x.csv.gz", ["a", "b"], [np.arange(2), np.arange(3)])
    arr = np.arange(6.0).reshape(3, 2)
    assert _read_gz(write_csv_gz(tmp_path / "r.csv.gz", ["a", "b"], arr))[1:] == [["0.0", "1.0"], ["2.0", "3.0"],
                                                                                   ["4.0", "5.0"]]


def test_envelope_and_read_results(tmp_path):
    started = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    env = envelope("stream", {"models": ["nin"]}, {"hostname": "h"}, {"modes": {"cached": {"p99_s": math.nan}}},
                   complete=False, started_at=started, finished_at=started.timestamp() + 61, argv=["x", "--y"])
    assert list(env)[:8] == ["schema_version", "kind", "complete", "started_at", "finished_at", "argv",
                             "config", "machine"]
    assert env["schema_version"] == SCHEMA_VERSION and env["complete"] is False
    assert env["started_at"] == "2024-05-06T07:08:09+00:00" and env["finished_at"] == "2024-05-06T07:09:10+00:00"
    assert env["argv"] == ["x", "--y"] and env["modes"]["cached"]["p99_s"] != env["modes"]["cached"]["p99_s"]
    run = new_run_dir(tmp_path, "stream", now=NOW)
    write_json(run / "results.json", env)
    back = read_results(run)  # a run directory works as well as the file
    assert back["modes"]["cached"]["p99_s"] is None and back["kind"] == "stream"
    assert read_results(run / "results.json") == back
    local = envelope("single", {}, {}, {}, complete=True, started_at=dt.datetime(2024, 1, 1), finished_at=None)
    assert local["started_at"].startswith("2024-01-01T00:00:00") and local["finished_at"] is None
    with pytest.raises(ValueError, match="config"):
        envelope("single", {}, {}, {"config": 1}, complete=True, started_at=None, finished_at=None)


@pytest.mark.parametrize(("content", "words"), [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ('{"kind": "stream"}', "no schema_version"),
    ('{"schema_version": 99}', "upgrade cortexbench"),
    ('{"schema_version": 0}', "version that wrote it"),
])
def test_read_results_errors(tmp_path, content, words):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as e:
        read_results(path)
    assert words in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_csv_gz_of_100k_rows_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    n = 100_000
    cols = {f"f{i}": rng.random(n) for i in range(12)} | {f"i{i}": rng.integers(0, 10**6, n) for i in range(4)}
    p = write_csv_gz(tmp_path / "big.csv.gz", list(cols), cols)
    with gzip.open(p, "rt") as f:
        text = f.read()
    lines = text.splitlines()
    assert len(lines) == n + 1
    last = next(csv.reader(io.StringIO(lines[-1])))
    assert [float(x) for x in last[:12]] == [cols[f"f{i}"][-1] for i in range(12)]
