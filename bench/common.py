"""Shared by the benchmarks: the null-model setup, bare Ray baselines, cortexbench's own paths, output.

Everything here measures with the null model (``predict`` returns at once), so what is timed is the
harness and Ray, not a framework.  Three kinds of measurement:

- bare Ray: ``bare_actor_loop`` (pipelined plain actor calls from one asyncio loop) and
  ``bare_compiled_loop`` (one Ray Compiled Graph per actor, driven synchronously), on ``Noop`` actors that
  return their argument.  The payload is 24 bytes (one image's request) as ``bytes``, the cheapest thing
  Ray can carry, so a baseline is the best bare Ray does; ``payload="numpy"`` sends the same as an int64
  array, for comparison.
- cortexbench: ``drive`` runs a closed-loop stream through ``driver.drive`` and ``ray_handles.make_handles`` as the
  coordinator does in one process (its progress fold included).
- the worker alone: ``worker_ceiling`` (a ``ModelWorker`` without Ray).

Rates are sized by time (``seconds``): a short warm-up estimates the rate, then the measured part runs
about that long.  ``cpu_s_per_image`` is the driving process's CPU time per image: steadier than wall
time on a shared machine.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

PAYLOAD_BYTES = bytes(24)  # one image's request: item, model, image as int64
BACKENDS = ("onnxruntime", "torch", "mxnet")  # the null model runs under any; the lightest import first


def null_setup(n_images: int = 8) -> tuple[Path, list[str]]:
    """A model_dir holding the null model and a few synthetic images, in a temporary directory."""
    from cortexbench.images.synth import synthesize
    from cortexbench.models.backends.base import export_null

    root = Path(tempfile.mkdtemp(prefix="cortexbench-bench-"))
    export_null(root / "models")
    synthesize(root / "images", n_images, seed=0, progress=False)
    from cortexbench.images.dataset import list_images

    return root / "models", [str(p) for p in list_images(root / "images")]


def null_backend() -> str:
    """A backend installed here (the null model does not use it; importing it is the only cost)."""
    from cortexbench.models.backends import installed

    for b in BACKENDS:
        if installed(b):
            return b
    raise SystemExit("no backend installed: pip install 'cortexbench[onnx]'")


def init_ray(cpus: int | None) -> None:
    from cortexbench.cluster import init_ray as init

    init(None, cpus or os.cpu_count())


# --- bare Ray ---------------------------------------------------------------------------------------


class Noop:
    """The bare baseline actor (threaded, like cortexbench's WorkerActor): returns its argument."""

    def execute(self, x: Any) -> Any:
        return x

    def call(self, x: Any) -> Any:
        return x

    def pid(self) -> int:
        return os.getpid()


class AsyncNoop:
    """The same as an asyncio actor (every call crosses to its event loop)."""

    async def call(self, x: Any) -> Any:
        return x

    def pid(self) -> int:
        return os.getpid()


def start_noops(n: int, kind: str = "threaded") -> list[Any]:
    import ray

    from cortexbench.cluster import CALLS_PER_WORKER

    cls = ray.remote(num_cpus=0, max_concurrency=CALLS_PER_WORKER)(Noop if kind == "threaded" else AsyncNoop)
    actors = [cls.remote() for _ in range(n)]
    ray.get([a.pid.remote() for a in actors])
    return actors


def _payload(kind: str) -> Any:
    return PAYLOAD_BYTES if kind == "bytes" else np.zeros((1, 3), np.int64)


def bare_actor_loop(actors: list[Any], seconds: float, inflight: int, *, payload: str = "bytes",
                    rtt_calls: int = 1000) -> dict[str, float]:
    """Pipelined plain actor calls from one asyncio loop: calls/s with ``inflight`` in flight, and the
    median round trip with one in flight."""
    from cortexbench.cluster import ADAPTER

    x = _payload(payload)

    async def run(n: int, depth: int) -> tuple[float, list[float]]:
        sem = asyncio.Semaphore(depth)
        rtts: list[float] = []

        async def one(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                await ADAPTER.call(actors[i % len(actors)], "call", x)
                rtts.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0, rtts

    wall, _ = asyncio.run(run(300, inflight))
    n = _size(300 / wall, seconds)
    c0 = time.process_time()
    wall, _ = asyncio.run(run(n, inflight))
    cpu = time.process_time() - c0
    _, rtts = asyncio.run(run(rtt_calls, 1))
    return {"images_per_s": n / wall, "rtt_median_s": statistics.median(rtts), "cpu_s_per_image": cpu / n}


def bare_compiled_loop(actors: list[Any], seconds: float, depth: int = 4, *, payload: str = "bytes",
                       rtt_calls: int = 1000) -> dict[str, float]:
    """One Ray Compiled Graph per actor, driven synchronously and pipelined (``depth`` in flight per
    graph): calls/s, and the median round trip of one execution at a time."""
    x = _payload(payload)
    dags = [_compile(a, depth) for a in actors]
    try:
        rtt = _median_rtt(dags[0], x, rtt_calls)

        def pipelined(n: int) -> float:
            t0 = time.perf_counter()
            refs: list[list[Any]] = [[] for _ in dags]
            for i in range(n):
                k = i % len(dags)
                refs[k].append(dags[k].execute(x))
                if len(refs[k]) >= depth:
                    refs[k].pop(0).get()
            for rs in refs:
                for r in rs:
                    r.get()
            return time.perf_counter() - t0

        n = _size(500 / pipelined(500), seconds)
        c0 = time.process_time()
        wall = pipelined(n)
        cpu = time.process_time() - c0
        return {"images_per_s": n / wall, "rtt_median_s": rtt, "cpu_s_per_image": cpu / n}
    finally:
        for d in dags:
            d.teardown()


def compiled_rtt(actor: Any, payload: bytes, calls: int = 1000) -> float:
    """The median round trip of a compiled graph to ``actor.execute`` with ``payload``, one execution at a
    time, driven synchronously (for a cortexbench worker: its own cost per image, without the driver)."""
    dag = _compile(actor, 1)
    try:
        return _median_rtt(dag, payload, calls)
    finally:
        dag.teardown()


def _compile(actor: Any, depth: int) -> Any:
    from ray.dag import InputNode

    with InputNode() as inp:
        node = actor.execute.bind(inp)
    return node.experimental_compile(_max_inflight_executions=depth)


def _median_rtt(dag: Any, x: Any, calls: int) -> float:
    """Median round trip of one execution at a time (after 200 warm-up executions)."""
    for _ in range(200):
        dag.execute(x).get()
    rtts = []
    for _ in range(calls):
        t = time.perf_counter()
        dag.execute(x).get()
        rtts.append(time.perf_counter() - t)
    return statistics.median(rtts)


def _size(rate: float, seconds: float, lo: int = 500, hi: int = 2_000_000) -> int:
    return int(min(hi, max(lo, rate * seconds)))


# --- cortexbench ------------------------------------------------------------------------------------


def start_null_workers(n: int, model_dir: Path, images: list[str], *, lanes: int, cpus: float,
                       prefix: str = "cpu") -> Any:
    """``n`` CPU WorkerActors with the null model in cached mode, sharing ``cpus`` Ray CPUs."""
    from cortexbench.cluster import start_workers
    from cortexbench.worker import WorkerSpec

    backend = null_backend()
    specs = [WorkerSpec(name=f"{prefix}{i}", device="cpu", backend=backend, model_dir=str(model_dir),
                        models=("null",), images=tuple(images), lanes=lanes, image_pool=len(images))
             for i in range(n)]
    pool = start_workers(specs, gpu=False, cpus_each=max(0.01, math.floor(100 * cpus / n) / 100), threads_each=1)
    pool.set_mode("cached")
    return pool


def drive(actors: list[Any], names: list[str], *, dispatch: str, seconds: float, concurrency: int,
          max_group: int, depth: int, warmup: int = 300, seed: int = 0) -> dict[str, float]:
    """A closed-loop stream through cortexbench's Driver, as the coordinator runs it in one process:
    images/s over the measured part, the median latency per image (done - scheduled), images per call,
    and this process's CPU seconds per image."""
    from cortexbench.driver import DriverOptions
    from cortexbench.driver import drive as drive_stream
    from cortexbench.ray_handles import make_handles
    from cortexbench.schedule import make_schedule

    async def run() -> dict[str, float]:
        handles = make_handles(actors, names, "cached", dispatch, depth, one_at_a_time=concurrency == 1)
        for h in handles:
            await h.start()
        try:
            async def one(n: int) -> tuple[Any, float]:
                sched = make_schedule(count=n, models=("null",), n_images=8, seed=seed)
                opts = DriverOptions(mode="cached", concurrency=concurrency, max_group=max_group, depth=depth)
                c0 = time.process_time()
                res = await drive_stream(sched, handles, opts, balancer="least-outstanding", seed=0,
                                         on_progress=_live_fold(names), manage_handles=False)
                return res, time.process_time() - c0

            res, _ = await one(warmup)
            res, cpu = await one(_size(res.sent / (res.finished_s - res.started_s), seconds, lo=warmup))
            led = res.ledger
            ok = led.column("outcome") == 0
            lat = led.column("latency_s")[ok]
            calls = len({(w, s) for w, s in zip(led.column("worker").tolist(), led.column("sent_s").tolist(),
                                                 strict=True)})
            return {"images_per_s": res.sent / (res.finished_s - res.started_s),
                    "latency_median_s": float(np.median(lat)) if len(lat) else math.nan,
                    "failed": float(len(led) - int(ok.sum())), "images_per_call": len(led) / max(1, calls),
                    "cpu_s_per_image": cpu / max(1, res.sent)}
        finally:
            for h in handles:
                await h.close()

    return asyncio.run(run())


def _live_fold(names: list[str]) -> Callable[..., None]:
    """The coordinator's progress fold (quiet), so the stream's own bookkeeping is in the measurement."""
    from cortexbench.live import LiveView

    view = LiveView(("null",), names, server=None, run_id="bench", backend="null", quiet=True)
    view.start_mode("cached", 0, 0)
    return view.fold


def worker_ceiling(model_dir: Path, images: list[str], *, lanes: int, group: int, inflight: int,
                   seconds: float) -> dict[str, float]:
    """One ModelWorker, no Ray: ``inflight`` groups of ``group`` images in flight at once, each from its
    own caller thread through ``ModelWorker.run`` (as a threaded actor's calls arrive)."""
    from cortexbench.protocol import RequestGroup
    from cortexbench.worker import ModelWorker, WorkerSpec

    spec = WorkerSpec(name="ceiling", device="cpu", backend=null_backend(), model_dir=str(model_dir),
                      models=("null",), images=tuple(images), lanes=lanes, image_pool=len(images))
    w = ModelWorker(spec)
    w.set_mode("cached")
    g = RequestGroup.of(range(group), [0] * group, [i % len(images) for i in range(group)])
    done = [0] * inflight
    stop = threading.Event()

    def caller(k: int) -> None:
        while not stop.is_set():
            w.run(g)
            done[k] += group

    try:
        for _ in range(200):
            w.run(g)
        threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(inflight)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return {"images_per_s": sum(done) / wall, "lanes": lanes, "group": group, "inflight": inflight}
    finally:
        w.close()


# --- processes ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def process_tree(root: int) -> dict[int, str]:
    """The live descendants of process ``root`` (Linux /proc), each with its command line (a Ray actor's
    process is titled ``ray::ClassName``): the worker processes of a Ray that ``root`` started."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        todo.extend(children.get(pid, []))
    return out


def worker_pids(root: int) -> dict[int, str]:
    """cortexbench's worker actors among ``root``'s descendants (``process_tree``): pid -> title."""
    return {p: c for p, c in process_tree(root).items() if c.startswith("ray::WorkerActor")}


def idle_cpu_share(pids: list[int], seconds: float = 1.0) -> float:
    """Cores the given processes use over ``seconds`` (a busy-waiting process shows as about 1)."""
    before = [cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    return sum(cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)) / seconds


def compiled_idle_cpu(actor: Any, pid: int, seconds: float = 1.0) -> dict[str, float]:
    """Cores a worker actor uses while idle, without and with a compiled graph set up on it."""
    from ray.dag import InputNode

    without = idle_cpu_share([pid], seconds)
    with InputNode() as inp:
        node = actor.execute.bind(inp)
    dag = node.experimental_compile(_max_inflight_executions=2)
    try:
        from cortexbench.protocol import RequestGroup

        dag.execute(RequestGroup.of([0], [0], [0]).to_bytes()).get()
        with_graph = idle_cpu_share([pid], seconds)
    finally:
        dag.teardown()
    return {"idle_cores_without_graph": without, "idle_cores_with_graph": with_graph}


# --- output -------------------------------------------------------------------------------------------


def interleave(runs: dict[str, Callable[[], dict[str, float]]],
               lat_runs: dict[str, Callable[[], dict[str, float]]], rounds: int
               ) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[dict[str, float]]]]:
    """Run every measurement once per round, the throughput runs in a rotated order (so no path always
    goes first on a noisy machine), then the latency runs; each name's results, one per round."""
    got: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    lat: dict[str, list[dict[str, float]]] = {k: [] for k in lat_runs}
    order = list(runs)
    for r in range(rounds):
        print(f"round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
        for name in order[r % len(order):] + order[:r % len(order)]:
            got[name].append(runs[name]())
        for name, fn in lat_runs.items():
            lat[name].append(fn())
    return got, lat


def median_of(runs: list[dict[str, float]], key: str) -> float:
    vals = [r[key] for r in runs if key in r and not math.isnan(r[key])]
    return statistics.median(vals) if vals else math.nan


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a bench starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: Any, url: str, within_s: float, what: str) -> None:
    """Poll ``url``/v2/health/ready until it answers 200; SystemExit naming ``what`` if ``proc`` exits or
    ``within_s`` pass first (the process is killed then)."""
    import httpx

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited before it was ready")
        time.sleep(0.1)  # the server is starting: poll its readiness at a bounded pace
    proc.kill()
    raise SystemExit(f"{what} did not get ready within {within_s:g} s")


def torch_work_dir(work: Path, names: list[str], images: int) -> tuple[Path, Path]:
    """``work/models`` with the models exported for torch and ``work/images`` with ``images`` synthetic
    JPEGs (both kept between runs): the GPU benches' data."""
    import subprocess

    model_dir, img_dir = work / "models", work / "images"
    subprocess.run([sys.executable, "-m", "cortexbench.models", "export", "--backend", "torch", "--models",
                    ",".join(names), "--model-dir", str(model_dir), "--quiet"], check=True)
    subprocess.run([sys.executable, "-m", "cortexbench.images", "synth", "--count", str(images), "--out",
                    str(img_dir)], check=True, capture_output=True)
    return model_dir, img_dir


def stream_results(cmd: list[str], env: dict[str, str] | None = None,
                   show: int = 6) -> tuple[dict[str, Any] | None, float, list[str]]:
    """Run a ``python -m cortexbench.stream`` command line; its results.json (None when it failed), its wall
    time and the tail of its output (``show`` lines of it printed)."""
    import json
    import subprocess

    print("$", " ".join(cmd), " ".join(f"{k}={v}" for k, v in (env or {}).items()), flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})
    wall = time.perf_counter() - t
    tail = (p.stdout + p.stderr).strip().splitlines()
    print("\n".join(tail[-show:]), flush=True)
    run_dir = next((line.split("results:", 1)[1].strip() for line in tail if line.startswith("results:")), None)
    if p.returncode != 0 or run_dir is None:
        return None, wall, [f"exit {p.returncode}", *tail[-5:]]
    res = json.loads((Path(run_dir) / "results.json").read_text())
    res["run_dir"] = run_dir
    return res, wall, tail


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def us(seconds: float) -> float:
    return seconds * 1e6


def write_json(path: Path, data: dict[str, Any]) -> None:
    from cortexbench.results import write_json as atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic(path, data)
    print(f"\nwrote {path}")
