"""The stream test on real Ray actors: modes, dispatch paths, a worker killed mid-run, shards, metrics.

Every test here shares the session's local Ray (``ray_session``) and one pool of two CPU workers with the
null model and two small mxnet models; the test that kills a worker comes last, since the pool's worker
restarts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cortexbench import cluster, ray_handles
from cortexbench.config import Config, StreamConfig
from cortexbench.coordinator import StreamPlan, StreamRun, run_stream
from cortexbench.driver import DriverOptions, DriverResult, Progress, drive
from cortexbench.errors import CortexbenchError, WorkerError
from cortexbench.images.dataset import list_images
from cortexbench.ledger import WORKER_STAGES
from cortexbench.live import LiveView
from cortexbench.metrics_http import MetricsServer
from cortexbench.residency import parse_mode
from cortexbench.schedule import Schedule, make_schedule
from cortexbench.target import HandleOptions, worker_labels
from cortexbench.worker import WorkerSpec
from tests.fakes import reference_lru_hits

pytestmark = pytest.mark.ray

MODELS = ("null:0.002", "digits_cnn", "mnist_cnn")
NULL_ONLY = (1.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def images(image_dir: Path) -> tuple[str, ...]:
    return tuple(str(p) for p in list_images(image_dir))


@pytest.fixture(scope="module")
def pool(ray_session: None, model_dir: Path, images: tuple[str, ...]) -> Iterator[cluster.RayTarget]:
    specs = [WorkerSpec(name=f"cpu{i}", device="cpu", backend="mxnet", model_dir=str(model_dir), models=MODELS,
                        images=images, lanes=1, image_pool=8) for i in range(2)]
    p = cluster.start_workers(specs, gpu=False, cpus_each=0.5, threads_each=1)
    yield p
    p.close()


def _schedule(count: int, weights: tuple[float, ...] = (), warmup: int = 0, seed: int = 0,
              rate: float | None = None) -> Schedule:
    return make_schedule(count=count, models=MODELS, n_images=8, weights=weights, warmup=warmup, seed=seed,
                         rate=rate)


def _drive(pool: cluster.RayTarget, schedule: Schedule, mode: str, *, workers: tuple[int, ...] = (0, 1),
           dispatch: str = "grouped", concurrency: int | None = 4, max_group: int = 1, depth: int = 4,
           on_progress: Callable[[Progress], None] | None = None, inline_wait_s: float | None = None) -> DriverResult:
    pool.set_mode(mode)

    async def main() -> DriverResult:
        handles = pool.handles(mode, HandleOptions(dispatch, depth, one_at_a_time=concurrency == 1), ids=workers)
        if inline_wait_s is not None:
            for h in handles:
                h.inline_wait_s = inline_wait_s
        opts = DriverOptions(mode=mode, concurrency=concurrency, max_group=max_group, depth=depth,
                             fold_interval_s=0.05, call_timeout_s=10.0)  # a lost reply fails, not hangs
        return await drive(schedule, handles, opts, balancer="least-outstanding", seed=0,
                           lru_capacity=parse_mode(mode).capacity or None, on_progress=on_progress)

    return asyncio.run(main())


def _accounted(res: DriverResult, n: int) -> dict[str, int]:
    counts = res.ledger.outcome_counts()
    assert res.sent == n and res.not_sent == 0
    assert res.sent == counts["ok"] + sum(v for k, v in counts.items() if k != "ok") == len(res.ledger)
    res.ledger.check_complete(res.sent)
    assert sorted(res.ledger.column("item").tolist()) == list(range(n))
    _times_are_on_the_driver_clock(res)
    return counts


def _times_are_on_the_driver_clock(res: DriverResult) -> None:
    """Every ok image was scheduled, sent and answered in that order within the run, and its round trip
    holds the worker's own stage times (a receive time from another clock breaks all of these)."""
    ok = res.ledger.column("outcome") == 0
    sched, sent, done = (res.ledger.column(c)[ok] for c in ("scheduled_s", "sent_s", "done_s"))
    run_s = res.finished_s - res.started_s
    assert (sched >= 0).all() and (sent >= sched).all() and (done >= sent).all() and (done <= run_s).all()
    worker_s = np.nansum([res.ledger.column(f"{s}_s")[ok] for s in WORKER_STAGES], axis=0)
    assert (done - sent >= worker_s * (1 - 1e-9)).all()


