"""cortexbench.config: the built-in default, flags named in errors, range checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cortexbench import single, stream
from cortexbench.cli import flags_of
from cortexbench.config import BUILTIN_CONFIG, load_config
from cortexbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_packaged_default_is_the_repository_config_json():
    assert BUILTIN_CONFIG.read_bytes() == (ROOT / "config.json").read_bytes()
    keys = json.loads(BUILTIN_CONFIG.read_text())
    assert {"models", "img_dir", "result_dir", "model_dir", "gpu_num", "batchsize", "times"} <= set(keys)


def test_without_config_json_the_built_in_default_applies_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, has_gpu=False)
    assert cfg.builtin and cfg.path == BUILTIN_CONFIG
    assert cfg.img_dir == tmp_path / "data" / "images" and cfg.model_dir == tmp_path / "data" / "models"
    assert cfg.result_dir == tmp_path / "results"
    # the CPU fallback of the file: 4 small models, 400 images, not the 8 ImageNet models
    assert cfg.models == ("squeezenet", "nin", "mnist_cnn", "digits_cnn") and cfg.times == 400
    assert cfg.source("times") == "cpu_fallback"
    line = cfg.describe()
    assert line.startswith("config: the built-in default (") and str(tmp_path) in line and "cpu_fallback" in line
    with_gpu = load_config(None, has_gpu=True)
    assert with_gpu.times == 100_000 and "cpu_fallback" not in with_gpu.describe()


def test_a_config_json_in_the_current_directory_wins_over_the_built_in_one(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"times": 7, "result_dir": "out"}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, has_gpu=False)
    assert not cfg.builtin and cfg.times == 7 and cfg.result_dir == tmp_path / "out"
    assert cfg.describe() == f"config: {tmp_path / 'config.json'}"


@pytest.mark.parametrize(("main", "argv", "message"), [
    (single.main, ["--batch-sizes", "x"], "--batch-sizes: 'batchsize' must be an integer, not \"x\""),
    (stream.main, ["--gpus", "x"], "--gpus: 'gpu_num' must be an integer or 'auto', not \"x\""),
    (stream.main, ["--mode", "lru:0"], "--mode: 'stream.modes'"),
    (stream.main, ["--linger", "-1"], "--linger: 'stream.linger_s' must be 0 or more seconds"),
    (stream.main, ["--drain-timeout", "-0.5"], "--drain-timeout: 'stream.drain_timeout_s' must be 0 or more"),
    (stream.main, ["--popularity", "zipfian"], "--popularity: 'stream.popularity': unknown popularity 'zipfian'"),
])
def test_a_bad_flag_value_names_the_flag_in_one_line(main, argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_the_same_value_from_the_file_names_the_file_key_not_a_flag(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"stream": {"linger_s": -1}}))
    with pytest.raises(ConfigError, match=r"^'stream.linger_s' must be 0 or more"):
        load_config(tmp_path / "c.json", flags=flags_of(stream.STREAM_KEYS))


def test_gpus_auto_is_accepted():
    assert stream.build_parser().parse_args(["--gpus", "auto"]).gpus == "auto"
    cfg = load_config(None, {"gpu_num": "auto"}, has_gpu=True)
    assert cfg.gpu_num == "auto" and cfg.from_flag("gpu_num")
    assert load_config(None, {"gpu_num": "2"}, has_gpu=True).gpu_num == 2


@pytest.mark.parametrize(("key", "file_value", "flag_value"), [
    ("times", "many", 10),
    ("stream.concurrency", -3, 8),
    ("stream.inputs", "bmp", "jpeg"),
])
def test_a_wrong_file_value_is_refused_even_when_a_flag_overrides_it(tmp_path, key, file_value, flag_value):
    section, _, name = key.rpartition(".")
    body = {section: {name: file_value}} if section else {name: file_value}
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=rf"^{cfg}: '{key}' .*a flag overrides it in this run, but the file is wrong"):
        load_config(cfg, {key: flag_value})
    body2 = {section: {name: flag_value}} if section else {name: flag_value}
    cfg.write_text(json.dumps(body2))
    assert load_config(cfg, {key: flag_value}) is not None  # a right value overridden is fine


def test_the_file_check_keeps_the_flags_other_values(tmp_path):
    """A server's own model names are fine with --target from a flag, though the file alone has none."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"models": ["my_served_model"], "times": 5}))
    got = load_config(cfg, {"stream.target": "http://127.0.0.1:1", "times": 7})
    assert got.times == 7 and got.models == ("my_served_model",)


def test_every_key_is_documented_in_config_md_and_every_stream_flag_in_usage_md():
    from cortexbench.config import Config, keys_of

    config_md = (ROOT / "docs" / "config.md").read_text()
    assert [k for k in keys_of(Config) if f"`{k}`" not in config_md] == []
    usage_md = (ROOT / "docs" / "usage.md").read_text()
    flags = sorted(set(flags_of(stream.STREAM_KEYS).values()) - {"--models", "--backend", "--precision",
                                                                 "--result-dir", "--model-dir", "--img-dir",
                                                                 "--seed"})
    assert [f for f in flags if f"`{f}" not in usage_md] == []
