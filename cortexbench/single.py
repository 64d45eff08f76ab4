"""``python -m cortexbench.single``: the single-device sweep, models x batch sizes x devices on one backend.

For every point the model's real inputs (images from ``img_dir``, preprocessed for the model) are fed to
``predict`` until the mean batch time is known to ``single.target_rel_spread`` or ``single.max_seconds``
pass (``cortexbench.timing.measure_point``).  Each model is loaded once per device.  ``--profile-ops``
adds seconds per operator type, ``--train`` seconds per training step per sample for the small models.

Everything lands in ``result_dir/<run-id>/``: results.json (every figure, the machine, the config),
results.csv (one row per point), report.md, and the plots of ``cortexbench.report.single_plots``.
The summary table and the run directory are printed to stdout; progress goes to stderr.

``--engines eager,compile,ort,openvino`` (``--precisions fp32,bf16,int8``) replaces the one backend with an
engine x precision axis, and compares every combination with fp32 eager torch on the CPU (``single_engines``).

With no argument on a CPU-only machine the ``cpu_fallback`` of config.json makes it a one-minute run:
missing model files are exported with random weights and a small synthetic image set is made.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cortexbench import machine
from cortexbench.cli import (
    COMMON_KEYS,
    ArgumentParser,
    add_common_flags,
    flags_of,
    overrides_from,
    parse_or_exit_code,
    run_main,
)
from cortexbench.config import Config, load_config
from cortexbench.errors import BackendUnavailableError, ConfigError, DatasetError, DeviceError
from cortexbench.models.backends import get_backend, resolve_backend
from cortexbench.models.backends.base import Backend, LoadOptions
from cortexbench.models.engines import framework
from cortexbench.models.registry import ModelSpec, expand_model_names, get_spec
from cortexbench.progress import Progress
from cortexbench.report.single_report import console_summary, csv_rows, markdown_report, summarise
from cortexbench.single_engines import CALIBRATION_IMAGES, run_engines
from cortexbench.timing import TimingPolicy, measure_point

PROG = "python -m cortexbench.single"
TRAIN_STEPS = 10
SINGLE_KEYS = {**COMMON_KEYS, "batch_sizes": "batchsize", "devices": "single.devices",
               "max_seconds": "single.max_seconds", "profile_ops": "single.profile_ops", "train": "single.train",
               "engines": "single.engines", "precisions": "single.precisions", "labels": "single.labels"}
SCALE_UP = "--models imagenet --batch-sizes 1,2,4,8,16,32,64 --devices cpu,gpu:0"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG, description="Latency and throughput of each model at each batch size on each device.",
        epilog=f"examples:\n  {PROG}\n  {PROG} {SCALE_UP}\n  {PROG} --models small --profile-ops --train",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p)
    p.add_argument("--batch-sizes", metavar="1,2,4", help="batch sizes [batchsize]")
    p.add_argument("--devices", metavar="cpu,gpu:0", help="devices, or 'auto' for cpu and every GPU [single.devices]")
    p.add_argument("--max-seconds", type=float, metavar="S", help="time bound per point [single.max_seconds]")
    p.add_argument("--profile-ops", action="store_const", const=True, help="seconds per operator type [single.profile_ops]")
    p.add_argument("--train", action="store_const", const=True, help="seconds per training step, small models [single.train]")
    p.add_argument("--engines", metavar="eager,compile,ort",
                   help="the engine axis: eager, graphs, compile, ort, ort-basic, ort-none, openvino, tensorrt; "
                        "each point also gets its fidelity to fp32 eager on the CPU [single.engines]")
    p.add_argument("--precisions", metavar="fp32,bf16,int8",
                   help="with --engines: fp32, fp16, bf16, int8 where an engine runs them [single.precisions]")
    p.add_argument("--labels", metavar="FILE",
                   help="with --engines: CSV of image file name, class index; adds top-1 accuracy [single.labels]")
    return p


@dataclass(frozen=True)
class Plan:
    """What one invocation measures, after flags, config and the machine are reconciled."""

    cfg: Config
    backend: str
    models: tuple[str, ...]
    devices: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    policy: TimingPolicy
    notes: tuple[str, ...] = ()
    engines: tuple[str, ...] = ()  # the engine axis (single_engines); () = ``backend`` alone, as before
    precisions: tuple[str, ...] = ()


@dataclass
class Sweep:
    """What has been measured so far (the body of results.json grows from it, also after Ctrl-C)."""

    plan: Plan
    points: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    op_profile: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    fidelity: list[dict[str, Any]] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)
    images_used: int = 0  # distinct images in a batch of the largest size (fewer: batches cycle)
    images_available: int = 0

    def body(self) -> dict[str, Any]:
        p = self.plan
        out = {"backend": p.backend, "precision": p.cfg.precision, "devices": list(p.devices),
               "batch_sizes": list(p.batch_sizes), "model_names": list(p.models),
               "policy": {"warmup_runs": p.policy.warmup_runs, "min_runs": p.policy.min_runs,
                          "max_seconds": p.policy.max_seconds, "target_rel_spread": p.policy.target_rel_spread},
               "images": {"img_dir": str(p.cfg.img_dir), "available": self.images_available,
                          "used": self.images_used, "bad": self.bad_images},
               "gpus_on_machine": [f"gpu:{g.index}" for g in machine.gpus()],
               "notes": list(p.notes), "points": self.points, "models": self.models,
               "op_profile": self.op_profile, "training": self.training, "skipped": self.skipped}
        if p.engines:
            from cortexbench.single_engines import engine_fields

            out.update(engine_fields(p), fidelity=self.fidelity)
        summarise(out)
        return out


def resolve_devices(requested: Sequence[str], backend_name: str) -> tuple[str, tuple[str, ...], list[str]]:
    """(backend, devices, notes): 'auto' is cpu plus every GPU the backend sees; a device that is not
    there is a DeviceError."""
    on_machine = [f"gpu:{g.index}" for g in machine.gpus()]
    explicit = list(dict.fromkeys(d for d in requested if d != "auto"))
    auto = "auto" in requested
    for d in explicit:
        if d != "cpu" and d not in on_machine:
            seen = f"its GPUs are {', '.join(on_machine)}" if on_machine else "it has no GPU"
            raise DeviceError(f"--devices: {d} does not exist on this machine ({seen}); "
                              f"use --devices cpu{''.join(',' + g for g in on_machine)} or auto")
    if backend_name == "auto":
        want = list(dict.fromkeys(explicit + (["cpu", *on_machine] if auto else [])))
        try:
            backend_name = resolve_backend("auto", want)
        except BackendUnavailableError:
            if not auto:
                raise
            backend_name = resolve_backend("auto", explicit or ["cpu"])
    else:
        resolve_backend(backend_name)
    have = get_backend(backend_name).devices()
    for d in explicit:
        if d not in have:
            raise DeviceError(f"--devices: backend '{backend_name}' cannot use {d} (it sees {', '.join(have)}); "
                              f"pick another --backend or --devices")
    devices = list(dict.fromkeys(explicit + (have if auto else [])))
    notes = []
    if auto and (unused := [g for g in on_machine if g not in have]):
        notes.append(f"backend '{backend_name}' cannot use {', '.join(unused)}; they were not measured")
    devices.sort(key=lambda d: (d != "cpu", len(d), d))
    return backend_name, tuple(devices), notes


def make_plan(args: argparse.Namespace) -> Plan:
    cfg = load_config(args.config, overrides_from(args, SINGLE_KEYS), has_gpu=bool(machine.gpus()),
                      flags=flags_of(SINGLE_KEYS))
    models = expand_model_names(cfg.models)
    engines = tuple(dict.fromkeys(cfg.single.engines))
    if engines and cfg.from_flag("backend"):
        raise ConfigError("--backend and --engines do not mix: an engine names its framework "
                          "(eager, graphs, compile: torch; ort*, openvino, tensorrt: the ONNX file)")
    if engines and (cfg.single.profile_ops or cfg.single.train):
        raise ConfigError("--profile-ops and --train measure the backend sweep, not --engines; run them without it")
    # with engines, devices are torch's: the fidelity reference is torch's fp32 eager
    backend, devices, notes = resolve_devices(cfg.single.devices, "torch" if engines else cfg.backend)
    return Plan(cfg, backend, models, devices, tuple(dict.fromkeys(cfg.batchsize)),
                TimingPolicy.from_config(cfg.single), tuple(notes), engines,
                tuple(dict.fromkeys(cfg.single.precisions)) if engines else ())


class Inputs:
    """Preprocessed real images per input layout, made into batches of N distinct images (cycling)."""

    def __init__(self, paths: list[Path], need: int, sweep: Sweep, batch_images: int | None = None) -> None:
        """``need`` images are decoded per layout; ``batch_images`` (default ``need``): how many of them
        the largest batch holds (results' ``images.used``)."""
        self.paths, self.need, self.sweep = paths, need, sweep
        self.batch_images = need if batch_images is None else batch_images
        self._cache: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
        self.names: dict[tuple[str, tuple[int, ...]], list[str]] = {}  # the file name of each cached image

    def for_model(self, spec: ModelSpec) -> np.ndarray:
        from cortexbench.images.dataset import load_batch

        key = (spec.input_kind, spec.input_shape)
        if key not in self._cache:
            good: list[np.ndarray] = []
            names: list[str] = []
            count, start = 0, 0
            while count < self.need and start < len(self.paths):
                chunk = self.paths[start:start + self.need - count]
                start += len(chunk)
                arr, bad = load_batch(chunk, spec)
                good.append(arr)
                names += [p.name for p in chunk if p not in bad]
                count += len(arr)
                self.sweep.bad_images += [str(b) for b in bad if str(b) not in self.sweep.bad_images]
            if count == 0:
                raise DatasetError(f"none of the {len(self.paths)} images in {self.sweep.plan.cfg.img_dir} "
                                   f"decodes; replace them or point --img-dir at another set")
            self._cache[key] = np.concatenate(good)
            self.names[key] = names
            self.sweep.images_used = max(self.sweep.images_used, min(count, self.batch_images))
        return self._cache[key]

    def batch(self, spec: ModelSpec, n: int) -> np.ndarray:
        images = self.for_model(spec)
        return np.ascontiguousarray(images[np.arange(n) % len(images)])


def run_sweep(sweep: Sweep, backend: Backend, inputs: Inputs, bar: Progress) -> None:
    """Measure every point, then the op profile and training figures; fills ``sweep`` as it goes."""
    plan = sweep.plan
    options = LoadOptions(precision=plan.cfg.precision)
    for name in plan.models:
        spec = get_spec(name)
        for device in plan.devices:
            model = backend.load(spec, plan.cfg.model_dir, device, options)
            try:
                sweep.models.setdefault(name, {}).update(param_count=model.param_count, size_bytes=model.size_bytes)
                for bs in plan.batch_sizes:
                    bar.advance(0, note=f"{name} on {device}, batch {bs}")
                    batch = inputs.batch(spec, bs)
                    timing = measure_point(model.predict, batch, plan.policy)
                    sweep.points.append({"model": name, "backend": plan.backend, "device": device,
                                         "precision": plan.cfg.precision, **timing.to_dict()})
                    if plan.cfg.single.profile_ops:
                        op_s = backend.profile_ops(model, batch, plan.policy.min_runs)
                        sweep.op_profile.append({"model": name, "device": device, "batch_size": bs,
                                                 "op_s": op_s, "total_s": sum(op_s.values())})
                    bar.advance(1)
            finally:
                model.close()
    if plan.cfg.single.train:
        for name in plan.models:
            spec = get_spec(name)
            for device in plan.devices:
                for bs in plan.batch_sizes:
                    bar.advance(0, note=f"training {name} on {device}, batch {bs}")
                    try:
                        step_s = backend.train_step_s(spec, device, bs, TRAIN_STEPS, plan.cfg.seed)
                    except NotImplementedError as e:
                        sweep.skipped.append({"what": "train", "model": name, "device": device, "reason": str(e)})
                        bar.advance(len(plan.batch_sizes) - plan.batch_sizes.index(bs))
                        break
                    sweep.training.append({"model": name, "device": device, "batch_size": bs, "steps": TRAIN_STEPS,
                                           "step_s": step_s, "sample_s": step_s / bs})
                    bar.advance(1)


def write_outputs(sweep: Sweep, run_dir: Path, *, complete: bool, started_at: dt.datetime,
                  argv: Sequence[str]) -> dict[str, Any]:
    """results.json, results.csv, report.md and the plots; returns the body."""
    from cortexbench.report.single_plots import write_plots
    from cortexbench.results import envelope, write_csv, write_json, write_text

    body = sweep.body()
    doc = envelope("single", sweep.plan.cfg.to_dict(), machine.machine_info(), body, complete=complete,
                   started_at=started_at, finished_at=dt.datetime.now(), argv=[PROG, *argv])
    write_json(run_dir / "results.json", doc)
    header, rows = csv_rows(body)
    write_csv(run_dir / "results.csv", header, rows)
    plots = write_plots(body, run_dir, gpu_on_machine=bool(body["gpus_on_machine"]))
    write_text(run_dir / "report.md", markdown_report(doc, run_dir.name, [p.name for p in plots]))
    return body


def _body(argv: Sequence[str], args: argparse.Namespace) -> int:
    from cortexbench.images.dataset import ensure_images
    from cortexbench.models.export import ensure_models
    from cortexbench.results import keeping_partial, new_run_dir

    started_at = dt.datetime.now()
    plan = make_plan(args)
    cfg = plan.cfg
    quiet = bool(args.quiet)
    if not quiet:
        print(cfg.describe(), file=sys.stderr)
    backend = get_backend(plan.backend)
    paths = ensure_images(cfg.img_dir, cfg.images.synth_count, seed=cfg.images.seed,
                          create=not cfg.from_flag("img_dir"), progress=not quiet)
    ensure_models(list(plan.models), plan.backend, cfg.model_dir, seed=cfg.seed, progress=not quiet)
    if any(framework(e) == "onnxruntime" for e in plan.engines):  # the same weights: exported from torch's
        ensure_models(list(plan.models), "onnxruntime", cfg.model_dir, seed=cfg.seed, progress=not quiet)
    sweep = Sweep(plan, images_available=len(paths))
    need = max(plan.batch_sizes)
    if plan.engines:
        need = max(need, cfg.single.fidelity_images + CALIBRATION_IMAGES)
    inputs = Inputs(paths, need, sweep, batch_images=max(plan.batch_sizes))
    for name in plan.models:  # decode the images before the first timing, and fail early on a bad set
        inputs.for_model(get_spec(name))
    if sweep.bad_images:
        print(f"{PROG}: warning: {len(sweep.bad_images)} image(s) do not decode and were left out, "
              f"e.g. {sweep.bad_images[0]}", file=sys.stderr)
    for note in plan.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    run_dir = new_run_dir(cfg.result_dir, "single")
    n_points = len(plan.models) * len(plan.devices) * len(plan.batch_sizes) * max(1, len(plan.engines) * len(plan.precisions))
    total = n_points * (2 if cfg.single.train else 1)
    with keeping_partial(run_dir, lambda: len(sweep.points), prog=PROG, total=n_points,
                         write_partial=lambda: write_outputs(sweep, run_dir, complete=False, started_at=started_at,
                                                             argv=argv)), \
            Progress("single", total=total, unit="points", enabled=not quiet) as bar:
        if plan.engines:
            run_engines(sweep, inputs, bar)
        else:
            run_sweep(sweep, backend, inputs, bar)
    body = write_outputs(sweep, run_dir, complete=True, started_at=started_at, argv=argv)
    print(console_summary(body), end="")
    print(f"\nresults: {run_dir}  (report.md, results.json, results.csv, plots)")
    if not cfg.from_flag("models") and not cfg.from_flag("batchsize"):
        lead = ("this was the quick CPU default (config.json's cpu_fallback)"
                if cfg.source("models") == "cpu_fallback" else "this was the sweep of the config file")
        where = "" if body["gpus_on_machine"] else " (on a machine with a GPU)"
        print(f"{lead}; scale up with e.g.{where}:  {PROG} {SCALE_UP}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):  # --help, or a bad flag (one line, exit 2)
        return args
    return run_main(lambda: _body(argv, args), PROG)


if __name__ == "__main__":
    sys.exit(main())
