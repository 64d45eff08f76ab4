"""``python -m cortexbench.experiments [NAME ...]``: the small-model experiments, each at its own scale.

    mlp2    40,000 seeded two-feature rows (two interleaved spirals) in batches of 8,192: an inference epoch
            (seconds per epoch and per row) and a training epoch (the epoch's steps), on each device
    mnist   mnist_mlp and mnist_cnn on seeded MNIST-like digits (drawn with OpenCV): inference and a training
            step, seconds per sample, against batch size 1 .. 1024
    digits  digits_cnn on seeded 8x8 digits: seconds per operator type (the backend's profiler) at batch sizes
            1, 2, 4, .. 256

Inference runs on ``--backend`` on each of ``--devices`` and, where it is installed, on ``--engine`` (ONNX
Runtime by default: the optimised engine) on the same devices, so the tables set CPU against GPU against
the engine.  Training runs on ``--backend`` only (ONNX Runtime does not train here).  Every timing goes
through the backends (``load``, ``predict``, ``train_step_s``, ``profile_ops``) and
``cortexbench.timing.measure_point``, with the ``single.*`` timing keys of config.json.

Everything lands in ``result_dir/<run-id>/``: results.json (every figure), report.md (a table per
experiment) and the plots of ``cortexbench.report.experiments_plots``.  Progress goes to stderr; Ctrl-C
writes what was measured (``complete: false``) and exits 130.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cortexbench import machine
from cortexbench.cli import ArgumentParser, overrides_from, parse_or_exit_code, run_main
from cortexbench.config import Config, load_config
from cortexbench.errors import (
    BackendUnavailableError,
    ConfigError,
    DeviceError,
    UsageError,
    did_you_mean,
)
from cortexbench.models.backends import get_backend
from cortexbench.models.backends.base import Backend, LoadedModel
from cortexbench.models.registry import get_spec
from cortexbench.progress import Progress
from cortexbench.single import resolve_devices
from cortexbench.timing import TimingPolicy, measure_point

PROG = "python -m cortexbench.experiments"
NAMES = ("mlp2", "mnist", "digits")
MODELS = {"mlp2": ("mlp2",), "mnist": ("mnist_mlp", "mnist_cnn"), "digits": ("digits_cnn",)}
MNIST_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DIGITS_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROFILE_S = 0.25  # each op profile averages about this many seconds of predictions,
PROFILE_RUNS = (20, 200)  # but no fewer and no more runs than these
KEYS = {"backend": "backend", "result_dir": "result_dir", "model_dir": "model_dir", "seed": "seed",
        "max_seconds": "single.max_seconds"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG, description="The small-model experiments: mlp2 epochs, mnist against batch size, digits per operator.",
        epilog=f"examples:\n  {PROG}\n  {PROG} mlp2 --backend torch\n  {PROG} --devices cpu,gpu:0 --backend torch",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"experiments to run: {', '.join(NAMES)} (default: all)")
    p.add_argument("--devices", default="auto", metavar="cpu,gpu:0", help="devices, or 'auto' for cpu and every GPU")
    p.add_argument("--backend", metavar="NAME", help="mxnet, torch or auto: inference and training [backend]")
    p.add_argument("--engine", default="onnxruntime", metavar="NAME",
                   help="the optimised inference engine beside it: onnxruntime or none (default onnxruntime)")
    p.add_argument("--rows", type=int, default=40_000, metavar="N", help="mlp2: rows per epoch (default 40000)")
    p.add_argument("--batch-size", type=int, default=8192, metavar="N", help="mlp2: rows per batch (default 8192)")
    p.add_argument("--batch-sizes", metavar="1,2,4", help="mnist and digits: batch sizes (default 1..1024, 1..256)")
    p.add_argument("--train-steps", type=int, default=10, metavar="N", help="timed training steps per point (default 10)")
    p.add_argument("--max-seconds", type=float, metavar="S", help="time bound per point [single.max_seconds]")
    p.add_argument("--config", metavar="PATH", help="config file (default: ./config.json, else the built-in default)")
    p.add_argument("--result-dir", metavar="DIR", help="where results go [result_dir]")
    p.add_argument("--model-dir", metavar="DIR", help="model files [model_dir]")
    p.add_argument("--seed", type=int, metavar="N", help="random seed of the data and weights [seed]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@dataclass(frozen=True)
class Plan:
    """What one invocation measures."""

    cfg: Config
    names: tuple[str, ...]
    backend: str
    devices: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]  # (backend, device) pairs that run inference
    engine: str | None
    rows: int
    batch_size: int
    mnist_batches: tuple[int, ...]
    digits_batches: tuple[int, ...]
    train_steps: int
    policy: TimingPolicy
    notes: tuple[str, ...] = ()


@dataclass
class Run:
    """What has been measured so far (results.json's body grows from it, also after Ctrl-C)."""

    plan: Plan
    mlp2: list[dict[str, Any]] = field(default_factory=list)
    mnist: list[dict[str, Any]] = field(default_factory=list)
    digits: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    broken: dict[tuple[str, str], str] = field(default_factory=dict)  # (engine, device) that would not start

    def points(self) -> int:
        return len(self.mlp2) + len(self.mnist) + len(self.digits)

    def body(self) -> dict[str, Any]:
        p = self.plan
        return {"experiments": list(p.names), "backend": p.backend, "engine": p.engine, "devices": list(p.devices),
                "columns": [{"backend": b, "device": d} for b, d in p.columns],
                "gpus_on_machine": [f"gpu:{g.index}" for g in machine.gpus()],
                "scale": {"rows": p.rows, "batch_size": p.batch_size, "mnist_batch_sizes": list(p.mnist_batches),
                          "digits_batch_sizes": list(p.digits_batches), "train_steps": p.train_steps},
                "policy": {"warmup_runs": p.policy.warmup_runs, "min_runs": p.policy.min_runs,
                           "max_seconds": p.policy.max_seconds, "target_rel_spread": p.policy.target_rel_spread},
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # threads of MXNet's and torch's CPU kernels
                "notes": list(p.notes) + [f"{b} on {d} was skipped: {why}" for (b, d), why in self.broken.items()],
                "models": self.models,
                "mlp2": self.mlp2, "mnist": self.mnist, "digits": self.digits}


# --- the data: seeded, synthetic, no download ----------------------------------------------------


def spirals(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved noisy spirals: ``rows`` (x, y) float32 points, and their class (0 or 1)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, rows)
    t = np.sqrt(rng.uniform(0.0, 1.0, rows)) * 3.0 * np.pi
    x = np.stack([t * np.cos(t + np.pi * label), t * np.sin(t + np.pi * label)], axis=1) / (3.0 * np.pi)
    x += rng.normal(0.0, 0.05, x.shape)
    return x.astype(np.float32), label.astype(np.int64)


def digit_images(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST-like digits (a random digit drawn with OpenCV's putText at a random size, stroke and place
    on a 28x28 canvas, resized to ``side``), as (n, 1, side, side) float32 in [0, 1], and their digits."""
    import cv2

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    out = np.empty((n, 1, side, side), dtype=np.float32)
    for i, digit in enumerate(labels):
        canvas = np.zeros((28, 28), dtype=np.uint8)
        scale = rng.uniform(0.7, 1.0)
        org = (int(rng.integers(5, 10)), int(rng.integers(20, 25)))
        cv2.putText(canvas, str(digit), org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, int(rng.integers(1, 4)), cv2.LINE_AA)
        img = canvas if side == 28 else cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA)
        out[i, 0] = img / 255.0
    return out, labels.astype(np.int64)


def cycle(data: np.ndarray, n: int) -> np.ndarray:
    """A batch of ``n`` samples of ``data`` (cycling when it has fewer)."""
    return np.ascontiguousarray(data[np.arange(n) % len(data)])


# --- the plan ------------------------------------------------------------------------------------


def parse_sizes(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        sizes = tuple(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise ConfigError(f"--batch-sizes: '{text}' is not a list of whole numbers (e.g. 1,4,16)") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes: '{text}' must name batch sizes of 1 or more")
    return sizes


def make_plan(args: argparse.Namespace) -> Plan:
    names = tuple(dict.fromkeys(args.names or NAMES))
    for n in names:
        if n not in NAMES:
            raise UsageError(f"unknown experiment '{n}'{did_you_mean(n, NAMES)}; the experiments are {', '.join(NAMES)}")
    for flag, value in (("--rows", args.rows), ("--batch-size", args.batch_size), ("--train-steps", args.train_steps)):
        if value < 1:
            raise ConfigError(f"{flag}: must be 1 or more (got {value})")
    cfg = load_config(args.config, overrides_from(args, KEYS), has_gpu=bool(machine.gpus()),
                      flags={k: "--" + a.replace("_", "-") for a, k in KEYS.items()})
    requested = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not requested:
        raise ConfigError("--devices: name at least one device (cpu, gpu:0, or auto)")
    backend, devices, notes = resolve_devices(requested, cfg.backend)
    if backend == "onnxruntime":
        raise ConfigError("--backend: onnxruntime does not train; pick mxnet or torch (ONNX Runtime is the --engine)")
    columns = [(backend, d) for d in devices]
    engine: str | None = None if args.engine in ("none", backend) else args.engine
    if engine is not None:
        if engine != "onnxruntime":
            raise ConfigError(f"--engine: '{engine}' is not an inference engine here; use onnxruntime or none")
        try:
            have = get_backend(engine).devices()
        except BackendUnavailableError as e:
            notes.append(f"no engine column: {e}")
            engine = None
        else:
            columns += [(engine, d) for d in devices if d in have]
            notes += [f"{engine} cannot use {d}; its column is left out" for d in devices if d not in have]
    return Plan(cfg, names, backend, devices, tuple(columns), engine, args.rows, args.batch_size,
                parse_sizes(args.batch_sizes, MNIST_BATCHES), parse_sizes(args.batch_sizes, DIGITS_BATCHES),
                args.train_steps, TimingPolicy.from_config(cfg.single), tuple(notes))


def total_points(plan: Plan) -> int:
    train = len(plan.devices)
    n = {"mlp2": len(plan.columns) + train,
         "mnist": 2 * len(plan.mnist_batches) * (len(plan.columns) + train),
         "digits": len(plan.digits_batches) * len(plan.columns)}
    return sum(n[name] for name in plan.names)


# --- the experiments -----------------------------------------------------------------------------


def _load(run: Run, name: str, backend: Backend, device: str) -> LoadedModel | None:
    """The model on the device; None (the column skipped, and said so) when the engine cannot start there,
    e.g. an ONNX Runtime whose CUDA provider is listed but fails to load CUDA's libraries."""
    if (backend.name, device) in run.broken:
        return None
    try:
        model = backend.load(get_spec(name), run.plan.cfg.model_dir, device)
    except DeviceError as e:
        if backend.name == run.plan.backend:
            raise
        run.broken[(backend.name, device)] = str(e)
        return None
    run.models.setdefault(name, {}).update(param_count=model.param_count, size_bytes=model.size_bytes)
    return model


def _timing(t: Any) -> dict[str, Any]:
    return {"runs": t.runs, "rel_spread": t.to_dict()["rel_spread"], "stable": t.stable}


def run_mlp2(run: Run, bar: Progress) -> None:
    plan = run.plan
    x, _ = spirals(plan.rows, plan.cfg.seed)
    bs = plan.batch_size
    starts = range(0, plan.rows, bs)
    for backend_name, device in plan.columns:
        bar.advance(0, note=f"mlp2 inference epoch, {backend_name} on {device}")
        model = _load(run, "mlp2", get_backend(backend_name), device)
        if model is None:
            bar.advance(1)
            continue
        try:
            def epoch(rows: np.ndarray, predict: Callable[[np.ndarray], Any] = model.predict) -> None:
                for i in starts:
                    predict(rows[i:i + bs])

            t = measure_point(epoch, x, plan.policy)
        finally:
            model.close()
        run.mlp2.append({"what": "inference", "backend": backend_name, "device": device, "rows": plan.rows,
                         "batch_size": bs, "batches": len(starts), "epoch_s": t.mean_batch_s,
                         "row_s": t.mean_image_s, **_timing(t)})
        bar.advance(1)
    backend = get_backend(plan.backend)
    sizes = Counter(min(bs, plan.rows - i) for i in starts)  # the epoch's batches: full ones and the rest
    for device in plan.devices:
        bar.advance(0, note=f"mlp2 training epoch on {device}")
        step_s = {n: backend.train_step_s(get_spec("mlp2"), device, n, plan.train_steps, plan.cfg.seed) for n in sizes}
        epoch_s = sum(step_s[n] * count for n, count in sizes.items())
        run.mlp2.append({"what": "training", "backend": plan.backend, "device": device, "rows": plan.rows,
                         "batch_size": bs, "batches": len(starts), "epoch_s": epoch_s, "row_s": epoch_s / plan.rows,
                         "step_s": {str(n): s for n, s in step_s.items()}, "steps": plan.train_steps})
        bar.advance(1)


def run_mnist(run: Run, bar: Progress) -> None:
    plan = run.plan
    images, _ = digit_images(max(plan.mnist_batches), 28, plan.cfg.seed)
    for name in MODELS["mnist"]:
        spec = get_spec(name)
        data = images.reshape(len(images), *spec.input_shape)
        for backend_name, device in plan.columns:
            model = _load(run, name, get_backend(backend_name), device)
            if model is None:
                bar.advance(len(plan.mnist_batches))
                continue
            try:
                for bs in plan.mnist_batches:
                    bar.advance(0, note=f"{name} inference, {backend_name} on {device}, batch {bs}")
                    t = measure_point(model.predict, cycle(data, bs), plan.policy)
                    run.mnist.append({"model": name, "what": "inference", "backend": backend_name, "device": device,
                                      "batch_size": bs, "batch_s": t.mean_batch_s, "sample_s": t.mean_image_s,
                                      **_timing(t)})
                    bar.advance(1)
            finally:
                model.close()
        backend = get_backend(plan.backend)
        for device in plan.devices:
            for bs in plan.mnist_batches:
                bar.advance(0, note=f"{name} training on {device}, batch {bs}")
                step_s = backend.train_step_s(spec, device, bs, plan.train_steps, plan.cfg.seed)
                run.mnist.append({"model": name, "what": "training", "backend": plan.backend, "device": device,
                                  "batch_size": bs, "batch_s": step_s, "sample_s": step_s / bs,
                                  "steps": plan.train_steps})
                bar.advance(1)


def run_digits(run: Run, bar: Progress) -> None:
    plan = run.plan
    images, _ = digit_images(max(plan.digits_batches), 8, plan.cfg.seed)
    for backend_name, device in plan.columns:
        backend = get_backend(backend_name)
        model = _load(run, "digits_cnn", backend, device)
        if model is None:
            bar.advance(len(plan.digits_batches))
            continue
        try:
            for bs in plan.digits_batches:
                bar.advance(0, note=f"digits_cnn ops, {backend_name} on {device}, batch {bs}")
                batch = cycle(images, bs)
                t = measure_point(model.predict, batch, plan.policy)
                runs = int(min(PROFILE_RUNS[1], max(PROFILE_RUNS[0], PROFILE_S / t.mean_batch_s)))
                op_s = backend.profile_ops(model, batch, runs)
                run.digits.append({"model": "digits_cnn", "backend": backend_name, "device": device, "batch_size": bs,
                                   "batch_s": t.mean_batch_s, "sample_s": t.mean_image_s, "op_s": op_s,
                                   "op_total_s": sum(op_s.values()), "profile_runs": runs, **_timing(t)})
                bar.advance(1)
        finally:
            model.close()


RUNNERS: dict[str, Callable[[Run, Progress], None]] = {"mlp2": run_mlp2, "mnist": run_mnist, "digits": run_digits}


# --- the command ---------------------------------------------------------------------------------


def write_outputs(run: Run, run_dir: Path, *, complete: bool, started_at: dt.datetime,
                  argv: Sequence[str]) -> dict[str, Any]:
    """results.json, report.md and the plots; returns the body."""
    from cortexbench.report.experiments_plots import write_plots
    from cortexbench.report.experiments_report import markdown_report
    from cortexbench.results import envelope, write_json, write_text

    body = run.body()
    doc = envelope("experiments", run.plan.cfg.to_dict(), machine.machine_info(), body, complete=complete,
                   started_at=started_at, finished_at=dt.datetime.now(), argv=[PROG, *argv])
    write_json(run_dir / "results.json", doc)
    plots = write_plots(body, run_dir)
    write_text(run_dir / "report.md", markdown_report(doc, run_dir.name, [p.name for p in plots]))
    return body


def _body(argv: Sequence[str], args: argparse.Namespace) -> int:
    from cortexbench.models.export import ensure_models
    from cortexbench.report.experiments_report import console_summary
    from cortexbench.results import keeping_partial, new_run_dir

    started_at = dt.datetime.now()
    plan = make_plan(args)
    quiet = bool(args.quiet)
    models = [m for n in plan.names for m in MODELS[n]]
    for backend_name in dict.fromkeys(b for b, _ in plan.columns):
        ensure_models(models, backend_name, plan.cfg.model_dir, seed=plan.cfg.seed, progress=not quiet)
    for note in plan.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    run = Run(plan)
    run_dir = new_run_dir(plan.cfg.result_dir, "experiments")
    with keeping_partial(run_dir, run.points, prog=PROG, total=total_points(plan), what="experiments",
                         write_partial=lambda: write_outputs(run, run_dir, complete=False, started_at=started_at,
                                                             argv=argv)), \
            Progress("experiments", total=total_points(plan), unit="points", enabled=not quiet) as bar:
        for name in plan.names:
            RUNNERS[name](run, bar)
    body = write_outputs(run, run_dir, complete=True, started_at=started_at, argv=argv)
    for (b, d), why in run.broken.items():
        print(f"{PROG}: note: {b} on {d} was skipped: {why}", file=sys.stderr)
    print(console_summary(body), end="")
    print(f"\nresults: {run_dir}  (report.md, results.json, plots)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):  # --help, or a bad flag (one line, exit 2)
        return args
    return run_main(lambda: _body(argv, args), PROG)


if __name__ == "__main__":
    sys.exit(main())
