"""Soak: a long open-loop null-model stream, its memory and its metrics endpoint watched over time.

Runs ``python -m cortexbench.stream`` (a local Ray started by the stream, ``--workers`` CPU workers, the null
model, cached, open loop at ``--rate``) for ``--duration-s`` seconds (or ``--images`` images), and every
``--sample-s`` seconds samples:

- the RSS of the driver (the stream's process) and of each worker actor (its ``ray::WorkerActor``
  processes, found among the stream's descendants);
- a GET of the stream's ``/metrics`` (its latency and size) and the images done so far that it reports.

Verdict:

- memory flat after warm-up: for the driver and each worker, the mean RSS over the last quarter of the run
  lies within ``--flat-share`` (5%) or ``--flat-mb`` (20 MB), whichever is larger, of its level at the end of
  the warm-up (the median of the samples in the ``--warmup-s`` .. ``--warmup-s`` + 10% window).  The stream
  allocates its per-image records for the whole schedule when it starts, so they do not count as growth;
- every image accounted: sent = ok + failed = ledger rows, lost (sent without a row) = 0, not sent = 0.

The JSON (``--out``) is rewritten after every sample, so a run cut short still leaves its samples.

    python bench/soak.py --duration-s 600
    python bench/soak.py --duration-s 3600 --rate 300
    python bench/soak.py --images 1000000 --rate 500
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, null_backend, null_setup, print_table, verdict, worker_pids, write_json
from cortexbench.cli import ArgumentParser
from cortexbench.machine import host_memory_bytes

PROG = "python bench/soak.py"
MB = 1 << 20
IMAGES_DONE = re.compile(r"^cortexbench_images_total\{[^}]*\}\s+([0-9.eE+-]+)$", re.M)


def parse_args(argv: Sequence[str]) -> Any:
    p = ArgumentParser(prog=PROG, description="A long null-model stream: memory and /metrics latency over time.")
    a = p.add_argument
    a("--duration-s", type=float, default=3600.0, help="how long the stream runs (default 3600)")
    a("--images", type=int, default=0, help="instead of --duration-s: this many images (at --rate)")
    a("--rate", type=float, default=200.0, help="open loop: images/s (default 200, well under this machine's "
                                                "capacity: a soak tests staying power, not the peak)")
    a("--workers", type=int, default=2, help="null-model CPU workers (default 2)")
    a("--null-s", type=float, default=0.0, help="the null model's predict time, seconds (default 0)")
    a("--sample-s", type=float, default=0.0, help="seconds between samples (default: duration / 60, 5..60)")
    a("--warmup-s", type=float, default=0.0, help="warm-up before memory must be flat (default: 20%% of the run)")
    a("--flat-share", type=float, default=0.05, help="allowed growth after warm-up, share (default 0.05)")
    a("--flat-mb", type=float, default=20.0, help="allowed growth after warm-up, MB, if larger (default 20)")
    a("--out", default="results/bench/soak.json", help="JSON file to write")
    args = p.parse_args(list(argv))
    if args.images < 0 or args.rate <= 0 or args.workers < 1 or (not args.images and args.duration_s <= 0):
        p.error("--rate, --workers and --duration-s (or --images) must be positive")
    return args


def planned_s(args: Any) -> float:
    return args.images / args.rate if args.images else args.duration_s


def stream_cmd(args: Any, model_dir: Path, img_dir: Path, result_dir: Path, port: int) -> list[str]:
    warmup = 200
    if args.images:
        count, limit = args.images, []
    else:  # enough images for the duration; the duration cuts the open-loop schedule
        count, limit = int(args.rate * args.duration_s * 1.2) + 1000, ["--duration", f"{args.duration_s:g}"]
    null = f"null:{args.null_s:g}" if args.null_s else "null"
    return [sys.executable, "-m", "cortexbench.stream", "--cpu-workers", str(args.workers), "--models", null,
            "--backend", null_backend(), "--mode", "cached", "--rate", f"{args.rate:g}", "--images", str(count),
            "--warmup", str(warmup), *limit, "--metrics-port", str(port), "--records", "none", "--quiet",
            "--result-dir", str(result_dir), "--model-dir", str(model_dir), "--img-dir", str(img_dir)]


def scrape(url: str) -> tuple[float, int, float]:
    """GET /metrics: seconds it took, bytes, images done (NaN when it did not answer)."""
    import httpx

    t = time.perf_counter()
    try:
        r = httpx.get(url, timeout=5.0)
        took = time.perf_counter() - t
        if r.status_code != 200:
            return took, 0, math.nan
        done = sum(float(v) for v in IMAGES_DONE.findall(r.text))
        return took, len(r.content), done
    except httpx.HTTPError:
        return math.nan, 0, math.nan


def sample(t0: float, pid: int, url: str) -> dict[str, Any]:
    took, size, done = scrape(url)
    workers = {str(p): host_memory_bytes(p) for p in sorted(worker_pids(pid))}
    return {"t_s": time.monotonic() - t0, "driver_rss_bytes": host_memory_bytes(pid),
            "worker_rss_bytes": {p: b for p, b in workers.items() if b > 0},
            "scrape_s": took, "scrape_bytes": size, "images_done": done}


def flat(series: list[tuple[float, int]], warmup_s: float, total_s: float, share: float, mb: float
         ) -> dict[str, Any]:
    """The flat-memory verdict of one process's (t, rss) samples (see the module docstring)."""
    end = [b for t, b in series if warmup_s <= t <= warmup_s + 0.1 * total_s]
    last = [b for t, b in series if t >= 0.75 * total_s]
    if not end or not last:
        return {"level_bytes": None, "last_quarter_bytes": None, "growth_bytes": None, "ok": None}
    level, tail = statistics.median(end), statistics.fmean(last)
    bound = max(share * level, mb * MB)
    after = [(t, b) for t, b in series if t >= warmup_s]
    # the trend after the warm-up, bytes an hour (a least-squares line): a slow creep the bound would hide
    slope = statistics.linear_regression([t for t, _ in after], [b for _, b in after]).slope * 3600 \
        if len(after) >= 3 and len({t for t, _ in after}) > 1 else None
    return {"level_bytes": level, "last_quarter_bytes": tail, "growth_bytes": tail - level,
            "bound_bytes": bound, "peak_bytes": max(b for _, b in series), "trend_bytes_per_h": slope,
            "ok": abs(tail - level) <= bound}