@pytest.mark.parametrize("weights", [NULL_ONLY, ()], ids=["null", "mixed"])
def test_modes_on_the_same_schedule_account_for_every_image(pool, weights):
    sched = _schedule(60, weights)
    for mode in ("cached", "cold", "lru:1"):
        res = _drive(pool, sched, mode)
        counts = _accounted(res, len(sched))
        assert counts["ok"] == len(sched), (mode, counts)
        workers = res.ledger.column("worker")
        hit = res.ledger.column("hit")
        if mode == "cached":
            assert (hit == 1).all()
        if mode == "cold":
            assert (hit == 0).all()
            for i, name in enumerate(pool.names):  # a load for every image the worker ran
                ran = int((workers == i).sum())
                assert res.states[name].loads_total == ran == res.states[name].misses_total


def test_lru_hit_ratio_equals_a_reference_replay(pool):
    sched = _schedule(80, seed=5)
    res = _drive(pool, sched, "lru:1", workers=(0,), concurrency=1)
    _accounted(res, len(sched))
    order = np.argsort(res.ledger.column("item"))
    names = [MODELS[m] for m in sched.model_idx]
    expected = reference_lru_hits(names, 1)
    assert int((res.ledger.column("hit")[order] == 1).sum()) == expected
    st = res.states[pool.names[0]]
    assert st.hits_total == expected and st.misses_total == st.loads_total == len(sched) - expected


@pytest.mark.parametrize("inline_wait_s", [ray_handles.INLINE_WAIT_S, 1e-6], ids=["inline", "handed-over"])
def test_compiled_one_at_a_time_waits_inline_or_hands_over_to_the_pump(pool, inline_wait_s):
    """Concurrency 1 on the compiled path: a call waits on the event loop's thread, and one slower than
    the wait (every call, with a 1 us wait) is handed to the pump, which reads it again.  LRU hits still
    match a reference replay (the calls keep their order), and every image is accounted for."""
    sched = _schedule(60, seed=7)
    res = _drive(pool, sched, "lru:1", workers=(0,), dispatch="compiled", concurrency=1,
                 inline_wait_s=inline_wait_s)
    counts = _accounted(res, len(sched))
    assert counts["ok"] == len(sched)
    order = np.argsort(res.ledger.column("item"))
    expected = reference_lru_hits([MODELS[m] for m in sched.model_idx], 1)
    assert int((res.ledger.column("hit")[order] == 1).sum()) == expected
    lat = res.ledger.column("latency_s")
    assert (lat > 0).all() and (res.ledger.column("done_s") >= res.ledger.column("sent_s")).all()


@pytest.mark.parametrize("dispatch", ["actor", "grouped", "compiled"])
def test_every_dispatch_path_accounts_for_every_image(pool, dispatch):
    sched = _schedule(120, NULL_ONLY)
    max_group = 1 if dispatch == "actor" else 4
    res = _drive(pool, sched, "cached", dispatch=dispatch, concurrency=8, max_group=max_group)
    counts = _accounted(res, len(sched))
    assert counts["ok"] == len(sched)
    assert set(np.unique(res.ledger.column("worker")).tolist()) == {0, 1}


def test_open_loop_latency_on_the_real_clock_is_bounded_by_the_service_time(pool):
    # 100 images/s of the 2 ms null model over two workers: far under capacity, so each image takes its
    # service time plus the transport; counted from its scheduled time on the driver's clock.  (Plain actor
    # calls: a compiled graph's first executions take seconds, which an open loop without warm-up shows.)
    service_s = 0.002
    sched = _schedule(60, NULL_ONLY, rate=100.0, seed=3)
    res = _drive(pool, sched, "cached", dispatch="grouped", concurrency=None, depth=4)
    assert _accounted(res, len(sched))["ok"] == len(sched), (res.ledger.outcome_counts(), res.error_samples)
    order = np.argsort(res.ledger.column("item"))
    assert sched.send_at_s is not None
    np.testing.assert_allclose(res.ledger.column("scheduled_s")[order], sched.send_at_s, rtol=0, atol=1e-6)
    lat = res.ledger.column("latency_s")
    infer = res.ledger.column("infer_s")
    assert (infer >= service_s).all() and (lat >= infer).all()
    assert float(np.median(lat)) < service_s + 0.25  # a busy 2-core machine adds ms, not seconds
    assert float(lat.max()) < service_s + 2.0


