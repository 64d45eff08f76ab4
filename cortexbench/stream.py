"""``python -m cortexbench.stream``: the image stream over one Ray worker per GPU (or CPU workers).

The command line only; ``cortexbench.coordinator`` runs it.  Every flag overrides its config.json key
(shown in brackets in ``--help``); docs/usage.md explains the modes, balancers and loops.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cortexbench import machine
from cortexbench.cli import (
    COMMON_KEYS,
    ArgumentParser,
    add_common_flags,
    asks_for_gpus,
    flags_of,
    overrides_from,
    run_main,
)
from cortexbench.config import load_config

PROG = "python -m cortexbench.stream"
STREAM_KEYS = {
    **COMMON_KEYS, "gpus": "gpu_num", "images": "times", "cpu_workers": "stream.cpu_workers",
    "mode": "stream.modes", "weights": "stream.model_weights", "balancer": "stream.balancer",
    "concurrency": "stream.concurrency", "rate": "stream.rate", "address": "stream.address",
    "metrics_port": "stream.metrics_port", "metrics_host": "stream.metrics_host", "duration": "stream.duration_s", "linger": "stream.linger_s",
    "warmup": "stream.warmup", "popularity": "stream.popularity", "arrivals": "stream.arrivals", "dispatch": "stream.dispatch",
    "drivers": "stream.drivers", "max_group": "stream.max_group", "lanes": "stream.lanes",
    "retries": "stream.retries", "image_pool": "stream.image_pool", "drain_timeout": "stream.drain_timeout_s",
    "image_timeout": "stream.image_timeout_s",
    "cold_drop_cache": "stream.cold_drop_cache", "records": "stream.records", "cold_rebuild": "stream.cold_rebuild",
    "on_demand_images": "stream.on_demand_images", "inputs": "stream.inputs", "decode": "stream.decode",
    "target": "stream.target", "protocol": "stream.protocol", "input_name": "stream.input_name",
    "input_shape": "stream.input_shape", "http_client": "stream.http_client", "find_peak": "stream.find_peak",
    "slo": "stream.slo", "peak_precision": "stream.peak_precision", "peak_tolerance": "stream.peak_tolerance",
    "sweep": "stream.sweep", "peak_late_ms": "stream.peak_late_ms", "gpu_hour_cost": "stream.gpu_hour_cost",
    "engine": "stream.engine",
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Per-image latency and throughput of a stream of images over many workers, with models "
                    "cached on the workers, held in host memory and copied in for every image (swap), loaded "
                    "cold from disk for every image, or kept in an LRU of K.",
        epilog=f"examples:\n  {PROG}\n  {PROG} --gpus 8 --mode cached,swap,cold,lru:2\n"
               f"  {PROG} --rate 2000 --duration 60 --balancer p2c\n  {PROG} --address auto --gpus 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p)
    a = p.add_argument
    a("--gpus", metavar="N", help="GPU workers, one per GPU; auto = every GPU; 0 = CPU workers [gpu_num]")
    a("--cpu-workers", type=int, metavar="N", help="CPU workers when there is no GPU [stream.cpu_workers]")
    a("--mode", metavar="M,M", help="cached, swap, cold, lru:K; several run one after another [stream.modes]")
    a("--images", type=int, metavar="N", help="images in the stream [times]")
    a("--weights", metavar="W,W", help="one weight per model, instead of --popularity [stream.model_weights]")
    a("--popularity", metavar="P", help="uniform or zipf:S [stream.popularity]")
    a("--balancer", metavar="B", help="round-robin, least-outstanding, p2c, affinity [stream.balancer]")
    a("--concurrency", type=int, metavar="C", help="closed loop: images in flight [stream.concurrency]")
    a("--rate", type=float, metavar="R", help="open loop: arrivals at R images/s [stream.rate]")
    a("--arrivals", metavar="A", help="open loop: poisson, gamma:CV (bursty gaps of coefficient of variation CV) "
                                      "or trace:FILE (time_s,model rows, scaled to --rate) [stream.arrivals]")
    a("--duration", type=float, metavar="S", help="stop after S seconds [stream.duration_s]")
    a("--warmup", type=int, metavar="N", help="images sent first and not counted [stream.warmup]")
    a("--address", metavar="ADDR", help="join this Ray cluster ('auto' for the local one) [stream.address]")
    a("--metrics-port", type=int, metavar="PORT", help="Prometheus /metrics port; 0 = off [stream.metrics_port]")
    a("--metrics-host", metavar="ADDR",
      help="address /metrics listens on (0.0.0.0: every interface) [stream.metrics_host]")
    a("--linger", type=float, metavar="S", help="keep /metrics up S seconds after the run [stream.linger_s]")
    a("--dispatch", metavar="D", help="actor, grouped, compiled or auto [stream.dispatch]")
    a("--drivers", type=int, metavar="N", help="load-generator shards; 0 = auto [stream.drivers]")
    a("--max-group", type=int, metavar="N", help="images per worker call (grouped, compiled) [stream.max_group]")
    a("--lanes", type=int, metavar="N", help="images in flight inside a worker; 0 = auto [stream.lanes]")
    a("--retries", type=int, metavar="N", help="retries of an image whose worker died [stream.retries]")
    a("--image-pool", type=int, metavar="N", help="decoded inputs held per worker (cached, lru) [stream.image_pool]")
    a("--drain-timeout", type=float, metavar="S", help="wait for in-flight images on stop [stream.drain_timeout_s]")
    a("--image-timeout", type=float, metavar="S",
      help="a worker call (a group of images) unanswered this long: the worker is taken as hung, replaced, "
           "and its images retried elsewhere [stream.image_timeout_s]")
    a("--cold-drop-cache", action="store_const", const=True,
      help="cold mode: drop files from the page cache before reading them [stream.cold_drop_cache]")
    a("--cold-rebuild", action="store_const", const=True,
      help="cold, swap: build each network's structure for every load, timed as 'build' (default: the "
           "structure is kept, as a serving process keeps its code) [stream.cold_rebuild]")
    a("--on-demand-images", type=int, metavar="N",
      help="counted images in the modes that load models on demand (swap, cold, lru:K), the first N of the "
           "same stream; 0 = --images [stream.on_demand_images]")
    a("--inputs", metavar="I",
      help="pool: each worker decodes a pool of images once and reuses them; jpeg: every image's file is "
           "read and decoded for that image, as a server gets them (cold always does) [stream.inputs]")
    a("--decode", metavar="D", help="with --inputs jpeg: cpu (OpenCV) or gpu (nvJPEG on the worker's GPU, "
                                    "torch) [stream.decode]")
    a("--target", metavar="URL",
      help="an Open Inference Protocol (v2) server to load-test instead of cortexbench's Ray workers, as in "
           "http://127.0.0.1:8000 (Triton, KServe) [stream.target]")
    a("--protocol", metavar="P", help="with --target: v2 (binary tensors) or v2-json [stream.protocol]")
    a("--input-name", metavar="NAME", help="with --target: the input of models whose metadata lists none "
                                           "[stream.input_name]")
    a("--http-client", metavar="C", help="with --target: raw (cortexbench's own keep-alive HTTP/1.1 client) or "
                                          "httpx [stream.http_client]")
    a("--input-shape", metavar="D,D", help="with --target: that input's shape without the batch axis, as in "
                                           "3,224,224 [stream.input_shape]")
    a("--records", metavar="F", help="per-image records: csv.gz or none [stream.records]")
    a("--find-peak", action="store_const", const=True,
      help="search the highest open-loop rate that meets every --slo, per mode; --rate is the first rate tried "
           "[stream.find_peak]")
    a("--slo", action="append", metavar="STAT=LIMIT",
      help="a latency objective of --find-peak: mean or pQ, in us, ms or s, as in p99=20ms; repeat for "
           "several [stream.slo]")
    a("--peak-precision", type=float, metavar="F",
      help="stop when the bracket [met, missed] is within this fraction (default 0.05) [stream.peak_precision]")
    a("--peak-late-ms", type=float, metavar="MS",
      help="find-peak: an image sent more than MS after its scheduled time is late; a step may have 1%% late "
           "(default 1) [stream.peak_late_ms]")
    a("--gpu-hour-cost", type=float, metavar="PRICE",
      help="price of one worker (GPU) hour: prints the cost per million images per mode, at the peak with "
           "--find-peak, else at the measured throughput [stream.gpu_hour_cost]")
    a("--sweep", metavar="KIND:V,V",
      help="the same stream at each value: lru:K,K (each LRU capacity, with cold, swap and cached from --mode "
           "as its ends; cache_sweep.png), concurrency:C,C (images in flight) or rate:R,R (images/s); a table "
           "and concurrency_sweep.png / rate_sweep.png [stream.sweep]")
    a("--engine", metavar="E",
      help="cached mode's engine: backend (the backend's own path), eager, graphs, compile, ort, ort-basic, "
           "ort-none, openvino or tensorrt at --precision; each model built once before the run "
           "[stream.engine]")
    a("--peak-tolerance", type=float, metavar="F",
      help="a step's measurement windows must agree within this fraction (default 0.2) [stream.peak_tolerance]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from cortexbench.coordinator import run_stream

        overrides = overrides_from(args, STREAM_KEYS)
        no_gpu = not machine.gpus() and args.address is None and not asks_for_gpus(args.gpus)
        cfg = load_config(args.config, overrides, has_gpu=not no_gpu, flags=flags_of(STREAM_KEYS))
        run_stream(cfg, quiet=args.quiet, argv=list(sys.argv) if argv is None else [PROG, *argv])
        return 0

    return run_main(body, PROG)


if __name__ == "__main__":
    sys.exit(main())
