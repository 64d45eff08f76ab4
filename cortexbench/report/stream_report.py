"""report.md and the console summary of ``python -m cortexbench.stream``, from results.json alone.

``render_markdown(results)`` writes a readable report: the machine and the run, one summary row per mode,
the modes against ``cached`` beside the published reference figures, per-model, per-worker and per-stage
tables for each mode, warnings (few samples, late sends, failures, a partial run) and a short guide to
reading it.  ``console_summary(results)`` is the compact table printed at the end of a run.

Both take the results.json dict, in memory (NaN possible) or read back (None where a figure is missing).
Durations are shown in milliseconds with three significant digits, units in the column headers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cortexbench.report import tiers
from cortexbench.report.stream_summary import BASELINE_MODE, LATE_SEND_S, REFERENCE, STAGES
from cortexbench.report.tables import (
    MISSING,
    console_table,
    format_bytes,
    format_percent,
    format_rate,
    format_ratio,
    markdown_table,
)
from cortexbench.stats import MIN_SAMPLES

LATE_WARN_SHARE = 0.01  # warn when more than this share of images was sent late
PLOTS = ("latency_cdf.png", "per_model_latency.png", "timeline.png", "worker_balance.png", "stage_breakdown.png")

STAGE_MEANING = {
    "send_delay": "driver: sent after the scheduled time",
    "queue": "worker: waiting for a free lane",
    "input": "worker: reading the image file",
    "decode": "worker: decoding and preprocessing",
    "wait": "worker: waiting for the model loader, a device slot, or another lane's load",
    "read": "worker: reading the model's bytes (disk to host; 0 from host memory)",
    "build": "worker: the network's structure and binding its weights",
    "copy": "worker: host to device (not overlapped with the read) and precision conversion",
    "infer": "worker: inference at batch size 1",
    "free": "worker: freeing the model / evicted models",
    "transport": "Ray calls, serialisation, waiting for the rest of its group (not timed by the worker)",
}


# --- small formatting ---------------------------------------------------------------------------


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def ms(seconds: Any, digits: int = 3) -> str:
    """Seconds as milliseconds with ``digits`` significant digits: 0.00316 -> '3.16', 0.1133 -> '113'."""
    v = _num(seconds)
    if not math.isfinite(v):
        return MISSING
    v *= 1000.0
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def _int(n: Any) -> str:
    v = _num(n)
    return f"{int(v):,}" if math.isfinite(v) else MISSING


def _count(n: Any) -> int:
    v = _num(n)
    return int(v) if math.isfinite(v) else 0


def _modes(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return dict(results.get("modes") or {})


def _summary(mode: Mapping[str, Any]) -> Mapping[str, Any]:
    return mode.get("summary") or {}


def _latency(mode: Mapping[str, Any]) -> Mapping[str, Any]:
    return _summary(mode).get("latency") or {}


def _ms_per_image(mode: Mapping[str, Any]) -> float:
    """Wall time per image (1 / throughput), the figure the published reference gives."""
    thr = _num(_summary(mode).get("throughput_images_per_s"))
    return 1.0 / thr if thr > 0 else math.nan


# --- tables -------------------------------------------------------------------------------------

SUMMARY_HEADER = ("mode", "sent", "ok", "failed", "throughput (img/s)", "mean (ms)", "p50 (ms)", "p90 (ms)",
                  "p99 (ms)", "p99.9 (ms)", "max (ms)", "hit ratio")


def _summary_rows(modes: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for name, mode in modes.items():
        s, lat = _summary(mode), _latency(mode)
        p99 = ms(lat.get("p99_s"))
        if lat.get("count") and not s.get("p99_enough_samples", True):
            p99 += " (few)"
        rows.append([name, _int(s.get("images_sent")), _int(s.get("ok")), _int(s.get("failed")),
                     format_rate(s.get("throughput_images_per_s"), unit="").strip(), ms(lat.get("mean_s")),
                     ms(lat.get("p50_s")), ms(lat.get("p90_s")), p99, ms(lat.get("p999_s")), ms(lat.get("max_s")),
                     format_percent(s.get("hit_ratio"))])
    return rows


def _ratio_rows(comparison: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, r in (comparison.get("ratios") or {}).items():
        rows.append([f"{name} / {BASELINE_MODE}", format_ratio(r.get("mean")), format_ratio(r.get("p50")),
                     format_ratio(r.get("p99")), format_ratio(r.get("throughput")), format_ratio(r.get("ms_per_image"))])
    return rows


def _reference_rows(modes: Mapping[str, Mapping[str, Any]], comparison: Mapping[str, Any]) -> list[list[str]]:
    ref = comparison.get("reference") or REFERENCE
    cached, cold = modes.get(BASELINE_MODE), modes.get("cold")
    ratio = (comparison.get("ratios") or {}).get("cold", {}).get("ms_per_image")

    def measured(mode: Mapping[str, Any] | None, what: str) -> str:
        if mode is None:
            return "not run"
        if what == "wall":
            return ms(_ms_per_image(mode))
        if what == "rate":
            return format_rate(_summary(mode).get("throughput_images_per_s"), unit="").strip()
        return ms(_latency(mode).get("mean_s"))

    return [
        ["cached: wall time per image (ms)", measured(cached, "wall"), _as_given(ref.get("cached_ms_per_image"))],
        ["cached: throughput (img/s)", measured(cached, "rate"), f"about {_as_given(ref.get('cached_images_per_s'))}"],
        ["cached: mean latency per image (ms)", measured(cached, "mean"), "not given"],
        ["cold: wall time per image (ms)", measured(cold, "wall"), _as_given(ref.get("cold_ms_per_image"))],
        ["cold: mean latency per image (ms)", measured(cold, "mean"), "not given"],
        ["cold / cached wall time per image", format_ratio(ratio) if cold is not None and cached is not None
         else "not run", format_ratio(ref.get("cold_over_cached_ms_per_image"))],
    ]


def _as_given(x: Any) -> str:
    """A published figure as it was published (113.3 stays 113.3)."""
    v = _num(x)
    return f"{v:g}" if math.isfinite(v) else MISSING


def _sig3(x: Any) -> str:
    v = _num(x)
    if not math.isfinite(v):
        return MISSING
    return ms(v / 1000.0)  # the same 3-significant-digit rule, without a unit change


def _model_rows(mode: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in (mode.get("per_model") or {}).items():
        lat = m.get("latency") or {}
        flag = "" if lat.get("p99_enough_samples", True) else f"p99 on {_int(lat.get('count'))} samples"
        rows.append([name, _int(m.get("count")), _int(m.get("ok")), _int(m.get("failed")), ms(lat.get("mean_s")),
                     ms(lat.get("p50_s")), ms(lat.get("p99_s")), ms(lat.get("max_s")), flag])
    return rows


def _worker_rows(mode: Mapping[str, Any], workers: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for name, w in (mode.get("per_worker") or {}).items():
        lat = w.get("latency") or {}
        info = workers.get(name, {})
        rows.append([name, str(info.get("device") or MISSING), _int(w.get("count")), format_percent(w.get("share")),
                     format_percent(w.get("hit_ratio")), _int(w.get("loads")) if "loads" in w else MISSING,
                     ms(lat.get("p50_s")), ms(lat.get("p99_s"))])
    return rows


def _stage_rows(mode: Mapping[str, Any]) -> list[list[str]]:
    stages = mode.get("stages") or {}
    order = [s for s in STAGES if s in stages] + [s for s in stages if s not in STAGES]
    return [[s, STAGE_MEANING.get(s, ""), ms(stages[s].get("mean_s")), ms(stages[s].get("p50_s")),
             ms(stages[s].get("p99_s")), format_percent(stages[s].get("share"))] for s in order]


# --- warnings -----------------------------------------------------------------------------------


def warnings(results: Mapping[str, Any]) -> list[str]:
    """One line per thing a reader must know before trusting the figures."""
    out: list[str] = []
    modes = _modes(results)
    if not results.get("complete", True):
        planned = list((results.get("run") or {}).get("passes")  # the passes run (an HTTP target's: server)
                       or ((results.get("config") or {}).get("stream") or {}).get("modes") or [])
        missing = [m for m in planned if m not in modes]
        out.append("Partial run: it was interrupted or failed, so only what was measured before is here"
                   + (f"; modes not run: {', '.join(missing)}" if missing else "") + ".")
    for name, mode in modes.items():
        s, lat = _summary(mode), _latency(mode)
        count = _count(lat.get("count"))
        if count == 0:
            out.append(f"{name}: no image succeeded after the warm-up; there are no latency figures.")
        elif not s.get("p99_enough_samples", True):
            out.append(f"{name}: p99 rests on {count:,} samples; at least {MIN_SAMPLES} are needed to trust it.")
        few = [f"{m} ({_int((pm.get('latency') or {}).get('count'))})" for m, pm in (mode.get("per_model") or {}).items()
               if 0 < _num((pm.get("latency") or {}).get("count")) < MIN_SAMPLES]
        if few:
            out.append(f"{name}: the per-model p99 of {len(few)} model(s) rests on fewer than {MIN_SAMPLES} samples: "
                       + ", ".join(few) + ".")
        late = _num(s.get("late_share"))
        if late > LATE_WARN_SHARE:
            out.append(f"{name}: {format_percent(late)} of images were sent more than {LATE_SEND_S * 1e3:g} ms after "
                       f"their scheduled time (p99 send delay {ms(s.get('late_p99_s'))} ms): the driver could not keep "
                       "the schedule; the latency includes its lateness.")
        failed = _count(s.get("failed"))
        if failed:
            kinds = ", ".join(f"{k} {v:,}" for k, v in (s.get("by_outcome") or {}).items() if k != "ok" and v)
            out.append(f"{name}: {failed:,} image(s) failed ({kinds}); they are counted here and left out of the "
                       "latency figures.")
        for key, what in (("not_sent", "were scheduled but never sent (the run stopped first)"),
                          ("cancelled", "were cancelled at the end of the run")):
            n = _num(s.get(key))
            if n > 0:
                out.append(f"{name}: {int(n):,} image(s) {what}.")
        losses = mode.get("worker_losses") or {}
        hangs = mode.get("worker_hangs") or {}
        died = {w: n - hangs.get(w, 0) for w, n in losses.items() if n - hangs.get(w, 0) > 0}
        if died:
            out.append(f"{name}: worker(s) died and were replaced: "
                       + ", ".join(f"{w} ×{n}" for w, n in died.items()) + "; their images were retried.")
        if hangs:
            out.append(f"{name}: worker(s) stopped answering (a call past --image-timeout) and were replaced: "
                       + ", ".join(f"{w} ×{n}" for w, n in hangs.items()) + "; their images were retried.")
        outages = mode.get("worker_outages") or []
        if outages:
            out.append(f"{name}: outages: " + "; ".join(
                f"{o['worker']} lost {o['lost_at_s']:.1f} s into the run, "
                + (f"back {o['back_after_s']:.1f} s later" if o.get("back_after_s") is not None else "not back by the end")
                for o in outages) + " (the throughput timeline shows the dip).")
    out += tiers.warnings(results)
    return out


# --- the documents ------------------------------------------------------------------------------


def _header_lines(results: Mapping[str, Any]) -> list[str]:
    mach = results.get("machine") or {}
    run = results.get("run") or {}
    cfg = results.get("config") or {}
    workers = results.get("workers") or []
    gpus = ", ".join(str(g.get("name")) for g in mach.get("gpus") or []) or "none"
    devices: dict[str, int] = {}
    for w in workers:
        devices[str(w.get("device"))] = devices.get(str(w.get("device")), 0) + 1
    nodes = {w.get("node") for w in workers if w.get("node")}
    if run.get("loop") == "open":
        loop = f"open loop at {format_rate(run.get('rate'))} (images are due on a fixed schedule)"
    else:
        loop = f"closed loop, {run.get('concurrency')} images in flight"
    models = run.get("models") or cfg.get("models") or []
    lines = [
        f"- started {results.get('started_at', MISSING)}, finished {results.get('finished_at', MISSING)}",
        f"- machine: {mach.get('cpu_model', '?')}, {mach.get('usable_cores', '?')} usable cores, "
        f"{format_bytes(mach.get('memory_bytes'))} memory; GPUs: {gpus}",
        f"- workers: {len(workers)} ({', '.join(f'{n}× {d}' for d, n in devices.items()) or 'none'})"
        + (f" on {len(nodes)} node(s)" if nodes else "")
        + (f", backend {run['backend']}" if run.get("backend") else "")
        + (f", engine {run['engine']} (cached)" if run.get("engine") not in (None, "backend") else ""),
        f"- {_int(run.get('images'))} images ({_int(run.get('warmup'))} warm-up, not counted), one random model "
        f"each at batch size 1, popularity {run.get('popularity', MISSING)}; {loop}",
        f"- models: {', '.join(map(str, models)) or MISSING}",
        *([f"- inputs: every image's JPEG read and decoded for it, on the {str(run.get('decode', 'cpu')).upper()} "
           "(`--inputs jpeg`)"] if run.get("inputs") == "jpeg" else []),
        f"- balancer {run.get('balancer', MISSING)}, dispatch {run.get('dispatch', MISSING)}, "
        f"{run.get('drivers', MISSING)} driver(s)"
        + (f"; metrics were served on port {run['metrics_port']}" if run.get("metrics_port") else ""),
    ]
    return lines


HOW_TO_READ = """\
- **Latency** is per image, from the time it was due (open loop) or its slot came free (closed loop) to the
  time its result reached the driver, for successful images after the warm-up.  p99 is the time 99% of
  images beat; it needs a few hundred samples to mean anything.