def _plan(cfg: Config, pool: cluster.RayTarget, images: tuple[str, ...], drivers: int) -> StreamPlan:
    sched = make_schedule(count=cfg.times, models=cfg.models, n_images=len(images), weights=cfg.stream.model_weights,
                          warmup=cfg.stream.warmup, seed=cfg.seed)
    return StreamPlan(cfg, "mxnet", cfg.models, images, tuple(pool.specs), False, 0.5, 1, "grouped", drivers,
                      1, 4, sched)


class ScrapingView(LiveView):
    """A LiveView that scrapes /metrics once in the middle of each mode's measured images (from the fold
    that the driver calls, so no waiting on time)."""

    scrapes: dict[str, dict[str, Any]]

    def fold(self, p: Progress, rows: Any = None) -> None:
        super().fold(p, rows)
        if self.server is not None and self.mode not in self.scrapes and self.done >= self.warmup + 20:
            self.scrapes[self.mode] = _scrape(self.server)


def _stream_run(pool: cluster.RayTarget, images: tuple[str, ...], model_dir: Path, drivers: int,
                server: MetricsServer | None) -> StreamRun:
    cfg = Config(models=MODELS, model_dir=model_dir, times=150,
                 stream=StreamConfig(modes=("cached", "lru:1"), concurrency=4, warmup=10, model_weights=(4, 1, 1)))
    plan = _plan(cfg, pool, images, drivers)
    live = ScrapingView(MODELS, pool.names, server=server, run_id="test", backend="mxnet", quiet=True,
                        host="here", worker_labels=worker_labels(pool.workers, "here"), modes=2)
    live.scrapes = {}
    run = StreamRun(plan, pool, live)
    run.live_scrapes = live.scrapes  # type: ignore[attr-defined]
    asyncio.run(run.run())
    live.finish()
    return run


def _scrape(server: MetricsServer) -> dict[str, Any]:
    text = httpx.get(server.url, timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _per(family: Any, sample_name: str, *labels: str, **where: str) -> dict[Any, float]:
    """Sum of the samples named ``sample_name`` matching ``where``, by the values of ``labels``."""
    out: dict[Any, float] = {}
    for s in family.samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in where.items()):
            key = tuple(s.labels[k] for k in labels)
            key = key[0] if len(key) == 1 else key
            out[key] = out.get(key, 0) + s.value
    return out


def _check_metrics(server: MetricsServer, run: StreamRun, pool: cluster.RayTarget) -> None:
    """Every metric means what docs/metrics.md says, checked against the ledgers after the run."""
    fams = _scrape(server)
    labels = set(worker_labels(pool.workers, "here"))
    warmup = run.plan.schedule.warmup
    for phase in ("warmup", "measured"):
        images = _per(fams["cortexbench_images"], "cortexbench_images_total", "mode", phase=phase)
        latency = _per(fams["cortexbench_image_latency_seconds"], "cortexbench_image_latency_seconds_count", "mode",
                       phase=phase)
        hits = _per(fams["cortexbench_cache_hits"], "cortexbench_cache_hits_total", "mode", phase=phase)
        loads = _per(fams["cortexbench_model_loads"], "cortexbench_model_loads_total", "mode", phase=phase)
        for mode, m in run.modes.items():
            ledger = m.result.ledger
            sel = (ledger.column("item") >= warmup) == (phase == "measured")
            assert images[mode] == int(sel.sum()) == (warmup if phase == "warmup" else m.result.sent - warmup)
            assert latency[mode] == int((sel & ledger.ok_mask()).sum())
            if phase == "measured":  # the report's counted images are the measured ones
                assert latency[mode] == m.hists.rollup(lambda k: k[:1]).get(("latency",)).count
            assert hits.get(mode, 0) == int((sel & (ledger.column("hit") == 1)).sum())
            assert loads.get(mode, 0) == int((sel & (ledger.column("hit") == 0)).sum())
    setup = _per(fams["cortexbench_model_loads"], "cortexbench_model_loads_total", "mode", "worker", phase="setup")
    assert setup == {("cached", w): len(MODELS) for w in labels}  # cached mode's preload, every model everywhere
    stages = _per(fams["cortexbench_stage_seconds"], "cortexbench_stage_seconds_count", "mode", "stage")
    for stage in ("input", "decode", "read", "build", "copy", "wait"):  # did not happen: not observed
        assert ("cached", stage) not in stages, stage
    # every model load reads the model's file: one `read` observed per model load
    assert stages[("lru:1", "read")] == _per(fams["cortexbench_model_loads"], "cortexbench_model_loads_total",
                                             "mode")["lru:1"]
    assert stages[("cached", "infer")] == latency_total(fams, "cached")
    assert {s.labels["worker"] for s in fams["cortexbench_inflight"].samples} == labels
    assert {s.labels["worker"] for s in fams["cortexbench_host_memory_bytes"].samples} == labels
    assert all(s.value > 10e6 for s in fams["cortexbench_host_memory_bytes"].samples)  # an RSS, not a stub
    assert not fams["cortexbench_device_memory_bytes"].samples  # CPU workers have no device memory
    assert {s.labels["host"] for f in fams.values() for s in f.samples} == {"here"}
    assert fams["cortexbench_run_progress_ratio"].samples[0].value == 1.0
    assert {s.labels["phase"] for s in fams["cortexbench_run_phase"].samples if s.value == 1} == {"done"}
    # during each mode: measuring it, progress between the modes' shares, the earlier mode's counts kept
    during = run.live_scrapes  # type: ignore[attr-defined]
    assert set(during) == {"cached", "lru:1"}
    for i, mode in enumerate(("cached", "lru:1")):
        fam = during[mode]
        assert {s.labels["phase"] for s in fam["cortexbench_run_phase"].samples if s.value == 1} == {"measuring"}
        run_ratio = fam["cortexbench_run_progress_ratio"].samples[0].value
        (mode_ratio,) = [s for s in fam["cortexbench_mode_progress_ratio"].samples]
        assert mode_ratio.labels["mode"] == mode and 0 < mode_ratio.value <= 1  # (one fold may hold them all)
        assert run_ratio == pytest.approx((i + mode_ratio.value) / 2)
        seen = _per(fam["cortexbench_images"], "cortexbench_images_total", "mode")
        assert warmup + 20 <= seen[mode] <= run.modes[mode].result.sent
        assert seen.get("lru:1", 0) == (0 if mode == "cached" else seen["lru:1"])


