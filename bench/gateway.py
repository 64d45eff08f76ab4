"""The serving gateway (``python -m cortexbench.serve``, null model) under load on loopback: its requests/s
and p50/p99 as wrk sees them and as cortexbench's HTTP target sees them, and the Ray path's p50 at
concurrency 1 (the same null model through ``cortexbench.stream`` without the gateway) for the gateway's
added latency.

    python bench/gateway.py [--seconds 4] [--concurrency 1,8,32] [--images 2000]

The gateway runs with one CPU worker (its Ray actor) on this machine, as ``serve --models null``; wrk
(Debian's package, one thread) sends the exact binary v2 request cortexbench sends (the null model's
3x224x224 FP32 input: 602 KB a request).  Target (issue #13): the gateway adds at most 1 ms p50 over the
Ray path at concurrency 1.  Prints the table, writes gateway.json.  (Not bench/http.py: run as a script, that name would hide the
standard library's http package.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, null_setup, print_table, verdict, wait_ready, write_json
from http_driver import _ms, lua_script

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def start_gateway(model_dir: Path, img_dir: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cortexbench.serve", "--models", "null", "--cpu-workers", "1",
                             "--model-dir", str(model_dir), "--img-dir", str(img_dir), "--port", str(port),
                             "--quiet", "--max-inflight", "1024"], cwd=work, env=ENV)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, 180, "the gateway")
    return proc, url


def request_body() -> tuple[bytes, dict[str, str]]:
    import numpy as np

    from cortexbench.http_target import HttpTarget, InputInfo

    t = HttpTarget("http://127.0.0.1:1", ("null",), ())
    return t._body(InputInfo("input", (3, 224, 224), "FP32", "bench"), np.full((1, 3, 224, 224), 0.5, np.float32))


def run_wrk(url: str, c: int, seconds: float, script: Path) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{c}", f"-d{seconds:g}s", "--latency", "-s", str(script),
                          f"{url}/v2/models/null/infer"], capture_output=True, text=True).stdout
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50_ms": _ms(pct.get("50", "")), "p99_ms": _ms(pct.get("99", "")),
            "req_per_s": float(rps.group(1)) if rps else float("nan"), "non_2xx": float(bad.group(1)) if bad else 0.0}


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--out", default="gateway.json")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    model_dir, images = null_setup()
    img_dir = Path(images[0]).parent
    work = Path(tempfile.mkdtemp(prefix="cortexbench-http-"))
    body, headers = request_body()
    script = lua_script(body, headers, work / "request.lua")
    out: dict = {"cores": os.cpu_count(), "runs": []}
    proc, url = start_gateway(model_dir, img_dir, work)
    try:
        for c in (int(v) for v in args.concurrency.split(",")):
            w = run_wrk(url, c, args.seconds, script)
            cb = run_stream(["--target", url], c, args.images, work, img_dir)
            out["runs"].append({"concurrency": c, "wrk": w, "cortexbench": cb})
    finally:
        proc.terminate()
        proc.wait(60)
    ray1 = run_stream(["--cpu-workers", "1", "--mode", "cached", "--backend", "mxnet", "--model-dir", str(model_dir)],
                      1, args.images, work, img_dir)
    out["ray_path_c1"] = ray1
    print_table("the gateway (null model, 1 CPU worker) on loopback",
                ["C", "wrk req/s", "wrk p50 ms", "wrk p99 ms", "cb req/s", "cb p50 ms", "cb p99 ms"],
                [[r["concurrency"], r["wrk"]["req_per_s"], r["wrk"]["p50_ms"], r["wrk"]["p99_ms"],
                  r["cortexbench"]["req_per_s"], r["cortexbench"]["p50_ms"], r["cortexbench"]["p99_ms"]]
                 for r in out["runs"]])
    c1 = next((r for r in out["runs"] if r["concurrency"] == 1), None)
    if c1 is not None:
        added = c1["cortexbench"]["p50_ms"] - ray1["p50_ms"]
        out["added_p50_ms_c1"] = added
        print_table("the gateway's added p50 at C=1", ["Ray path p50 ms", "gateway p50 ms (cortexbench)", "added ms",
                                                       "target <= 1 ms"],
                    [[ray1["p50_ms"], c1["cortexbench"]["p50_ms"], added, verdict(added <= 1.0)]])
    write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