- **Throughput** is successful counted images divided by the counted window (first counted image due to
  last counted result).  **Wall time per image** is its inverse, the figure the published reference gives;
  it is not a latency (many images are in flight at once).
- **cached** keeps every model loaded; **cold** reads the model file and the image file, loads, runs and
  frees for every image; **lru:K** keeps K models per worker.  Ratios are mode / cached: above 1× means
  slower for latency, below 1× means fewer images per second for throughput.
- **Stages** add up to the latency: send delay + queue + read + decode + load + infer + free + transport;
  the share column is each stage's part of the mean latency.
- **Imbalance** is how far the busiest worker is above the average (0% is perfectly even).
"""


def render_markdown(results: Mapping[str, Any]) -> str:
    """report.md for a stream results.json dict."""
    modes = _modes(results)
    comparison = results.get("comparison") or {}
    workers = {str(w.get("name")): w for w in results.get("workers") or []}
    warns = warnings(results)
    lines = [f"# cortexbench stream: {', '.join(modes) or 'no modes'}", ""]
    if not results.get("complete", True):
        lines += ["**Partial run**: interrupted or failed; the figures cover only what was measured.", ""]
    lines += [*_header_lines(results), ""]
    if warns:
        lines += [f"**{len(warns)} warning(s)**, see [Warnings](#warnings).", ""]

    lines += ["## Summary per mode", "",
              "One row per mode.  Sent, ok and failed include the warm-up; throughput and latency cover the "
              "successful images after it (latency in milliseconds).", "",
              markdown_table(SUMMARY_HEADER, _summary_rows(modes), "lrrrrrrrrrrr") if modes
              else "No mode finished.\n"]

    lines += [f"## Modes against {BASELINE_MODE}", ""]
    ratio_rows = _ratio_rows(comparison)
    if ratio_rows:
        lines += [markdown_table(("ratio", "mean", "p50", "p99", "throughput", "wall time per image"), ratio_rows,
                                 "lrrrrr")]
    else:
        lines += [str(comparison.get("note") or f"Only one mode; nothing to compare with {BASELINE_MODE}."), ""]
    lines += ["**Published reference** (not measured on this machine): "
              + str((comparison.get("reference") or REFERENCE).get("text")) + ".  Its \"ms per image\" is wall "
              "time divided by images (1 / throughput), so it is set beside the measured wall time per image.", "",
              markdown_table(("figure", "measured here", "reference (8 older GPUs)"),
                             _reference_rows(modes, comparison), "lrr")]

    for name, mode in modes.items():
        s = _summary(mode)
        lines += [f"## Mode {name}", ""]
        lines += [f"{_int(s.get('counted'))} images counted ({_int(s.get('warmup_excluded'))} warm-up excluded) over "
                  f"{_sig3(s.get('window_s'))} s; retries {_int(s.get('retries'))}, model loads {_int(s.get('loads'))}, "
                  f"hit ratio {format_percent(s.get('hit_ratio'))}, sent late {format_percent(s.get('late_share'))}"
                  + (f"; setting the mode up (loading models) took {_sig3(mode['setup_s'])} s"
                     if math.isfinite(_num(mode.get("setup_s"))) else "") + ".", ""]
        model_rows = _model_rows(mode)
        if model_rows:
            lines += ["### Per model", "",
                      markdown_table(("model", "images", "ok", "failed", "mean (ms)", "p50 (ms)", "p99 (ms)",
                                      "max (ms)", "note"), model_rows, "lrrrrrrrl")]
        worker_rows = _worker_rows(mode, workers)
        if worker_rows:
            lines += ["### Per worker", "",
                      f"Imbalance (busiest worker over the mean, minus 1): {format_percent(mode.get('imbalance'))}.", "",
                      markdown_table(("worker", "device", "images", "share", "hit ratio", "loads", "p50 (ms)",
                                      "p99 (ms)"), worker_rows, "llrrrrrr")]
        stage_rows = _stage_rows(mode)
        if stage_rows:
            lines += ["### Where the time goes", "",
                      markdown_table(("stage", "what", "mean (ms)", "p50 (ms)", "p99 (ms)", "share of mean latency"),
                                     stage_rows, "llrrrr")]

    lines += tiers.markdown_lines(results)
    lines += ["## Warnings", ""]
    lines += [f"- {w}" for w in warns] if warns else ["None."]
    lines += ["", "## How to read this", "", HOW_TO_READ]
    if modes:
        lines += ["## Plots", ""]
        lines += [f"![{p.removesuffix('.png').replace('_', ' ')}]({p})\n" for p in PLOTS]
    return "\n".join(lines).rstrip() + "\n"


def _ratio_line(comparison: Mapping[str, Any]) -> list[str]:
    out = []
    ref = comparison.get("reference") or REFERENCE
    for name, r in (comparison.get("ratios") or {}).items():
        line = (f"{name}/{BASELINE_MODE}: mean {format_ratio(r.get('mean'))}, p50 {format_ratio(r.get('p50'))}, "
                f"p99 {format_ratio(r.get('p99'))}, throughput {format_ratio(r.get('throughput'))}, "
                f"wall time per image {format_ratio(r.get('ms_per_image'))}")
        if name == "cold":
            line += f" (published reference: {format_ratio(ref.get('cold_over_cached_ms_per_image'))})"
        out.append(line)
    return out


def console_summary(results: Mapping[str, Any]) -> str:
    """A compact table for stdout: one row per mode, then the ratios against cached."""
    modes = _modes(results)
    header: Sequence[str] = ("mode", "sent", "ok", "failed", "img/s", "mean ms", "p50 ms", "p99 ms", "p99.9 ms",
                             "hit")
    rows = [[r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[8], r[9], r[11]] for r in _summary_rows(modes)]
    parts = [console_table(header, rows, "lrrrrrrrrr") if rows else "no mode finished\n"]
    parts += [line + "\n" for line in _ratio_line(results.get("comparison") or {})]
    warns = warnings(results)
    if warns:
        parts.append(f"{len(warns)} warning(s), see report.md: {warns[0]}\n")
    return "".join(parts)
