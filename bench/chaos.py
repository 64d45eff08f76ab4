"""Chaos: a whole worker node killed mid-stream on a multi-node Ray cluster, and a node added back.

On this machine, ``ray.cluster_utils.Cluster`` starts a head node (no GPU: the stream's driver side) and
``--nodes`` worker nodes, each with one **fake** GPU (the Ray resource ``{"GPU": 1}``, no device behind it)
and one CPU.  ``python -m cortexbench.stream --address <the cluster> --gpus N`` joins it (a Ray of its own
would have no GPU, so the run only starts if it joined), places one worker per fake GPU, and streams the
null model (it runs on the CPU whatever the device says) in an open loop at ``--rate``.  Once the stream is
under way (its first progress line) and ``--kill-after-s`` more, the bench removes one worker node (its
raylet and the worker on it die), and ``--down-s`` later adds a new node with a fake GPU, where Ray restarts
the lost worker.

It prints the images sent, ok, failed by kind, retried, lost (sent without a ledger row: must be 0) and not
sent; each worker outage from results.json's ``worker_outages`` (when it was lost, how long until it was
back: the recovery time); the peak and final RSS of the driver and of each worker process (sampled every
``--sample-s``); and writes the JSON.

    python bench/chaos.py                       # 3 fake-GPU nodes, 12,000 images at 400/s: about a minute
    python bench/chaos.py --images 60000 --kills 3 --nodes 4
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench.common import null_backend, null_setup, print_table, worker_pids, write_json
from cortexbench.cli import ArgumentParser
from cortexbench.machine import host_memory_bytes

PROG = "python bench/chaos.py"
MB = 1 << 20
PROGRESS = re.compile(r"^stream cached \[.*img/s")
WARMUP = 100
PARTIAL = re.compile(r"partial results in (\S+)")


def parse_args(argv: Sequence[str]) -> Any:
    p = ArgumentParser(prog=PROG, description="Kill a worker node mid-stream on a local multi-node Ray; "
                                              "count every image and time the recovery.")
    a = p.add_argument
    a("--nodes", type=int, default=3, help="worker nodes, one fake GPU each (default 3)")
    a("--images", type=int, default=12000, help="images in the stream (default 12000)")
    a("--rate", type=float, default=400.0, help="open loop, images/s (default 400)")
    a("--null-s", type=float, default=0.002, help="the null model's predict time, seconds (default 0.002)")
    a("--kill-after-s", type=float, default=5.0, help="kill a node this long after the first progress line")
    a("--down-s", type=float, default=2.0, help="add a new node this long after the kill (default 2)")
    a("--kills", type=int, default=1, help="nodes to kill, one after another (default 1)")
    a("--between-s", type=float, default=8.0, help="seconds between kills (default 8)")
    a("--drivers", type=int, default=1, help="driver shards (default 1: the stream's process)")
    a("--image-timeout", type=float, default=10.0, help="the stream's --image-timeout (default 10)")
    a("--sample-s", type=float, default=0.5, help="memory sampling interval (default 0.5)")
    a("--out", default="results/bench/chaos.json", help="JSON file to write")
    args = p.parse_args(list(argv))
    if args.nodes < 2 or args.images < 1 or args.rate <= 0 or not 1 <= args.kills <= args.nodes:
        p.error("need --nodes >= 2, --kills 1..nodes, and positive --images and --rate")
    return args


class MemoryWatch:
    """Samples the RSS of the stream's process and of every worker actor under this process (the Cluster's
    raylets are its children) on a thread; keeps each process's peak and last value."""

    def __init__(self, driver_pid: int, every_s: float) -> None:
        self.driver_pid = driver_pid
        self.every_s = every_s
        self.procs: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):  # a paced sampler; it waits on nothing of the stream's
            pids = {self.driver_pid: "driver", **{p: "worker" for p in worker_pids(os.getpid())}}
            for pid, kind in pids.items():
                rss = host_memory_bytes(pid)
                if rss <= 0:
                    continue
                rec = self.procs.setdefault(pid, {"pid": pid, "kind": kind, "peak_bytes": 0, "first_s": time.time()})
                rec["peak_bytes"] = max(rec["peak_bytes"], rss)
                rec["final_bytes"] = rss
                rec["last_s"] = time.time()


def stream_cmd(args: Any, address: str, model_dir: Path, result_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cortexbench.stream", "--address", address, "--gpus", str(args.nodes),
            "--models", f"null:{args.null_s:g}", "--backend", null_backend(), "--mode", "cached",
            "--rate", f"{args.rate:g}", "--images", str(args.images), "--warmup", str(WARMUP),
            "--drivers", str(args.drivers), "--image-timeout", f"{args.image_timeout:g}", "--retries", "3",
            "--metrics-port", "0", "--records", "none", "--result-dir", str(result_dir),
            "--model-dir", str(model_dir), "--img-dir", str(model_dir.parent / "images")]


