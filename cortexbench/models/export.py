"""Writing models to ``model_dir`` with deterministic random weights, and the manifest that lists them.

``export_models`` builds each (model, backend) pair through the backend's ``export`` (files already there
are kept unless ``force``: they may be real weights a user put there), then merges what it did into
``model_dir/manifest.json``.  ``ensure_models`` exports only what is missing; the embedded default run
uses it so that a fresh checkout runs without a separate export step.

manifest.json::

    {"manifest_version": 1,
     "models": [{"name", "backend", "files" (relative to model_dir), "input_shape", "param_count",
                 "size_bytes", "source" ("random-init" or "user"), "seed", "exported_at",
                 "mtime_ns" (of each file, to tell an untouched export from files a user put there)}, ...]}
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cortexbench.errors import ConfigError, ModelFileError, ModelNotFoundError
from cortexbench.models.backends import get_backend
from cortexbench.models.backends.base import Backend, ExportResult, export_null, files_size, null_file
from cortexbench.models.registry import ModelSpec, expand_model_names, file_stem, get_spec
from cortexbench.progress import Progress
from cortexbench.results import write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def _backend(b: str | Backend) -> Backend:
    return get_backend(b) if isinstance(b, str) else b


def _specs(names: Sequence[str]) -> list[ModelSpec]:
    """Specs of the names and groups, one per file: every null:S is the one null model."""
    out: dict[str, ModelSpec] = {}
    for name in expand_model_names(names, key="models"):
        out.setdefault(file_stem(name), get_spec(file_stem(name)))
    return list(out.values())


def _export_null(backend: Backend, model_dir: Path, *, force: bool, seen: dict[str, bool]) -> ExportResult:
    """The null model's file, written once however many backends ask (they all read the same file)."""
    start = time.perf_counter()
    path = null_file(model_dir)
    if "null" not in seen:
        existed = path.exists()
        if existed and force:
            path.unlink()
        export_null(model_dir)
        seen["null"] = existed and not force
    spec = get_spec("null")
    return ExportResult("null", backend.name, (path,), spec.input_shape, 0, files_size([path]),
                        "user" if seen["null"] else "random-init", None, time.perf_counter() - start)


def export_models(names: Sequence[str], backends: Sequence[str | Backend], model_dir: Path, *, seed: int = 0,
                  force: bool = False, progress: bool = True) -> list[ExportResult]:
    """Export every model of ``names`` (groups expanded) for every backend into ``model_dir``.

    A backend that cannot build a model is skipped with a note.  Files already there are kept unless
    ``force``.  The manifest is updated with what was done even if a later export fails.  With
    ``progress``, a bar and one line per result go to stderr."""
    model_dir = Path(model_dir)
    specs = _specs(names)
    chosen: dict[str, Backend] = {}
    for b in backends:
        backend = _backend(b)
        chosen.setdefault(backend.name, backend)
    if not chosen:
        raise ConfigError("no backend to export to: name one with --backend (mxnet, torch, onnxruntime)")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"model_dir {model_dir} cannot be created ({e.strerror or e}); "
                          f"pick another with --model-dir") from None

    plan: list[tuple[ModelSpec, Backend]] = []
    lines: list[str] = []
    for spec in specs:
        for backend in chosen.values():
            if spec.is_null or backend.supports(spec):
                plan.append((spec, backend))
            else:
                lines.append(f"export: {spec.name}/{backend.name}: skipped: the {backend.name} backend "
                             f"cannot build {spec.name}")

    results: list[ExportResult] = []
    null_seen: dict[str, bool] = {}
    try:
        with Progress("export", total=len(plan), enabled=progress) as bar:
            for spec, backend in plan:
                bar.advance(0, note=f"{spec.name}/{backend.name}")
                if spec.is_null:
                    result = _export_null(backend, model_dir, force=force, seen=null_seen)
                else:
                    result = backend.export(spec, model_dir, seed, force=force)
                results.append(result)
                bar.advance(1)
    finally:
        if results:
            update_manifest(model_dir, results)
    if progress:
        lines += [summary_line(r, model_dir) for r in results]
        for line in lines:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
    return results


def summary_line(r: ExportResult, model_dir: Path) -> str:
    """'export: squeezenet/torch: wrote torch/squeezenet.safetensors (1.24M params, 4.96 MB) in 0.4s'."""
    files = ", ".join(_relative(f, model_dir) for f in r.files)
    size = f"{format_count(r.param_count)} params, {format_bytes(r.size_bytes)}"
    if r.source == "user":
        return f"export: {r.name}/{r.backend}: kept {files} ({size}; already there, --force replaces it)"
    return f"export: {r.name}/{r.backend}: wrote {files} ({size}) in {r.export_s:.1f}s"


