"""The residency tiers against each other: do they answer alike, and how fast does each load.

- ``answers``: every mode against ``cached`` on the (model, input) pairs both ran (each image records the
  input file it ran, its top-1 class and the sum of its logits): the share of pairs whose top-1 agrees,
  and the largest relative difference of the logit sums.  A loader that races its copy or reuses a
  device slot too early gives wrong answers, and shows here.  The floor is 100% in fp32 and
  ``FP16_AGREEMENT_FLOOR`` in fp16 (the tiers may run different kernels: cached's own CUDA graphs, the
  loader's graphs bound to its slots, or eager runs with cuDNN's heuristics; in fp16 near-ties may flip).
- ``loads``: per model in the modes that load on demand, the mean read, build and copy times, the read
  bandwidth (file bytes / read time), the whole load's bandwidth (bytes / (read + build + copy)), and the
  floor (bytes / the pinned host-to-device bandwidth the worker measured before the run).

Plain Python and numpy: figures in, JSON-ready dicts out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cortexbench.ledger import Ledger
from cortexbench.report.stream_summary import BASELINE_MODE

FP16_AGREEMENT_FLOOR = 0.98


def _answers(ledger: Ledger, warmup: int) -> dict[tuple[str, int], tuple[int, float]]:
    """(model name, input file index) -> (top-1, logit sum) of the counted ok images that say so."""
    c = ledger.columns()
    mask = (c["item"] >= warmup) & (c["outcome"] == 0) & (c["input_idx"] >= 0) & (c["top1"] >= 0)
    out: dict[tuple[str, int], tuple[int, float]] = {}
    for m, i, t, s in zip(c["model_idx"][mask].tolist(), c["input_idx"][mask].tolist(), c["top1"][mask].tolist(),
                          c["checksum"][mask].tolist(), strict=True):
        out.setdefault((ledger.models[m], int(i)), (int(t), float(s)))
    return out


def answers_agreement(ledgers: Mapping[str, Ledger], warmup: int, precision: str) -> dict[str, Any]:
    """Every mode against ``cached`` (see the module docstring)."""
    floor = 1.0 if precision == "fp32" else FP16_AGREEMENT_FLOOR
    out: dict[str, Any] = {"baseline": BASELINE_MODE, "floor": floor, "modes": {}}
    base = ledgers.get(BASELINE_MODE)
    if base is None:
        out["note"] = f"no '{BASELINE_MODE}' mode was run: no answers to compare with"
        return out
    ref = _answers(base, warmup)
    for mode, ledger in ledgers.items():
        if mode == BASELINE_MODE:
            continue
        mine = _answers(ledger, warmup)
        keys = [k for k in mine if k in ref]
        if not keys:
            out["modes"][mode] = {"pairs": 0, "note": "no (model, input) pair ran in both modes"}
            continue
        agree = sum(mine[k][0] == ref[k][0] for k in keys)
        rel = [abs(mine[k][1] - ref[k][1]) / max(abs(ref[k][1]), 1e-6) for k in keys]
        bad = sorted({k[0] for k in keys if mine[k][0] != ref[k][0]})
        share = agree / len(keys)
        out["modes"][mode] = {"pairs": len(keys), "agree": agree, "share": share, "max_rel_checksum_diff": max(rel),
                              "models_disagreeing": bad, "ok": share >= floor}
    return out


def load_figures(modes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per mode that loads on demand and per model: load stage means, bandwidths and the floor."""
    out: dict[str, Any] = {}
    for name, mode in modes.items():
        setup = (mode.get("setup_s") or [{}])[0] or {}
        h2d = setup.get("loader_h2d_gbps")
        per_model: dict[str, Any] = {}
        for model, fig in (mode.get("per_model") or {}).items():
            st = fig.get("miss_stages_mean_s") or {}
            nbytes = setup.get(f"model_bytes.{model}")
            read, build, copy = (st.get(k, math.nan) for k in ("read", "build", "copy"))
            if not nbytes or not all(map(math.isfinite, (read, build, copy))) or (read + build + copy) <= 0:
                continue
            load = read + build + copy
            per_model[model] = {
                "bytes": nbytes, "read_s": read, "build_s": build, "copy_s": copy, "wait_s": st.get("wait", math.nan),
                "infer_s": st.get("infer", math.nan), "load_s": load,
                "read_gbps": nbytes / read / 1e9 if read > 0 else math.nan,
                "load_gbps": nbytes / load / 1e9,
                "floor_s": nbytes / (h2d * 1e9) if h2d else math.nan,
            }
        if per_model:
            mean = {k: float(np.mean([v[k] for v in per_model.values()]))
                    for k in ("bytes", "read_s", "build_s", "copy_s", "load_s", "infer_s", "floor_s")}
            out[name] = {"h2d_gbps": h2d, "per_model": per_model, "mean": mean}
    return out


