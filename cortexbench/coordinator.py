"""The stream run from start to end: plan the workers, run each mode, merge, write the results.

``run_stream(cfg)`` is what ``python -m cortexbench.stream`` does after parsing its flags:

1. join or start Ray; one worker per GPU (``gpu_num``), else CPU workers (``stream.cpu_workers``);
2. make missing model files and, for the embedded default, a small synthetic image set;
3. one seeded schedule, replayed for every mode (``stream.modes``);
4. per mode: set the workers' residency, drive the schedule (in this process, or through ``--drivers N``
   shard actors), fold progress into the live line and the Prometheus metrics;
5. merge shards' ledgers and histograms, summarise, write ``result_dir/<run-id>/``.

Ctrl-C stops dispatching, drains in-flight images for ``stream.drain_timeout_s``, writes the partial
results (``complete: false``) and exits 130 with a one-line summary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortexbench import cli
from cortexbench.config import Config
from cortexbench.driver import Driver, drive
from cortexbench.driver_types import DriverOptions, DriverResult, merge_results
from cortexbench.errors import Interrupted, Terminated, WorkerError
from cortexbench.live import LiveView
from cortexbench.metrics import MetricsState
from cortexbench.metrics_http import MetricsServer
from cortexbench.models.backends import get_backend
from cortexbench.report import stream_report
from cortexbench.report.stream_summary import histograms, summarize_mode
from cortexbench.results import new_run_dir
from cortexbench.schedule import Schedule, shard_workers
from cortexbench.stats import HistogramSet
from cortexbench.stream_plan import (  # SERVER_PASS, call_depth, check_precision: the plan's names, as before
    SERVER_PASS,  # noqa: F401
    StreamPlan,
    _check_gpus,
    _local_resources,
    call_depth,  # noqa: F401
    check_precision,  # noqa: F401
    mode_of,
    plan_http,
    plan_stream,
)
from cortexbench.stream_results import make_results, write_results
from cortexbench.target import HandleOptions, ShardJob, Target, worker_labels, worker_names


@dataclass
class ModeRun:
    result: DriverResult
    hists: HistogramSet
    summary: dict[str, Any]


class StreamRun:
    """Runs every mode of a plan on a target; keeps what was measured for the results."""

    def __init__(self, plan: StreamPlan, target: Target, live: LiveView) -> None:
        self.plan = plan
        self.target = target
        self.live = live
        self.modes: dict[str, ModeRun] = {}
        self.interrupted = False
        self.terminated = False  # the interruption was a SIGTERM
        self.error: str | None = None  # why the run could not go on (every worker gone), if so
        self._stop_current: Any = None
        self.setup_s: dict[str, list[dict[str, float]]] = {}

    def options(self, mode: str, shards: int, index: int = 0) -> DriverOptions:
        """Driver ``index`` of ``shards``: the closed loop's images in flight shared out, sizes differing by
        one at most (at least one each)."""
        st = self.plan.cfg.stream
        conc = None if st.rate is not None else \
            max(1, st.concurrency // shards + (1 if index < st.concurrency % shards else 0))
        return DriverOptions(mode=mode, concurrency=conc, max_group=self.plan.max_group, depth=self.plan.depth,
                             retries=st.retries, duration_s=st.duration_s, drain_timeout_s=st.drain_timeout_s,
                             call_timeout_s=st.image_timeout_s)

    def interrupt(self, terminated: bool = False) -> None:
        self.interrupted = True
        self.terminated = self.terminated or terminated
        if self._stop_current is not None:
            self._stop_current()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests): interrupt() is called directly
        try:
            await self.run_passes()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            _set_sigterm(signal.SIG_IGN)  # the loop's removal left the default: writing the results is not killed

    async def run_passes(self) -> None:
        """Every pass of the plan, one after another (``peak.PeakRun`` searches a rate for each instead)."""
        for mode in self.plan.run_modes:
            if self.interrupted or self.error:
                break
            await self.run_mode(mode)

    def _on_sigint(self) -> None:
        print("\nstopping: draining in-flight images (Ctrl-C again to abort at once)", file=sys.stderr)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        self.interrupt()

    def _on_sigterm(self) -> None:
        print("\nstopping (SIGTERM): draining in-flight images", file=sys.stderr)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: drain and write, then exit 143
        self.interrupt(terminated=True)

    async def run_mode(self, mode: str) -> None:
        plan = self.plan
        sched = self.schedule_of(mode)
        self.live.start_mode(mode, len(sched), sched.warmup)
        loop = asyncio.get_running_loop()
        self.setup_s[mode] = await loop.run_in_executor(None, self.target.set_mode, mode)
        if self.interrupted:  # Ctrl-C while the workers were setting up: the mode is not run at all
            self.live.close_mode()
            return
        kind = mode_of(mode)
        if kind is not None and kind.kind == "cached":  # set_mode loaded every model on every worker
            self.live.add_preload(len(plan.models))
        self.live.sending()
        lru = (kind.capacity if kind is not None else 0) or None
        if plan.drivers <= 1 or not self.target.shards_supported:
            handles = self.target.handles(mode, self.handle_options(mode, 1))
            result = await drive(sched, handles, self.options(mode, 1), balancer=plan.cfg.stream.balancer,
                                 seed=plan.cfg.seed, lru_capacity=lru, on_progress=self.live.fold,
                                 on_driver=self._set_driver)
        else:
            result = await self._run_shards(mode, lru, sched)
        hists = histograms(result.ledger, sched.warmup)
        self.live.close_mode()
        summary = summarize_mode(mode, result.ledger, hists, warmup=sched.warmup, sent=result.sent,
                                 not_sent=result.not_sent, retries=result.retries, cancelled=result.cancelled,
                                 duration_s=plan.cfg.stream.duration_s,
                                 worker_states={k: vars(v) for k, v in result.states.items()})
        summary["setup_s"] = self.setup_s.get(mode)
        summary["worker_losses"] = result.worker_losses
        summary["worker_hangs"] = result.worker_hangs
        summary["worker_outages"] = [{"worker": n, "lost_at_s": t, "back_after_s": b} for n, t, b in result.outages]
        summary["error"] = result.error
        summary["error_samples"] = result.error_samples
        result.ledger.check_complete(result.sent)
        self.modes[mode] = ModeRun(result, hists, summary)
        if result.error:
            self.error = f"mode {mode}: {result.error}"

    def handle_options(self, mode: str, shards: int) -> HandleOptions:
        return HandleOptions(self.plan.dispatch, self.plan.depth,
                             one_at_a_time=self.options(mode, shards).concurrency == 1)

    def _set_driver(self, driver: Driver | None) -> None:
        self._stop_current = driver.stop if driver is not None else None

    def schedule_of(self, mode: str) -> Schedule:
        """The stream of ``mode``: the whole schedule, or its head in the modes that load on demand when
        ``stream.on_demand_images`` says so (the same seeded stream, shorter)."""
        n = self.plan.cfg.stream.on_demand_images
        kind = mode_of(mode)
        if n and kind is not None and kind.kind != "cached":
            return self.plan.schedule.head(n)
        return self.plan.schedule

    async def _run_shards(self, mode: str, lru: int | None, sched: Schedule) -> DriverResult:
        """The mode on ``plan.drivers`` driver shards run by the target next to their workers; their ledgers
        merged into one result."""
        plan = self.plan
        n = plan.drivers
        workers = self.target.workers
        if len(workers) >= n:  # each shard's workers together, the shard on their node
            parts = shard_workers([w.node_id for w in workers], n)
        else:  # fewer workers than shards (an HTTP target's one server): every shard sends to all of them
            parts = [(tuple(range(len(workers))), "")] * n
        start_wall = time.time() + 1.0
        jobs = [ShardJob(sched.shard(i, n), ids, node, self.options(mode, n, i), self.handle_options(mode, n),
                         plan.cfg.stream.balancer, plan.cfg.seed + i, lru, start_wall)
                for i, (ids, node) in enumerate(parts)]
        self._stop_current = self.target.stop_shards
        try:
            results = await self.target.run_shards(jobs, self.live.fold, lambda: self.interrupted)
        finally:
            self._stop_current = None
        return merge_results(results)


def run_stream(cfg: Config, *, quiet: bool = False, argv: list[str] | None = None) -> Path:
    """Run the stream test as configured; return the run directory.

    A Ray already initialised in this process (a test's, a notebook's) is used as it is and left running;
    a Ray this call starts is shut down at the end.  A local run (no ``stream.address``) is planned before
    Ray starts, so that bad input (a device, an image set, a model) fails in a second, not after Ray's start.
    """
    started = time.time()
    http = cfg.stream.target is not None
    cluster: Any = None
    if not http:  # the HTTP target does not import Ray
        from cortexbench import cluster
    own_ray = not http and not cluster.ray_running()
    target: Target | None = None
    server: MetricsServer | None = None
    run_dir: Path | None = None
    host = socket.gethostname()
    # SIGTERM (timeout, systemd, Kubernetes) is Ctrl-C's twin: while starting it stops the start cleanly;
    # during the run the event loop's handler drains and writes partial results (StreamRun.run)
    prev_sigterm = _set_sigterm(_raise_terminated)
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))
    say(cfg.describe())
    try:
        # Metrics first, so that a dashboard shows the run (phase "preparing") from its first second, and a
        # port in use stops the run before anything starts.
        server = MetricsServer(cfg.stream.metrics_port, cfg.stream.metrics_host) if cfg.stream.metrics_port else None
        port = server.start() if server is not None else None
        if server is not None:
            server.update(MetricsState(host=host, phase="preparing"), copy=False)
            say(f"metrics on {server.url}")
        if http:
            plan = plan_http(cfg, quiet=quiet)
        elif own_ray and not cfg.stream.address:
            plan = plan_stream(cfg, _local_resources(), quiet=quiet)
            resources = cluster.init_ray(None, os.cpu_count())
            _set_sigterm(_raise_terminated)  # over the handler Ray's core installs (it dumps native stacks)
            _check_gpus(plan, resources)
        else:
            resources = cluster.init_ray(cfg.stream.address, None if cfg.stream.address else os.cpu_count())
            _set_sigterm(_raise_terminated)
            plan = plan_stream(cfg, resources, quiet=quiet)
        run_dir = new_run_dir(cfg.result_dir, "stream")
        where = f"the server at {cfg.stream.target}" if http else \
            f"{len(plan.workers)} {'GPU' if plan.gpu else 'CPU'} worker(s)"
        od = cfg.stream.on_demand_images
        also = f"; {od} counted in the modes that load on demand" if od and od < cfg.times else ""
        say(f"stream: {len(plan.schedule)} images ({plan.schedule.warmup} warm-up{also}), {len(plan.models)} models, "
            f"{where}, backend {plan.backend}, dispatch {plan.dispatch}, drivers {plan.drivers}"
            + ("" if http or cfg.stream.inputs == "pool" else
               f", inputs jpeg (every image read and decoded, on the {cfg.stream.decode.upper()})"))
        if http:
            from cortexbench.http_target import HttpTarget

            st = cfg.stream
            target = HttpTarget(st.target or "", plan.models, plan.images, protocol=st.protocol,
                                image_pool=st.image_pool, input_name=st.input_name, input_shape=st.input_shape,
                                client=st.http_client, token=os.environ.get(cli.TOKEN_ENV) or None, say=say)
            say(f"waiting for {where} to be ready, reading its models' metadata ...")
            target.start()
        else:
            say(f"starting {where} (loading frameworks) ...")
            target = cluster.start_workers(plan.workers, gpu=plan.gpu, cpus_each=plan.cpus_each,
                                           threads_each=plan.threads_each)
        live = LiveView(plan.models, worker_names(target), server=server, run_id=run_dir.name, backend=plan.backend,
                        quiet=quiet, host=host, worker_labels=worker_labels(target.workers, host),
                        modes=len(plan.run_modes))
        if cfg.stream.find_peak:
            from cortexbench.peak import PeakRun

            run: StreamRun = PeakRun(plan, target, live, say=say)
        elif cfg.stream.sweep and not cfg.stream.sweep.strip().lower().startswith("lru"):
            from cortexbench.load_sweep import LoadSweepRun

            run = LoadSweepRun(plan, target, live)
        else:
            run = StreamRun(plan, target, live)
        try:
            asyncio.run(run.run())
        except KeyboardInterrupt:
            run.interrupted = True
        finally:
            live.finish()
        results = make_results(run.plan, target, run, port, started, argv)
        write_results(run_dir, results, run)
        # --quiet drops the progress only: the summary and where the results went are always printed.
        print(stream_report.console_summary(results))
        if "peak" in results:
            from cortexbench.report import peak_report

            print(peak_report.console(results["peak"]))
        if "cost" in results:
            from cortexbench.report.peak_report import cost_lines

            print("\n".join(cost_lines(results["cost"])))
        if "sweep" in results:
            from cortexbench import sweep

            print(sweep.console(results["sweep"]))
        print(f"results: {run_dir}")
        if not quiet and not http and not plan.gpu and cfg.from_flag("models") is False \
                and cfg.source("times") != "flag":
            print("this was the small CPU run; scale up on a GPU machine or a Ray cluster with e.g.: "
                  "python -m cortexbench.stream --gpus 8 --models imagenet --images 100000 "
                  "--mode cached,swap,cold,lru:2 (add --address auto to join a cluster)")
        if server is not None and cfg.stream.linger_s > 0 and not run.interrupted and not run.error:
            if _linger(cfg.stream.linger_s, say,
                       f"metrics stay up for {cfg.stream.linger_s:g} s (--linger; Ctrl-C or SIGTERM ends it)"):
                say("linger ended early; the results are complete")
        if run.error and not run.interrupted:
            raise WorkerError(f"{run.error}; partial results in {run_dir}")
        if run.interrupted:
            done = sum(m.result.sent for m in run.modes.values())
            if run.terminated:
                raise Terminated(f"terminated (SIGTERM): {done} images sent and accounted for; partial results in "
                                 f"{run_dir}")
            raise Interrupted(f"interrupted: {done} images sent and accounted for; partial results in {run_dir}")
        return run_dir
    finally:
        if server is not None:
            server.stop()
        if target is not None:
            target.close()
        if own_ray:
            cluster.shutdown_ray()
        if run_dir is not None and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that could not start leaves no empty folder behind
        if prev_sigterm is not None:
            _set_sigterm(prev_sigterm)


class _LingerOver(Exception):
    """SIGTERM during --linger."""


def _end_linger(signum: int, frame: object) -> None:
    raise _LingerOver


def _linger(seconds: float, say: Callable[[str], None], announce: str) -> bool:
    """Keep the metrics endpoint up for ``seconds`` after a finished run; Ctrl-C or SIGTERM (Kubernetes
    ending the pod) ends the wait and the command exits 0: the results are written and complete.
    ``announce`` is said only once the handler is in place, so a SIGTERM sent on seeing it is never lost.
    Whether it ended early."""
    old = _set_sigterm(_end_linger)
    try:
        say(announce)
        time.sleep(seconds)
        return False
    except (_LingerOver, KeyboardInterrupt):
        return True
    finally:
        _set_sigterm(old if old is not None else signal.SIG_IGN)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated("terminated (SIGTERM) while starting; nothing was measured")


def _set_sigterm(handler: Any) -> Any:
    """Set SIGTERM's handler (the main thread only; elsewhere, as in tests, nothing); returns the old one."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def backend_devices(name: str) -> list[str]:
    return get_backend(name).devices()
