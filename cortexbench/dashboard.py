"""``python -m cortexbench.dashboard``: the Grafana dashboard, built with Grafana's own Python types.

The panels are plain data here (``ROWS``: rows of ``PanelSpec``, each with its PromQL ``Query``'s);
``build`` turns them into a dashboard with ``grafana-foundation-sdk``'s builders (the ``dashboards``
extra) and ``render`` into the JSON that deploy/grafana/cortexbench-dashboard.json holds::

    python -m cortexbench.dashboard            # (re)write deploy/grafana/cortexbench-dashboard.json
    python -m cortexbench.dashboard --check    # exit 1 when the committed file differs from what is built

Every ``cortexbench_*`` selector filters on the dashboard's ``host`` variable, and every per-image one on
``phase="measured"`` (what the report counts).  Ray's node metrics (``ray_node_*``, from Ray's own metrics
agent: see deploy/prometheus.yml) carry no ``host`` label and are not filtered.  docs/metrics.md lists the
panels.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortexbench import cli
from cortexbench.errors import CortexbenchError, UsageError
from cortexbench.results import write_text

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "cortexbench-dashboard.json"
UID = "cortexbench-stream"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel; ``instant`` for a value now (tables, whole-run figures)."""

    expr: str
    legend: str = "__auto"
    instant: bool = False


@dataclass(frozen=True)
class PanelSpec:
    """One panel: ``kind`` is timeseries, table, stat or gauge; ``unit`` a Grafana unit id; ``hide``: a
    table's columns left out (besides Time, __name__ and host)."""

    kind: str
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    width: int = 12
    height: int = 9
    hide: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowSpec:
    title: str
    panels: tuple[PanelSpec, ...]


def sel(metric: str, *matchers: str, measured: bool = False) -> str:
    """``metric{matchers..., phase="measured", host=~"$host"}``."""
    labels = [*matchers, *(['phase="measured"'] if measured else []), 'host=~"$host"']
    return f"{metric}{{{', '.join(labels)}}}"


def rate(selector: str) -> str:
    return f"rate({selector}[$__rate_interval])"


def _quantile(q: float, by: str, buckets: str) -> str:
    return f"histogram_quantile({q:g}, sum by ({by}) ({buckets}))"


_LAT = "cortexbench_image_latency_seconds_bucket"
_STAGE = "cortexbench_stage_seconds"
_IMAGES = "cortexbench_images_total"
_OK, _FAILED = 'outcome="ok"', 'outcome!="ok"'
_CACHED_P50 = _quantile(0.5, "le", sel(_LAT, 'mode="cached"', measured=True))


def _tiers_against_cached() -> str:
    every = _quantile(0.5, "le, mode", sel(_LAT, 'mode!="cached"', measured=True))
    return f"{every} / ignoring(mode) group_left {_CACHED_P50}"


