"""The figures of ``python -m cortexbench.stream``: ledgers and latency histograms in, JSON-ready dicts out.

Three steps, each on plain data so that a report can be rebuilt from results.json alone:

- ``histograms(ledger, warmup)``: the HDR histograms of one ledger (each driver shard computes its own; the
  coordinator merges the shards' sets, so percentiles are never averaged).  Keys::

      ("latency", model, worker)   done - scheduled of ok images counted after the warm-up
      ("stage", stage)             send_delay, the worker stages (queue ... free) and transport

  ``send_delay`` is sent - scheduled (how late the driver sent); ``transport`` is what the worker did not
  account for: done - sent - the sum of the worker stages, clamped at 0 (Ray calls, serialisation, retries).
- ``summarize_mode``: one mode's counts, throughput, latency, per-model and per-worker figures, stage
  breakdown and a timeline.
- ``compare_modes``: ratios of the modes against ``cached``, with ``REFERENCE``, a published run of the
  same experiment, beside them.

Counted images are those with ``item >= warmup``; failed images are counted in the outcomes and left out of
every latency figure.  Times in the ledger are seconds from the start of the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cortexbench.ledger import OUTCOMES, WORKER_STAGES, Ledger
from cortexbench.results import to_jsonable
from cortexbench.stats import MIN_SAMPLES, HistogramSet, LatencyHistogram, enough_samples, samples_note

STAGES = ("send_delay", *WORKER_STAGES, "transport")
LATE_SEND_S = 1e-3  # a send more than this after its scheduled time is late
TIMELINE_POINTS = 200  # a timeline has at most about this many windows
BASELINE_MODE = "cached"

# A published run of this experiment, quoted beside the measured figures (not a measurement of this machine).
# Its "ms per image" is wall time divided by images: 3.16 ms per image is about 316 images/s in total.
REFERENCE: dict[str, Any] = {
    "text": ("a published run of this experiment on 8 GPUs of an older generation reported about 3.16 ms per "
             "image (about 300 images/s in total) for cached and 113.3 ms per image for cold"),
    "gpus": 8,
    "cached_ms_per_image": 3.16,
    "cached_images_per_s": 300.0,
    "cold_ms_per_image": 113.3,
    "cold_over_cached_ms_per_image": 113.3 / 3.16,
}


# --- histograms ---------------------------------------------------------------------------------


def _counted_ok(ledger: Ledger, warmup: int) -> np.ndarray:
    return (ledger.column("item") >= warmup) & (ledger.column("outcome") == 0) \
        & np.isfinite(ledger.column("latency_s"))


def _stage_values(ledger: Ledger, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per stage, the finite durations of the rows in ``mask`` (negative clock noise clamped to 0)."""
    out: dict[str, np.ndarray] = {}
    sent = ledger.column("sent_s")[mask]
    out["send_delay"] = sent - ledger.column("scheduled_s")[mask]
    worker = np.stack([ledger.column(f"{s}_s")[mask].astype(np.float64) for s in WORKER_STAGES])
    for i, s in enumerate(WORKER_STAGES):
        out[s] = worker[i]
    known = np.isfinite(worker).any(axis=0)
    transport = ledger.column("done_s")[mask] - sent - np.nansum(worker, axis=0)
    out["transport"] = np.where(known, transport, np.nan)
    return {s: np.maximum(v[np.isfinite(v)], 0.0) for s, v in out.items()}