# --- what is there, what is missing -------------------------------------------------------------


def model_files(spec: ModelSpec, backend: Backend, model_dir: Path) -> list[Path]:
    """The files ``backend`` loads ``spec`` from (the shared null file for the null model)."""
    if spec.is_null:
        return [null_file(Path(model_dir))]
    return list(backend.model_files(spec, Path(model_dir)))


def missing_models(names: Sequence[str], backend: str | Backend, model_dir: Path) -> list[str]:
    """The models of ``names`` (groups expanded) that have a file missing in ``model_dir`` for ``backend``."""
    b = _backend(backend)
    out = []
    for name in expand_model_names(names, key="models"):
        spec = get_spec(name)
        if spec.is_null or b.supports(spec):
            files = model_files(spec, b, model_dir)
        else:
            try:  # user files may still be there; a backend may refuse to name files it cannot build
                files = model_files(spec, b, model_dir)
            except Exception:
                files = []
        if not files or not all(f.exists() for f in files):
            out.append(name)
    return out


def ensure_models(names: Sequence[str], backend: str | Backend, model_dir: Path, *, seed: int = 0,
                  progress: bool = True) -> list[ExportResult]:
    """Export the models of ``names`` that have no file yet (never replaces a file); [] when none is missing.
    Raises ModelNotFoundError for a missing model the backend cannot build."""
    b = _backend(backend)
    missing = missing_models(names, b, model_dir)
    if not missing:
        return []
    for name in missing:
        spec = get_spec(name)
        if not spec.is_null and not b.supports(spec):
            raise ModelNotFoundError(
                f"model '{name}': no file in {model_dir} for backend '{b.name}', which cannot build it; "
                f"put its files there or pick another --backend")
    return export_models(missing, [b], model_dir, seed=seed, force=False, progress=progress)


# --- manifest.json ------------------------------------------------------------------------------


def read_manifest(model_dir: Path) -> list[dict[str, Any]]:
    """The manifest's entries ([] when there is no manifest yet)."""
    path = Path(model_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot be read ({e}); delete it and run "
                             f"'python -m cortexbench.models export' to rebuild it") from None
    entries = data.get("models") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e and "backend" in e
                                                for e in entries):
        raise ModelFileError(f"{path}: not a cortexbench model manifest; delete it and run "
                             f"'python -m cortexbench.models export' to rebuild it")
    return entries


def _relative(path: Path, model_dir: Path) -> str:
    try:
        return Path(path).relative_to(model_dir).as_posix()
    except ValueError:
        return Path(os.path.relpath(Path(path).resolve(), Path(model_dir).resolve())).as_posix()


def _entry(r: ExportResult, model_dir: Path, now: str) -> dict[str, Any]:
    return {
        "name": r.name,
        "backend": r.backend,
        "files": [_relative(f, model_dir) for f in r.files],
        "input_shape": list(r.input_shape),
        "param_count": int(r.param_count),
        "size_bytes": int(r.size_bytes),
        "source": r.source,
        "seed": r.seed if r.source == "random-init" else None,
        "exported_at": now,
        "mtime_ns": [_mtime_ns(f) for f in r.files],
    }


def _mtime_ns(path: Path) -> int | None:
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return None


@contextlib.contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    """Serialise read-merge-write of the manifest between processes (best effort where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(model_dir / ".manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_manifest(model_dir: Path, results: Sequence[ExportResult], *,
                    now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Merge ``results`` into ``model_dir/manifest.json`` (atomically), keyed by (name, backend).

    Files found already there ('user') that are the ones an earlier export recorded (same files, size and
    modification times) keep that entry's source, seed and export time; otherwise a result replaces its
    entry."""
    model_dir = Path(model_dir)
    stamp = (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
    with _locked(model_dir):
        entries = {(e["name"], e["backend"]): e for e in read_manifest(model_dir)}
        for r in results:
            new = _entry(r, model_dir, stamp)
            old = entries.get((r.name, r.backend))
            if (r.source == "user" and old is not None and old.get("files") == new["files"]
                    and old.get("size_bytes") == new["size_bytes"] and old.get("mtime_ns") == new["mtime_ns"]):
                new.update(source=old.get("source", "user"), seed=old.get("seed"),
                           exported_at=old.get("exported_at", stamp))
            entries[(r.name, r.backend)] = new
        merged = [entries[k] for k in sorted(entries)]
        write_json(model_dir / MANIFEST, {"manifest_version": MANIFEST_VERSION, "models": merged})
    return merged


# --- numbers for people -------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"  # pragma: no cover


def format_count(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if n < 1000 or unit == "G":
            return f"{n:.0f}" if unit == "" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}G"  # pragma: no cover
