"""The stream's plan: flags, config and the cluster's resources reconciled into workers, a backend, a
dispatch path, drivers and one seeded schedule (``coordinator.run_stream`` runs it).

``plan_stream`` plans cortexbench's own workers (one per GPU, else CPU workers), exporting missing models and
making the default image set; ``plan_http`` plans a run against an Open Inference Protocol server (no Ray, no
model files).  ``call_depth`` sizes the calls in flight per worker; ``check_precision``, ``check_engine`` and
``_check_gpus`` refuse what cannot run before anything starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from cortexbench import machine
from cortexbench.config import Config
from cortexbench.errors import BackendUnavailableError, ConfigError, DeviceError, ModelNotFoundError
from cortexbench.images.dataset import ensure_images
from cortexbench.models.backends import resolve_backend
from cortexbench.models.export import ensure_models, missing_models
from cortexbench.models.registry import expand_model_names
from cortexbench.residency import Mode, parse_mode
from cortexbench.schedule import Schedule, make_schedule
from cortexbench.sweep import base_rate
from cortexbench.worker import WorkerSpec


@dataclass(frozen=True)
class StreamPlan:
    """The reconciled run: flags, config, the cluster's resources."""

    cfg: Config
    backend: str
    models: tuple[str, ...]
    images: tuple[str, ...]
    workers: tuple[WorkerSpec, ...]
    gpu: bool
    cpus_each: float
    threads_each: int
    dispatch: str
    drivers: int
    max_group: int
    depth: int
    schedule: Schedule
    modes: tuple[str, ...] = ()  # the passes to run; () = cfg.stream.modes
    engine: str = "backend"  # cached mode's engine (stream.engine); backend = the backend's own path

    @property
    def run_modes(self) -> tuple[str, ...]:
        return self.modes or self.cfg.stream.modes


SERVER_PASS = "server"  # the one pass against an HTTP target: what stays loaded is the server's business


def mode_of(name: str) -> Mode | None:
    """The residency mode of a pass (None for an HTTP target's ``server`` pass)."""
    return None if name == SERVER_PASS else parse_mode(name)


def plan_http(cfg: Config, *, quiet: bool = False) -> StreamPlan:
    """A run against an Open Inference Protocol server (``stream.target``): no Ray, no model files; the
    images are read (or synthesised) here and sent with every request."""
    from cortexbench.http_target import check_target

    st = cfg.stream
    check_target(st.target or "", st.protocol)
    if cfg.from_flag("stream.modes") or (st.sweep and st.sweep.strip().lower().startswith("lru")):
        flag = "--mode" if cfg.from_flag("stream.modes") else "--sweep lru"
        raise ConfigError(f"{flag} does not apply with --target: what stays loaded is the server's business")
    if st.engine != "backend":
        raise ConfigError(f"--engine {st.engine} applies to cortexbench's own workers; an HTTP target runs its "
                          "models its own way (leave --engine out with --target)")
    if st.inputs != "pool" or st.decode != "cpu":
        raise ConfigError("--inputs/--decode apply to cortexbench's own workers; an HTTP target gets decoded "
                          "tensors (leave them out with --target)")
    drivers = st.drivers or 1
    if st.rate is None and drivers > st.concurrency:
        raise ConfigError(f"--drivers {drivers} with --concurrency {st.concurrency}: each driver keeps at least one "
                          f"image in flight; use --drivers {st.concurrency} or fewer")
    models = expand_model_names(cfg.models, known_only=False)
    images = ensure_images(cfg.img_dir, cfg.images.synth_count, seed=cfg.images.seed,
                           create=not cfg.from_flag("img_dir"), progress=not quiet)
    schedule = make_schedule(count=cfg.times, models=models, n_images=len(images), popularity=st.popularity,
                             weights=st.model_weights, rate=base_rate(st), duration_s=st.duration_s,
                             warmup=st.warmup, seed=cfg.seed, arrivals=st.arrivals)
    depth = call_depth("http", st.rate, st.concurrency, 1)
    modes: tuple[str, ...] = (SERVER_PASS,)
    if st.sweep:  # a concurrency or rate sweep: the server's pass at each value
        from cortexbench.sweep import sweep_modes

        modes = sweep_modes(st.sweep, modes)
    return StreamPlan(cfg, "http", models, tuple(str(p) for p in images), (), False, 0.0, 1, "http", drivers, 1,
                      depth, schedule, modes=modes)


