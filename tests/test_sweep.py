"""``--sweep lru:K,...``: its passes, its table and picture, and on real Ray workers: each capacity's hit ratio
equals a replay of the seeded model sequence through a reference LRU of that capacity."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from cortexbench.config import Config, StreamConfig, load_config
from cortexbench.coordinator import StreamPlan
from cortexbench.errors import ConfigError
from cortexbench.live import LiveView
from cortexbench.load_sweep import LoadSweepRun
from cortexbench.schedule import make_schedule
from cortexbench.sweep import (
    Sweep,
    base_rate,
    console,
    load_table,
    parse_sweep,
    plot,
    plot_cache_sweep,
    plot_name,
    render_markdown,
    resident,
    section,
    split_pass,
    sweep_modes,
    sweep_table,
)
from cortexbench.worker import WorkerSpec
from tests.fakes import FakeTarget, FakeWorkerHandle, reference_lru_hits
from tests.report.runs import schema_errors


def test_parse_sweep_and_its_passes():
    assert parse_sweep("lru:8,1,2,4,2") == Sweep("lru", (1, 2, 4, 8)) and parse_sweep(" LRU:3 ") == Sweep("lru", (3,))
    assert parse_sweep("concurrency:16,1,4") == Sweep("concurrency", (1, 4, 16))
    assert parse_sweep("rate:200,50,100.5") == Sweep("rate", (50.0, 100.5, 200.0))
    for bad in ("lru:", "lru:0,1", "lru:a", "fifo:1,2", "1,2,4", "lru:1,,2", "concurrency:0,2", "concurrency:1.5",
                "rate:0,10", "rate:-5", "rate:inf", "rate:nan"):
        with pytest.raises(ConfigError, match=rf"^'stream.sweep': '{bad}' is not a sweep: use lru:K,K,... \(cache "
                                              r"capacities of 1 or more, as in 'lru:1,2,4,8'\), concurrency:C,C,... "
                                              r".* or rate:R,R,... \(images/s, more than 0, as in 'rate:50,100,200'\)$"):
            parse_sweep(bad)
    assert sweep_modes("lru:4,1", ("cached", "swap", "cold", "lru:2")) == ("cold", "swap", "lru:1", "lru:4", "cached")
    assert sweep_modes("lru:2", ("lru:3",)) == ("lru:2",)
    assert sweep_modes("concurrency:4,1", ("cached", "lru:2")) == ("cached@c1", "cached@c4", "lru:2@c1", "lru:2@c4")
    assert sweep_modes("rate:50,12.5", ("cold",)) == ("cold@r12.5", "cold@r50")
    assert [split_pass(p) for p in ("lru:2@c4", "cold@r12.5", "cached", "x@y", "a@c")] == [
        ("lru:2", 4.0), ("cold", 12.5), ("cached", None), ("x@y", None), ("a@c", None)]
    assert [resident(m, 4) for m in ("cold", "swap", "lru:2", "lru:9", "cached")] == [0, 0, 2, 4, 4]


def test_config_checks_the_sweep_and_names_the_flag():
    flags = {"stream.sweep": "--sweep"}
    assert load_config(None, {"stream.sweep": "lru:1,2"}, has_gpu=False, flags=flags).stream.sweep == "lru:1,2"
    with pytest.raises(ConfigError, match=r"^--sweep: 'stream.sweep': 'lru' is not a sweep"):
        load_config(None, {"stream.sweep": "lru"}, has_gpu=False, flags=flags)
    with pytest.raises(ConfigError, match=r"'stream.sweep' and 'stream.find_peak' both set"):
        load_config(None, {"stream.sweep": "lru:1", "stream.find_peak": True, "stream.slo": ["p99=5ms"]},
                    has_gpu=False)
    assert load_config(None, {"stream.sweep": "rate:5,10", "stream.arrivals": "gamma:2"}, has_gpu=False).stream.sweep
    for over, says in ((({"stream.sweep": "concurrency:1,2", "stream.rate": 10.0}),
                        r"^--sweep: 'stream.sweep' concurrency:1,2 sweeps a closed loop's images in flight: leave "
                        r"out 'stream.rate' \(--rate 10\), or sweep rate:R,R,...$"),
                       (({"stream.sweep": "rate:5,10", "stream.rate": 10.0}),
                        r"^--sweep: 'stream.sweep' rate:5,10 sets the rate of each pass: leave out 'stream.rate'"),
                       (({"stream.sweep": "concurrency:1,2", "stream.arrivals": "gamma:2"}),
                        r"'stream.arrivals' gamma:2 is an open loop: give its mean rate")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, over, has_gpu=False, flags=flags)


def _summary(hit: float, tput: float, p99: float, late: float = 0.0, memory: int | None = None) -> dict:
    sizes = {"model_bytes.a": 4e6, "model_bytes.b": 1e6, "model_bytes.c": 2e6, "model_bytes.d": 0.5e6}
    worker = {"count": 100} if memory is None else {"count": 100, "device_memory_bytes": memory}
    return {"summary": {"hit_ratio": hit, "throughput_images_per_s": tput, "loads": 3, "counted_ok": 100,
                        "late_share": late, "latency": {"mean_s": p99 / 3, "p50_s": p99 / 4, "p99_s": p99}},
            "setup_s": [{"models_s": 0.1, **sizes}], "per_worker": {"w0": worker}}


def test_the_table_report_and_picture_of_a_sweep(tmp_path):
    """Device memory per capacity: the K largest models' weight files (4 + 2 MB for lru:2), or the memory a
    worker measured when the results have it."""
    modes = {"cold": _summary(0.0, 50.0, 0.05), "lru:1": _summary(0.3, 80.0, 0.04),
             "lru:2": _summary(0.6, 120.0, 0.03), "cached": _summary(1.0, 200.0, 0.01, memory=9_000_000)}
    rows = sweep_table(modes, 4)
    assert [(r["mode"], r["resident"], r["hit_ratio"]) for r in rows] == [
        ("cold", 0, 0.0), ("lru:1", 1, 0.3), ("lru:2", 2, 0.6), ("cached", 4, 1.0)]
    assert [(r["device_memory_bytes"], r["memory_basis"]) for r in rows] == [
        (0.0, "weights"), (4e6, "weights"), (6e6, "weights"), (9_000_000, "measured")]
    sec = {"sweep": "lru:1,2", "kind": "lru", "rows": rows}
    md = render_markdown(sec)
    assert "## Cache sweep" in md and "| lru:2 | 2 | 6.00 MB | weights | 60.0% |" in md and "cache_sweep.png" in md
    assert "| cached | 4 | 9.00 MB | measured | 100% |" in md
    assert render_markdown({"sweep": "lru:1,2", "rows": rows}) == md  # results from before the kinds: lru
    png = plot_cache_sweep(rows, tmp_path / "cache_sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_table_and_picture_of_a_concurrency_and_a_rate_sweep(tmp_path):
    modes = {"cached@c1": _summary(1.0, 90.0, 0.02), "cached@c4": _summary(1.0, 300.0, 0.03),
             "cold@c1": _summary(0.0, 40.0, 0.05), "cold@c4": _summary(0.0, 70.0, 0.2)}
    rows = load_table(modes)
    assert [(r["pass"], r["mode"], r["value"], r["images_per_s"]) for r in rows] == [
        ("cached@c1", "cached", 1.0, 90.0), ("cached@c4", "cached", 4.0, 300.0), ("cold@c1", "cold", 1.0, 40.0),
        ("cold@c4", "cold", 4.0, 70.0)]
    sec = section("concurrency:1,4", modes, 2)
    assert sec["kind"] == "concurrency" and sec["rows"] == rows and plot_name(sec) == "concurrency_sweep.png"
    md = render_markdown(sec)
    assert "## Concurrency sweep" in md and "| cached@c4 | 4 | 300 img/s | 10.0 ms | 7.50 ms | 30.0 ms | 0% |" in md
    assert "![concurrency sweep](concurrency_sweep.png)" in md
    rate = section("rate:10,20", {"cached@r10": _summary(1.0, 10.2, 0.02, late=0.01),
                                  "cached@r20": _summary(1.0, 19.5, 0.04)}, 1)
    assert plot_name(rate) == "rate_sweep.png"
    assert "| cached@r10 | 10.0 img/s | 10.2 img/s | 6.67 ms | 5.00 ms | 20.0 ms | 1.00% |" in render_markdown(rate)
    assert "cached@r20" in console(rate).splitlines()[-1]
    for sec_ in (sec, rate):
        png = plot(sec_, tmp_path / plot_name(sec_))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


MODELS = ("null", "digits_cnn", "mnist_cnn", "mlp2")


@pytest.mark.ray
def test_a_sweeps_hit_ratios_equal_a_reference_lru_replay(ray_session, model_dir, image_dir, tmp_path):
    """One worker, one image in flight (the worker sees the schedule's order), Zipf popularity: each lru:K's
    hit ratio over the counted images is the reference LRU's over the same seeded sequence; cold and cached
    are the ends (0 and 1)."""
    from cortexbench.coordinator import run_stream

    count, warmup = 150, 10
    cfg = Config(models=MODELS, model_dir=model_dir, img_dir=image_dir, result_dir=tmp_path, times=count, seed=3,
                 stream=StreamConfig(modes=("cached", "cold"), sweep="lru:1,2,3", popularity="zipf:1.1",
                                     concurrency=1, warmup=warmup, cpu_workers=1, lanes=1, metrics_port=0,
                                     records="none"))
    run_dir = run_stream(cfg, quiet=True)
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["modes"]) == ["cold", "lru:1", "lru:2", "lru:3", "cached"] and results["complete"]
    sched = make_schedule(count=count, models=MODELS, n_images=8, popularity="zipf:1.1", warmup=warmup, seed=3)
    names = [MODELS[m] for m in sched.model_idx]
    rows = {r["mode"]: r for r in results["sweep"]["rows"]}
    for k in (1, 2, 3):
        hits = reference_lru_hits(names, k) - reference_lru_hits(names[:warmup], k)
        assert rows[f"lru:{k}"]["hit_ratio"] == pytest.approx(hits / count, abs=1e-12), k
        assert rows[f"lru:{k}"]["resident"] == k
    assert rows["cold"]["hit_ratio"] == 0.0 and rows["cached"]["hit_ratio"] == 1.0
    assert rows["lru:1"]["hit_ratio"] < rows["lru:2"]["hit_ratio"] < rows["lru:3"]["hit_ratio"] < 1.0
    assert (run_dir / "cache_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Cache sweep" in (run_dir / "report.md").read_text()
    assert schema_errors(results) == []  # a real Ray run's results.json meets docs/results.schema.json


def _load_sweep(sweep: str, handle: FakeWorkerHandle, count: int = 120) -> tuple[LoadSweepRun, list[int]]:
    """A LoadSweepRun of mode cached on one fake worker; the most images it had in flight in each pass."""
    cfg = Config(models=("null",), times=count, stream=StreamConfig(modes=("cached",), sweep=sweep, warmup=10,
                                                                    retries=1, concurrency=2))
    sched = make_schedule(count=count, models=("null",), n_images=3, rate=base_rate(cfg.stream), warmup=10, seed=0)
    images = ("a.jpg", "b.jpg", "c.jpg")
    plan = StreamPlan(cfg, "mxnet", ("null",), images, (WorkerSpec("w0", "cpu", "mxnet", "m", ("null",), images,
                                                                   lanes=handle.lanes),),
                      False, 1.0, 1, "grouped", 1, 1, 4, sched, modes=sweep_modes(sweep, ("cached",)))
    most: list[int] = []

    def next_pass() -> None:
        most.append(handle.max_inflight)
        handle.max_inflight = 0

    target = FakeTarget({"w0": handle}, on_set_mode=next_pass)
    run = LoadSweepRun(plan, target, LiveView(("null",), ["w0"], server=None, run_id="t", backend="x", quiet=True))
    asyncio.run(run.run())
    next_pass()
    return run, most[1:]


def test_a_load_sweep_runs_each_pass_at_its_concurrency_or_rate_on_the_same_stream():
    """Each pass of concurrency:1,4 keeps exactly that many images in flight (eight lanes: room for more);
    each pass of rate:200,400 sends the seeded schedule's arrivals at that rate; every pass the same images."""
    run, most = _load_sweep("concurrency:1,4", FakeWorkerHandle("w0", service_s=0.002, lanes=8))
    assert list(run.modes) == ["cached@c1", "cached@c4"] and most == [1, 4] and not run.error
    run, _ = _load_sweep("rate:200,400", FakeWorkerHandle("w0", service_s=0.001, lanes=4))
    assert list(run.modes) == ["cached@r200", "cached@r400"]
    for name, rate in (("cached@r200", 200.0), ("cached@r400", 400.0)):
        led = run.modes[name].result.ledger
        order = np.argsort(led.column("item"))
        want = make_schedule(count=120, models=("null",), n_images=3, rate=rate, warmup=10, seed=0)
        assert np.allclose(np.diff(led.column("scheduled_s")[order]), np.diff(want.send_at_s), atol=1e-9), name
        assert (led.column("image_idx")[order] == want.image_idx).all()
        assert run.modes[name].summary["summary"]["mode"] == name
    rows = {r["pass"]: r for r in section("rate:200,400", {m: r.summary for m, r in run.modes.items()}, 1)["rows"]}
    assert rows["cached@r200"]["value"] == 200.0 and rows["cached@r400"]["value"] == 400.0


def test_a_concurrency_sweep_against_an_http_target_and_lru_refused_there(image_dir, tmp_path, capsys):
    """Against an Open Inference Protocol server (tests/v2_server.py) each pass is the server's at one
    concurrency; an lru sweep is the server's business and is refused with one line."""
    from cortexbench.stream import main
    from tests.v2_server import V2Server

    server = V2Server(("mnist_cnn",))
    with server.running():
        args = ["--target", server.url, "--models", "mnist_cnn", "--images", "40", "--warmup", "0",
                "--metrics-port", "0", "--result-dir", str(tmp_path), "--img-dir", str(image_dir), "--quiet"]
        assert main([*args, "--sweep", "concurrency:1,3"]) == 0
        out = capsys.readouterr().out
        assert "concurrency sweep:" in out
        run_dir = Path(out.split("results:", 1)[1].strip())
        res = json.loads((run_dir / "results.json").read_text())
        assert list(res["modes"]) == ["server@c1", "server@c3"] and res["complete"] and server.requests == 80
        assert [r["value"] for r in res["sweep"]["rows"]] == [1.0, 3.0] and res["run"]["concurrency"] == 3
        assert (run_dir / "concurrency_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert schema_errors(res) == []
        assert main([*args, "--sweep", "lru:1,2"]) == 2
        assert "--sweep lru does not apply with --target" in capsys.readouterr().err
