"""The tables of ``python -m cortexbench.single``: derived figures, report.md, the console summary, CSV rows.

Everything here reads the body of results.json (plain dicts), so a report can be rebuilt from a results
file alone.  ``summarise`` adds the figures that follow from the points (best batch size per model and
device, GPU/CPU speed-ups for inference and training); the renderers only format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cortexbench.report.tables import (
    console_table,
    format_bytes,
    format_count,
    format_percent,
    format_rate,
    format_ratio,
    format_seconds,
    markdown_table,
)

CSV_HEADER = ("model", "backend", "device", "precision", "batch_size", "runs", "warmup_runs", "elapsed_s",
              "rel_spread", "stable", "batch_mean_s", "batch_p50_s", "batch_p90_s", "batch_p99_s", "batch_min_s",
              "batch_max_s", "image_mean_s", "image_p50_s", "image_p90_s", "image_p99_s",
              "throughput_images_per_s", "param_count", "size_bytes")


@dataclass(frozen=True)
class Section:
    title: str
    header: tuple[str, ...]
    rows: list[list[str]]
    align: str
    text: str = ""


def _is_gpu(device: str) -> bool:
    return device != "cpu"


def point_label(p: Mapping[str, Any]) -> str:
    """What a point ran on: its device, and with an engine axis ``single --engines`` the engine and
    precision too ('cpu ort int8')."""
    return f"{p['device']} {p['engine']} {p['precision']}" if p.get("engine") else p["device"]


def _variant(r: Mapping[str, Any]) -> tuple[Any, Any]:
    """The engine and precision of a point (None, precision) without an engine axis."""
    return r.get("engine"), r.get("precision")


def summarise(body: dict[str, Any]) -> dict[str, Any]:
    """Add ``best`` per model and device, ``speedups`` and ``training_speedups`` to ``body`` (in place)."""
    points = body.get("points", [])
    models = body.setdefault("models", {})
    for m in models.values():
        m["best_batch_size"], m["best_throughput_images_per_s"] = {}, {}
    for key in dict.fromkeys((p["model"], point_label(p)) for p in points):
        mine = [p for p in points if (p["model"], point_label(p)) == key]
        best = max(mine, key=lambda p: p["throughput_images_per_s"])
        entry = models.setdefault(key[0], {})
        entry.setdefault("best_batch_size", {})[key[1]] = best["batch_size"]
        entry.setdefault("best_throughput_images_per_s", {})[key[1]] = best["throughput_images_per_s"]
    body["speedups"] = _speedups(points, lambda p: p["image_latency_s"]["mean"], "image_mean_s")
    body["training_speedups"] = _speedups(body.get("training", []), lambda t: t["sample_s"], "sample_s")
    return body


def _speedups(rows: Sequence[Mapping[str, Any]], value: Any, unit: str) -> list[dict[str, Any]]:
    """CPU time / GPU time for each model, GPU and batch size (and engine and precision) where both ran."""
    cpu = {(r["model"], r["batch_size"], _variant(r)): value(r) for r in rows if r["device"] == "cpu"}
    out = []
    for r in rows:
        base = cpu.get((r["model"], r["batch_size"], _variant(r)))
        if _is_gpu(r["device"]) and base is not None:
            v = value(r)
            extra = {"engine": r["engine"], "precision": r["precision"]} if r.get("engine") else {}
            out.append({"model": r["model"], "batch_size": r["batch_size"], "device": r["device"], **extra,
                        f"cpu_{unit}": base, f"device_{unit}": v, "speedup": base / v if v > 0 else None})
    return out


def csv_rows(body: Mapping[str, Any]) -> tuple[tuple[str, ...], list[list[Any]]]:
    """results.csv: one row per point, units in the column names."""
    rows = []
    engines = bool(body.get("engines"))
    for p in body.get("points", []):
        b, i = p["batch_latency_s"], p["image_latency_s"]
        m = body.get("models", {}).get(p["model"], {})
        rows.append([p["model"], p["backend"], p["device"], p["precision"], p["batch_size"], p["runs"],
                     p["warmup_runs"], p["elapsed_s"], p["rel_spread"], p["stable"], b["mean"], b["p50"], b["p90"],
                     b["p99"], b["min"], b["max"], i["mean"], i["p50"], i["p90"], i["p99"],
                     p["throughput_images_per_s"], m.get("param_count"), m.get("size_bytes"),
                     *([p.get("engine")] if engines else [])])
    return (*CSV_HEADER, *(("engine",) if engines else ())), rows


def _stable(p: Mapping[str, Any]) -> str:
    return "yes" if p["stable"] else "NO"


def points_section(body: Mapping[str, Any], wide: bool) -> Section:
    if wide:
        header = ("model", "device", "batch", "per image: mean", "p50", "p90", "p99", "per batch: mean", "p50",
                  "p90", "p99", "throughput", "runs", "spread", "stable")
    else:
        header = ("model", "device", "batch", "per image", "p50", "p99", "per batch", "throughput", "runs",
                  "spread", "stable")
    rows = []
    for p in body.get("points", []):
        b, i = p["batch_latency_s"], p["image_latency_s"]
        image = [i["mean"], i["p50"], i["p90"], i["p99"]] if wide else [i["mean"], i["p50"], i["p99"]]
        batch = [b["mean"], b["p50"], b["p90"], b["p99"]] if wide else [b["mean"]]
        rows.append([p["model"], point_label(p), str(p["batch_size"]), *map(format_seconds, image + batch),
                     format_rate(p["throughput_images_per_s"]), str(p["runs"]), format_percent(p["rel_spread"]),
                     _stable(p)])
    text = ("Latency is the mean (and percentiles) of timed `predict` calls; per image = per batch / batch size; "
            "throughput = batch size / mean batch time.  Spread: half-width of the 95% confidence interval of "
            "the mean, relative to it; 'NO' under stable means the time bound came first.")
    return Section("Latency and throughput per point", header, rows, "llr" + "r" * (len(header) - 4) + "l", text)


def models_section(body: Mapping[str, Any]) -> Section:
    rows = []
    for name, m in body.get("models", {}).items():
        for device, bs in m.get("best_batch_size", {}).items():
            point = next(p for p in body["points"] if (p["model"], point_label(p), p["batch_size"]) == (name, device, bs))
            rows.append([name, format_count(m.get("param_count")), format_bytes(m.get("size_bytes")), device,
                         str(bs), format_rate(point["throughput_images_per_s"]),
                         format_seconds(point["image_latency_s"]["mean"])])
    header = ("model", "parameters", "size on disk", "device", "best batch", "throughput", "per image")
    return Section("Models: size and best batch size", header, rows, "lrrlrrr",
                   "Best batch: the batch size with the highest throughput on that device.")


def speedup_section(body: Mapping[str, Any], key: str, unit: str, title: str) -> Section | None:
    rows = [[s["model"], str(s["batch_size"]), format_seconds(s[f"cpu_{unit}"]), point_label(s),
             format_seconds(s[f"device_{unit}"]), format_ratio(s["speedup"])] for s in body.get(key, [])]
    if not rows:
        return None
    what = "per image" if unit == "image_mean_s" else "per sample"
    return Section(title, ("model", "batch", f"cpu {what}", "gpu", f"gpu {what}", "speed-up"), rows, "lrrlrr",
                   "Speed-up: CPU time divided by GPU time at the same batch size.")


def engines_section(body: Mapping[str, Any]) -> Section | None:
    """``single --engines``: per model, engine, precision and device the best throughput and the fidelity to
    the fp32 eager reference."""
    fidelity = body.get("fidelity")
    if not body.get("engines"):
        return None
    rows = []
    labelled = any("top1_accuracy" in f for f in fidelity or [])
    for f in fidelity or []:
        mine = [p for p in body.get("points", []) if (p["model"], p["device"], p.get("engine"), p["precision"])
                == (f["model"], f["device"], f["engine"], f["precision"])]
        best = max(mine, key=lambda p: p["throughput_images_per_s"]) if mine else None
        rows.append([f["model"], f["engine"], f["precision"], f["device"],
                     format_rate(best["throughput_images_per_s"]) if best else "-",
                     str(best["batch_size"]) if best else "-", format_percent(f["top1_agreement"]),
                     f"{f['logits_mad']:.3g}", f"{f['logits_max_abs_diff']:.3g}", format_percent(f["logits_rel_mad"]),
                     *([format_percent(f.get("top1_accuracy"))] if labelled else [])])
    ref = (fidelity or [{}])[0].get("reference", "eager fp32 cpu")
    n = (fidelity or [{}])[0].get("images", body.get("fidelity_images"))
    text = (f"Fidelity: each engine x precision against the {ref} reference on the same {n} images: top-1 "
            "agreement (the share of images whose top class is the same), the mean and largest absolute "
            "difference of the logits, and the mean difference relative to the reference's mean |logit|.  "
            "The weights are random unless model_dir holds real ones, so agreement with the reference, not "
            "accuracy, is the measure.  Throughput: the best batch size's.")
    calib = [f for f in fidelity or [] if f["precision"] == "int8"]
    if calib:
        same = any(f.get("calibrated_on_fidelity_images") for f in calib)
        text += (f"  int8: static post-training quantisation (QDQ, per-channel int8 weights) calibrated on "
                 f"{calib[0]['calibration_images']} images of the set"
                 + (" (the same images as the fidelity set: too few images for a separate subset)." if same
                    else ", not those of the fidelity set."))
    skipped = [sk for sk in body.get("skipped", []) if sk.get("what") == "engine"]
    by_reason: dict[str, list[str]] = {}
    for sk in skipped:
        combos = by_reason.setdefault(sk["reason"], [])
        combo = f"{sk['engine']} {sk['precision']} on {sk['device']}"
        if combo not in combos:
            combos.append(combo)
    for reason, combos in by_reason.items():
        text += f"  Skipped {', '.join(combos)}: {reason.rstrip('.')}."
    if labelled:
        refs = {f["model"]: f for f in fidelity or [] if "top1_accuracy" in f}
        text += ("  Top-1 accuracy: against the labels file, on the labelled images of the fidelity set (the "
                 "reference's: " + ", ".join(f"{m} {format_percent(f.get('reference_top1_accuracy'))} of "
                                             f"{f.get('labelled_images')}" for m, f in refs.items()) + ").")
    header = ("model", "engine", "precision", "device", "throughput", "batch", "top-1 agreement", "logits MAD",
              "max |diff|", "relative MAD", *(("top-1 accuracy",) if labelled else ()))
    return Section("Engines: speed and fidelity", header, rows, "llll" + "r" * (len(header) - 4), text)


def op_section(body: Mapping[str, Any], wide: bool) -> Section | None:
    """Every operator type at every batch size (wide), or the types of 1% or more at the smallest batch."""
    profiles = body.get("op_profile", [])
    if not wide:
        smallest = {}
        for p in profiles:
            smallest[p["model"]] = min(smallest.get(p["model"], p["batch_size"]), p["batch_size"])
        profiles = [p for p in profiles if p["batch_size"] == smallest[p["model"]]]
    if not profiles:
        return None
    devices = list(dict.fromkeys(p["device"] for p in profiles))
    gpus = [d for d in devices if _is_gpu(d)]
    header = ["model", "batch", "operator"]
    for d in devices:
        header += [f"{d} per batch", f"{d} share"]
    header += [f"{g} speed-up" for g in gpus if "cpu" in devices]
    by_key = {(p["model"], p["batch_size"], p["device"]): p for p in profiles}
    rows = []
    for model, bs in dict.fromkeys((p["model"], p["batch_size"]) for p in profiles):
        mine = {d: by_key.get((model, bs, d)) for d in devices}
        ops: dict[str, float] = {}
        for p in mine.values():
            total = (p or {}).get("total_s") or 0.0
            for op, s in (p or {}).get("op_s", {}).items():
                if s > 0 and (wide or s >= 0.01 * total):  # an operator type that did not run is not a row
                    ops[op] = max(ops.get(op, 0.0), s)
        for op in sorted(ops, key=lambda o: -ops[o]):
            row = [model, str(bs), op]
            for d in devices:
                p = mine[d]
                s = p["op_s"].get(op) if p else None
                total = p.get("total_s") if p else None
                row += [format_seconds(s), format_percent(s / total if s is not None and total else None)]
            cpu_s = (mine.get("cpu") or {}).get("op_s", {}).get(op)
            for g in gpus if "cpu" in devices else []:
                g_s = (mine.get(g) or {}).get("op_s", {}).get(op)
                row.append(format_ratio(cpu_s / g_s if cpu_s and g_s else None))
            rows.append(row)
    text = ("From the backend's own profiler, averaged over the profiled runs; share is of the summed "
            "operator time, which excludes the overheads outside operators.")
    if not wide:
        text = "At the smallest batch size, operator types of 1% or more; report.md has every batch size."
    return Section("Operator profile (seconds per batch by operator type)", tuple(header), rows,
                   "lrl" + "r" * (len(header) - 3), text)


def training_section(body: Mapping[str, Any]) -> Section | None:
    training, skipped = body.get("training", []), [s for s in body.get("skipped", []) if s["what"] == "train"]
    if not training and not skipped:
        return None
    rows = [[t["model"], t["device"], str(t["batch_size"]), format_seconds(t["step_s"]), format_seconds(t["sample_s"])]
            for t in training]
    text = "Mean seconds of one SGD step (forward, backward, update), and per sample (per step / batch size)."
    by_reason: dict[str, list[str]] = {}
    for s in skipped:
        models = by_reason.setdefault(s["reason"], [])
        if s["model"] not in models:
            models.append(s["model"])
    for reason, models in by_reason.items():
        text += f"  Skipped {', '.join(models)}: {reason.rstrip('.')}."
    return Section("Training", ("model", "device", "batch", "per step", "per sample"), rows, "llrrr", text)


def sections(body: Mapping[str, Any], wide: bool) -> list[Section]:
    out = [points_section(body, wide), models_section(body)]
    engines = engines_section(body)
    if engines is not None:
        out.append(engines)
    speed = speedup_section(body, "speedups", "image_mean_s", "GPU speed-up over CPU (inference, per image)")
    if speed is None:
        ran = {p.get("device", "") for p in body.get("points", [])}
        gpus_ran = sorted(d for d in ran if d.startswith("gpu"))
        if gpus_ran and "cpu" not in ran:
            text = (f"No CPU baseline was measured in this sweep ({', '.join(gpus_ran)} ran alone): add cpu to "
                    "--devices for the speed-up.")
        else:
            on_machine = body.get("gpus_on_machine") or []
            why = (f"--devices left out {', '.join(on_machine)}, or the backend cannot use it" if on_machine
                   else "no GPU on this machine")
            text = f"No GPU ran in this sweep ({why})."
        out.append(Section("GPU speed-up over CPU", (), [], "", text))
    else:
        out.append(speed)
    for s in (op_section(body, wide), training_section(body),
              speedup_section(body, "training_speedups", "sample_s", "GPU speed-up over CPU (training, per sample)")):
        if s is not None:
            out.append(s)
    return out


def console_summary(body: Mapping[str, Any]) -> str:
    parts = []
    for s in sections(body, wide=False):
        parts.append(f"\n== {s.title} ==\n")
        if s.rows:
            if s.title.startswith("Operator"):
                parts.append(s.text + "\n")
            parts.append(console_table(s.header, s.rows, s.align))
        elif s.text:
            parts.append(s.text + "\n")
    return "".join(parts)


def markdown_report(doc: Mapping[str, Any], run_id: str, plots: Sequence[str]) -> str:
    """report.md for a whole results.json document (envelope and body)."""
    mach = doc.get("machine", {})
    gpus = ", ".join(g["name"] for g in mach.get("gpus", [])) or "none"
    pol = doc.get("policy", {})
    img = doc.get("images", {})
    lines = [f"# cortexbench single: {run_id}", ""]
    if not doc.get("complete", True):
        lines += ["**Incomplete run** (interrupted or failed): only the points measured so far are here.", ""]
    lines += [
        f"- started {doc.get('started_at')}, finished {doc.get('finished_at')}",
        f"- machine: {mach.get('cpu_model', '?')}, {mach.get('usable_cores', '?')} usable cores, "
        f"{format_bytes(mach.get('memory_bytes'))} memory; GPUs: {gpus}",
        (f"- engines {', '.join(doc['engines'])}, precisions {', '.join(doc.get('precisions', []))}"
         if doc.get("engines") else f"- backend {doc.get('backend')}, precision {doc.get('precision')}")
        + f", devices {', '.join(doc.get('devices', []))}, batch sizes {', '.join(map(str, doc.get('batch_sizes', [])))}",
        f"- each point: {pol.get('warmup_runs')} warm-up runs, then at least {pol.get('min_runs')} timed runs until "
        f"the spread is below {format_percent(pol.get('target_rel_spread'))} or {pol.get('max_seconds')} s pass",
        f"- inputs: batches of up to {img.get('used')} distinct images, of the {img.get('available')} in "
        f"{img.get('img_dir')} (preprocessed for each model)"
        + (f"; {len(img.get('bad', []))} did not decode and were left out" if img.get("bad") else ""),
    ]
    lines += [f"- note: {n}" for n in doc.get("notes", [])]
    lines.append("")
    for s in sections(doc, wide=True):
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.rows:
            lines += [markdown_table(s.header, s.rows, s.align)]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})\n" for name in plots]
    return "\n".join(lines).rstrip() + "\n"
