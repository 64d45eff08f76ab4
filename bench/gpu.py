"""The GPU cached path against bare loops, layer by layer, in one call on a GPU machine.

    python bench/gpu.py [--precision fp16] [--seconds 4] [--images 20000] [--out DIR] [--skip-stream]

Side by side, on GPU 0 (torch, batch 1, the eight ImageNet models in a uniform mix, random weights):

1. bare loops, no harness: eager on one stream; CUDA graphs on 1/2/4/8/16 streams, a Python thread per
   stream, each image copied in from pinned memory, its graph replayed, its logits copied out and the
   stream synchronised (what any server must do per answer); and a bare nvJPEG loop (JPEG bytes in host
   memory, ``torchvision.io.decode_jpeg(device="cuda")``, resize and normalise on the GPU, then the graph)
   on 8 streams;
2. cortexbench's layers without Ray: ``TorchModel.predict`` (cached mode's model, its own CUDA graphs)
   from 8 lane threads; a ``ModelWorker`` in cached mode (lanes, groups, the per-image bookkeeping) driven
   by caller threads as the Ray actor's threads drive it;
3. cortexbench end to end: ``python -m cortexbench.stream --gpus 1 --mode cached`` (``--inputs pool`` and
   ``jpeg``, each dispatch path), and on every GPU of the machine (``--gpus N``).

It prints one table with the ratios to the bare 8-stream loop (issue #10's targets) and writes gpu.json.
Without a GPU it exits with a message.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from common import print_table, stream_results, torch_work_dir, verdict, write_json

from cortexbench.models.registry import expand_model_names, get_spec


def _models(specs: list[Any], model_dir: Path, half: bool) -> dict[str, Any]:
    from cortexbench.models.backends import get_backend
    from cortexbench.models.backends.base import LoadOptions

    backend = get_backend("torch")
    return {s.name: backend.load(s, model_dir, "gpu:0", LoadOptions(precision="fp16" if half else "fp32"))
            for s in specs}


def _timed(threads: int, seconds: float, body: Any) -> float:
    """images/s of ``threads`` threads each calling ``body(k, stop)`` (which returns its image count)."""
    stop = threading.Event()
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def run(k: int) -> None:
        barrier.wait()
        counts[k] = body(k, stop)

    ts = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)  # a benchmark's measuring window, not synchronisation
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def bare_eager(models: dict[str, Any], specs: list[Any], half: bool, seconds: float) -> float:
    """The plainest eager loop: per image, copy the input in, run the network, copy the logits out
    (blocking), on the default stream."""
    dev = torch.device("cuda", 0)
    nets = {s.name: models[s.name].net for s in specs}
    xs = {s.name: torch.randn(1, *s.input_shape) for s in specs}

    def body(k: int, stop: threading.Event) -> int:
        rng, n = random.Random(k), 0
        with torch.inference_mode():
            while not stop.is_set():
                s = specs[rng.randrange(len(specs))]
                x = xs[s.name].to(dev)
                nets[s.name](x.half() if half else x).float().cpu()
                n += 1
        return n

    # cuDNN keeps its tuned plans per thread: warm and time on this thread (a fresh thread would tune
    # every model again inside the window: the 2.9 images/s of the 2026-11-30 and 12-01 calls)
    body(0, _Stop(50))
    t0 = time.perf_counter()
    n = body(0, _Deadline(seconds))
    return n / (time.perf_counter() - t0)


class _Deadline:
    """A stop flag that is set ``seconds`` from now."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def is_set(self) -> bool:
        return time.perf_counter() >= self.end


class _Stop:
    """A stop flag that is set after ``n`` checks (warm-up rounds)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0


def _graphs_for(nets: dict[str, Any], specs: list[Any], half: bool, stream: Any, pre: Any = None) -> dict[str, Any]:
    """Per model: (graph, static input, static output) captured on ``stream``; ``pre`` maps the static
    input (uint8 or float) to the network's input inside the graph."""
    from cortexbench.models.backends.torch_impl import capture, run_net

    dev = torch.device("cuda", 0)
    out = {}
    for s in specs:
        net = nets[s.name]
        x = torch.zeros(1, *s.input_shape, device=dev)

        def fwd(v: torch.Tensor, net: Any = net) -> torch.Tensor:
            return run_net(net, v, half)

        graph, y = capture(fwd, x, stream, dev)
        out[s.name] = (graph, x, y)
    return out


