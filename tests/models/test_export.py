"""export_models, ensure_models and the manifest: with a fake backend, then with the real ones."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cortexbench.errors import ConfigError, ModelFileError, ModelNotFoundError
from cortexbench.models.backends import get_backend
from cortexbench.models.backends.base import ExportResult, LoadOptions, null_file
from cortexbench.models.export import (
    MANIFEST,
    ensure_models,
    export_models,
    missing_models,
    read_manifest,
    update_manifest,
)
from cortexbench.models.registry import ModelSpec, get_spec


@dataclass
class FakeBackend:
    """Writes a few seeded bytes per model; keeps files already there unless force, as backends must."""

    name: str = "torch"
    unsupported: tuple[str, ...] = ()
    fail_on: tuple[str, ...] = ()
    calls: list[str] = field(default_factory=list)

    def devices(self) -> list[str]:
        return ["cpu"]

    def supports(self, spec: ModelSpec) -> bool:
        return spec.name not in self.unsupported

    def model_files(self, spec: ModelSpec, model_dir: Path) -> list[Path]:
        return [model_dir / "fake" / f"{spec.name}.bin"]

    def export(self, spec: ModelSpec, model_dir: Path, seed: int, *, force: bool = False) -> ExportResult:
        self.calls.append(spec.name)
        if spec.name in self.fail_on:
            raise ModelFileError(f"model '{spec.name}': cannot build it")
        (f,) = self.model_files(spec, model_dir)
        if f.exists() and not force:
            source, used_seed = "user", None
        else:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(np.random.default_rng(seed).bytes(64))
            source, used_seed = "random-init", seed
        return ExportResult(spec.name, self.name, (f,), spec.input_shape, 16, f.stat().st_size,  # type: ignore[arg-type]
                            source, used_seed, 0.01)  # type: ignore[arg-type]


def _manifest(model_dir: Path) -> dict[tuple[str, str], dict]:
    return {(e["name"], e["backend"]): e for e in read_manifest(model_dir)}


def test_export_writes_files_and_manifest(tmp_path, capsys):
    fake = FakeBackend()
    res = export_models(["mlp2", "digits_cnn"], [fake], tmp_path, seed=7, progress=True)
    assert [(r.name, r.backend, r.source) for r in res] == [("mlp2", "torch", "random-init"),
                                                           ("digits_cnn", "torch", "random-init")]
    m = _manifest(tmp_path)
    assert set(m) == {("mlp2", "torch"), ("digits_cnn", "torch")}
    e = m[("mlp2", "torch")]
    assert e["files"] == ["fake/mlp2.bin"] and e["input_shape"] == [2] and e["param_count"] == 16
    assert e["size_bytes"] == 64 and e["source"] == "random-init" and e["seed"] == 7 and e["exported_at"]
    err = capsys.readouterr().err
    assert "export: mlp2/torch: wrote fake/mlp2.bin (16 params, 64 B)" in err
    assert "export: digits_cnn/torch: wrote fake/digits_cnn.bin" in err
    raw = json.loads((tmp_path / MANIFEST).read_text())
    assert raw["manifest_version"] == 1


def test_manifest_merge_and_keep_user_files_unless_force(tmp_path, capsys):
    fake = FakeBackend()
    update_manifest(tmp_path, [ExportResult("vgg16", "mxnet", (tmp_path / "mxnet" / "vgg16-0000.params",),
                                            (3, 224, 224), 138_000_000, 5, "user", None, 0.0)])
    export_models(["mlp2"], [fake], tmp_path, seed=1, progress=False)
    f = tmp_path / "fake" / "mlp2.bin"
    original = f.read_bytes()
    # pretend the export was long ago: an unchanged re-export must keep that record
    data = json.loads((tmp_path / MANIFEST).read_text())
    for e in data["models"]:
        e["exported_at"] = "2000-01-01T00:00:00+00:00"
    (tmp_path / MANIFEST).write_text(json.dumps(data))

    (r,) = export_models(["mlp2"], [fake], tmp_path, seed=2, progress=False)
    assert r.source == "user" and f.read_bytes() == original
    e = _manifest(tmp_path)[("mlp2", "torch")]
    assert (e["source"], e["seed"], e["exported_at"]) == ("random-init", 1, "2000-01-01T00:00:00+00:00")
    assert ("vgg16", "mxnet") in _manifest(tmp_path)  # other entries survive the merge

    f.write_bytes(b"real weights from the user")  # the user puts their own file there
    (r,) = export_models(["mlp2"], [fake], tmp_path, seed=2, progress=True)
    assert r.source == "user" and f.read_bytes() == b"real weights from the user"
    e = _manifest(tmp_path)[("mlp2", "torch")]
    assert e["source"] == "user" and e["seed"] is None and e["size_bytes"] == len(b"real weights from the user")
    assert e["exported_at"] != "2000-01-01T00:00:00+00:00"
    assert "--force replaces it" in capsys.readouterr().err

    (r,) = export_models(["mlp2"], [fake], tmp_path, seed=1, force=True, progress=False)
    assert r.source == "random-init" and f.read_bytes() == original
    e = _manifest(tmp_path)[("mlp2", "torch")]
    assert e["source"] == "random-init" and e["seed"] == 1
    assert sorted(_manifest(tmp_path)) == [("mlp2", "torch"), ("vgg16", "mxnet")]


def test_unsupported_is_skipped_with_a_note(tmp_path, capsys):
    fake = FakeBackend(unsupported=("digits_cnn",))
    res = export_models(["mlp2", "digits_cnn"], [fake], tmp_path, progress=True)
    assert [r.name for r in res] == ["mlp2"] and fake.calls == ["mlp2"]
    assert "export: digits_cnn/torch: skipped: the torch backend cannot build digits_cnn" in capsys.readouterr().err
    assert set(_manifest(tmp_path)) == {("mlp2", "torch")}


def test_quiet_prints_nothing(tmp_path, capsys):
    export_models(["mlp2"], [FakeBackend(unsupported=("mlp2",))], tmp_path, progress=False)
    export_models(["digits_cnn"], [FakeBackend()], tmp_path, progress=False)
    assert capsys.readouterr() == ("", "")


def test_null_is_exported_once_for_every_backend(tmp_path):
    a, b = FakeBackend("torch"), FakeBackend("mxnet")
    res = export_models(["null", "null:0.002", "mlp2"], [a, b, a], tmp_path, progress=False)
    assert sorted((r.name, r.backend) for r in res) == [("mlp2", "mxnet"), ("mlp2", "torch"),
                                                        ("null", "mxnet"), ("null", "torch")]
    assert a.calls == ["mlp2"] and b.calls == ["mlp2"]  # the null model never goes through a backend
    assert null_file(tmp_path).exists()
    m = _manifest(tmp_path)
    assert m[("null", "torch")]["files"] == m[("null", "mxnet")]["files"] == ["null/null.json"]
    assert m[("null", "torch")]["seed"] is None
    null_file(tmp_path).write_text("{}")
    (r,) = export_models(["null"], [a], tmp_path, progress=False)
    assert r.source == "user" and null_file(tmp_path).read_text() == "{}"
    (r,) = export_models(["null"], [a], tmp_path, force=True, progress=False)
    assert r.source == "random-init" and json.loads(null_file(tmp_path).read_text())["model"] == "null"


def test_manifest_is_written_for_what_finished_before_a_failure(tmp_path):
    fake = FakeBackend(fail_on=("digits_cnn",))
    with pytest.raises(ModelFileError):
        export_models(["mlp2", "digits_cnn", "mnist_mlp"], [fake], tmp_path, progress=False)
    assert set(_manifest(tmp_path)) == {("mlp2", "torch")} and fake.calls == ["mlp2", "digits_cnn"]


def test_bad_names(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'resnet15'.*resnet152"):
        export_models(["resnet15"], [FakeBackend()], tmp_path, progress=False)
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'"):
        export_models(["mlp2"], ["tensorflow"], tmp_path, progress=False)
    with pytest.raises(ConfigError, match="no backend"):
        export_models(["mlp2"], [], tmp_path, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="--model-dir"):
        export_models(["mlp2"], [FakeBackend()], blocker / "models", progress=False)


def test_missing_and_ensure_models(tmp_path):
    fake = FakeBackend()
    assert missing_models(["small", "null:0.01"], fake, tmp_path) == ["mlp2", "mnist_mlp", "mnist_cnn",
                                                                      "digits_cnn", "null:0.01"]
    export_models(["mlp2"], [fake], tmp_path, progress=False)
    fake.calls.clear()
    res = ensure_models(["mlp2", "digits_cnn", "null:0.01"], fake, tmp_path, seed=3, progress=False)
    assert sorted(r.name for r in res) == ["digits_cnn", "null"] and fake.calls == ["digits_cnn"]
    assert missing_models(["mlp2", "digits_cnn", "null"], fake, tmp_path) == []
    assert ensure_models(["mlp2", "digits_cnn"], fake, tmp_path, progress=False) == []
    assert fake.calls == ["digits_cnn"]

    picky = FakeBackend(unsupported=("mnist_cnn", "mlp2"))
    assert missing_models(["mlp2", "mnist_cnn"], picky, tmp_path) == ["mnist_cnn"]  # mlp2's file is there
    with pytest.raises(ModelNotFoundError, match=r"model 'mnist_cnn'.*cannot build it"):
        ensure_models(["mnist_cnn"], picky, tmp_path, progress=False)


def test_read_manifest(tmp_path):
    assert read_manifest(tmp_path) == []
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(ModelFileError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / MANIFEST).write_text('{"models": [{"nam": 1}]}')
    with pytest.raises(ModelFileError, match="not a cortexbench model manifest"):
        read_manifest(tmp_path)


# --- the real backends --------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["mxnet", "torch", "onnxruntime"])
def test_real_backend_export_keep_and_force(tmp_path, backend_name):
    backend = get_backend(backend_name)
    res = export_models(["mlp2", "digits_cnn"], [backend_name], tmp_path, seed=0, progress=False)
    assert [(r.name, r.source) for r in res] == [("mlp2", "random-init"), ("digits_cnn", "random-init")]
    for r in res:
        spec = get_spec(r.name)
        files = backend.model_files(spec, tmp_path)
        assert list(r.files) == files and all(f.exists() for f in files)
        assert r.size_bytes == sum(f.stat().st_size for f in files) and r.param_count > 0
    m = _manifest(tmp_path)
    assert set(m) == {("mlp2", backend_name), ("digits_cnn", backend_name)}
    assert all(not Path(f).is_absolute() and (tmp_path / f).exists() for e in m.values() for f in e["files"])
    assert missing_models(["mlp2", "digits_cnn"], backend, tmp_path) == []

    model = backend.load(get_spec("mlp2"), tmp_path, "cpu", LoadOptions())
    try:
        out = model.predict(np.zeros((3, 2), dtype=np.float32))
        assert out.shape == (3, 2)
    finally:
        model.close()

    target = backend.model_files(get_spec("mlp2"), tmp_path)[-1]
    before = target.read_bytes()
    again = export_models(["mlp2"], [backend_name], tmp_path, seed=0, progress=False)
    assert again[0].source == "user" and target.read_bytes() == before
    assert _manifest(tmp_path)[("mlp2", backend_name)]["source"] == "random-init"

    # the user puts other (valid) weights there: another seed's export, copied over ours
    other = tmp_path / "other"
    export_models(["mlp2"], [backend_name], other, seed=1, progress=False)
    for theirs, ours in zip(backend.model_files(get_spec("mlp2"), other),
                            backend.model_files(get_spec("mlp2"), tmp_path), strict=True):
        shutil.copyfile(theirs, ours)
    user_bytes = target.read_bytes()
    assert user_bytes != before  # another seed gives other weights, or this test proves nothing
    (r,) = export_models(["mlp2"], [backend_name], tmp_path, seed=0, progress=False)
    assert r.source == "user" and target.read_bytes() == user_bytes
    assert _manifest(tmp_path)[("mlp2", backend_name)]["source"] == "user"
    (r,) = export_models(["mlp2"], [backend_name], tmp_path, seed=0, force=True, progress=False)
    assert r.source == "random-init" and target.read_bytes() != user_bytes
    assert _manifest(tmp_path)[("mlp2", backend_name)]["source"] == "random-init"