def latency_total(fams: dict[str, Any], mode: str) -> float:
    return sum(_per(fams["cortexbench_image_latency_seconds"], "cortexbench_image_latency_seconds_count", "mode",
                    mode=mode).values())


@pytest.mark.parametrize("drivers", [1, 2], ids=["in-process", "shards"])
def test_stream_run_merges_ledgers_histograms_and_metrics(pool, images, model_dir, drivers):
    server = MetricsServer(0)
    server.start()
    try:
        run = _stream_run(pool, images, model_dir, drivers, server)
        assert set(run.modes) == {"cached", "lru:1"} and not run.interrupted
        for mode, m in run.modes.items():
            res = m.result
            _accounted(res, 160)
            assert res.ledger.workers == tuple(pool.names)
            ok_counted = int(((res.ledger.column("item") >= 10) & res.ledger.ok_mask()).sum())
            assert m.hists.rollup(lambda k: k[:1]).get(("latency",)).count == ok_counted
            s = m.summary["summary"]
            assert s["images_sent"] == s["rows"] == 160 and s["counted_ok"] == ok_counted
            assert set(res.states) == set(pool.names)
            if drivers == 2:  # each shard drove its own worker
                per = np.bincount(res.ledger.column("worker"), minlength=2)
                assert per.min() > 0
            if mode == "cached":
                assert s["hit_ratio"] == 1.0
        _check_metrics(server, run, pool)
    finally:
        server.stop()


def test_workers_that_cannot_set_up_are_freed_with_their_placement_group(ray_session, model_dir):
    """check() fails on a worker (its image does not exist): the error reaches the caller as itself, and
    the actors and the placement group (the CPUs or GPUs it reserved) are given back."""
    from ray.util import placement_group_table

    before = set(placement_group_table())
    specs = [WorkerSpec(name="bad0", device="cpu", backend="mxnet", model_dir=str(model_dir), models=MODELS,
                        images=("/nonexistent/image.jpg",), lanes=1, image_pool=8)]
    with pytest.raises(CortexbenchError, match=r"image\.jpg"):
        cluster.start_workers(specs, gpu=False, cpus_each=0.25, threads_each=1)
    new = {k: v for k, v in placement_group_table().items() if k not in before}
    assert len(new) == 1 and all(v["state"] == "REMOVED" for v in new.values()), new