def bare_graphs(models: dict[str, Any], specs: list[Any], half: bool, seconds: float, streams: int) -> float:
    dev = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    nets = {s.name: models[s.name].net for s in specs}
    lanes = []
    for _ in range(streams):
        st = torch.cuda.Stream(dev)
        g = _graphs_for(nets, specs, half, st)
        host = {s.name: (torch.randn(1, *s.input_shape).pin_memory(),
                         torch.empty(1, s.num_classes).pin_memory()) for s in specs}
        lanes.append((st, g, host))
    torch.cuda.synchronize()

    def body(k: int, stop: threading.Event) -> int:
        st, g, host = lanes[k]
        rng, n = random.Random(k), 0
        with torch.cuda.stream(st):
            while not stop.is_set():
                s = specs[rng.randrange(len(specs))]
                graph, x, y = g[s.name]
                hin, hout = host[s.name]
                x.copy_(hin, non_blocking=True)
                graph.replay()
                hout.copy_(y, non_blocking=True)
                st.synchronize()
                n += 1
        return n

    rate = _timed(streams, seconds, body)
    lanes.clear()
    torch.cuda.synchronize()
    return rate


def bare_graphs_launched(models: dict[str, Any], specs: list[Any], half: bool, seconds: float, streams: int,
                         window: int = 64) -> float:
    """One thread queues each image on the next stream in turn (copy in from its own pinned buffer, graph,
    copy out, event) and collects the oldest answer once ``window`` are queued: the GPU's capacity with
    no per-image wait, the shape of cortexbench's launched path without its harness."""
    dev = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    nets = {s.name: models[s.name].net for s in specs}
    lanes = []
    for _ in range(streams):
        st = torch.cuda.Stream(dev)
        lanes.append((st, _graphs_for(nets, specs, half, st)))
    bufs = {s.name: [(torch.randn(1, *s.input_shape).pin_memory(), torch.empty(1, s.num_classes).pin_memory(),
                      torch.cuda.Event()) for _ in range(window)] for s in specs}
    torch.cuda.synchronize()

    def body(k: int, stop: threading.Event) -> int:
        rng, n = random.Random(k), 0
        queued: collections.deque[tuple[Any, list[Any]]] = collections.deque()
        while not stop.is_set():
            if len(queued) >= window:
                buf, home = queued.popleft()
                buf[2].synchronize()
                buf[1].numpy().copy()
                home.append(buf)
            s = specs[rng.randrange(len(specs))]
            st, g = lanes[n % streams]
            graph, x, y = g[s.name]
            free = bufs[s.name]
            buf = free.pop()
            hin, hout, ev = buf
            with torch.cuda.stream(st):
                x.copy_(hin, non_blocking=True)
                graph.replay()
                hout.copy_(y, non_blocking=True)
                ev.record()
            queued.append((buf, free))
            n += 1
        while queued:
            buf, home = queued.popleft()
            buf[2].synchronize()
            home.append(buf)
        return n

    body(0, _Stop(200))
    rate = _timed(1, seconds, body)
    lanes.clear()
    torch.cuda.synchronize()
    return rate


def bare_nvjpeg(models: dict[str, Any], specs: list[Any], half: bool, seconds: float, streams: int,
                jpegs: list[bytes]) -> float:
    """JPEG bytes -> nvJPEG decode -> resize/normalise on the GPU -> the model's graph, per image."""
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    dev = torch.device("cuda", 0)
    nets = {s.name: models[s.name].net for s in specs}
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
    lanes = []
    for _ in range(streams):
        st = torch.cuda.Stream(dev)
        lanes.append((st, _graphs_for(nets, specs, half, st),
                      {s.name: torch.empty(1, s.num_classes).pin_memory() for s in specs}))
    torch.cuda.synchronize()

    def body(k: int, stop: threading.Event) -> int:
        st, g, hout = lanes[k]
        rng, n = random.Random(k), 0
        with torch.cuda.stream(st):
            while not stop.is_set():
                s = specs[rng.randrange(len(specs))]
                graph, x, y = g[s.name]
                img = decode_jpeg(datas[rng.randrange(len(datas))], device=dev)  # (3, H, W) uint8
                c, h, w = s.input_shape
                v = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False)
                x.copy_(((v - mean) / std)[:, :c])
                graph.replay()
                hout[s.name].copy_(y, non_blocking=True)
                st.synchronize()
                n += 1
        return n

    body(0, _Stop(4))
    rate = _timed(streams, seconds, body)
    lanes.clear()
    torch.cuda.synchronize()
    return rate


def model_layer(specs: list[Any], model_dir: Path, half: bool, seconds: float, lanes: int) -> float:
    """cached mode's TorchModel.predict (its own graphs, pinned buffers) from ``lanes`` threads."""
    from cortexbench.models.backends import get_backend
    from cortexbench.models.backends.base import LoadOptions

    backend = get_backend("torch")
    opts = LoadOptions(precision="fp16" if half else "fp32", lanes=lanes, cuda_graphs=True)
    models = {s.name: backend.load(s, model_dir, "gpu:0", opts) for s in specs}
    xs = {s.name: np.random.default_rng(0).standard_normal((1, *s.input_shape), dtype=np.float32) for s in specs}
    for lane in range(lanes):
        for s in specs:
            models[s.name].predict(xs[s.name], lane)

    def body(k: int, stop: threading.Event) -> int:
        rng, n = random.Random(k), 0
        while not stop.is_set():
            s = specs[rng.randrange(len(specs))]
            models[s.name].predict(xs[s.name], k)
            n += 1
        return n

    rate = _timed(lanes, seconds, body)
    for m in models.values():
        m.close()
    return rate