def histograms(ledger: Ledger, warmup: int) -> HistogramSet:
    """The latency and stage histograms of the ok images counted after ``warmup`` (see the module docstring)."""
    hs = HistogramSet()
    mask = _counted_ok(ledger, warmup)
    if not mask.any():
        return hs
    lat = np.maximum(ledger.column("latency_s")[mask], 0.0)
    n_workers = max(1, len(ledger.workers))
    group = ledger.column("model_idx")[mask].astype(np.int64) * n_workers + ledger.column("worker")[mask]
    order = np.argsort(group, kind="stable")
    keys, starts = np.unique(group[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    lat_sorted = lat[order]
    for j, key in enumerate(keys.tolist()):
        model, worker = divmod(key, n_workers)
        hs.record_many(("latency", _name(ledger.models, model), _name(ledger.workers, worker)),
                       lat_sorted[bounds[j]:bounds[j + 1]])
    for stage, values in _stage_values(ledger, mask).items():
        if values.size:
            hs.record_many(("stage", stage), values)
    return hs


def _name(names: tuple[str, ...], idx: int) -> str:
    return names[idx] if 0 <= idx < len(names) else f"#{idx}"


# --- one mode -----------------------------------------------------------------------------------


def _summary_dict(h: LatencyHistogram | None) -> dict[str, Any]:
    s = (h or LatencyHistogram()).summary().to_dict()
    s["p99_enough_samples"] = enough_samples(s["count"])
    note = samples_note(s["count"])
    if note:
        s["note"] = note
    return s


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else math.nan


def _timeline(done: np.ndarray, lat: np.ndarray, t0: float, span_s: float) -> dict[str, Any]:
    """Windows of completion time from ``t0``: images per second and exact p50/p99 (nearest rank)."""
    window = max(1.0, span_s / TIMELINE_POINTS) if math.isfinite(span_s) else 1.0
    if done.size == 0:
        return {"window_s": window, "t_s": [], "count": [], "images_per_s": [], "p50_s": [], "p99_s": []}
    rel = np.maximum(done - t0, 0.0)
    n_win = int(rel.max() // window) + 1
    idx = np.minimum((rel // window).astype(np.int64), n_win - 1)
    counts = np.bincount(idx, minlength=n_win)
    order = np.lexsort((lat, idx))
    sorted_lat = lat[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def pct(p: float) -> np.ndarray:
        rank = np.maximum(np.ceil(p / 100.0 * counts).astype(np.int64), 1)
        pick = np.minimum(starts + rank - 1, max(sorted_lat.size - 1, 0))
        return np.where(counts > 0, sorted_lat[pick], np.nan)

    edges = np.arange(n_win) * window
    widths = np.minimum(window, np.maximum(float(rel.max()) - edges, 0.0))
    widths[:-1] = window  # only the last window may be partial
    widths = np.where(widths > 0, widths, window)
    return {"window_s": window, "t_s": edges, "count": counts, "images_per_s": counts / widths,
            "p50_s": pct(50.0), "p99_s": pct(99.0)}


def summarize_mode(mode: str, ledger: Ledger, hists: HistogramSet, *, warmup: int, sent: int, not_sent: int,
                   retries: int, cancelled: int, duration_s: float | None = None,
                   worker_states: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One mode's figures as a JSON-ready dict: ``summary``, ``per_model``, ``per_worker``, ``imbalance``,
    ``stages`` and ``timeline`` (see the module docstring; latency figures come from ``hists``)."""
    outcome = ledger.column("outcome")
    item = ledger.column("item")
    counted = item >= warmup
    ok = outcome == 0
    c_ok = _counted_ok(ledger, warmup)
    by_outcome = ledger.outcome_counts()
    counted_outcomes = np.bincount(outcome[counted].astype(np.intp), minlength=len(OUTCOMES))

    sched = ledger.column("scheduled_s")
    done = ledger.column("done_s")
    t_first = float(np.nanmin(sched[counted])) if np.isfinite(sched[counted]).any() else math.nan
    t_last = float(np.nanmax(done[counted])) if np.isfinite(done[counted]).any() else math.nan
    window_s = t_last - t_first if math.isfinite(t_first) and math.isfinite(t_last) else math.nan
    n_counted_ok = int(c_ok.sum())

    lat_hists = hists.rollup(lambda k: k[:1]).get(("latency",))
    latency = _summary_dict(lat_hists)

    # How late the driver sent: over every counted image that was sent.
    delay = ledger.column("sent_s")[counted] - sched[counted]
    delay = delay[np.isfinite(delay)]
    late_share = float(np.count_nonzero(delay > LATE_SEND_S) / delay.size) if delay.size else math.nan
    delay_hist = LatencyHistogram()
    delay_hist.record_many(np.maximum(delay, 0.0))

    hit = ledger.column("hit")
    hits = int(np.count_nonzero(hit[counted] == 1))
    misses = int(np.count_nonzero(hit[counted] == 0))
    states = dict(worker_states or {})
    loads = sum(int(_get(s, "loads_total", 0)) for s in states.values()) if states \
        else int(np.count_nonzero(hit == 0))

    summary: dict[str, Any] = {
        "mode": mode,
        "images_sent": int(sent),
        "rows": len(ledger),
        "ok": int(ok.sum()),
        "failed": int(len(ledger) - ok.sum()),
        "by_outcome": by_outcome,
        "warmup": int(warmup),
        "warmup_excluded": int(np.count_nonzero(~counted)),
        "counted": int(counted.sum()),
        "counted_ok": n_counted_ok,
        "counted_failed": int(counted.sum()) - int(counted_outcomes[0]),
        "window_s": window_s,
        "throughput_images_per_s": _ratio(n_counted_ok, window_s),
        "latency": latency,
        "p99_enough_samples": latency["p99_enough_samples"],
        "p99_note": latency.get("note"),
        "late_share": late_share,
        "late_p99_s": delay_hist.percentile(99.0),
        "retries": int(retries),
        "cancelled": int(cancelled),
        "not_sent": int(not_sent),
        "hits": hits,
        "misses": misses,
        "hit_ratio": _ratio(hits, hits + misses),
        "loads": loads,
        "configured_duration_s": duration_s,
    }

    # Per model.
    per_model_hists = hists.rollup(lambda k: k[:2])
    model_idx = ledger.column("model_idx").astype(np.int64)
    m_count = _per_index(model_idx, counted, len(ledger.models))
    m_ok = _per_index(model_idx, c_ok, len(ledger.models))
    per_model: dict[str, Any] = {}
    stage_cols = {st: ledger.column(f"{st}_s").astype(np.float64) for st in WORKER_STAGES}
    hit_col = ledger.column("hit")
    for i, name in enumerate(ledger.models):
        per_model[name] = {"count": int(m_count[i]), "ok": int(m_ok[i]), "failed": int(m_count[i] - m_ok[i]),
                           "latency": _summary_dict(per_model_hists.get(("latency", name)))}
        sel = c_ok & (model_idx == i)
        if sel.any():
            per_model[name]["stages_mean_s"] = _stage_means(stage_cols, sel)
            miss = sel & (hit_col == 0)
            if miss.any():  # the images that loaded the model: what a load costs
                per_model[name]["miss_stages_mean_s"] = _stage_means(stage_cols, miss)

    # Per worker.
    per_worker_hists = hists.rollup(lambda k: (k[0], k[2]) if k[0] == "latency" else k)
    worker = ledger.column("worker").astype(np.int64)
    n_workers = len(ledger.workers)
    w_count = _per_index(worker, counted, n_workers)
    w_hits = _per_index(worker, counted & (hit == 1), n_workers)
    w_miss = _per_index(worker, counted & (hit == 0), n_workers)
    total = int(w_count.sum())
    per_worker: dict[str, Any] = {}
    for i, name in enumerate(ledger.workers):
        per_worker[name] = {"count": int(w_count[i]), "share": _ratio(int(w_count[i]), total),
                            "hit_ratio": _ratio(int(w_hits[i]), int(w_hits[i] + w_miss[i])),
                            "latency": _summary_dict(per_worker_hists.get(("latency", name)))}
        if name in states:
            per_worker[name]["loads"] = int(_get(states[name], "loads_total", 0))
            memory = int(_get(states[name], "memory_bytes", -1))
            if memory >= 0:  # the device memory the worker's process held at its last answer (GPU workers)
                per_worker[name]["device_memory_bytes"] = memory
    counts = w_count.astype(np.float64)
    imbalance = float(counts.max() / counts.mean() - 1.0) if counts.size and counts.mean() > 0 else math.nan

    # Stages, shares of the mean latency (sum over sum, so stages with unknown rows stay comparable).
    lat_sum = lat_hists.sum_s if lat_hists is not None else math.nan
    stages: dict[str, Any] = {}
    for stage in STAGES:
        h = hists.get(("stage", stage))
        if h is None or h.count == 0:
            continue
        p50, p99 = h.percentiles([50.0, 99.0])
        stages[stage] = {"count": h.count, "mean_s": h.mean_s, "p50_s": p50, "p99_s": p99,
                         "share": _ratio(h.sum_s, lat_sum)}

    lat = ledger.column("latency_s")[c_ok]
    timeline = _timeline(done[c_ok], np.maximum(lat, 0.0), t_first, window_s)

    return to_jsonable({"summary": summary, "per_model": per_model, "per_worker": per_worker,
                        "imbalance": imbalance, "stages": stages, "timeline": timeline,
                        "min_samples": MIN_SAMPLES})


def _stage_means(cols: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, float]:
    """Mean seconds of each worker stage over the rows in ``mask`` (NaN where no row measured it)."""
    out = {}
    for name, col in cols.items():
        v = col[mask]
        v = v[np.isfinite(v)]
        out[name] = float(v.mean()) if v.size else math.nan
    return out


def _per_index(idx: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """How many rows in ``mask`` have each index 0..n-1 (indices out of range are not counted)."""
    sel = idx[mask & (idx >= 0) & (idx < n)]
    return np.bincount(sel, minlength=n)[:n]


def _get(state: Any, key: str, default: Any) -> Any:
    return state.get(key, default) if isinstance(state, Mapping) else getattr(state, key, default)


# --- modes against each other -------------------------------------------------------------------


def _fig(mode: Mapping[str, Any], key: str) -> float:
    s = mode.get("summary", {})
    v = s.get("throughput_images_per_s") if key == "throughput" else s.get("latency", {}).get(f"{key}_s")
    return float(v) if isinstance(v, (int, float)) else math.nan


def compare_modes(modes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every mode against ``cached``: ``<mode>_over_cached_{mean,p50,p99,throughput,ms_per_image}``
    (ms_per_image is wall time per image, 1 / throughput, the figure ``REFERENCE`` quotes), with the
    same figures grouped under ``ratios[mode]`` and ``REFERENCE`` under ``reference``."""
    out: dict[str, Any] = {"baseline": BASELINE_MODE, "ratios": {}, "reference": dict(REFERENCE)}
    base = modes.get(BASELINE_MODE)
    if base is None:
        out["note"] = f"no '{BASELINE_MODE}' mode was run; there is nothing to compare against"
        return to_jsonable(out)
    for name, mode in modes.items():
        if name == BASELINE_MODE:
            continue
        r = {k: _ratio(_fig(mode, k), _fig(base, k)) for k in ("mean", "p50", "p99", "throughput")}
        r["ms_per_image"] = _ratio(_fig(base, "throughput"), _fig(mode, "throughput"))
        out["ratios"][name] = r
        for k, v in r.items():
            out[f"{name}_over_{BASELINE_MODE}_{k}"] = v
    return to_jsonable(out)
