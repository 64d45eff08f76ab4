"""What the stream harness costs over bare Ray: throughput and added latency per image, null model.

In one run, interleaved over ``--rounds`` rounds (medians reported), on 2 CPU workers (``--workers``):

* **bare**: a loop of pipelined Ray actor calls on 2 ``Noop`` actors (threaded actors, as cortexbench's
  workers are; 24-byte ``bytes`` payloads, one image per call, ``--concurrency`` in flight), and its
  round trip with one call in flight;
* **cortexbench**: the stream's Driver in one process, closed loop with ``--concurrency`` in flight, on
  null-model workers: the ``actor`` path (one image per call) and the ``grouped`` and ``compiled`` paths
  (up to ``--max-group`` images per call, each image still run and timed on its own);
* at concurrency 1: the median latency per image (done - scheduled) of the ``actor`` path, and what it
  adds over the bare round trip; the same for ``compiled`` against a bare compiled-graph round trip.

Target: cortexbench's throughput (its best path) >= 80% of the bare actor loop's.  The actor path alone
is judged too, since it does what the bare loop does (one image per call).

    python bench/stream_overhead.py
    python bench/stream_overhead.py --rounds 5 --seconds 3
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    bare_actor_loop,
    bare_compiled_loop,
    drive,
    init_ray,
    interleave,
    median_of,
    null_setup,
    print_table,
    start_noops,
    start_null_workers,
    us,
    verdict,
    write_json,
)
from cortexbench.cli import ArgumentParser

PROG = "python bench/stream_overhead.py"
TARGET = 0.8


def parse_args(argv: Sequence[str]) -> Any:
    p = ArgumentParser(prog=PROG, description="Stream harness throughput and latency against bare Ray actor calls.")
    a = p.add_argument
    a("--workers", type=int, default=2, help="null-model CPU workers and Noop actors (default 2)")
    a("--cpus", type=int, default=0, help="CPUs Ray may use (default: all)")
    a("--seconds", type=float, default=2.0, help="seconds per throughput measurement (default 2)")
    a("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    a("--concurrency", type=int, default=64, help="closed loop: images in flight (default 64)")
    a("--max-group", type=int, default=32, help="images per call, grouped and compiled (default 32)")
    a("--depth", type=int, default=4, help="grouped calls / compiled executions in flight per worker (default 4)")
    a("--latency-calls", type=int, default=1000, help="images at concurrency 1 per round (default 1000)")
    a("--no-compiled", action="store_true", help="leave out the compiled path (its actors spin while idle)")
    a("--out", default="results/bench/stream_overhead.json", help="JSON file to write")
    args = p.parse_args(list(argv))
    if args.workers < 1 or args.rounds < 1 or not args.seconds > 0:
        p.error("--workers, --rounds and --seconds must be positive")
    return args


def measure(args: Any) -> dict[str, Any]:
    from cortexbench.cluster import CALLS_PER_WORKER

    model_dir, images = null_setup(8)
    print(f"starting {args.workers} null-model workers and {args.workers} Noop actors ...", file=sys.stderr)
    pool = start_null_workers(args.workers, model_dir, images, lanes=1, cpus=args.cpus or os.cpu_count() or 2)
    noops = start_noops(args.workers, "threaded")
    c, g, s, n1 = args.concurrency, args.max_group, args.seconds, args.latency_calls
    w = (pool.actors, pool.names)
    runs: dict[str, Any] = {
        "bare actor calls": lambda: bare_actor_loop(noops, s, c, rtt_calls=n1),
        "cortexbench actor": lambda: drive(*w, dispatch="actor", seconds=s, concurrency=c, max_group=1,
                                           depth=min(c, CALLS_PER_WORKER)),
        "cortexbench grouped": lambda: drive(*w, dispatch="grouped", seconds=s, concurrency=c, max_group=g,
                                             depth=args.depth),
    }
    lat_runs: dict[str, Any] = {
        "cortexbench actor": lambda: drive(*w, dispatch="actor", seconds=1e-9, concurrency=1, max_group=1,
                                           depth=1, warmup=n1),
    }
    if not args.no_compiled:
        runs["cortexbench compiled"] = lambda: drive(*w, dispatch="compiled", seconds=s, concurrency=c,
                                                     max_group=g, depth=args.depth)
        runs["bare compiled graph"] = lambda: bare_compiled_loop(noops, s, args.depth, rtt_calls=n1)
        lat_runs["cortexbench compiled"] = lambda: drive(*w, dispatch="compiled", seconds=1e-9, concurrency=1,
                                                         max_group=1, depth=args.depth, warmup=n1)
    got, lat = interleave(runs, lat_runs, args.rounds)
    pool.close()

    rate = {k: median_of(v, "images_per_s") for k, v in got.items()}
    per_call = {k: median_of(v, "images_per_call") for k, v in got.items()}
    latm = {k: median_of(v, "latency_median_s") for k, v in lat.items()}
    bare_rate = rate["bare actor calls"]
    bare_rtt = median_of(got["bare actor calls"], "rtt_median_s")
    cg_rtt = median_of(got["bare compiled graph"], "rtt_median_s") if "bare compiled graph" in got else float("nan")
    paths = [k for k in rate if k.startswith("cortexbench")]
    best = max(paths, key=lambda k: rate[k])
    ratio = {k: rate[k] / bare_rate for k in paths}
    added = {"cortexbench actor": latm["cortexbench actor"] - bare_rtt}
    if "cortexbench compiled" in latm:
        added["cortexbench compiled"] = latm["cortexbench compiled"] - cg_rtt

    rows = [["bare actor calls", bare_rate, 1.0, 1, us(bare_rtt), "", ""]]
    if "bare compiled graph" in got:
        rows.append(["bare compiled graph", rate["bare compiled graph"], rate["bare compiled graph"] / bare_rate, 1,
                     us(cg_rtt), "", ""])
    for k in paths:
        rows.append([k, rate[k], ratio[k], per_call[k], us(latm.get(k, float("nan"))),
                     us(added[k]) if k in added else "", verdict(ratio[k] >= TARGET)])
    print_table(f"stream throughput, closed loop, {c} in flight, {args.workers} workers (median of {args.rounds} "
                "rounds); latency: median per image at concurrency 1",
                ["path", "images/s", "x bare actor", "img/call", "c=1 latency us", "added us", ">= 0.8x?"], rows)
    targets = {"best_path": {"path": best, "ratio": ratio[best], "target": TARGET,
                             "verdict": verdict(ratio[best] >= TARGET)},
               "actor_path": {"ratio": ratio["cortexbench actor"], "target": TARGET,
                              "verdict": verdict(ratio["cortexbench actor"] >= TARGET)},
               "added_latency_s": added}
    print(f"\nbest path {best}: {ratio[best]:.2f}x the bare actor loop ({targets['best_path']['verdict']}); "
          f"actor path alone {ratio['cortexbench actor']:.2f}x ({targets['actor_path']['verdict']}); "
          f"added latency at c=1: actor {us(added['cortexbench actor']):.0f} us over a bare actor call"
          + (f", compiled {us(added['cortexbench compiled']):.0f} us over a bare compiled-graph call"
             if "cortexbench compiled" in added else ""))
    return {"rounds": {"throughput": got, "latency_c1": lat}, "images_per_s": rate, "ratio_to_bare": ratio,
            "latency_c1_median_s": latm, "bare_rtt_median_s": bare_rtt, "bare_compiled_rtt_median_s": cg_rtt,
            "targets": targets}


def main(argv: Sequence[str] | None = None) -> int:
    from cortexbench import machine
    from cortexbench.cluster import shutdown_ray

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    init_ray(args.cpus or None)
    try:
        body = measure(args)
    finally:
        shutdown_ray()
    write_json(Path(args.out), {"kind": "bench.stream_overhead", "started_at": started, "argv": [PROG, *argv],
                                "machine": machine.machine_info(),
                                "options": {k: v for k, v in vars(args).items() if k != "out"}, **body})
    return 0


if __name__ == "__main__":
    sys.exit(main())