def worker_layer(names: list[str], model_dir: Path, images: list[str], precision: str, seconds: float,
                 lanes: int, group: int, callers: int, launched: bool) -> float:
    """A cached ModelWorker (lanes, groups, per-image bookkeeping), no Ray: ``callers`` threads each
    running groups of ``group`` random images through ``ModelWorker.run`` as the actor's threads do."""
    from cortexbench.protocol import RequestGroup
    from cortexbench.worker import ModelWorker, WorkerSpec

    spec = WorkerSpec(name="w", device="gpu:0", backend="torch", model_dir=str(model_dir), models=tuple(names),
                      images=tuple(images), lanes=lanes, precision=precision, cuda_graphs=True, image_pool=256)
    w = ModelWorker(spec)
    w.set_mode("cached")
    if not launched:
        w.lanes.pipeline = None  # one lane thread per image, each waiting for its own (the path before)

    def body(k: int, stop: threading.Event) -> int:
        rng, n = random.Random(k), 0
        while not stop.is_set():
            g = RequestGroup.of(range(group), [rng.randrange(len(names)) for _ in range(group)],
                                [rng.randrange(len(images)) for _ in range(group)])
            w.run(g)
            n += group
        return n

    try:
        return _timed(callers, seconds, body)
    finally:
        w.close()


