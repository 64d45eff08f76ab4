"""Cold and swap loads against the hardware: one run measures the floors, a bare loop and cortexbench.

    python bench/cold.py [--models imagenet] [--precision fp16] [--images 160] [--out DIR]

On a GPU machine (torch), side by side in one process tree:

1. the hardware: pinned and pageable host-to-device bandwidth (1 GiB), reads of the largest model file
   from the page cache into pinned memory on 1/4/8/16 threads (``os.preadv``), and the same with the file
   dropped from the page cache (``posix_fadvise``: on a VM the host may still cache it);
2. per model: the file's bytes, the floor (bytes / pinned bandwidth), the cached inference (warm eager,
   batch 1, and the CUDA-graph replay cortexbench's cached mode uses);
3. the bare loop: build the network on the meta device, ``safetensors.torch.load_file(device="cuda")``,
   assign, convert to the precision, first eager inference, synchronise: no harness (rounds after the
   first, so the process is as warm as cortexbench's);
4. cortexbench: ``python -m cortexbench.stream --mode cold,swap`` at concurrency 1 and 16 on one GPU,
   the same model files (results.json read back).

It prints one table with the targets of issue #9 and writes ``cold.json``.  Without a GPU it runs steps 1-3
on the CPU where they apply (a smoke test; no verdicts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import print_table, stream_results, torch_work_dir, verdict, write_json

from cortexbench.models.registry import expand_model_names, get_spec


def h2d_gbps(nbytes: int, pinned: bool, dev: torch.device) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    best = float("inf")
    for _ in range(4):
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise OSError("short read")
        view = view[got:]
        offset += got


def read_gbps(path: Path, threads: int, buf: Any, drop: bool) -> float:
    size = path.stat().st_size
    view = memoryview(buf)[:size]
    chunk = -(-size // (threads * 4))
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(lambda a: _pread_all(fd, view[a:min(size, a + chunk)], a), range(0, size, chunk)))
            return size / (time.perf_counter() - t) / 1e9
    finally:
        os.close(fd)


def sync(dev: torch.device | None) -> None:
    if dev is not None:
        torch.cuda.synchronize(dev)


def cached_inference(spec: Any, path: Path, dev: torch.device | None, half: bool) -> dict[str, float]:
    from cortexbench.models.backends import get_backend
    from cortexbench.models.backends.base import LoadOptions

    backend = get_backend("torch")
    device = "cpu" if dev is None else f"gpu:{dev.index}"
    out = {}
    for graphs in ([False, True] if dev is not None else [False]):
        m = backend.load(spec, path.parent.parent, device,
                         LoadOptions(precision="fp16" if half else "fp32", cuda_graphs=graphs))
        x = torch.randn(1, *spec.input_shape).numpy()
        for _ in range(5):
            m.predict(x)
        times = []
        for _ in range(30):
            t = time.perf_counter()
            m.predict(x)
            times.append(time.perf_counter() - t)
        m.close()
        out["graph_s" if graphs else "eager_s"] = statistics.median(times)
    return out


def bare_loop(specs: list[Any], paths: dict[str, Path], dev: torch.device | None, half: bool,
              rounds: int) -> dict[str, float]:
    """Mean seconds per model of the naive load + first inference, rounds after the first."""
    from safetensors.torch import load_file

    from cortexbench.models.backends import torch_nets

    per: dict[str, list[float]] = {s.name: [] for s in specs}
    device = "cpu" if dev is None else str(dev)
    for r in range(rounds + 1):
        for spec in specs:
            x = torch.randn(1, *spec.input_shape)
            sync(dev)
            t = time.perf_counter()
            with torch.device("meta"):
                net = torch_nets.make(spec)
            sd = load_file(str(paths[spec.name]), device=device)
            for k in torch_nets.ignored_keys(spec, list(sd)):
                del sd[k]
            net.load_state_dict(sd, assign=True)
            net.eval()
            if half:
                net.half()
            with torch.inference_mode():
                xi = x.to(device)
                y = net(xi.half() if half else xi)
                y.float().cpu()
            sync(dev)
            if r:
                per[spec.name].append(time.perf_counter() - t)
            del net, sd
    return {k: statistics.mean(v) for k, v in per.items()}


def run_stream(cfg: Path, modes: str, concurrency: int, images: int, warmup: int, precision: str,
               extra: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "cortexbench.stream", "--config", str(cfg), "--gpus", "1", "--mode", modes,
           "--concurrency", str(concurrency), "--images", str(images), "--warmup", str(warmup),
           "--precision", precision, "--metrics-port", "0", "--records", "none", *extra]
    res, wall, tail = stream_results(cmd, env, show=14)
    if res is None:
        return {"error": tail[0], "wall_s": wall}
    out: dict[str, Any] = {"wall_s": wall, "run_dir": res["run_dir"], "tiers": res.get("tiers")}
    answers = ((res.get("tiers") or {}).get("answers") or {}).get("modes") or {}
    for mode, a in answers.items():
        print(f"answers {mode} vs cached: {a.get('agree')}/{a.get('pairs')} top-1 agree, max rel. logit-sum diff "
              f"{a.get('max_rel_checksum_diff')}", flush=True)
    for mode, m in res["modes"].items():
        s = m["summary"]
        out[mode] = {"mean_s": s["latency"].get("mean_s"), "p50_s": s["latency"].get("p50_s"),
                     "p99_s": s["latency"].get("p99_s"), "img_per_s": s["throughput_images_per_s"],
                     "failed": s["failed"],
                     "stages": {st: v.get("mean_s") for st, v in (m.get("stages") or {}).items()},
                     "per_model_mean_s": {k: v["latency"].get("mean_s") for k, v in m["per_model"].items()}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="imagenet")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    ap.add_argument("--images", type=int, default=320, help="counted images per cortexbench mode at c=1")
    ap.add_argument("--images16", type=int, default=800, help="counted images per cortexbench mode at c=16")
    ap.add_argument("--rounds", type=int, default=3, help="bare-loop rounds (after one warm-up round)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cb-cold")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results")))
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--ab", action="store_true", help="only the A/B of the loader's tuning knobs (cold, c=16)")
    ap.add_argument("--c1-modes", default="cached,cold,swap",
                    help="modes of the concurrency-1 run (cached checks the other tiers' answers)")
    ap.add_argument("--eager-ab", action="store_true",
                    help="also run cold at c=1 and c=16 with the loader's slot graphs off (CORTEXBENCH_SLOT_GRAPHS=0)")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="also run c=16 with the workers' GIL switch interval in the loading modes at this value "
                         "(an A/B against cortexbench's 0.0005 s)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if gpu else None
    half = args.precision == "fp16" and gpu
    names = expand_model_names([m.strip() for m in args.models.split(",")], key="--models")
    specs = [get_spec(n) for n in names]
    work = args.work
    model_dir, img_dir = torch_work_dir(work, names, 300)
    from cortexbench.models.backends import get_backend

    backend = get_backend("torch")
    paths = {s.name: backend.model_files(s, model_dir)[0] for s in specs}
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    mean_bytes = statistics.mean(sizes.values())
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "torch": torch.__version__,
                           "precision": args.precision, "models": names, "bytes": sizes, "mean_bytes": mean_bytes}
    if args.ab and gpu:  # only the A/B of the loader's tuning knobs: cold at c=16, one run per variant
        cfg = work / "config.json"
        cfg.write_text(json.dumps({"models": names, "img_dir": str(img_dir), "model_dir": str(model_dir),
                                   "result_dir": str(work / "results"), "backend": "torch"}))
        variants = {"as shipped": {}, "switch 5 ms": {"CORTEXBENCH_SWITCH_INTERVAL_S": "0.005"},
                    "chunks 16 MB": {"CORTEXBENCH_CHUNK_MB": "16"}, "no input overlap": {"CORTEXBENCH_INPUT_OVERLAP": "0"},
                    "as shipped again": {}}
        ab = {k: run_stream(cfg, "cold", 16, args.images16, 64, args.precision, [], env=v) for k, v in variants.items()}
        out["ab"] = ab
        print_table("A/B: cold at c=16", ["variant", "img/s", "mean ms", "read ms", "copy ms", "wait ms", "infer ms"],
                    [[k, (r.get("cold") or {}).get("img_per_s", float("nan")),
                      *((((r.get("cold") or {}).get(key) or float("nan")) * 1e3) for key in ("mean_s",)),
                      *((((r.get("cold") or {}).get("stages") or {}).get(st) or float("nan")) * 1e3
                        for st in ("read", "copy", "wait", "infer"))] for k, r in ab.items()])
        write_json(args.out / "cold_ab.json", out)
        return 0
    # 1. the hardware
    biggest = max(paths.values(), key=lambda p: p.stat().st_size)
    buf = torch.empty(biggest.stat().st_size, dtype=torch.uint8, pin_memory=gpu).numpy()
    if gpu:
        out["h2d_pinned_gbps"] = h2d_gbps(1 << 30, True, dev)
        out["h2d_pageable_gbps"] = h2d_gbps(1 << 30, False, dev)
    read_gbps(biggest, 8, buf, drop=False)  # into the page cache
    out["read_cache_gbps"] = {t: read_gbps(biggest, t, buf, drop=False) for t in (1, 4, 8, 16)}
    out["read_dropped_gbps"] = {t: read_gbps(biggest, t, buf, drop=True) for t in (1, 16)}
    copy_bw = out.get("h2d_pinned_gbps") or float("nan")
    read_bw = max(out["read_cache_gbps"].values())
    # 2. per model
    per: dict[str, Any] = {}
    for s in specs:
        inf = cached_inference(s, paths[s.name], dev, half)
        per[s.name] = {"bytes": sizes[s.name], "floor_s": sizes[s.name] / (copy_bw * 1e9) if gpu else float("nan"),
                       **inf}
    out["per_model"] = per
    floor = statistics.mean(v["floor_s"] for v in per.values())
    cached_eager = statistics.mean(v["eager_s"] for v in per.values())
    # 3. the bare loop
    bare = bare_loop(specs, paths, dev, half, args.rounds)
    for k, v in bare.items():
        per[k]["bare_s"] = v
    bare_mean = statistics.mean(bare.values())
    out.update(floor_s=floor, cached_eager_s=cached_eager, bare_mean_s=bare_mean)
    # 4. cortexbench
    if not args.skip_stream and gpu:
        cfg = work / "config.json"
        cfg.write_text(json.dumps({"models": names, "img_dir": str(img_dir), "model_dir": str(model_dir),
                                   "result_dir": str(work / "results"), "backend": "torch"}))
        out["c1"] = run_stream(cfg, args.c1_modes, 1, args.images, 16, args.precision, [])
        out["c16"] = run_stream(cfg, "cold,swap", 16, args.images16, 64, args.precision, [])
        if args.switch_interval:  # A/B: the workers' GIL switch interval
            out["c16_switch"] = run_stream(cfg, "cold,swap", 16, args.images16, 64, args.precision, [],
                                           env={"CORTEXBENCH_SWITCH_INTERVAL_S": str(args.switch_interval)})
        if args.eager_ab:  # A/B: loaded models run eagerly instead of replaying their slot's CUDA graph
            eager = {"CORTEXBENCH_SLOT_GRAPHS": "0"}
            out["c1_eager"] = run_stream(cfg, "cold", 1, args.images, 16, args.precision, [], env=eager)
            out["c16_eager"] = run_stream(cfg, "cold", 16, args.images16, 64, args.precision, [], env=eager)
    # the table
    rows = [[n, f"{v['bytes'] / 1e6:.0f}", v["floor_s"] * 1e3, v["eager_s"] * 1e3, v.get("graph_s", float("nan")) * 1e3,
             v["bare_s"] * 1e3, *(((out.get("c1") or {}).get(m) or {}).get("per_model_mean_s", {}).get(n, float("nan"))
                                  * 1e3 for m in ("cold", "swap"))]
            for n, v in per.items()]
    print_table("per model (ms; cold/swap: cortexbench mean latency per image at c=1)",
                ["model", "MB", "floor", "cached eager", "cached graph", "bare loop", "cold c=1", "swap c=1"], rows)
    hw = [["pinned H2D GB/s", out.get("h2d_pinned_gbps", float("nan"))],
          ["pageable H2D GB/s", out.get("h2d_pageable_gbps", float("nan"))],
          *[[f"page cache -> pinned, {t} threads, GB/s", v] for t, v in out["read_cache_gbps"].items()],
          *[[f"dropped cache, {t} threads, GB/s", v] for t, v in out["read_dropped_gbps"].items()],
          ["mean model MB (fp32 file)", mean_bytes / 1e6], ["floor mean ms", floor * 1e3],
          ["cached eager inference mean ms", cached_eager * 1e3], ["bare loop mean ms", bare_mean * 1e3]]
    print_table("hardware and bare loops", ["figure", "value"], hw)
    targets = []
    c1, c16 = out.get("c1") or {}, out.get("c16") or {}
    if "cold" in c1:
        cold = c1["cold"]["mean_s"]
        targets += [["cold c=1 mean <= 4 x (floor + cached inference)", cold * 1e3, 4 * (floor + cached_eager) * 1e3,
                     verdict(cold <= 4 * (floor + cached_eager))],
                    ["cold c=1 mean <= 0.3 x bare loop", cold * 1e3, 0.3 * bare_mean * 1e3,
                     verdict(cold <= 0.3 * bare_mean)]]
    if "swap" in c1:
        swap = c1["swap"]["mean_s"]
        targets.append(["swap c=1 mean <= 2 x (floor + cached inference)", swap * 1e3, 2 * (floor + cached_eager) * 1e3,
                        verdict(swap <= 2 * (floor + cached_eager))])
    if "cold" in c16:
        bound = 0.5 * min(read_bw, copy_bw) * 1e9 / mean_bytes
        targets.append(["cold c=16 img/s >= 0.5 x min(read, copy) / mean bytes", c16["cold"]["img_per_s"], bound,
                        verdict(c16["cold"]["img_per_s"] >= bound)])
        if "swap" in c16:
            targets.append(["swap c=16 img/s (information)", c16["swap"]["img_per_s"], copy_bw * 1e9 / mean_bytes, "-"])
        for key, label in (("c1_eager", "cold c=1 mean ms, slot graphs off (A/B)"),
                           ("c16_eager", "cold c=16 img/s, slot graphs off (A/B)")):
            r = (out.get(key) or {}).get("cold")
            if r:
                targets.append([label, r["mean_s"] * 1e3 if key == "c1_eager" else r["img_per_s"], "-", "-"])
        ab = (out.get("c16_switch") or {}).get("cold")
        if ab:
            targets.append([f"cold c=16 img/s, switch interval {args.switch_interval:g} s (A/B)", ab["img_per_s"],
                            bound, verdict(ab["img_per_s"] >= bound)])
    for key in ("c1", "c16"):
        stages = {m: (out.get(key) or {}).get(m, {}).get("stages") for m in ("cached", "cold", "swap")}
        rows = [[st, *(((stages.get(m) or {}).get(st) or float("nan")) * 1e3 for m in ("cached", "cold", "swap"))]
                for st in ("queue", "input", "decode", "wait", "read", "build", "copy", "infer", "free", "transport")]
        if any(stages.values()):
            print_table(f"stage means at {key} (ms)", ["stage", "cached", "cold", "swap"], rows)
    if targets:
        print_table("targets (ms, or images/s)", ["target", "measured", "bound", "verdict"], targets)
    out["targets"] = targets
    write_json(args.out / "cold.json", out)
    failed = [k for k in ("c1", "c16", "c16_switch") if (out.get(k) or {}).get("error")]
    if failed:
        print(f"cortexbench failed in: {', '.join(failed)} (see the output above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