def test_recovering_a_worker_that_is_dead_for_good_fails_at_once(ray_session):
    import ray

    class Worker:
        def set_mode(self, mode: str) -> None:
            pass

    actor = ray.remote(Worker).options(num_cpus=0, max_restarts=0).remote()
    cluster.get(actor.set_mode.remote("cached"), 60)
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    while True:  # ray.kill returns before the actor is gone (seen on a loaded machine): wait until a call says so
        try:
            ray.get(actor.set_mode.remote("cached"), timeout=10)
        except ray.exceptions.ActorDiedError:
            break
        assert time.monotonic() < deadline, "the killed actor still answers"
    handle = ray_handles.ActorHandle("gone", actor, "cached")

    async def recover() -> None:
        await asyncio.wait_for(handle.recover(), timeout=5.0)

    with pytest.raises(WorkerError):
        asyncio.run(recover())


class InterruptingView(LiveView):
    """A LiveView that presses Ctrl-C (StreamRun.interrupt) once some images are done."""

    run: StreamRun | None = None

    def fold(self, p: Progress, rows: Any = None) -> None:
        super().fold(p, rows)
        if self.done >= 20 and self.run is not None and not self.run.interrupted:
            self.run.interrupt()


@pytest.mark.parametrize("drivers", [1, 2], ids=["in-process", "shards"])
def test_interrupt_stops_the_mode_and_accounts_for_every_image_sent(pool, images, model_dir, drivers):
    cfg = Config(models=MODELS, model_dir=model_dir, times=20_000,
                 stream=StreamConfig(modes=("cached", "cold"), concurrency=4, warmup=0, model_weights=NULL_ONLY))
    live = InterruptingView(MODELS, pool.names, server=None, run_id="test", backend="mxnet", quiet=True)
    run = StreamRun(_plan(cfg, pool, images, drivers), pool, live)
    live.run = run
    asyncio.run(run.run())
    assert run.interrupted and list(run.modes) == ["cached"]
    res = run.modes["cached"].result
    assert res.stopped_early and 20 <= res.sent < 20_000 and res.sent + res.not_sent == 20_000
    res.ledger.check_complete(res.sent)


def test_run_stream_reuses_a_running_ray_and_leaves_it_up(ray_session, pool, model_dir, image_dir, tmp_path):
    import ray

    cfg = Config(models=("null",), model_dir=model_dir, img_dir=image_dir, result_dir=tmp_path, times=40,
                 stream=StreamConfig(modes=("cached",), concurrency=2, warmup=5, cpu_workers=1, metrics_port=0))
    run_dir = run_stream(cfg, quiet=True)
    assert (run_dir / "results.json").is_file()
    assert ray.is_initialized()
    res = _drive(pool, _schedule(10, NULL_ONLY), "cached")  # the shared pool still answers
    _accounted(res, 10)


def _pid(pool: cluster.RayTarget, i: int) -> int:
    return int(cluster.get(cluster.ADAPTER.call(pool.actors[i], "info"), 60)["pid"])


@pytest.mark.parametrize("dispatch", ["grouped", "compiled"])
def test_a_worker_killed_mid_run_is_retried_around_and_comes_back(pool, dispatch):
    old_pid = _pid(pool, 0)
    sched = _schedule(400, NULL_ONLY)
    killed: list[int] = []

    def kill_once(p: Progress) -> None:
        if not killed and p.done >= 40:
            killed.append(p.done)
            pool.kill(0)

    res = _drive(pool, sched, "cached", dispatch=dispatch, concurrency=8, depth=4, on_progress=kill_once)
    assert killed and killed[0] < len(sched)
    counts = _accounted(res, len(sched))
    assert counts["ok"] + counts["worker_died"] == len(sched)
    assert res.worker_losses == {pool.names[0]: 1} and res.retries >= 1  # one death, counted once
    assert counts["ok"] == len(sched)  # two retries are plenty: the other worker takes them
    # Ray restarts it: the handle's recovery waits for that and sets the mode again
    asyncio.run(ray_handles.ActorHandle(pool.names[0], pool.actors[0], "cached").recover())
    new_pid = _pid(pool, 0)
    assert new_pid != old_pid and new_pid != os.getpid()
    res2 = _drive(pool, _schedule(40, NULL_ONLY), "cached")  # the restarted worker works again
    _accounted(res2, 40)
    assert (res2.ledger.column("worker") == 0).any()


