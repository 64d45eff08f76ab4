"""How much the harness of ``python -m cortexbench.single`` adds to the latency it reports.

For each model, in one process and one run, two measurements of the same batch on the same device:

* **harness**: the per-image latency ``single`` reports, from the very function it uses
  (``cortexbench.timing.measure_point`` around ``LoadedModel.predict`` of a model from ``backend.load``);
* **bare**: a loop that calls the framework directly on a network read from the same files
  (MXNet: ``gluon.SymbolBlock`` hybridized like the backend's, ``net(mx.nd.array(x)).asnumpy()``),
  each call timed with ``time.perf_counter``.

They run interleaved in ``--rounds`` rounds (AB, BA, AB, ...) of ``--round-seconds`` each, so that drift of the
machine hits both alike.  Each round gives both the mean and the median (p50) seconds per image, as ``single``
reports them.  The verdict uses the medians: ``median over rounds of p50(harness) / the same of bare - 1``,
since a per-call median shifts by exactly the per-call cost the harness adds while other processes' bursts
on a shared machine move the means of whole rounds.  The same ratio of the means is reported beside it.
Target: under 3%.  PASS/FAIL is printed per model and written to the JSON (``--out``); the exit status is 0
either way.

    python bench/single_overhead.py                       # squeezenet and mnist_cnn, mxnet, cpu, batch 1
    python bench/single_overhead.py --models mnist_cnn --rounds 10 --batch-size 4
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cortexbench import machine
from cortexbench.cli import ArgumentParser, run_main
from cortexbench.config import load_config
from cortexbench.errors import ConfigError
from cortexbench.models.backends import get_backend
from cortexbench.models.backends.base import LoadOptions
from cortexbench.models.registry import expand_model_names, get_spec
from cortexbench.report.tables import console_table, format_percent, format_seconds
from cortexbench.timing import TimingPolicy, measure_point

PROG = "python bench/single_overhead.py"
TARGET = 0.03
WARMUP_RUNS = 3


def parse_args(argv: Sequence[str]) -> Any:
    p = ArgumentParser(prog=PROG, description="Harness overhead of cortexbench.single against a bare framework loop.")
    p.add_argument("--models", default="squeezenet,mnist_cnn", help="models (default: squeezenet,mnist_cnn)")
    p.add_argument("--backend", default="mxnet", help="backend with a bare loop here: mxnet (default)")
    p.add_argument("--device", default="cpu", help="cpu (default) or gpu:N")
    p.add_argument("--batch-size", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds of each (default 20)")
    p.add_argument("--round-seconds", type=float, default=0.25, help="seconds per round and side (default 0.25)")
    p.add_argument("--model-dir", help="model files (default: config.json's model_dir)")
    p.add_argument("--img-dir", help="images (default: config.json's img_dir; a synthetic set is made there if empty)")
    p.add_argument("--config", help="config file (default ./config.json)")
    p.add_argument("--out", default="results/bench/single_overhead.json", help="JSON file to write")
    args = p.parse_args(list(argv))
    if args.rounds < 1 or args.batch_size < 1 or not args.round_seconds > 0:
        p.error("--rounds, --batch-size and --round-seconds must be positive")
    return args


def bare_mxnet(spec: Any, model_dir: Path, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """The framework alone: the exported files read into a SymbolBlock, hybridized like the backend does."""
    import warnings

    import mxnet as mx
    from mxnet import gluon

    backend = get_backend("mxnet")
    sym_file, params_file = backend.model_files(spec, model_dir)
    ctx = mx.cpu() if device == "cpu" else mx.gpu(int(device.split(":")[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = gluon.SymbolBlock.imports(str(sym_file), ["data"], str(params_file), ctx=ctx)
    net.hybridize(static_alloc=True)
    if device == "cpu":
        return lambda x: net(mx.nd.array(x)).asnumpy()
    return lambda x: net(mx.nd.array(x, ctx=ctx)).asnumpy()


BARE = {"mxnet": bare_mxnet}


def bare_round(fn: Callable[[np.ndarray], Any], x: np.ndarray, seconds: float) -> tuple[float, float]:
    """Mean and median seconds per image of ``fn(x)`` over ``seconds`` (after a warm-up), each call timed alone."""
    for _ in range(WARMUP_RUNS):
        fn(x)
    times = []
    clock = time.perf_counter
    start = clock()
    while True:
        t0 = clock()
        fn(x)
        t1 = clock()
        times.append(t1 - t0)
        if t1 - start >= seconds and len(times) >= 5:
            break
    return float(np.mean(times)) / len(x), float(np.median(times)) / len(x)


def compare(name: str, args: Any, model_dir: Path, paths: list[Path]) -> dict[str, Any]:
    from cortexbench.images.dataset import load_batch

    spec = get_spec(name)
    backend = get_backend(args.backend)
    images, _ = load_batch(paths[:args.batch_size], spec)
    if len(images) == 0:
        raise ConfigError(f"none of the first {args.batch_size} images decodes; use another --img-dir")
    x = np.ascontiguousarray(images[np.arange(args.batch_size) % len(images)])
    model = backend.load(spec, model_dir, args.device, LoadOptions())
    bare = BARE[args.backend](spec, model_dir, args.device)
    # A tiny target makes the harness run its whole time bound, like the bare side.
    policy = TimingPolicy(WARMUP_RUNS, 5, args.round_seconds, 1e-9)
    rounds: dict[str, dict[str, list[float]]] = {side: {"mean": [], "p50": []} for side in ("harness", "bare")}
    try:
        for r in range(args.rounds):
            for side in ("harness", "bare") if r % 2 == 0 else ("bare", "harness"):
                if side == "harness":
                    t = measure_point(model.predict, x, policy)
                    mean, p50 = t.mean_image_s, t.batch.p50_s / t.batch_size
                else:
                    mean, p50 = bare_round(bare, x, args.round_seconds)
                rounds[side]["mean"].append(mean)
                rounds[side]["p50"].append(p50)
    finally:
        model.close()
    med = {side: {k: statistics.median(v) for k, v in stats.items()} for side, stats in rounds.items()}
    overhead = med["harness"]["p50"] / med["bare"]["p50"] - 1
    overhead_mean = med["harness"]["mean"] / med["bare"]["mean"] - 1
    return {"model": name, "backend": args.backend, "device": args.device, "batch_size": args.batch_size,
            "rounds": args.rounds, "round_seconds": args.round_seconds,
            "harness_rounds_image_s": rounds["harness"], "bare_rounds_image_s": rounds["bare"],
            "harness_median_image_s": med["harness"]["p50"], "bare_median_image_s": med["bare"]["p50"],
            "harness_mean_image_s": med["harness"]["mean"], "bare_mean_image_s": med["bare"]["mean"],
            "overhead": overhead, "overhead_of_means": overhead_mean, "target": TARGET,
            "verdict": "PASS" if overhead < TARGET else "FAIL"}


def body(argv: Sequence[str]) -> int:
    from cortexbench.images.dataset import ensure_images
    from cortexbench.models.export import ensure_models
    from cortexbench.results import write_json

    args = parse_args(argv)
    if args.backend not in BARE:
        raise ConfigError(f"--backend {args.backend}: no bare loop written for it here (have: {', '.join(BARE)})")
    overrides = {k: v for k, v in (("model_dir", args.model_dir), ("img_dir", args.img_dir)) if v is not None}
    cfg = load_config(args.config, overrides, has_gpu=bool(machine.gpus()))
    names = expand_model_names(args.models.split(","), key="--models")
    started = dt.datetime.now()
    paths = ensure_images(cfg.img_dir, cfg.images.synth_count, seed=cfg.images.seed,
                          create=args.img_dir is None, progress=True)
    ensure_models(list(names), args.backend, cfg.model_dir, seed=cfg.seed, progress=True)
    results = []
    for name in names:
        print(f"{name}: {args.rounds} rounds x 2 x {args.round_seconds:g} s ...", file=sys.stderr, flush=True)
        results.append(compare(name, args, cfg.model_dir, paths))
    rows = [[r["model"], format_seconds(r["harness_median_image_s"]), format_seconds(r["bare_median_image_s"]),
             format_percent(r["overhead"]), format_seconds(r["harness_mean_image_s"]),
             format_seconds(r["bare_mean_image_s"]), format_percent(r["overhead_of_means"]), r["verdict"]]
            for r in results]
    print(console_table(["model", "harness p50", "bare p50", "overhead", "harness mean", "bare mean",
                         "of means", "< 3%?"], rows, align="lrrrrrrl"))
    print("per image, the median over rounds; the verdict uses the p50s (see the module docstring)")
    out = Path(args.out)
    write_json(out, {"kind": "bench.single_overhead", "started_at": started.astimezone().isoformat(timespec="seconds"),
                     "argv": [PROG, *argv], "machine": machine.machine_info(), "target": TARGET, "models": results,
                     "verdict": "PASS" if all(r["verdict"] == "PASS" for r in results) else "FAIL"})
    print(f"written: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_main(lambda: body(argv), PROG)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2


if __name__ == "__main__":
    sys.exit(main())
