"""The serving gateway (``python -m cortexbench.serve``, null model) under load on loopback: its requests/s
(and per core it used) and p50/p99 as wrk sees them and as cortexbench's HTTP target sees them, with 1 and
with N gateway processes (``--gateways N``); and, in the same rounds, the Ray path's p50 at concurrency 1
(the same null model through ``cortexbench.stream`` without the gateway) for the gateway's added latency.

    python bench/gateway.py [--rounds 3] [--seconds 4] [--concurrency 1,8,32] [--gateways 1,2] [--images 1000]
                            [--channels socket,ray]

Each round: for each gateway count, start ``serve --models null --cpu-workers 1`` (one CPU worker, its Ray
actor), drive it with cortexbench's HTTP target at C=1 (``stream --target``: closed loop), then with wrk
(Debian's package, one thread, the exact binary v2 request cortexbench sends: the null model's 3x224x224 FP32
input, 602 KB a request) at each C, and stop it (SIGTERM); then the Ray path at C=1 (``stream --models null
--concurrency 1``, its default dispatch), with no gateway running.  Target (issue #13): the gateway adds at
most 1 ms p50 over the Ray path at concurrency 1.  ``--channels`` names how the gateway reaches its worker
(``serve --channel``: ``socket``, the default, a Unix socket into the worker's process; ``ray``, a Ray actor
call), each measured in every round, side by side.  Prints the tables (median of the rounds and the spread),
writes gateway.json.  (Not bench/http.py: run as a script, that name would hide the standard library's http
package.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    cpu_seconds,
    free_port,
    null_backend,
    null_setup,
    print_table,
    verdict,
    wait_ready,
    write_json,
)
from http_driver import _ms, lua_script

ROOT = Path(__file__).resolve().parent.parent
# the project first, then whatever PYTHONPATH already names (a machine's extra site directory)
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def start_gateway(model_dir: Path, img_dir: Path, work: Path, gateways: int,
                  channel: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cortexbench.serve", "--models", "null", "--cpu-workers", "1",
                             "--model-dir", str(model_dir), "--img-dir", str(img_dir), "--port", str(port),
                             "--quiet", "--max-inflight", "1024", "--gateways", str(gateways), "--channel", channel],
                            cwd=work, env=ENV)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, 180, "the gateway")
    return proc, url


def stop_gateway(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(120)


def gateway_pids(proc: subprocess.Popen[bytes], gateways: int) -> list[int]:
    """The processes that run the gateway: serve itself, or its replicas (Ray actors: ``ray::GatewayReplica``)."""
    if gateways == 1:
        return [proc.pid]
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::GatewayReplica"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def request_body() -> tuple[bytes, dict[str, str]]:
    import numpy as np

    from cortexbench.http_target import HttpTarget, InputInfo

    t = HttpTarget("http://127.0.0.1:1", ("null",), ())
    return t._body(InputInfo("input", (3, 224, 224), "FP32", "bench"), np.full((1, 3, 224, 224), 0.5, np.float32))


def run_wrk(url: str, c: int, seconds: float, script: Path, pids: list[int]) -> dict[str, float]:
    before = sum(cpu_seconds(p) for p in pids)
    out = subprocess.run(["wrk", "-t1", f"-c{c}", f"-d{seconds:g}s", "--latency", "-s", str(script),
                          f"{url}/v2/models/null/infer"], capture_output=True, text=True).stdout
    cores = (sum(cpu_seconds(p) for p in pids) - before) / seconds
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    req_s = float(rps.group(1)) if rps else float("nan")
    return {"p50_ms": _ms(pct.get("50", "")), "p99_ms": _ms(pct.get("99", "")), "req_per_s": req_s,
            "gateway_cores": cores, "req_per_s_per_core": req_s / cores if cores > 0 else float("nan"),
            "non_2xx": float(bad.group(1)) if bad else 0.0}


def run_stream(args: list[str], c: int, images: int, work: Path, img_dir: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "cortexbench.stream", *args, "--models", "null", "--concurrency", str(c),
           "--images", str(images), "--warmup", str(min(200, images // 5)), "--metrics-port", "0", "--records",
           "none", "--quiet", "--result-dir", str(work / "results"), "--img-dir", str(img_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=ENV)
    run_dir = next((ln.split("results:", 1)[1].strip() for ln in p.stdout.splitlines() if ln.startswith("results:")),
                   None)
    if p.returncode != 0 or run_dir is None:
        print(p.stdout[-2000:], p.stderr[-2000:], file=sys.stderr)
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "req_per_s": float("nan"), "failed": float("nan")}
    modes = json.loads((Path(run_dir) / "results.json").read_text())["modes"]
    s = next(iter(modes.values()))["summary"]
    return {"p50_ms": s["latency"]["p50_s"] * 1e3, "p99_ms": s["latency"]["p99_s"] * 1e3,
            "req_per_s": s["throughput_images_per_s"], "failed": float(s["failed"])}


def spread(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v == v]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--gateways", default="1,2")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--channels", default="socket,ray")
    ap.add_argument("--out", default="gateway.json")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    model_dir, images = null_setup()
    img_dir = Path(images[0]).parent
    work = Path(tempfile.mkdtemp(prefix="cortexbench-http-"))
    body, headers = request_body()
    script = lua_script(body, headers, work / "request.lua")
    conc = [int(v) for v in args.concurrency.split(",")]
    counts = [int(v) for v in args.gateways.split(",")]
    channels = args.channels.split(",")
    variants = [(g, ch) for g in counts for ch in channels]
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        got: dict[str, Any] = {"gateways": {}}
        for g, ch in variants:
            proc, url = start_gateway(model_dir, img_dir, work, g, ch)
            try:
                pids = gateway_pids(proc, g)
                cb = run_stream(["--target", url], 1, args.images, work, img_dir)
                wrk = {c: run_wrk(url, c, args.seconds, script, pids) for c in conc}
            finally:
                rc = stop_gateway(proc)
            got["gateways"][f"{g}:{ch}"] = {"cortexbench_c1": cb, "wrk": wrk, "exit": rc}
        got["ray_path_c1"] = run_stream(["--cpu-workers", "1", "--mode", "cached", "--backend", null_backend(),
                                         "--model-dir", str(model_dir)],
                                        1, args.images, work, img_dir)
        rounds.append(got)

    def pick(fn: Any) -> dict[str, float]:
        return spread([fn(x) for x in rounds])

    out: dict[str, Any] = {"cores": os.cpu_count(), "rounds": rounds, "summary": {}}
    ray_p50 = pick(lambda x: x["ray_path_c1"]["p50_ms"])
    rows = []
    for gc in variants:
        g = f"{gc[0]}:{gc[1]}"
        cb_p50 = pick(lambda x, g=g: x["gateways"][g]["cortexbench_c1"]["p50_ms"])
        added = pick(lambda x, g=g: x["gateways"][g]["cortexbench_c1"]["p50_ms"] - x["ray_path_c1"]["p50_ms"])
        wrk_added = pick(lambda x, g=g: x["gateways"][g]["wrk"][1]["p50_ms"] - x["ray_path_c1"]["p50_ms"]) \
            if 1 in conc else spread([])
        out["summary"][g] = {"cortexbench_c1_p50_ms": cb_p50, "added_p50_ms_c1": added,
                             "wrk_added_p50_ms_c1": wrk_added,
                             "wrk": {c: {k: pick(lambda x, g=g, c=c, k=k: x["gateways"][g]["wrk"][c][k])
                                         for k in ("req_per_s", "p50_ms", "p99_ms", "gateway_cores",
                                                   "req_per_s_per_core")} for c in conc}}
        rows.append([gc[0], gc[1], ray_p50["median"], cb_p50["median"], f"{added['median']:.2f} ({added['min']:.2f}..{added['max']:.2f})",
                     f"{wrk_added['median']:.2f} ({wrk_added['min']:.2f}..{wrk_added['max']:.2f})",
                     verdict(added["median"] <= 1.0)])
    out["summary"]["ray_path_c1_p50_ms"] = ray_p50
    print_table(f"the gateway's added p50 at C=1 (median of {args.rounds} rounds, min..max)",
                ["gateways", "channel", "Ray path p50 ms", "gateway p50 ms (cortexbench)", "added ms (cortexbench)",
                 "added ms (wrk)", "target <= 1 ms"], rows)
    print_table("wrk against the gateway (null model, 1 CPU worker), median of the rounds",
                ["gateways", "channel", "C", "req/s", "p50 ms", "p99 ms", "gateway cores", "req/s per gateway core"],
                [[g, ch, c, *(out["summary"][f"{g}:{ch}"]["wrk"][c][k]["median"] for k in
                              ("req_per_s", "p50_ms", "p99_ms", "gateway_cores", "req_per_s_per_core"))]
                 for g, ch in variants for c in conc])
    write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