# --- in the report --------------------------------------------------------------------------------


def _ms(x: Any) -> str:
    return f"{x * 1e3:.3g}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _gbps(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def markdown_lines(results: Mapping[str, Any]) -> list[str]:
    """The report's section on the tiers (empty when no mode loaded on demand)."""
    from cortexbench.report.tables import markdown_table

    tiers = results.get("tiers") or {}
    loads, answers = tiers.get("loads") or {}, tiers.get("answers") or {}
    if not loads and not answers.get("modes"):
        return []
    lines = ["## Loading on demand", ""]
    if tiers.get("process_warm"):
        lines += [f"What is kept between images: {tiers['process_warm']}.", ""]
    for mode, fig in loads.items():
        h2d = fig.get("h2d_gbps")
        lines += [f"### {mode}: where a load's time goes, per model", "",
                  "Mean milliseconds of the images that loaded their model; read GB/s is the file's bytes over "
                  "the read time, load GB/s over read + build + copy; the floor is the bytes over the pinned "
                  "host-to-device bandwidth measured by the worker"
                  + (f" ({h2d:.3g} GB/s)" if isinstance(h2d, (int, float)) else " (not measured: no GPU)") + ".", ""]
        rows = [[m, f"{v['bytes'] / 1e6:.1f}", _ms(v["wait_s"]), _ms(v["read_s"]), _ms(v["build_s"]),
                 _ms(v["copy_s"]), _ms(v["infer_s"]), _gbps(v["read_gbps"]), _gbps(v["load_gbps"]), _ms(v["floor_s"])]
                for m, v in fig["per_model"].items()]
        mean = fig["mean"]
        rows.append(["**mean**", f"{mean['bytes'] / 1e6:.1f}", "", _ms(mean["read_s"]), _ms(mean["build_s"]),
                     _ms(mean["copy_s"]), _ms(mean["infer_s"]), "", "", _ms(mean["floor_s"])])
        lines += [markdown_table(("model", "MB", "wait", "read", "build", "copy", "infer", "read GB/s", "load GB/s",
                                  "floor"), rows, "lrrrrrrrrr")]
    modes = answers.get("modes") or {}
    if modes:
        lines += ["### Answers against cached", "",
                  f"Top-1 agreement on the (model, input) pairs that ran in both modes; floor "
                  f"{answers.get('floor', 1.0):.0%}.", ""]
        rows = []
        for mode, a in modes.items():
            if not a.get("pairs"):
                rows.append([mode, "0", "-", "-", a.get("note", "")])
                continue
            rows.append([mode, f"{a['pairs']:,}", f"{a['share']:.2%}", f"{a['max_rel_checksum_diff']:.2g}",
                         ("ok" if a["ok"] else "BELOW THE FLOOR: " + ", ".join(a["models_disagreeing"]))])
        lines += [markdown_table(("mode", "pairs", "top-1 agrees", "max rel. logit-sum diff", "verdict"), rows,
                                 "lrrrl")]
    return lines


def warnings(results: Mapping[str, Any]) -> list[str]:
    """A line for each tier whose answers fall below the floor."""
    answers = (results.get("tiers") or {}).get("answers") or {}
    out = []
    for mode, a in (answers.get("modes") or {}).items():
        if a.get("pairs") and not a.get("ok", True):
            out.append(f"{mode}: top-1 agrees with cached on {a['share']:.2%} of {a['pairs']:,} (model, input) pairs, "
                       f"below the floor of {answers.get('floor', 1.0):.0%} (models: "
                       f"{', '.join(a['models_disagreeing'])}): the loader may be giving wrong weights.")
    return out
