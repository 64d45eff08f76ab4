"""``python -m cortexbench.serve``: cortexbench's Ray workers behind an HTTP gateway (Open Inference Protocol v2).

Starts the same workers as the stream (one per GPU with ``--gpus N``, else CPU workers), sets their
residency mode (``--mode cached|swap|cold|lru:K``), and serves them with FastAPI under uvicorn (uvloop and
httptools when installed) until SIGTERM or Ctrl-C.  The endpoints, the limits and the errors:
``cortexbench.gateway.app`` and docs/http-api.md.

Safe by default: it listens on 127.0.0.1; a ``--host`` that is not a loopback address needs a bearer token
(``--token`` or ``CORTEXBENCH_TOKEN``) or ``--insecure``.  With a token, every inference call needs
``Authorization: Bearer <token>``.  SIGTERM stops accepting, lets the requests in flight finish within
``serve.drain_timeout_s``, and exits 0 with a last line counting the requests accepted and answered.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from cortexbench import machine
from cortexbench.cli import (
    COMMON_KEYS,
    TOKEN_ENV,
    ArgumentParser,
    add_common_flags,
    asks_for_gpus,
    flags_of,
    overrides_from,
    run_main,
)
from cortexbench.config import Config, load_config
from cortexbench.errors import ConfigError, UsageError

INLINE_BYTES = 4 << 20  # Ray's inline argument limit for the workers this command starts (default 100 KB)

PROG = "python -m cortexbench.serve"
SERVE_KEYS = {
    **COMMON_KEYS, "gpus": "gpu_num", "cpu_workers": "stream.cpu_workers", "lanes": "stream.lanes",
    "image_pool": "stream.image_pool", "mode": "serve.mode", "host": "serve.host", "port": "serve.port",
    "balancer": "serve.balancer", "max_inflight": "serve.max_inflight", "max_body_bytes": "serve.max_body_bytes",
    "call_timeout": "serve.call_timeout_s", "drain_timeout": "serve.drain_timeout_s", "channel": "serve.channel",
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve cortexbench's workers (one per GPU, or CPU workers) over HTTP: the Open Inference "
                    "Protocol (v2), /v1/models/NAME:predict for JPEG/PNG bodies, /metrics.",
        epilog=f"examples:\n  {PROG} --gpus 8 --mode cached --port 8080\n  {PROG} --models null --port 0\n"
               f"  CORTEXBENCH_TOKEN=secret {PROG} --host 0.0.0.0 --mode lru:2\n  {PROG} --models null --gateways 2")
    add_common_flags(p)
    a = p.add_argument
    a("--gpus", metavar="N", help="GPU workers, one per GPU; auto = every GPU; 0 = CPU workers [gpu_num]")
    a("--cpu-workers", type=int, metavar="N", help="CPU workers when there is no GPU [stream.cpu_workers]")
    a("--lanes", type=int, metavar="N", help="images in flight inside a worker; 0 = auto [stream.lanes]")
    a("--image-pool", type=int, metavar="N", help="decoded warm-up inputs per worker [stream.image_pool]")
    a("--mode", metavar="M", help="cached, swap, cold or lru:K [serve.mode]")
    a("--host", metavar="ADDR", help="address to listen on (default 127.0.0.1) [serve.host]")
    a("--port", type=int, metavar="PORT", help="port to listen on; 0 = any free port [serve.port]")
    a("--balancer", metavar="B", help="round-robin, least-outstanding, p2c, affinity [serve.balancer]")
    a("--max-inflight", type=int, metavar="N", help="inference requests at once; more get 503 [serve.max_inflight]")
    a("--max-body-bytes", type=int, metavar="N", help="larger bodies get 413 [serve.max_body_bytes]")
    a("--call-timeout", type=float, metavar="S", help="a worker call not answered by then: 503 [serve.call_timeout_s]")
    a("--drain-timeout", type=float, metavar="S", help="on SIGTERM, time for in-flight requests [serve.drain_timeout_s]")
    a("--channel", metavar="C", help="to a worker on this machine: socket (a Unix socket into its process) or ray "
                                     "(a Ray actor call) [serve.channel]")
    a("--gateways", type=int, default=1, metavar="N",
      help="gateway processes sharing the port (SO_REUSEPORT), each with its own /metrics port (default 1)")
    a("--token", metavar="T", help=f"bearer token required on inference calls (or ${TOKEN_ENV})")
    a("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """A gateway reachable from other machines needs a token, unless ``--insecure`` says otherwise."""
    if not is_loopback(host) and not token and not insecure:
        raise UsageError(f"--host {host} opens the gateway to other machines: give --token T (or ${TOKEN_ENV}), "
                         "or --insecure to serve without one")


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound before anything starts (a port in use fails in a second); with
    ``reuse_port``, SO_REUSEPORT: several processes' sockets share the port (``--gateways N``)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port}: the port is in use on {host}; pick another (0 = any free port)") from None
        raise ConfigError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def slot_prefix() -> str:
    """The shared-memory slots' name prefix of this serve process's gateways (``gateway/shm.py``)."""
    return f"cortexbench-gw-{os.getpid()}"


def build_gateway(target: Any, cfg: Config, models: Sequence[Any], host_label: str, prefix: str) -> Any:
    """The ``Gateway`` over ``target``'s workers; requests for workers on this process's machine travel in
    shared memory (``gateway/shm.py``, one slot per request in flight) and, with ``serve.channel`` socket,
    over the worker's direct channel (``gateway/channel.py``) rather than a Ray actor call."""
    import numpy as np

    from cortexbench import cluster
    from cortexbench.gateway.pool import Gateway, RayCaller
    from cortexbench.gateway.shm import SharedSlots
    from cortexbench.protocol import tensor_request_size

    sv = cfg.serve
    here = cluster.node_id()
    slots = SharedSlots(max(tensor_request_size(np.empty((1, *m.input_shape), np.float32)) for m in models),
                        sv.max_inflight, prefix)
    caller = RayCaller(target, sv.mode, slots, [n == here for n in target.node_ids], channel=sv.channel == "socket")
    gateway = Gateway(caller, models, mode=sv.mode, balancer=sv.balancer, max_inflight=sv.max_inflight,
                      call_timeout_s=sv.call_timeout_s, seed=cfg.seed, host=host_label)
    gateway.ready = True
    return gateway