def run_stream(cfg: Path, gpus: int, images: int, precision: str, extra: list[str],
               env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "cortexbench.stream", "--config", str(cfg), "--gpus", str(gpus), "--mode", "cached",
           "--images", str(images), "--warmup", str(min(2000, images // 5)), "--precision", precision,
           "--metrics-port", "0", "--records", "none", *extra]
    res, wall, tail = stream_results(cmd, env)
    if res is None:
        return {"error": tail[0], "wall_s": wall, "tail": tail[1:]}
    m = res["modes"]["cached"]
    s = m["summary"]
    print(f"  -> {s['throughput_images_per_s']:.0f} img/s, p50 {s['latency'].get('p50_s', 0) * 1e3:.1f} ms, "
          f"failed {s['failed']}", flush=True)
    return {"wall_s": wall, "img_per_s": s["throughput_images_per_s"], "p50_s": s["latency"].get("p50_s"),
            "p99_s": s["latency"].get("p99_s"), "failed": s["failed"],
            "stages": {st: v.get("mean_s") for st, v in (m.get("stages") or {}).items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="imagenet")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    ap.add_argument("--seconds", type=float, default=4.0, help="each bare or in-process loop")
    ap.add_argument("--images", type=int, default=20000, help="counted images per cortexbench stream run")
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cb-gpu")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results")))
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--skip-layers", action="store_true", help="leave out cortexbench's layers without Ray")
    ap.add_argument("--launched-streams", default="8,16", help="stream counts of the bare launched loop")
    ap.add_argument("--stream-variants", default="default",
                    help="comma list of end-to-end variants: default, lane-threads, lanes16, compiled, switch, jpeg, "
                         "jpeg-gpu, jpeg-gpu-5ms (the GIL switch interval of 5 ms, not 0.5)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (see bench/cold.py and bench/single_overhead.py for CPU benches)")
        return 2
    half = args.precision == "fp16"
    names = expand_model_names([m.strip() for m in args.models.split(",")], key="--models")
    specs = [get_spec(n) for n in names]
    work = args.work
    model_dir, img_dir = torch_work_dir(work, names, 500)
    images = sorted(str(p) for p in img_dir.rglob("*.jpg"))
    n_gpus = torch.cuda.device_count()
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "gpus": n_gpus, "torch": torch.__version__,
                           "driver": _driver(), "precision": args.precision, "models": names, "cpus": os.cpu_count()}
    print(f"{out['gpu']} x{n_gpus}, driver {out['driver']}, torch {torch.__version__}, {os.cpu_count()} cpus", flush=True)
    models = _models(specs, model_dir, half)
    bare: dict[str, float] = {"eager, 1 stream": bare_eager(models, specs, half, args.seconds)}
    for k in (int(v) for v in args.streams.split(",")):
        bare[f"graphs, {k} streams"] = bare_graphs(models, specs, half, args.seconds, k)
        print(f"bare graphs {k} streams: {bare[f'graphs, {k} streams']:.0f} img/s", flush=True)
    for k in (int(v) for v in args.launched_streams.split(",") if v):
        bare[f"graphs launched, {k} streams, 64 queued"] = bare_graphs_launched(models, specs, half, args.seconds, k)
        print(f"bare launched {k} streams: {bare[f'graphs launched, {k} streams, 64 queued']:.0f} img/s", flush=True)
    try:
        jpegs = [Path(p).read_bytes() for p in images[:200]]
        bare["nvjpeg + graphs, 8 streams"] = bare_nvjpeg(models, specs, half, args.seconds, 8, jpegs)
    except Exception as e:  # torchvision without nvJPEG: say so, go on
        print(f"nvjpeg loop skipped: {type(e).__name__}: {e}", flush=True)
    for m in models.values():
        m.close()
    del models
    torch.cuda.empty_cache()
    out["bare"] = bare
    write_json(args.out / "gpu.json", out)  # what is measured so far survives a time-out
    layers: dict[str, float] = {}
    for launched in (() if args.skip_layers else (True, False)):
        layers[f"ModelWorker 8 lanes, 8 callers x groups of 8, {'launched' if launched else 'lane threads'}"] = \
            worker_layer(names, model_dir, images, args.precision, args.seconds, 8, 8, 8, launched)
    if not args.skip_layers:
        layers["TorchModel.predict, 8 lanes"] = model_layer(specs, model_dir, half, args.seconds, 8)
    out["layers"] = layers
    stream: dict[str, Any] = {}
    if not args.skip_stream:
        cfg = work / "config.json"
        cfg.write_text(json.dumps({"models": names, "img_dir": str(img_dir), "model_dir": str(model_dir),
                                   "result_dir": str(work / "results"), "backend": "torch"}))
        variants = {"default": ([], None), "lanes16": (["--lanes", "16", "--max-group", "16", "--concurrency", "256"], None),
                    "lane-threads": ([], {"CORTEXBENCH_LAUNCH": "0"}),
                    "compiled": (["--dispatch", "compiled"], None),
                    "switch": ([], {"CORTEXBENCH_CACHED_SWITCH_INTERVAL_S": "0.0005"}),
                    "jpeg": (["--inputs", "jpeg"], None), "jpeg-gpu": (["--inputs", "jpeg", "--decode", "gpu"], None),
                    "jpeg-gpu-5ms": (["--inputs", "jpeg", "--decode", "gpu"],
                                     {"CORTEXBENCH_INPUTS_SWITCH_INTERVAL_S": "0.005"})}
        for v in args.stream_variants.split(","):
            extra, env = variants[v]
            stream[f"1 GPU, {v}"] = run_stream(cfg, 1, args.images, args.precision, extra, env)
            out["stream"] = stream
            write_json(args.out / "gpu.json", out)
        if n_gpus > 1:
            stream[f"{n_gpus} GPUs, default"] = run_stream(cfg, n_gpus, args.images * n_gpus, args.precision, [])
    out["stream"] = stream
    # the stronger of the two bare 8-stream loops is the reference (issue #10's target)
    ref = max(v for k, v in bare.items() if "8 streams" in k and "nvjpeg" not in k)
    rows = [[f"bare {k}", v, v / ref] for k, v in bare.items()]
    rows += [[k, v, v / ref] for k, v in layers.items()]
    rows += [[f"stream {k}", r.get("img_per_s", float("nan")), r.get("img_per_s", float("nan")) / ref]
             for k, r in stream.items()]
    print_table("GPU 0: images/s and the ratio to the best bare 8-stream graph loop", ["path", "img/s", "ratio"], rows)
    one = stream.get("1 GPU, default", {}).get("img_per_s")
    targets = []
    if one:
        targets.append(["1 GPU cached >= 0.8 x bare 8 streams", one, 0.8 * ref, verdict(one >= 0.8 * ref)])
    jg, nv = stream.get("1 GPU, jpeg-gpu", {}).get("img_per_s"), bare.get("nvjpeg + graphs, 8 streams")
    if jg and nv:
        targets.append(["1 GPU --inputs jpeg --decode gpu >= 0.8 x bare nvJPEG + graphs", jg, 0.8 * nv,
                        verdict(jg >= 0.8 * nv)])
    many = stream.get(f"{n_gpus} GPUs, default", {}).get("img_per_s")
    if one and many:
        targets.append([f"{n_gpus} GPUs >= 0.9 x {n_gpus} x 1 GPU", many, 0.9 * n_gpus * one,
                        verdict(many >= 0.9 * n_gpus * one)])
    if targets:
        print_table("targets of issue #10", ["target", "measured", "bound", ""], targets)
    for k, r in stream.items():
        if r.get("stages"):
            print(k, "stages (ms):", ", ".join(f"{st} {v * 1e3:.3g}" for st, v in r["stages"].items() if v), flush=True)
    write_json(args.out / "gpu.json", out)
    return 0


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
