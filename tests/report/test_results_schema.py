"""docs/results.schema.json: a valid Draft 2020-12 schema that the results.json of real runs of every kind
meet (single, stream, each sweep, a peak search), and that a results.json with a broken section fails."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from cortexbench.results import SCHEMA_VERSION
from tests.report.runs import SCHEMA, schema_errors, stream_run_dir


def _doc(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_the_schema_is_draft_2020_12_and_names_the_version_results_py_writes():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION,
                                                      "description": schema["properties"]["schema_version"]["description"]}


def test_every_results_json_of_the_runs_meets_the_schema(stream_runs, single_run, tmp_path_factory):
    """The report tests' runs (stream, lru, concurrency and rate sweeps, repeats, single), and every other
    results.json this test session has written so far."""
    runs = [d for d in stream_runs.values() if (d / "results.json").is_file()] + [single_run]
    kinds = {(_doc(d)["kind"], (_doc(d).get("sweep") or {}).get("kind")) for d in runs}
    assert kinds == {("stream", None), ("stream", "lru"), ("stream", "concurrency"), ("stream", "rate"),
                     ("single", None)}
    others = set(tmp_path_factory.getbasetemp().glob("**/results.json")) - {d / "results.json" for d in runs}
    for path in [d / "results.json" for d in runs] + sorted(others):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:  # runs write atomically: only a test's deliberately broken file is broken
            assert path not in {d / "results.json" for d in runs}
            continue
        if doc.get("schema_version") != SCHEMA_VERSION:
            continue  # a test's deliberately foreign file (the report tests' 'newer' one)
        assert schema_errors(doc) == [], path


def _break(doc: dict, where: str) -> dict:
    bad = copy.deepcopy(doc)
    if where == "version":
        bad["schema_version"] = 2
    elif where == "kind":
        bad["kind"] = "batch"
    elif where == "envelope":
        del bad["machine"]
    elif where == "started_at":
        bad["started_at"] = "yesterday"
    elif where == "summary":
        del next(iter(bad["modes"].values()))["summary"]["throughput_images_per_s"]
    elif where == "hit_ratio":
        next(iter(bad["modes"].values()))["summary"]["hit_ratio"] = 1.5
    elif where == "sweep_row":
        del bad["sweep"]["rows"][0]["hit_ratio" if bad["sweep"]["kind"] == "lru" else "value"]
    elif where == "point":
        del bad["points"][0]["throughput_images_per_s"]
    elif where == "device":
        bad["devices"] = ["tpu"]
    return bad


@pytest.mark.parametrize("run,where", [("lru", "version"), ("lru", "kind"), ("lru", "envelope"), ("lru", "started_at"),
                                       ("lru", "summary"), ("lru", "hit_ratio"), ("lru", "sweep_row"),
                                       ("concurrency", "sweep_row"), ("single", "point"), ("single", "device")])
def test_a_results_json_with_a_broken_section_fails(stream_runs, single_run, run, where):
    doc = _doc(single_run if run == "single" else stream_runs[run])
    assert schema_errors(doc) == []
    assert schema_errors(_break(doc, where)) != []


@pytest.mark.slow
def test_a_peak_search_meets_the_schema(tmp_path):
    """A coarse peak search (bracket within 50%) on one fake worker of 4 ms an image, from 200/s."""
    run_dir = stream_run_dir(tmp_path, find_peak=True, slo=("mean=50ms",), count=100, service_s=0.004, lanes=1,
                             rate=200.0)
    doc = _doc(run_dir)
    assert doc["peak"]["cached"]["steps"] and doc["cost"]["modes"]["cached"]["basis"] in ("peak", "throughput")
    assert schema_errors(doc) == []
    del doc["peak"]["cached"]["steps"][0]["verdict"]
    assert schema_errors(doc) != []