def make_server(gateway: Any, cfg: Config, token: str | None, platform: str) -> Any:
    """The gateway's app under a uvicorn server (uvloop and httptools when installed)."""
    import uvicorn

    from cortexbench.gateway.app import make_app

    sv = cfg.serve
    app = make_app(gateway, token=token, max_body_bytes=sv.max_body_bytes, retry_after_s=sv.retry_after_s,
                   platform=platform)
    config = uvicorn.Config(app, loop="uvloop" if _installed("uvloop") else "asyncio",
                            http="httptools" if _installed("httptools") else "h11", lifespan="off",
                            log_level="warning", access_log=False, timeout_graceful_shutdown=sv.drain_timeout_s)
    return uvicorn.Server(config)


def stop_counts(gateway: Any) -> tuple[int, int, int]:
    """Requests accepted, answered whole, and inferences answered 200."""
    ok = sum(n for (method, route, code), n in gateway.requests.requests.items() if method == "POST" and code == "200")
    return gateway.accepted, gateway.answered, ok


class GatewayReplica:
    """One gateway process of ``--gateways N``: a Ray actor on the serving machine (``cluster.start_gateways``)
    with its own ``Gateway`` over the same workers, serving on the shared port (SO_REUSEPORT: the kernel
    spreads connections over the replicas) and on a port of its own (its /metrics), uvicorn on a thread."""

    def __init__(self, index: int, target: Any, cfg: Config, models: Sequence[Any], token: str | None,
                 platform: str, prefix: str) -> None:
        self.gateway = build_gateway(target, cfg, models, f"{socket.gethostname()}/gw{index}", prefix)
        self.server = make_server(self.gateway, cfg, token, platform)
        self.host = cfg.serve.host
        self._thread: threading.Thread | None = None

    def start(self, port: int) -> int:
        """Listen on the shared ``port`` and on a port of this replica's own (returned); serve on a thread.
        Both sockets listen before this returns: a connection that comes early waits in the backlog."""
        shared = bind(self.host, port, reuse_port=True)
        own = bind(self.host, 0)
        for sock in (shared, own):
            sock.listen(2048)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [shared, own]},
                                        name="gateway", daemon=True)
        self._thread.start()
        return int(own.getsockname()[1])

    def stop(self) -> tuple[int, int, int]:
        """Stop accepting, let the requests in flight finish (``serve.drain_timeout_s``); the counts."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.gateway.caller.close()
        return stop_counts(self.gateway)


def serve(cfg: Config, *, token: str | None, gateways: int = 1, quiet: bool = False) -> int:
    """Start the workers, serve until SIGTERM or Ctrl-C, stop them; returns the exit code (0).  With
    ``gateways`` > 1, that many ``GatewayReplica`` processes share the port."""
    from cortexbench import cluster
    from cortexbench.coordinator import _check_gpus, _local_resources, plan_stream
    from cortexbench.gateway.v2 import ModelInfo
    from cortexbench.models.registry import get_spec

    sv = cfg.serve
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    sock = bind(sv.host, sv.port, reuse_port=gateways > 1)  # with replicas: holds the port, never listens
    own_ray = not cluster.ray_running()
    target: Any = None
    gateway: Any = None
    replicas: list[Any] = []
    try:
        plan = plan_stream(cfg, _local_resources(), quiet=quiet)
        if own_ray:
            # A request's tensor travels to its worker with the call (gRPC) rather than through the object
            # store up to this size (workers on another machine: on this one it goes through shared memory)
            os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))
        _check_gpus(plan, cluster.init_ray(None, os.cpu_count()))
        where = f"{len(plan.workers)} {'GPU' if plan.gpu else 'CPU'} worker(s)"
        say(f"serve: starting {where}, backend {plan.backend}, models {', '.join(plan.models)} ...")
        target = cluster.start_workers(plan.workers, gpu=plan.gpu, cpus_each=plan.cpus_each,
                                       threads_each=plan.threads_each)
        target.set_mode(sv.mode)
        models = [ModelInfo(name, i, tuple(get_spec(name).input_shape), get_spec(name).num_classes)
                  for i, name in enumerate(plan.models)]
        platform = f"cortexbench_{plan.backend}"
        stopped: list[str] = []
        host, port = sock.getsockname()[:2]
        fast = "uvloop+httptools" if _installed("uvloop") and _installed("httptools") else "asyncio+h11"
        fast += "; workers here over a Unix socket" if sv.channel == "socket" else "; workers over Ray actor calls"
        tokens = "token required on inference calls" if token else "no token"
        if gateways > 1:
            replicas = cluster.start_gateways(GatewayReplica, gateways, target, cfg, models, token, platform,
                                              slot_prefix())
            own_ports = cluster.get([cluster.ADAPTER.call(r, "start", port) for r in replicas], 120)
            metrics = ", ".join(f"http://{_url_host(host)}:{p}/metrics" for p in own_ports)
            say(f"serve: {where}, mode {sv.mode}, on http://{_url_host(host)}:{port} through {gateways} gateway "
                f"processes ({tokens}; {fast}); each gateway's metrics: {metrics}")
            done = threading.Event()

            def on_signal(sig: int, frame: Any) -> None:
                stopped.append(signal.Signals(sig).name)
                done.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            done.wait()
            counts = cluster.settle([cluster.ADAPTER.call(r, "stop") for r in replicas], sv.drain_timeout_s + 60)
            for k, c in enumerate(counts):
                if isinstance(c, BaseException):
                    say(f"serve: gateway {k} did not stop cleanly: {type(c).__name__}: {str(c).strip()[:200]}")
            accepted, answered, ok = (sum(c[k] for c in counts if isinstance(c, tuple)) for k in range(3))
            if stopped == ["SIGINT"]:
                _stop_line(stopped, accepted, answered, ok)
                raise KeyboardInterrupt
        else:
            gateway = build_gateway(target, cfg, models, socket.gethostname(), slot_prefix())
            server = make_server(gateway, cfg, token, platform)
            # uvicorn re-raises the signal it shut down for once it is done, through the handler it found:
            # this one, so that SIGTERM ends in a clean exit 0 (Ctrl-C keeps Python's KeyboardInterrupt: 130)
            signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append("SIGTERM"))
            say(f"serve: {where}, mode {sv.mode}, on http://{_url_host(host)}:{port} ({tokens}; {fast})")
            server.run(sockets=[sock])  # its loop ends with any recovery still running
            accepted, answered, ok = stop_counts(gateway)
        _stop_line(stopped, accepted, answered, ok)
        return 0
    finally:
        sock.close()
        if gateway is not None:
            gateway.caller.close()
        cluster.drop_actors(replicas)
        if replicas:
            from cortexbench.gateway.shm import remove_slots

            remove_slots(slot_prefix())  # a gateway killed before it closed its slots leaves them behind
        if target is not None:
            target.close()
        if own_ray:
            cluster.shutdown_ray()


def _stop_line(stopped: list[str], accepted: int, answered: int, ok: int) -> None:
    print(f"serve: stopped{' on ' + stopped[0] if stopped else ''}: {accepted} requests accepted, "
          f"{answered} answered, {accepted - answered} not answered; {ok} inferences answered 200",
          file=sys.stderr, flush=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        overrides = overrides_from(args, SERVE_KEYS)
        no_gpu = not machine.gpus() and not asks_for_gpus(args.gpus)
        cfg = load_config(args.config, overrides, has_gpu=not no_gpu, flags=flags_of(SERVE_KEYS))
        token = args.token or os.environ.get(TOKEN_ENV) or None
        check_exposure(cfg.serve.host, token, args.insecure)
        if args.gateways < 1:
            raise UsageError(f"--gateways must be 1 or more, not {args.gateways}")
        if cfg.stream.engine != "backend":
            raise ConfigError(f"stream.engine is '{cfg.stream.engine}' in {cfg.path or 'the config'}: engines apply to "
                              "python -m cortexbench.stream; serve runs the backend's own path (set it to "
                              "'backend' or use another config)")
        return serve(cfg, token=token, gateways=args.gateways, quiet=args.quiet)

    return run_main(body, PROG)


if __name__ == "__main__":
    sys.exit(main())
