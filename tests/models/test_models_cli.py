"""``python -m cortexbench.models``: list, export, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from cortexbench.models import __main__ as cli
from cortexbench.models import backends
from cortexbench.models.backends.base import null_file
from cortexbench.models.export import read_manifest
from cortexbench.models.registry import REGISTRY


@pytest.fixture(autouse=True)
def _no_config_json(tmp_path, monkeypatch):
    """Run from an empty directory, so that the checkout's config.json is not read."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def _one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m cortexbench.models") and "error" in lines[0]
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_export_then_list(tmp_path, capsys):
    d = tmp_path / "models"
    assert cli.main(["export", "--models", "null,mlp2", "--backend", "torch", "--model-dir", str(d)]) == 0
    err = capsys.readouterr().err
    assert "export: null/torch: wrote null/null.json" in err and "export: mlp2/torch: wrote" in err
    assert null_file(d).exists()
    assert {(e["name"], e["backend"]) for e in read_manifest(d)} == {("null", "torch"), ("mlp2", "torch")}

    assert cli.main(["list", "--model-dir", str(d)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["MODEL", "GROUP", "INPUT", "BACKENDS"] and header[-1] == "DESCRIPTION"
    assert "torch" in header
    rows = {line.split()[0]: line for line in lines[1:len(REGISTRY) + 1]}
    assert set(rows) == set(REGISTRY)
    start = lines[0].index(" torch ") + 1  # cells are padded to the header's columns
    end = start + len(lines[0][start:]) - len(lines[0][start:].split(" ", 1)[1].lstrip())
    torch_cell = {name: row[start:end].strip() for name, row in rows.items()}
    assert torch_cell["null"] == "31 B" and torch_cell["mlp2"].endswith(" KB")  # exported, with its size
    assert torch_cell["digits_cnn"] == "-" and torch_cell["vgg16"] == "-"  # not exported yet
    assert "1x8x8" in rows["digits_cnn"] and "small" in rows["digits_cnn"] and "8x8 digits" in rows["digits_cnn"]
    assert "torch" in rows["mlp2"].split()[3].split(",")


def test_quiet_export_prints_nothing(tmp_path, capsys):
    d = tmp_path / "m"
    assert cli.main(["export", "--models", "null", "--backend", "torch", "--model-dir", str(d), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert null_file(d).exists()


def test_defaults_come_from_the_config(tmp_path, capsys):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps({"models": ["null"], "model_dir": "mdl", "seed": 5}))
    assert cli.main(["export", "--config", str(cfg_dir / "config.json"), "--backend", "torch", "--quiet"]) == 0
    assert null_file(cfg_dir / "mdl").exists()  # model_dir is relative to the config file
    assert [e["name"] for e in read_manifest(cfg_dir / "mdl")] == ["null"]


def test_all_installed_is_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "installed", lambda name: name == "torch")
    d = tmp_path / "m"
    assert cli.main(["export", "--models", "null", "--model-dir", str(d), "--quiet"]) == 0
    assert [(e["name"], e["backend"]) for e in read_manifest(d)] == [("null", "torch")]


@pytest.mark.parametrize(("argv", "words"), [
    (["export", "--models", "nope", "--backend", "torch"], ["unknown model 'nope'"]),
    (["export", "--models", "vgg1", "--backend", "torch"], ["unknown model 'vgg1'", "did you mean"]),
    (["export", "--models", "null", "--backend", "torh"], ["unknown backend 'torh'", "did you mean 'torch'"]),
    (["export", "--models", "null", "--config", "missing.json"], ["missing.json", "no such file"]),
    (["list", "--config", "missing.json"], ["missing.json"]),
    (["export", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["export", "--seed", "x"], ["--seed"]),
    (["frobnicate"], ["frobnicate"]),
    ([], ["COMMAND"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    assert cli.main([*argv, "--model-dir", str(tmp_path / "m")] if argv[:1] == ["export"] else argv) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, *words)
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_backend_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backends, "_CACHE", {})
    monkeypatch.setattr(backends, "installed", lambda name: name != "onnxruntime")
    assert cli.main(["export", "--models", "null", "--backend", "onnxruntime", "--model-dir", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "backend 'onnxruntime'", "pip install 'cortexbench[onnx]'")
    monkeypatch.setattr(cli, "installed", lambda name: False)
    assert cli.main(["export", "--models", "null", "--model-dir", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "no backend is installed")


def test_list_notes_backends_that_are_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "installed", lambda name: name == "torch")
    assert cli.main(["list", "--model-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mxnet: not installed (pip install 'cortexbench[mxnet]')" in out
    assert "onnxruntime" not in out.splitlines()[0]


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "export" in capsys.readouterr().out
    assert cli.main(["export", "--help"]) == 0
    assert "--force" in capsys.readouterr().out
