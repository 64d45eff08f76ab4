"""Is the harness ever the bottleneck?  cortexbench's dispatch paths against bare Ray, with the null model.

Default mode (``--workers 2``): in one run, interleaved over ``--rounds`` rounds (medians reported):

* bare Ray on ``Noop`` actors: pipelined actor calls (threaded actors, and asyncio actors for comparison)
  and a Ray Compiled Graph per actor driven synchronously; 24-byte ``bytes`` payloads (and int64 arrays
  for comparison), one image per call;
* cortexbench's paths through its Driver on null-model workers (closed loop, ``--concurrency`` in
  flight): ``actor`` (one image per call), ``grouped`` and ``compiled`` (up to ``--max-group`` images per
  call), and ``compiled`` with one image per call;
* at concurrency 1, on one worker (as the bare round trips go to one actor): the median latency per image
  of the ``actor`` and ``compiled`` paths against the bare round trips, and the bare compiled-graph round
  trip to a cortexbench worker (the worker's own cost per image, without the driver).

Targets: the best path's images/s >= 0.8x the bare compiled-graph loop's, and the latency the compiled
path adds at concurrency 1 (its median latency per image minus the bare compiled round trip) <= 1.5x the
bare compiled round trip.  The ratio of the whole latency to the bare round trip is printed too.  Also measured: the worker's own ceiling
(one ModelWorker, no Ray: ``--ceiling-lanes`` lanes, groups of ``--ceiling-group``, several in flight;
target >= 10,000 images/s) and the cores an idle worker burns once a compiled graph is set up on it
(Ray's compiled-graph reader waits by spinning).

Scale-out mode (``--drivers K[,K...]``): ``--workers N`` null-model workers and K driver shards
(``ray_shards.ShardActor``, as ``--drivers`` in the stream test), total images/s per K.  Target: >= 20,000
images/s with 8 workers (judged only with >= 8 workers).

    python bench/dispatch.py                                  # 2 workers, all paths, 3 rounds
    python bench/dispatch.py --workers 8 --drivers 1,2,4      # scale-out
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    bare_actor_loop,
    bare_compiled_loop,
    compiled_idle_cpu,
    compiled_rtt,
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
    worker_ceiling,
    write_json,
)
from cortexbench.cli import ArgumentParser

PROG = "python bench/dispatch.py"
RATE_TARGET = 0.8  # best path / bare compiled loop
LATENCY_TARGET = 1.5  # compiled path at concurrency 1 / bare compiled round trip
CEILING_TARGET = 10_000.0
SCALE_TARGET = 20_000.0
SCALE_WORKERS = 8


def parse_args(argv: Sequence[str]) -> Any:
    p = ArgumentParser(prog=PROG, description="cortexbench's dispatch paths against bare Ray (null model).")
    a = p.add_argument
    a("--workers", type=int, default=2, help="null-model CPU workers (default 2)")
    a("--drivers", default="", help="scale-out mode: driver shard counts to run, as in 1,2,4 (default: off)")
    a("--dispatch", default="grouped", help="scale-out mode: actor, grouped or compiled (default grouped)")
    a("--cpus", type=int, default=0, help="CPUs Ray may use (default: all)")
    a("--seconds", type=float, default=2.0, help="seconds per throughput measurement (default 2)")
    a("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    a("--concurrency", type=int, default=0,
      help="closed loop: images in flight (default 256; scale-out: 128 per worker)")
    a("--max-group", type=int, default=32, help="images per call, grouped and compiled (default 32)")
    a("--lanes", type=int, default=1, help="lanes per worker (default 1)")
    a("--depth", type=int, default=4, help="compiled graph executions / grouped calls in flight per worker (default 4)")
    a("--latency-calls", type=int, default=1000, help="images at concurrency 1 per round (default 1000)")
    a("--ceiling-lanes", type=int, default=8, help="worker ceiling: lanes (default 8)")
    a("--ceiling-group", type=int, default=32, help="worker ceiling: images per group (default 32)")
    a("--ceiling-inflight", type=int, default=4, help="worker ceiling: groups in flight (default 4)")
    a("--out", default=None, help="JSON file (default results/bench/dispatch.json, dispatch_scale.json)")
    args = p.parse_args(list(argv))
    if args.workers < 1 or args.rounds < 1 or not args.seconds > 0 or args.max_group < 1:
        p.error("--workers, --rounds, --seconds and --max-group must be positive")
    if args.concurrency <= 0:
        args.concurrency = 256
        if args.drivers.strip():
            args.concurrency = 128 * args.workers
    try:
        args.drivers = [int(k) for k in args.drivers.split(",") if k.strip()]
    except ValueError:
        p.error(f"--drivers {args.drivers}: give shard counts, as in 1,2,4")
    if any(k < 1 for k in args.drivers):
        p.error("--drivers: each shard count must be 1 or more")
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- default mode -------------------------------------------------------------------------------------


def compare(args: Any) -> dict[str, Any]:
    model_dir, images = null_setup(8)
    say(f"starting {args.workers} null-model workers and {args.workers} + {args.workers} Noop actors ...")
    pool = start_null_workers(args.workers, model_dir, images, lanes=args.lanes, cpus=args.cpus or os.cpu_count() or 2)
    noops = start_noops(args.workers, "threaded")
    anoops = start_noops(args.workers, "async")
    c, g, depth, s = args.concurrency, args.max_group, args.depth, args.seconds
    from cortexbench.cluster import CALLS_PER_WORKER

    actor_depth = min(c, CALLS_PER_WORKER)
    w = (pool.actors, pool.names)
    runs: dict[str, Any] = {
        "bare actor calls (threaded)": lambda: bare_actor_loop(noops, s, c, rtt_calls=args.latency_calls),
        "bare actor calls (asyncio)": lambda: bare_actor_loop(anoops, s, c, rtt_calls=args.latency_calls),
        "bare compiled graph": lambda: bare_compiled_loop(noops, s, depth, rtt_calls=args.latency_calls),
        "bare compiled graph, numpy payload": lambda: bare_compiled_loop(noops, s, depth, payload="numpy",
                                                                         rtt_calls=args.latency_calls),
        "cortexbench actor": lambda: drive(*w, dispatch="actor", seconds=s, concurrency=c, max_group=1,
                                           depth=actor_depth),
        "cortexbench grouped": lambda: drive(*w, dispatch="grouped", seconds=s, concurrency=c, max_group=g,
                                             depth=depth),
        "cortexbench compiled": lambda: drive(*w, dispatch="compiled", seconds=s, concurrency=c, max_group=g,
                                              depth=depth),
        "cortexbench compiled, 1 image per call": lambda: drive(*w, dispatch="compiled", seconds=s,
                                                                concurrency=c, max_group=1, depth=depth),
    }
    w1 = (pool.actors[:1], pool.names[:1])  # one image at a time to one worker, as the bare round trips
    lat_runs: dict[str, Any] = {
        "cortexbench actor": lambda: drive(*w1, dispatch="actor", seconds=1e-9, concurrency=1, max_group=1,
                                           depth=1, warmup=args.latency_calls),
        "cortexbench compiled": lambda: drive(*w1, dispatch="compiled", seconds=1e-9, concurrency=1, max_group=1,
                                              depth=depth, warmup=args.latency_calls),
    }
    from cortexbench.protocol import RequestGroup

    one_image = RequestGroup.of([0], [0], [0]).to_bytes()
    lat_runs["bare compiled graph to a cortexbench worker"] = lambda: {
        "latency_median_s": compiled_rtt(pool.actors[0], one_image, args.latency_calls)}
    got, lat = interleave(runs, lat_runs, args.rounds)
    pid0 = pool.infos[0]["pid"]
    spin = compiled_idle_cpu(pool.actors[0], pid0)
    ceiling = worker_ceiling(model_dir, images, lanes=args.ceiling_lanes, group=args.ceiling_group,
                             inflight=args.ceiling_inflight, seconds=s)
    pool.close()

    med = {k: {m: median_of(v, m) for m in ("images_per_s", "rtt_median_s", "latency_median_s",
                                            "images_per_call", "cpu_s_per_image")} for k, v in got.items()}
    latm = {k: median_of(v, "latency_median_s") for k, v in lat.items()}
    bare_cg = med["bare compiled graph"]
    bare_actor = med["bare actor calls (threaded)"]
    cb_paths = [k for k in med if k.startswith("cortexbench")]
    best = max(cb_paths, key=lambda k: med[k]["images_per_s"])
    rate_ratio = med[best]["images_per_s"] / bare_cg["images_per_s"]
    lat_ratio = latm["cortexbench compiled"] / bare_cg["rtt_median_s"]
    added = latm["cortexbench compiled"] - bare_cg["rtt_median_s"]
    added_ratio = added / bare_cg["rtt_median_s"]
    targets = {
        "best_path_rate_vs_bare_compiled": {"path": best, "ratio": rate_ratio, "target": RATE_TARGET,
                                            "verdict": verdict(rate_ratio >= RATE_TARGET)},
        "compiled_added_latency_c1_vs_bare_compiled_rtt": {
            "added_s": added, "ratio": added_ratio, "target": LATENCY_TARGET,
            "latency_s": latm["cortexbench compiled"], "bare_rtt_s": bare_cg["rtt_median_s"],
            "latency_ratio": lat_ratio, "verdict": verdict(added_ratio <= LATENCY_TARGET)},
        "worker_ceiling": {"images_per_s": ceiling["images_per_s"], "target": CEILING_TARGET,
                           "verdict": verdict(ceiling["images_per_s"] >= CEILING_TARGET)},
    }
    rows = []
    for k, m in med.items():
        rows.append([k, m["images_per_s"], m["images_per_s"] / bare_cg["images_per_s"],
                     m["images_per_s"] / bare_actor["images_per_s"],
                     m["images_per_call"] if k.startswith("cortexbench") else 1.0, us(m["cpu_s_per_image"]),
                     us(m["rtt_median_s"]) if k.startswith("bare") else us(latm.get(k, float("nan")))])
    print_table(f"images/s, closed loop, {args.workers} null-model workers, {c} in flight "
                f"(median of {args.rounds} rounds); c=1 latency: median per image",
                ["path", "images/s", "x bare cgraph", "x bare actor", "img/call", "driver cpu us/img",
                 "c=1 latency us"], rows)
    to_worker = latm["bare compiled graph to a cortexbench worker"]
    print_table("where the c=1 latency goes (median per image, one in flight)", ["step", "us", "x bare cgraph"], [
        ["bare compiled graph round trip (Noop actor)", us(bare_cg["rtt_median_s"]), 1.0],
        ["bare compiled graph to a cortexbench worker (its own work)", us(to_worker),
         to_worker / bare_cg["rtt_median_s"]],
        ["cortexbench compiled (driver, handle, worker)", us(latm["cortexbench compiled"]), lat_ratio],
        ["bare actor call round trip", us(bare_actor["rtt_median_s"]),
         bare_actor["rtt_median_s"] / bare_cg["rtt_median_s"]],
        ["cortexbench actor", us(latm["cortexbench actor"]),
         latm["cortexbench actor"] / bare_cg["rtt_median_s"]],
    ])
    print_table("targets", ["target", "measured", "goal", "verdict"], [
        [f"best path ({best}) / bare compiled graph", rate_ratio, f">= {RATE_TARGET}",
         targets["best_path_rate_vs_bare_compiled"]["verdict"]],
        [f"compiled c=1: added latency ({us(added):.0f} us) / bare compiled round trip", added_ratio,
         f"<= {LATENCY_TARGET}", targets["compiled_added_latency_c1_vs_bare_compiled_rtt"]["verdict"]],
        ["compiled c=1: whole latency / bare compiled round trip (for information)", lat_ratio, "-", "-"],
        [f"worker ceiling (lanes {args.ceiling_lanes}, groups of {args.ceiling_group}), images/s",
         ceiling["images_per_s"], f">= {CEILING_TARGET:,.0f}", targets["worker_ceiling"]["verdict"]],
    ])
    print(f"\nidle worker: {spin['idle_cores_without_graph']:.2f} cores without a compiled graph, "
          f"{spin['idle_cores_with_graph']:.2f} with one (Ray's compiled-graph reader spins while it waits)")
    return {"rounds": {"throughput": got, "latency_c1": lat}, "medians": med, "latency_c1_median_s": latm,
            "targets": targets, "worker_ceiling": ceiling, "compiled_idle_cpu": spin}


# --- scale-out mode -----------------------------------------------------------------------------------


def scale_out(args: Any) -> dict[str, Any]:
    import ray

    from cortexbench import cluster, ray_shards
    from cortexbench.driver import DriverOptions
    from cortexbench.schedule import make_schedule, shard_workers

    model_dir, images = null_setup(8)
    say(f"starting {args.workers} null-model workers ...")
    pool = start_null_workers(args.workers, model_dir, images, lanes=args.lanes,
                              cpus=args.cpus or os.cpu_count() or 2)
    names = tuple(pool.names)
    group = 1 if args.dispatch == "actor" else args.max_group
    depth = min(args.concurrency, cluster.CALLS_PER_WORKER) if args.dispatch == "actor" else args.depth

    def run(k: int, n: int) -> dict[str, float]:
        parts = shard_workers(pool.node_ids, k)
        shards = ray_shards.start_shards([node for _, node in parts])
        try:
            sched = make_schedule(count=n, models=("null",), n_images=8, seed=0)
            opts = DriverOptions(mode="cached", concurrency=max(1, args.concurrency // k), max_group=group,
                                 depth=depth)
            start_wall = time.time() + 2.0
            refs = []
            for i, (shard, (ids, _)) in enumerate(zip(shards, parts, strict=True)):
                plan = ray_shards.ShardPlan(sched.shard(i, k), tuple(pool.actors[j] for j in ids),
                                         tuple(names[j] for j in ids), ids, names, opts, "least-outstanding", i,
                                         None, args.dispatch, start_wall)
                refs.append(ray_shards.shard_run(shard, plan))
            results = cluster.get(refs, 600)
        finally:
            for s in shards:
                ray.kill(s)
        span = max(r.finished_s for r in results) - min(r.started_s for r in results)
        sent = sum(r.sent for r in results)
        failed = sum(len(r.ledger) - int((r.ledger.column("outcome") == 0).sum()) for r in results)
        return {"images_per_s": sent / span, "images": sent, "failed": failed, "span_s": span}

    out: dict[int, list[dict[str, float]]] = {k: [] for k in args.drivers}
    for r in range(args.rounds):
        for k in args.drivers:
            say(f"round {r + 1}/{args.rounds}: {k} driver shard(s) ...")
            got = run(k, 2000)
            for _ in range(3):  # size the run until it lasts about --seconds: a short one is mostly ramp-up
                n = int(min(5_000_000, max(2000, got["images_per_s"] * args.seconds * 1.2)))
                got = run(k, n)
                if got["span_s"] >= 0.8 * args.seconds or n >= 5_000_000:
                    break
            out[k].append(got)
    pool.close()
    med = {k: median_of(v, "images_per_s") for k, v in out.items()}
    judged = args.workers >= SCALE_WORKERS
    best = max(med.values())
    rows = [[k, args.workers, args.dispatch, med[k], med[k] / args.workers,
             verdict(med[k] >= SCALE_TARGET) if judged else "n/a"] for k in args.drivers]
    print_table(f"scale-out: {args.workers} null-model workers, {args.dispatch}, {args.concurrency} in flight, "
                f"groups of {group} (median of {args.rounds} rounds)",
                ["drivers", "workers", "dispatch", "images/s", "per worker", f">= {SCALE_TARGET:,.0f}?"], rows)
    if not judged:
        print(f"(the target is for {SCALE_WORKERS} workers; with {args.workers} this shows the shape only)")
    return {"rounds": {str(k): v for k, v in out.items()}, "medians": {str(k): v for k, v in med.items()},
            "target": {"images_per_s": SCALE_TARGET, "workers": SCALE_WORKERS, "best": best,
                       "verdict": verdict(best >= SCALE_TARGET) if judged else "n/a"}}


def main(argv: Sequence[str] | None = None) -> int:
    from cortexbench import machine
    from cortexbench.cluster import shutdown_ray

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    init_ray(args.cpus or None)
    try:
        body = scale_out(args) if args.drivers else compare(args)
    finally:
        shutdown_ray()
    out = Path(args.out or ("results/bench/dispatch_scale.json" if args.drivers else "results/bench/dispatch.json"))
    write_json(out, {"kind": "bench.dispatch", "mode": "scale-out" if args.drivers else "compare",
                     "started_at": started, "argv": [PROG, *argv], "machine": machine.machine_info(),
                     "options": {k: v for k, v in vars(args).items() if k != "out"}, **body})
    return 0


if __name__ == "__main__":
    sys.exit(main())