def call_depth(dispatch: str, rate: float | None, concurrency: int, max_group: int) -> int:
    """Calls in flight per worker (per HTTP target: requests in flight).

    Ray workers: in a closed loop enough that the images wait at the worker (its queue stage), not in the
    driver's pending list, where they would count as sent late, and no more than the worker actor runs at
    once; an open loop has no concurrency to size by (an image held back in the driver would count as sent
    late), so as many as the actor runs.  A compiled graph keeps a buffer per execution in flight, so it
    keeps a few.  HTTP: the closed loop's images in flight, at least 1024 in an open loop."""
    if dispatch == "http":
        return concurrency if rate is None else max(concurrency, 1024)
    if dispatch == "compiled":
        return 4
    from cortexbench.cluster import CALLS_PER_WORKER

    return CALLS_PER_WORKER if rate is not None else min(CALLS_PER_WORKER, max(4, math.ceil(concurrency / max_group)))


def plan_stream(cfg: Config, resources: dict[str, float], *, quiet: bool = False) -> StreamPlan:
    st = cfg.stream
    cpus = int(resources.get("CPU", os.cpu_count() or 1))
    have_gpus = int(resources.get("GPU", 0))
    if cfg.gpu_num == "auto":
        n_gpu = have_gpus
    else:
        n_gpu = int(cfg.gpu_num)
        if n_gpu > have_gpus:
            fix = f"--gpus {have_gpus} or " if have_gpus else ""
            raise DeviceError(f"--gpus {n_gpu}: the {'cluster' if st.address else 'machine'} has "
                              f"{have_gpus} GPU(s); use {fix}--gpus 0 for CPU workers")
    gpu = n_gpu > 0
    check_precision(cfg, gpu)
    n_workers = n_gpu if gpu else (st.cpu_workers or max(1, min(8, cpus // 2)))
    cpus_each = max(1.0, (cpus - 1) / n_workers) if not gpu else max(1.0, min(2.0, (cpus - 1) / n_workers))
    cpus_each = float(math.floor(cpus_each)) if cpus_each >= 1 else cpus_each
    threads_each = max(1, int(cpus_each))
    models = expand_model_names(cfg.models)
    engine = st.engine
    if engine != "backend":  # its framework's files; the refusals before anything is exported or started
        backend = check_engine(cfg, gpu)
    elif cfg.backend == "auto":
        backend = "torch" if gpu else resolve_backend("auto", ["cpu"])
    else:
        backend = resolve_backend(cfg.backend)
    if st.decode == "gpu":
        if st.inputs != "jpeg":
            raise ConfigError("--decode gpu decodes JPEG inputs: add --inputs jpeg")
        if not gpu or backend != "torch":
            raise ConfigError(f"--decode gpu needs GPU workers with the torch backend (this run: "
                              f"{'GPU' if gpu else 'CPU'} workers, {backend}); use --decode cpu")
    model_dir = cfg.model_dir
    if not cfg.from_flag("model_dir"):
        ensure_models(models, backend, model_dir, seed=cfg.seed, progress=not quiet)
    elif not st.address:  # the user's directory: never written to; a missing file is said now, not by a worker
        missing = missing_models(models, backend, model_dir)
        if missing:
            raise ModelNotFoundError(
                f"--model-dir {model_dir}: no {backend} file for {', '.join(missing)}; make them with "
                f"'python -m cortexbench.models export --models {','.join(missing)} --backend {backend} "
                f"--model-dir {model_dir}'")
    images = ensure_images(cfg.img_dir, cfg.images.synth_count, seed=cfg.images.seed,
                           create=not cfg.from_flag("img_dir"), progress=not quiet)
    lanes = st.lanes or (8 if gpu else 1)
    workers = tuple(
        WorkerSpec(name=f"{'gpu' if gpu else 'cpu'}{i}", device="gpu:0" if gpu else "cpu", backend=backend,
                   model_dir=str(model_dir), models=models, images=tuple(str(p) for p in images), lanes=lanes,
                   precision=cfg.precision, cuda_graphs=gpu and backend == "torch", image_pool=st.image_pool,
                   drop_cache=st.cold_drop_cache, cold_rebuild=st.cold_rebuild, inputs=st.inputs, decode=st.decode,
                   engine="" if engine == "backend" else engine)
        for i in range(n_workers))
    # auto = grouped: a worker runs several grouped calls at once (Ray's threads), so its lanes never
    # wait for the slowest image of a group; a compiled graph runs its executions one after another on
    # the actor (one H200, eight-model mix, fp16, 64 in flight: 1,284 images/s against 2,022 grouped).
    # Compiled is for the lowest overhead per call (the null model, concurrency 1).
    dispatch = st.dispatch if st.dispatch != "auto" else "grouped"
    drivers = st.drivers or (1 if n_workers <= 2 else max(1, min(n_workers // 2, cpus // 4)))
    drivers = min(drivers, n_workers)
    max_group = 1 if dispatch == "actor" else (st.max_group or lanes)
    depth = call_depth(dispatch, st.rate, st.concurrency, max_group)
    schedule = make_schedule(count=cfg.times, models=models, n_images=len(images), popularity=st.popularity,
                             weights=st.model_weights, rate=base_rate(st), duration_s=st.duration_s,
                             warmup=st.warmup, seed=cfg.seed, arrivals=st.arrivals)
    return StreamPlan(cfg, backend, models, tuple(str(p) for p in images), workers, gpu, cpus_each,
                      threads_each, dispatch, drivers, max_group, depth, schedule, modes=stream_modes(cfg),
                      engine=engine)


def stream_modes(cfg: Config) -> tuple[str, ...]:
    """The passes of a sweep (the same stream at each capacity, its ends as --mode lists them, concurrency
    or rate); () = ``stream.modes`` as they are."""
    st = cfg.stream
    if not st.sweep:
        return ()
    from cortexbench.sweep import sweep_modes

    return sweep_modes(st.sweep, st.modes)


def check_engine(cfg: Config, gpu: bool) -> str:
    """``--engine``: the backend whose files it runs, after the refusals said before anything starts: the
    engine's package missing, a backend named that is not its framework, a precision or device it cannot run,
    a pass that is not cached mode (an engine builds each model once, before the run)."""
    from cortexbench.models import engines
    from cortexbench.sweep import split_pass

    engine = cfg.stream.engine
    why = engines.missing(engine)
    if why:
        raise BackendUnavailableError(why)
    backend = engines.framework(engine)
    if cfg.backend not in ("auto", backend):
        raise ConfigError(f"--engine {engine} runs {backend} files, not --backend {cfg.backend}: leave "
                          f"--backend out (or use --backend {backend})")
    device = "gpu:0" if gpu else "cpu"
    try:
        engines.check(engine, cfg.precision, device)
    except engines.EngineSkip as e:
        raise DeviceError(f"--engine {engine} --precision {cfg.precision} on {'GPU' if gpu else 'CPU'} "
                          f"workers: {e}") from None
    others = [m for m in (stream_modes(cfg) or cfg.stream.modes) if parse_mode(split_pass(m)[0]).kind != "cached"]
    if others:
        raise ConfigError(f"--engine {engine} applies to cached mode only (the engine builds each model once, "
                          f"before the run), and this run has {', '.join(others)}; use --mode cached")
    return backend


def check_precision(cfg: Config, gpu: bool) -> None:
    """fp16 needs GPU workers and a backend that has it: said before anything starts, not by a worker."""
    if cfg.precision != "fp16":
        return
    if not gpu:
        raise DeviceError("'precision' fp16 needs GPU workers, and this run has none (no GPU, or --gpus 0); "
                          "use --precision fp32 on the CPU")
    if cfg.backend == "onnxruntime":
        raise DeviceError("'precision' fp16: the onnxruntime backend runs fp32 only; use --backend torch or mxnet")


def _local_resources() -> dict[str, float]:
    """What a local Ray started by ``cluster.init_ray`` will have: every core, every GPU of this machine."""
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(machine.gpu_count())}


def _check_gpus(plan: StreamPlan, resources: dict[str, float]) -> None:
    have = int(resources.get("GPU", 0))
    if plan.gpu and have < len(plan.workers):
        raise DeviceError(f"--gpus {len(plan.workers)}: Ray sees {have} GPU(s) on this machine; "
                          f"use --gpus {have} (check CUDA_VISIBLE_DEVICES)")
