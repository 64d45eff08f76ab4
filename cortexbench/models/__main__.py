"""``python -m cortexbench.models``: list the registered models, or export them to ``model_dir``.

    python -m cortexbench.models list [--model-dir DIR] [--config PATH]
    python -m cortexbench.models export [--models a,b|imagenet|small|all] [--backend torch,onnxruntime|all-installed]
                                        [--model-dir DIR] [--seed N] [--force] [--quiet] [--config PATH]

Defaults for ``--models``, ``--model-dir`` and ``--seed`` come from config.json (with its ``cpu_fallback``
on a machine without a GPU, as ``single`` and ``stream`` do), so that a bare ``export`` writes what the
default run will load.  Bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cortexbench.cli import ArgumentParser, parse_or_exit_code, run_main
from cortexbench.config import Config, load_config
from cortexbench.errors import BackendUnavailableError, CortexbenchError
from cortexbench.machine import gpu_count
from cortexbench.models.backends import get_backend, installed, resolve_backend
from cortexbench.models.backends.base import BACKEND_IDS, Backend
from cortexbench.models.export import export_models, format_bytes, model_files, read_manifest
from cortexbench.models.registry import REGISTRY, ModelSpec

PROG = "python -m cortexbench.models"
EXTRAS = {"mxnet": "mxnet", "torch": "torch", "onnxruntime": "onnx"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="List the registered models, or export them with random weights.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ls = sub.add_parser("list", help="every registered model, and which files model_dir has")
    ls.add_argument("--model-dir", metavar="DIR", help="model files [model_dir]")
    ls.add_argument("--config", metavar="PATH", help="config file (default: ./config.json)")
    ex = sub.add_parser("export", help="write models with deterministic random weights to model_dir")
    ex.add_argument("--models", metavar="A,B", help="models or groups (imagenet, small, all) [models]")
    ex.add_argument("--backend", metavar="NAME", default="all-installed",
                    help="mxnet, torch, onnxruntime, a comma list, auto or all-installed (default)")
    ex.add_argument("--model-dir", metavar="DIR", help="model files [model_dir]")
    ex.add_argument("--seed", type=int, metavar="N", help="random seed of the weights [seed]")
    ex.add_argument("--force", action="store_true", help="replace files already there (they may be real weights)")
    ex.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    ex.add_argument("--config", metavar="PATH", help="config file (default: ./config.json)")
    return p


def _config(args: argparse.Namespace) -> Config:
    overrides = {"models": getattr(args, "models", None), "model_dir": args.model_dir,
                 "seed": getattr(args, "seed", None)}
    return load_config(args.config, overrides, has_gpu=gpu_count() > 0)


def backend_names(arg: str) -> list[str]:
    """'all-installed' (every backend whose framework imports), 'auto', or a comma list of names."""
    if arg == "all-installed":
        names = [b for b in BACKEND_IDS if installed(b)]
        if not names:
            raise BackendUnavailableError("no backend is installed: pip install 'cortexbench[torch]' "
                                          "(or [mxnet], [onnx])")
        return names
    out = []
    for name in (n.strip() for n in arg.split(",") if n.strip()):
        out.append(resolve_backend("auto") if name == "auto" else name)
    return list(dict.fromkeys(out))


def _export(args: argparse.Namespace) -> int:
    cfg = _config(args)
    backends = [get_backend(n) for n in backend_names(args.backend)]
    export_models(cfg.models, backends, cfg.model_dir, seed=cfg.seed, force=args.force, progress=not args.quiet)
    return 0


def _shape(spec: ModelSpec) -> str:
    return "x".join(str(d) for d in spec.input_shape)


def _available() -> tuple[dict[str, Backend], list[str]]:
    """The backends that import, and a note for each that does not."""
    ok: dict[str, Backend] = {}
    notes = []
    for name in BACKEND_IDS:
        if not installed(name):
            notes.append(f"{name}: not installed (pip install 'cortexbench[{EXTRAS[name]}]')")
            continue
        try:
            ok[name] = get_backend(name)
        except CortexbenchError as e:
            notes.append(f"{name}: {e}")
    return ok, notes


def _file_cell(spec: ModelSpec, backend: Backend, model_dir: Path, manifest: dict[tuple[str, str], dict]) -> str:
    if not (spec.is_null or backend.supports(spec)):
        return "n/a"
    files = model_files(spec, backend, model_dir)
    if not files or not all(f.exists() for f in files):
        return "-"
    size = sum(f.stat().st_size for f in files)
    entry = manifest.get((spec.name, backend.name))
    return format_bytes(size) + (" (user)" if entry is not None and entry.get("source") == "user" else "")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain console table: columns padded to their widest cell, the last one left ragged."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [str(r[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    cfg = _config(args)
    model_dir = cfg.model_dir
    backends, notes = _available()
    manifest = {(e["name"], e["backend"]): e for e in read_manifest(model_dir)}
    header = ["MODEL", "GROUP", "INPUT", "BACKENDS", *backends, "DESCRIPTION"]
    rows = []
    for spec in REGISTRY.values():
        supported = [n for n, b in backends.items() if spec.is_null or b.supports(spec)]
        cells = [_file_cell(spec, b, model_dir, manifest) for b in backends.values()]
        rows.append([spec.name, spec.group, _shape(spec), ",".join(supported) or "-", *cells, spec.description])
    print(table(header, rows))
    print(f"\nmodel_dir: {model_dir}   (a size: the file is there; -: not exported yet; n/a: the backend "
          f"cannot build it; (user): files not written by export)")
    for note in notes:
        print(f"backend {note}")
    print(f"export: {PROG} export --models NAME[,NAME] --backend NAME")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):  # --help, or a bad flag (one line already printed)
        return args
    body = _list if args.command == "list" else _export
    return run_main(lambda: body(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