ROWS: tuple[RowSpec, ...] = (
    RowSpec("Run", (
        PanelSpec("table", "Run", "The run being served: its id, the residency mode being run now, and the backend.",
                  "none", (Query(sel("cortexbench_run_info"), instant=True),), width=10, height=4, hide=("Value",)),
        PanelSpec("gauge", "Progress", "Fraction of the run's images done over all modes (run), and of the mode "
                  "being run.", "percentunit",
                  (Query(sel("cortexbench_run_progress_ratio"), "run"),
                   Query(sel("cortexbench_mode_progress_ratio"), "{{mode}}")), width=4, height=4),
        PanelSpec("stat", "Phase", "What the run is doing: preparing, warmup, measuring or done.", "none",
                  (Query(f"{sel('cortexbench_run_phase')} == 1", "{{phase}}", instant=True),), width=3, height=4),
        PanelSpec("stat", "Each tier / cached, p50 (whole run)",
                  "Median latency of each residency tier (swap, cold, lru:K) over cached's, from the cumulative "
                  "buckets: the modes run one after another, so a short window only ever holds one.", "x",
                  (Query(_tiers_against_cached(), "{{mode}} / cached"),), width=7, height=4),
    )),
    RowSpec("Throughput and latency by tier", (
        PanelSpec("timeseries", "Images/s by tier", "Successful images per second by mode (cached, swap, cold, "
                  "lru:K); failures per second by mode and kind.", "reqps",
                  (Query(f"sum by (mode) ({rate(sel(_IMAGES, _OK, measured=True))})", "{{mode}}"),
                   Query(f"sum by (mode, outcome) ({rate(sel(_IMAGES, _FAILED, measured=True))})",
                         "{{mode}} {{outcome}}"))),
        PanelSpec("timeseries", "Latency p50 / p99 by tier", "Per-image latency from scheduled send to result.", "s",
                  tuple(Query(_quantile(q, "le, mode", rate(sel(_LAT, measured=True))), f"p{q * 100:g} {{{{mode}}}}")
                        for q in (0.5, 0.99))),
        PanelSpec("table", "Latency by tier (whole run)", "p50 and p99 of each tier over the run so far, from the "
                  "cumulative buckets.", "s",
                  tuple(Query(_quantile(q, "le, mode", sel(_LAT, measured=True)), f"p{q * 100:g}", instant=True)
                        for q in (0.5, 0.99)), height=8),
        PanelSpec("table", "Latency p99 by tier and model (whole run)", "p99 of each (tier, model) over the run.", "s",
                  (Query(_quantile(0.99, "le, mode, model", sel(_LAT, measured=True)), instant=True),), height=8),
    )),
    RowSpec("Stages", (
        PanelSpec("timeseries", "Stage breakdown (mean seconds per image)", "Mean seconds per finished image spent "
                  "in each stage; stacked, about the mean latency (docs/metrics.md, Stages).", "s",
                  (Query(f"sum by (stage) ({rate(sel(_STAGE + '_sum', measured=True))}) / "
                         f"scalar(sum({rate(sel(_IMAGES, measured=True))}))", "{{stage}}"),), width=8),
        PanelSpec("timeseries", "Stage p99", "p99 of each stage over the images that went through it.", "s",
                  (Query(_quantile(0.99, "le, stage", rate(sel(_STAGE + "_bucket", measured=True))), "{{stage}}"),),
                  width=8),
        PanelSpec("table", "Mean stage time by tier (whole run)", "Mean seconds of each stage in each tier, over "
                  "the images that went through it: where swap's copy and cold's read go.", "s",
                  (Query(f"sum by (mode, stage) ({sel(_STAGE + '_sum', measured=True)}) / "
                         f"sum by (mode, stage) ({sel(_STAGE + '_count', measured=True)})", instant=True),),
                  width=8),
    )),
    RowSpec("Workers", (
        PanelSpec("timeseries", "Images/s per worker", "Images finished per second by each worker.", "reqps",
                  (Query(f"sum by (worker) ({rate(sel(_IMAGES, measured=True))})", "{{worker}}"),), width=8),
        PanelSpec("timeseries", "In flight per worker", "Images sent to the worker and not yet answered.", "short",
                  (Query(f"sum by (worker) ({sel('cortexbench_inflight')})", "{{worker}}"),), width=8),
        PanelSpec("timeseries", "Cache hit ratio per worker", "Share of the worker's images whose model was "
                  "resident.", "percentunit",
                  (Query(f"sum by (worker) ({rate(sel('cortexbench_cache_hits_total', measured=True))}) / "
                         f"sum by (worker) ({rate(sel(_IMAGES, measured=True))})", "{{worker}}"),), width=8),
        PanelSpec("timeseries", "Model loads/s per worker", "Models loaded onto each worker per second (every cold "
                  "and swap image, lru:K misses, cached mode's preload).", "ops",
                  (Query(f"sum by (worker) ({rate(sel('cortexbench_model_loads_total'))})", "{{worker}}"),)),
        PanelSpec("timeseries", "Device and host memory per worker", "GPU memory (GPU workers) and resident host "
                  "memory of each worker's process.", "bytes",
                  (Query(f"sum by (worker) ({sel('cortexbench_device_memory_bytes')})", "{{worker}} device"),
                   Query(f"sum by (worker) ({sel('cortexbench_host_memory_bytes')})", "{{worker}} host"))),
    )),
    RowSpec("Gateway (cortexbench.serve)", (
        PanelSpec("timeseries", "Requests/s by route and status", "HTTP requests answered by the gateway per "
                  "second, by route template and status code.", "reqps",
                  (Query(f"sum by (route, code) ({rate(sel('cortexbench_http_requests_total'))})",
                         "{{route}} {{code}}"),), width=10),
        PanelSpec("timeseries", "Request latency p50 / p99 by route", "Time from a request's arrival at the "
                  "gateway to its answer.", "s",
                  tuple(Query(_quantile(q, "le, route", rate(sel("cortexbench_http_request_seconds_bucket"))),
                              f"p{q * 100:g} {{{{route}}}}") for q in (0.5, 0.99)), width=10),
        PanelSpec("timeseries", "Requests in flight", "Inference requests in the gateway now.", "short",
                  (Query(f"sum by (host) ({sel('cortexbench_http_inflight')})", "{{host}}"),), width=4),
    )),
    RowSpec("Ray nodes (Ray's metrics agent)", (
        PanelSpec("timeseries", "CPU utilisation per node", "ray_node_cpu_utilization: CPU use of each Ray node, "
                  "percent.", "percent", (Query("ray_node_cpu_utilization", "{{ip}}"),), width=6),
        PanelSpec("timeseries", "Memory per node", "ray_node_mem_used and ray_node_mem_total of each Ray node.",
                  "bytes", (Query("ray_node_mem_used", "{{ip}} used"), Query("ray_node_mem_total", "{{ip}} total")),
                  width=6),
        PanelSpec("timeseries", "GPU utilisation", "ray_node_gpus_utilization: each GPU of each node, percent.",
                  "percent", (Query("ray_node_gpus_utilization", "{{ip}} GPU {{GpuIndex}}"),), width=6),
        PanelSpec("timeseries", "GPU memory used", "ray_node_gram_used: device memory in use on each GPU.", "bytes",
                  (Query("ray_node_gram_used", "{{ip}} GPU {{GpuIndex}}"),), width=6),
    )),
)


