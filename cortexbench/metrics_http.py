"""Metrics over HTTP: ``MetricsServer`` serves ``/metrics`` of the latest ``metrics.MetricsState`` (the
stream's driver side), ``RequestCounts`` counts the serving gateway's HTTP requests, and ``exposition``
renders metric families for the gateway's own ``/metrics``.  docs/metrics.md lists every metric.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from cortexbench.errors import ConfigError
from cortexbench.metrics import LE, BucketCounts, MetricsState


class _StateCollector:
    """A prometheus_client Collector rendering whatever state the server holds at scrape time."""

    def __init__(self, server: MetricsServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        yield from self._server.state.families()


class _QuietHandler(WSGIRequestHandler):
    """Serves requests without logging each one to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """Serves ``/metrics`` of the latest ``MetricsState`` on ``host:port`` from a private registry, with
    prometheus_client's threaded WSGI server and exposition (its content negotiation and gzip included)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self._lock = threading.Lock()
        self._state = MetricsState()
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StateCollector(self))  # type: ignore[arg-type]

    @property
    def state(self) -> MetricsState:
        with self._lock:
            return self._state

    def start(self) -> int:
        """Start serving; returns the bound port (an ephemeral one when port is 0)."""
        if self._httpd is not None:
            return int(self._httpd.server_port)
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_cls = type("MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family})
            httpd = make_server(self.host, self.port, make_wsgi_app(self.registry), server_cls,
                                handler_class=_QuietHandler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"metrics port {self.port} is in use; pick another with --metrics-port "
                                  "or 0 to turn metrics off") from None
            raise ConfigError(f"cannot serve metrics on {self.host}:{self.port}: {e.strerror or e}; "
                              "pick another --metrics-port or 0 to turn metrics off") from None
        # A short poll interval so that stop() returns within about 50 ms.
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="cortexbench-metrics", daemon=True)
        thread.start()
        self._httpd, self._thread = httpd, thread
        self.port = int(httpd.server_port)
        return self.port

    def update(self, state: MetricsState, *, copy: bool = True) -> None:
        """Show ``state`` from now on.  By default a copy is kept, so the caller may keep changing its own;
        ``copy=False`` hands the object over (the caller must not change it afterwards)."""
        snapshot = state.copy() if copy else state
        with self._lock:
            self._state = snapshot

    def stop(self) -> None:
        """Stop serving and close the socket (so the port can be bound again); safe to call twice."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# --- the serving gateway (``cortexbench.serve``): requests by route and status code ------------------

GATEWAY_METRIC_NAMES: tuple[str, ...] = (
    "cortexbench_http_requests_total", "cortexbench_http_request_seconds", "cortexbench_http_inflight",
)


@dataclass
class RequestCounts:
    """The gateway's HTTP requests: counts by (method, route template, status code), the time to answer by
    route, and the inference requests in the gateway now.  Updated on the gateway's event loop only."""

    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    seconds: dict[str, BucketCounts] = field(default_factory=dict)
    inflight: int = 0

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        k = (method, route, str(status))
        self.requests[k] = self.requests.get(k, 0) + 1
        h = self.seconds.get(route)
        if h is None:
            h = self.seconds[route] = BucketCounts()
        h.observe(seconds)

    def families(self, host: str) -> list[Metric]:
        total = CounterMetricFamily("cortexbench_http_requests", "HTTP requests answered by the gateway, by "
                                    "method, route and status code", labels=("method", "route", "code", "host"))
        for k, n in sorted(self.requests.items()):
            total.add_metric([*k, host], n)
        hist = HistogramMetricFamily("cortexbench_http_request_seconds", "Time from a request's arrival at the "
                                     "gateway to its answer, by route", labels=("route", "host"))
        for route, h in sorted(self.seconds.items()):
            hist.add_metric([route, host], list(zip(LE, h.cumulative(), strict=True)), h.sum_s)
        inflight = GaugeMetricFamily("cortexbench_http_inflight", "Inference requests in the gateway now",
                                     labels=("host",))
        inflight.add_metric([host], self.inflight)
        return [total, hist, inflight]


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def exposition(families: list[Metric]) -> tuple[bytes, str]:
    """``families`` in Prometheus's text format, and its content type (the gateway's ``/metrics``)."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