def test_the_same_stream_runs_against_the_fake_the_ray_and_the_http_targets(pool, images):
    """One seeded stream through StreamRun against three targets, the coordinator none the wiser: each
    accounts for every image, sends the same items to the same models, and the two real ones (Ray workers,
    a v2 server on loopback) run each image on the same input file."""
    from cortexbench.coordinator import SERVER_PASS
    from cortexbench.http_target import HttpTarget
    from tests.fakes import FakeTarget, FakeWorkerHandle
    from tests.v2_server import V2Server

    cfg = Config(models=MODELS, times=90,
                 stream=StreamConfig(modes=("cached",), concurrency=4, warmup=0, image_pool=8))
    ledgers = {}

    def run_on(name: str, target: Any, modes: tuple[str, ...] = ()) -> None:
        plan = _plan(cfg, pool, images, 1)
        from dataclasses import replace

        plan = replace(plan, modes=modes)
        run = StreamRun(plan, target, LiveView(MODELS, [w.name for w in target.workers], server=None, run_id="t",
                                               backend="x", quiet=True))
        asyncio.run(run.run())
        (only,) = run.modes.values()
        assert only.result.sent == 90 and only.result.ledger.outcome_counts()["ok"] == 90, name
        only.result.ledger.check_complete(only.result.sent)
        ledgers[name] = only.result.ledger

    run_on("fake", FakeTarget({n: FakeWorkerHandle(n, service_s=0.001) for n in ("f0", "f1")}))
    run_on("ray", pool)
    server = V2Server(MODELS)
    with server.running():
        target = HttpTarget(server.url, MODELS, images, image_pool=8)
        target.start()
        run_on("http", target, (SERVER_PASS,))
    order = {k: np.argsort(v.column("item"), kind="stable") for k, v in ledgers.items()}
    cols = {k: {c: v.column(c)[order[k]] for c in ("item", "model_idx", "input_idx")} for k, v in ledgers.items()}
    for k in ("ray", "http"):
        assert np.array_equal(cols[k]["item"], cols["fake"]["item"])
        assert np.array_equal(cols[k]["model_idx"], cols["fake"]["model_idx"])
    assert np.array_equal(cols["ray"]["input_idx"], cols["http"]["input_idx"])


@pytest.mark.slow
def test_a_hung_worker_is_timed_out_replaced_and_its_images_retried(ray_session, model_dir, images):
    """Real workers; the model ``null:8`` holds a worker for 8 s, 4x the 2 s call time-out (its warm-up in each
    set_mode costs those 8 s too, at the start and in every replacement, hence no longer): the
    driver takes the worker as hung, Ray kills and restarts it, and the image is retried once, hangs a
    worker again and then fails as timeout.  Every other image is answered; every image is accounted."""
    models = ("null:0.002", "null:8")
    specs = [WorkerSpec(name=f"hang{i}", device="cpu", backend="mxnet", model_dir=str(model_dir), models=models,
                        images=images, lanes=1, image_pool=8) for i in range(2)]
    target = cluster.start_workers(specs, gpu=False, cpus_each=0.5, threads_each=1)
    try:
        pids = {_pid(target, i) for i in range(2)}
        target.set_mode("cached")
        sched = make_schedule(count=60, models=models, n_images=8, weights=(0.97, 0.03), seed=3)
        slow = int(np.count_nonzero(sched.model_idx == 1))
        assert slow >= 1

        async def main() -> DriverResult:
            handles = target.handles("cached", HandleOptions("grouped", 2))
            opts = DriverOptions(mode="cached", concurrency=2, max_group=1, depth=2, retries=1,
                                 fold_interval_s=0.05, call_timeout_s=2.0)
            return await drive(sched, handles, opts, balancer="least-outstanding", seed=0)

        t0 = time.monotonic()
        res = asyncio.run(main())
        assert time.monotonic() - t0 < 240
        counts = _accounted(res, 60)
        assert counts["timeout"] == slow  # each hung twice (the first try and its one retry)
        assert counts["ok"] + counts.get("worker_died", 0) == 60 - slow
        assert sum(res.worker_hangs.values()) >= 2 * slow - 1
        assert "did not answer within 2 s; retries ran out" in res.error_samples["timeout"]
        for i in range(2):  # a replacement may still be starting when the run ends: wait for it
            asyncio.run(ray_handles.ActorHandle(specs[i].name, target.actors[i], "cached").recover())
        assert {_pid(target, i) for i in range(2)} & pids == set()  # both processes were replaced
    finally:
        target.close()