def _sdk() -> Any:
    try:
        from grafana_foundation_sdk.builders import dashboard
    except ImportError:
        raise UsageError("grafana-foundation-sdk is not installed; pip install -e '.[dashboards]'") from None
    return dashboard


def build() -> dict[str, Any]:
    """The dashboard as a JSON object, built with grafana-foundation-sdk's builder types."""
    gd = _sdk()
    from grafana_foundation_sdk.builders import gauge, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import (
        DashboardCursorSync,
        DataSourceRef,
        DataTransformerConfig,
    )
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

    ds = DataSourceRef(type_val=DATASOURCE["type"], uid=DATASOURCE["uid"])
    kinds = {"timeseries": timeseries.Panel, "table": table.Panel, "stat": stat.Panel, "gauge": gauge.Panel}
    dash = (gd.Dashboard("cortexbench stream").uid(UID).tags(["cortexbench"])
            .description("python -m cortexbench.stream and cortexbench.serve: throughput, latency, stages and "
                         "residency by tier (cached, swap, cold, lru:K), the gateway's requests, Ray's nodes. "
                         "Generated by python -m cortexbench.dashboard; see docs/metrics.md.")
            .refresh("5s").time("now-15m", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
            .timepicker(gd.TimePicker().refresh_intervals(["1s", "5s", "10s", "30s", "1m"]))
            .annotation(gd.AnnotationQuery().name("Annotations & Alerts").built_in(1).enable(True).hide(True)
                        .icon_color("rgba(0, 211, 255, 1)").type("dashboard")
                        .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --")))
            .with_variable(gd.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
            .with_variable(gd.QueryVariable("host").label("Host").datasource(ds)
                           .query("label_values(cortexbench_run_info, host)").refresh(2).sort(1)
                           .include_all(True).multi(True).all_value(".*")))
    panel_id = 0
    for row in ROWS:
        panel_id += 1
        dash = dash.with_row(gd.Row(row.title).id(panel_id))
        for spec in row.panels:
            panel_id += 1
            p = (kinds[spec.kind]().id(panel_id).title(spec.title).description(spec.description).datasource(ds)
                 .unit(spec.unit).span(spec.width).height(spec.height))
            for ref, q in zip("ABCDEFGH", spec.queries, strict=False):
                t = prometheus.Dataquery().ref_id(ref).datasource(ds).expr(q.expr).legend_format(q.legend)
                if q.instant:
                    t = t.instant()
                    if spec.kind == "table":
                        t = t.format(PromQueryFormat.TABLE)
                p = p.with_target(t)
            if spec.kind == "table":
                if len(spec.queries) > 1:
                    p = p.with_transformation(DataTransformerConfig(id_val="merge", options={}))
                hidden = ("Time", "__name__", "host", *spec.hide)
                p = p.with_transformation(DataTransformerConfig(id_val="organize", options={
                    "excludeByName": dict.fromkeys(hidden, True)}))
            if spec.kind == "gauge" and spec.unit == "percentunit":
                p = p.min(0).max(1)
            dash = dash.with_panel(p)
    return json.loads(json.dumps(dash.build(), cls=JSONEncoder))


def render() -> str:
    """The dashboard's JSON text, as deploy/grafana/cortexbench-dashboard.json holds it."""
    return json.dumps(build(), indent=2) + "\n"


def exprs(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (panel title, PromQL) of a dashboard's JSON, in order."""
    return [(p["title"], t["expr"]) for p in dashboard_json["panels"] if p["type"] != "row"
            for t in p.get("targets", [])]


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m cortexbench.dashboard",
                           description="Build the Grafana dashboard (grafana-foundation-sdk) and write its JSON.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="PATH",
                   help="where the JSON goes (default: deploy/grafana/cortexbench-dashboard.json)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when PATH differs from what would be written")
    args = p.parse_args(argv)

    def body() -> int:
        text = render()
        if args.check:
            try:
                current = args.out.read_text()
            except OSError as e:
                raise UsageError(f"cannot read {args.out}: {e.strerror or e}") from None
            if current != text:
                raise CortexbenchError(f"{args.out} differs from the dashboard the code builds; regenerate it "
                                       "with python -m cortexbench.dashboard")
            print(f"{args.out} is up to date")
            return 0
        write_text(args.out, text)
        print(f"dashboard: {args.out}")
        return 0

    return cli.run_main(body, "python -m cortexbench.dashboard")


if __name__ == "__main__":
    sys.exit(main())