def streaming(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples taken while images were being served: from the first that counts images done to the last
    whose count grew (Ray's start before, and the results' computation after, are left out)."""
    done = [float(d) if d is not None and math.isfinite(d) else -1.0 for d in (s["images_done"] for s in samples)]
    first = next((i for i, d in enumerate(done) if d > 0), None)
    last = max((i for i in range(1, len(done)) if done[i] > done[i - 1] > 0), default=None)
    return [] if first is None or last is None else samples[first:last + 1]


def judge(samples: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """The flat-memory verdict of every process, over the streaming samples, times from the first of them."""
    live = streaming(samples)
    t0 = live[0]["t_s"] if live else 0.0
    total_s = live[-1]["t_s"] - t0 if live else 0.0
    warmup_s = args.warmup_s or 0.2 * total_s
    procs: dict[str, list[tuple[float, int]]] = {"driver": [(s["t_s"] - t0, s["driver_rss_bytes"]) for s in live
                                                            if s["driver_rss_bytes"] > 0]}
    for s in live:
        for p, b in s["worker_rss_bytes"].items():
            procs.setdefault(f"worker pid {p}", []).append((s["t_s"] - t0, b))
    return {"streaming_from_s": t0, "streaming_s": total_s, "warmup_s": warmup_s,
            "per_process": {k: flat(v, warmup_s, total_s, args.flat_share, args.flat_mb) for k, v in procs.items()}}


def accounting(results: dict[str, Any] | None) -> dict[str, Any]:
    if results is None:
        return {"ok": False, "why": "the stream wrote no results"}
    s = results["modes"]["cached"]["summary"]
    out = {k: s.get(k) for k in ("images_sent", "ok", "failed", "rows", "not_sent", "retries", "by_outcome",
                                  "throughput_images_per_s", "late_share")}
    out["lost"] = s["images_sent"] - s["rows"]
    out["latency_p99_s"] = s["latency"].get("p99_s")
    out["ok_verdict"] = bool(s["images_sent"] == s["ok"] + s["failed"] == s["rows"] and out["lost"] == 0
                             and s.get("not_sent", 0) == 0)
    return out


def run(args: Any, argv: list[str], started: str) -> dict[str, Any]:
    from cortexbench import machine
    from cortexbench.results import write_json as write_atomic

    model_dir, _ = null_setup(8)
    work = Path(tempfile.mkdtemp(prefix="cortexbench-soak-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    cmd = stream_cmd(args, model_dir, model_dir.parent / "images", work / "results", port)
    every = args.sample_s or min(60.0, max(5.0, planned_s(args) / 60))
    print("$", " ".join(cmd), flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = (work / "stream.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    t0 = time.monotonic()
    samples: list[dict[str, Any]] = []
    body: dict[str, Any] = {"kind": "bench.soak", "started_at": started, "argv": [PROG, *argv],
                            "machine": machine.machine_info(), "options": vars(args), "stream_cmd": cmd,
                            "samples": samples, "complete": False}
    try:
        next_at = t0
        while proc.poll() is None:
            # pace the samples; the stream runs on its own, nothing here waits on it
            time.sleep(max(0.0, min(1.0, next_at - time.monotonic())))
            if time.monotonic() < next_at or proc.poll() is not None:
                continue
            next_at += every
            s = sample(t0, proc.pid, url)
            samples.append(s)
            w = s["worker_rss_bytes"]
            print(f"t={s['t_s']:7.0f}s  driver {s['driver_rss_bytes'] / MB:7.1f} MB  workers "
                  f"{' '.join(f'{b / MB:.1f}' for b in w.values()) or '-'} MB  scrape "
                  f"{s['scrape_s'] * 1e3:6.1f} ms  done {s['images_done']:.0f}", flush=True)
            write_atomic(out_path, body)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        log.close()
    text = (work / "stream.log").read_text()
    run_dir = next((ln.split("results:", 1)[1].strip() for ln in text.splitlines() if ln.startswith("results:")),
                   None)
    results = json.loads((Path(run_dir) / "results.json").read_text()) if run_dir and proc.returncode == 0 else None
    if results is None:
        print(text[-3000:], file=sys.stderr)
    elapsed = time.monotonic() - t0
    memory = judge(samples, args)
    acct = accounting(results)
    scrapes = [s["scrape_s"] for s in samples if math.isfinite(s["scrape_s"])]
    body.update({"complete": True, "elapsed_s": elapsed, "returncode": proc.returncode, "memory": memory,
                 "accounting": acct, "scrape_s": {"median": statistics.median(scrapes) if scrapes else None,
                                                   "max": max(scrapes) if scrapes else None,
                                                   "failed": len(samples) - len(scrapes)},
                 "worker_outages": results["modes"]["cached"].get("worker_outages") if results else None})
    mem_ok = [v["ok"] for v in memory["per_process"].values()]
    body["verdict"] = {"memory_flat": None if None in mem_ok or not mem_ok else all(mem_ok),
                       "every_image_accounted": acct["ok_verdict"] if "ok_verdict" in acct else False}
    return body


def report(body: dict[str, Any]) -> None:
    step = max(1, len(body["samples"]) // 40)
    rows = [[f"{s['t_s']:.0f}", s["driver_rss_bytes"] / MB,
             " ".join(f"{b / MB:.1f}" for b in s["worker_rss_bytes"].values()) or "-",
             s["scrape_s"] * 1e3, s["scrape_bytes"], s["images_done"]] for s in body["samples"][::step]]
    print_table("samples", ["t (s)", "driver MB", "workers MB", "scrape ms", "scrape bytes", "images done"], rows)
    mem = body["memory"]
    print_table(f"memory over {mem['streaming_s']:.0f} s of streaming (from t={mem['streaming_from_s']:.0f} s), after "
                f"{mem['warmup_s']:.0f} s of warm-up: last-quarter mean against the warm-up-end level",
                ["process", "level MB", "last quarter MB", "growth MB", "bound MB", "peak MB", "trend MB/h", "verdict"],
                [[k, *(v[f] / MB if v[f] is not None else math.nan
                       for f in ("level_bytes", "last_quarter_bytes", "growth_bytes")),
                  v.get("bound_bytes", math.nan) / MB, v.get("peak_bytes", math.nan) / MB,
                  (v.get("trend_bytes_per_h") or math.nan) / MB, verdict(v["ok"])]
                 for k, v in mem["per_process"].items()])
    a = body["accounting"]
    sc = body["scrape_s"]
    print(f"\nimages: sent {a.get('images_sent')}, ok {a.get('ok')}, failed {a.get('failed')}, rows {a.get('rows')}, "
          f"lost {a.get('lost')}, not sent {a.get('not_sent')}; {a.get('throughput_images_per_s') or 0:.0f} images/s, "
          f"p99 {(a.get('latency_p99_s') or math.nan) * 1e3:.2f} ms, late share {a.get('late_share')}")
    print(f"/metrics scrape: median {(sc['median'] or math.nan) * 1e3:.1f} ms, max {(sc['max'] or math.nan) * 1e3:.1f} "
          f"ms, failed {sc['failed']}")
    v = body["verdict"]
    print(f"verdict: memory flat {verdict(v['memory_flat'])}; every image accounted "
          f"{verdict(v['every_image_accounted'])} (elapsed {body['elapsed_s']:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    body = run(args, argv, started)
    report(body)
    write_json(Path(args.out), body)
    v = body["verdict"]
    return 0 if v["memory_flat"] is not False and v["every_image_accounted"] else 1


if __name__ == "__main__":
    sys.exit(main())