def run(args: Any) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    model_dir, _ = null_setup(8)
    result_dir = model_dir.parent / "results"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(args.nodes)]
    cluster.wait_for_nodes()
    events: list[dict[str, Any]] = []
    cmd = stream_cmd(args, cluster.address, model_dir, result_dir)
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        with MemoryWatch(proc.pid, args.sample_s) as watch:
            assert proc.stderr is not None
            for line in proc.stderr:  # blocks until the stream is under way
                lines.append(line)
                if PROGRESS.match(line):
                    break
            events.append({"event": "stream under way", "t_s": time.monotonic() - t0})
            print(f"stream under way at {events[-1]['t_s']:.1f} s", flush=True)
            # the rest of the output is read on threads (a full pipe would stall the stream)
            out_lines: list[str] = []
            readers = [threading.Thread(target=lambda src=src, dst=dst: dst.extend(src), daemon=True)
                       for src, dst in ((proc.stderr, lines), (proc.stdout, out_lines))]
            for r in readers:
                r.start()
            for k in range(args.kills):
                time.sleep(args.kill_after_s if k == 0 else args.between_s)  # the experiment's timeline
                victim = nodes.pop(0)
                cluster.remove_node(victim)
                events.append({"event": "node killed", "t_s": time.monotonic() - t0, "node_id": victim.node_id})
                print(f"killed node {victim.node_id[:12]} at {events[-1]['t_s']:.1f} s", flush=True)
                time.sleep(args.down_s)
                nodes.append(cluster.add_node(num_cpus=1, num_gpus=1))
                events.append({"event": "node added", "t_s": time.monotonic() - t0, "node_id": nodes[-1].node_id})
                print(f"added node {nodes[-1].node_id[:12]} at {events[-1]['t_s']:.1f} s", flush=True)
            proc.wait(timeout=600)
            for r in readers:
                r.join(timeout=10)
            out = "".join(out_lines)
        wall_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    text = out + "".join(lines)
    run_dir = next((ln.split("results:", 1)[1].strip() for ln in text.splitlines() if ln.startswith("results:")), None)
    partial = PARTIAL.search(text)  # a run that lost a driver shard ends with an error and partial results
    run_dir = run_dir or (partial.group(1) if partial else None)
    body: dict[str, Any] = {"stream_cmd": cmd, "returncode": proc.returncode, "wall_s": wall_s, "events": events,
                            "memory": sorted(watch.procs.values(), key=lambda r: (r["kind"] != "driver", r["first_s"]))}
    if proc.returncode != 0:
        body["error"] = text[-3000:] if run_dir is None else text.strip().splitlines()[-1]
        print(body["error"], file=sys.stderr)
    if run_dir is None:
        return body
    res = json.loads((Path(run_dir) / "results.json").read_text())
    mode = res["modes"]["cached"]
    s = mode["summary"]
    body["images"] = {"sent": s["images_sent"], "ok": s["ok"], "failed": s["failed"],
                      "failed_by_kind": {k: v for k, v in s["by_outcome"].items() if k != "ok" and v},
                      "retried": s["retries"], "lost": s["images_sent"] - s["rows"], "not_sent": s["not_sent"],
                      "scheduled": args.images + WARMUP,
                      "late_share": s["late_share"], "p99_s": s["latency"].get("p99_s")}
    body["worker_losses"] = mode.get("worker_losses", {})
    body["worker_outages"] = mode.get("worker_outages", [])
    body["workers"] = res["workers"]
    body["run_dir"] = run_dir
    return body


def report(body: dict[str, Any]) -> bool:
    print_table("events", ["t (s)", "event", "node"],
                [[f"{e['t_s']:.1f}", e["event"], e.get("node_id", "")[:12]] for e in body["events"]])
    print_table("memory per process (RSS)", ["process", "pid", "peak MB", "final MB", "seen (s)"],
                [[r["kind"], r["pid"], r["peak_bytes"] / MB, r["final_bytes"] / MB, r["last_s"] - r["first_s"]]
                 for r in body["memory"]])
    if "images" not in body:
        print(f"\nthe stream failed (exit {body['returncode']})")
        return False
    im = body["images"]
    print_table("images", ["sent", "ok", "failed", "failed by kind", "retried", "lost", "not sent"],
                [[im["sent"], im["ok"], im["failed"], json.dumps(im["failed_by_kind"]) if im["failed_by_kind"] else "-",
                  im["retried"], im["lost"], im["not_sent"]]])
    if body["worker_outages"]:
        print_table("worker outages (from results.json)", ["worker", "lost at (s)", "back after (s)"],
                    [[o["worker"], o["lost_at_s"], o["back_after_s"] if o["back_after_s"] is not None else "never"]
                     for o in body["worker_outages"]])
    else:
        print("\nworker outages (from results.json): none seen by a driver")
    if body.get("error"):
        print(f"\nthe run ended with (exit {body['returncode']}): {body['error']}")
    # every image accounted: each sent one has a row (ok or a failure kind), the rest count as not sent
    ok = im["lost"] == 0 and im["sent"] == im["ok"] + im["failed"] and im["sent"] + im["not_sent"] == im["scheduled"]
    back = [o["back_after_s"] for o in body["worker_outages"]]
    kills = [e["t_s"] for e in body["events"] if e["event"] == "node killed"]
    adds = [e["t_s"] for e in body["events"] if e["event"] == "node added"]
    # of each outage, the part after the new node had joined (the kill is seen at once: a dead raylet fails
    # its calls within milliseconds), i.e. Ray's restart of the worker and its set-up
    body["restart_after_node_added_s"] = [b - (a - k) if b is not None else None
                                          for b, k, a in zip(back, kills, adds, strict=False)]
    print(f"\nlost {im['lost']} ({'PASS' if ok else 'FAIL'}: every image accounted); recovery after the node kill: "
          f"{', '.join(f'{b:.1f} s' if b is not None else 'never' for b in back) or 'no outage seen'} (of which "
          f"{', '.join(f'{b:.1f} s' for b in body['restart_after_node_added_s'] if b is not None) or '-'} after the "
          f"new node joined); "
          f"wall {body['wall_s']:.0f} s.  The GPUs are fake (Ray resources only); the null model runs on the CPU.")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    from cortexbench import machine

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    body = run(args)
    ok = report(body)
    write_json(Path(args.out), {"kind": "bench.chaos", "started_at": started, "argv": [PROG, *argv],
                                "machine": machine.machine_info(), "options": vars(args), "fake_gpus": True,
                                "every_image_accounted": ok, **body})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
