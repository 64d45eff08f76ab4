"""The tables and plots of ``python -m cortexbench.experiments``, from the body of its results.json alone.

Every table sets each inference column (backend x device) against the first one, the backend on the CPU:
``x`` is how many times faster (its seconds over the column's), so the CPU-vs-GPU and CPU-vs-engine ratios
read off directly.  Training is the backend's only (the engine does not train).

The plots are ``cortexbench.report.experiments_plots``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cortexbench.report.tables import console_table, format_ratio, format_seconds, markdown_table

Column = tuple[str, str]  # (backend, device)


def _columns(body: Mapping[str, Any]) -> list[Column]:
    return [(c["backend"], c["device"]) for c in body["columns"]]


def label(col: Column) -> str:
    return f"{col[0]} {col[1]}"


def _speedup(ref: float | None, value: float | None) -> str:
    return format_ratio(ref / value) if ref and value else "-"


def _cell(row: Mapping[str, Any] | None, key: str) -> str:
    """A row's seconds, marked ``*`` when its timing did not become stable (training has no such flag)."""
    if not row:
        return format_seconds(None)
    return format_seconds(row.get(key)) + ("*" if row.get("stable") is False else "")


def mlp2_table(body: Mapping[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    rows = body.get("mlp2") or []
    if not rows:
        return None
    infer = {(r["backend"], r["device"]): r for r in rows if r["what"] == "inference"}
    train = {(r["backend"], r["device"]): r for r in rows if r["what"] == "training"}
    cols = [c for c in _columns(body) if c in infer or c in train]
    ref_i = infer.get(cols[0], {}).get("epoch_s") if cols else None
    ref_t = train.get(cols[0], {}).get("epoch_s") if cols else None
    header = ["backend", "device", "inference epoch", "per row", "x", "training epoch", "per row", "x"]
    out = []
    for c in cols:
        i, t = infer.get(c, {}), train.get(c, {})
        out.append([c[0], c[1], _cell(i, "epoch_s"), _cell(i, "row_s"),
                    _speedup(ref_i, i.get("epoch_s")), format_seconds(t.get("epoch_s")),
                    format_seconds(t.get("row_s")), _speedup(ref_t, t.get("epoch_s")) if t else "-"])
    return header, out


def mnist_table(body: Mapping[str, Any], model: str) -> tuple[list[str], list[list[str]]] | None:
    rows = [r for r in body.get("mnist") or [] if r["model"] == model]
    if not rows:
        return None
    infer = {(r["backend"], r["device"], r["batch_size"]): r for r in rows if r["what"] == "inference"}
    train = {(r["device"], r["batch_size"]): r["sample_s"] for r in rows if r["what"] == "training"}
    cols = [c for c in _columns(body) if any(k[:2] == c for k in infer)]
    devices = [d for d in body["devices"] if any(k[0] == d for k in train)]
    header = ["batch"] + [f"infer {label(c)}" for c in cols] + [f"x {label(c)}" for c in cols[1:]] \
        + [f"train {d}" for d in devices] + [f"x train {d}" for d in devices[1:]]
    out = []
    for bs in sorted({r["batch_size"] for r in rows}):
        rs = [infer.get((*c, bs)) for c in cols]
        i = [r["sample_s"] if r else None for r in rs]
        t = [train.get((d, bs)) for d in devices]
        out.append([str(bs)] + [_cell(r, "sample_s") for r in rs] + [_speedup(i[0], v) for v in i[1:]]
                   + [format_seconds(v) for v in t] + [_speedup(t[0], v) for v in t[1:]])
    return header, out


def op_types(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Operator types with time in any row, in the order the backends give them."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.update({k: None for k, v in r["op_s"].items() if v > 0})
    return list(seen)


def digits_tables(body: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """One table of seconds per batch per operator type for each column, then the columns compared."""
    rows = body.get("digits") or []
    out = []
    cols = [c for c in _columns(body) if any((r["backend"], r["device"]) == c for r in rows)]
    for c in cols:
        mine = [r for r in rows if (r["backend"], r["device"]) == c]
        ops = op_types(mine)
        header = ["batch", *ops, "profiled total", "measured batch", "per sample"]
        table = [[str(r["batch_size"]), *(format_seconds(r["op_s"].get(o, 0.0)) for o in ops),
                  format_seconds(r["op_total_s"]), _cell(r, "batch_s"), _cell(r, "sample_s")]
                 for r in mine]
        out.append((f"digits_cnn per operator type, {label(c)} (seconds per batch)", header, table))
    if len(cols) > 1:
        per = {(r["backend"], r["device"], r["batch_size"]): r["sample_s"] for r in rows}
        header = ["batch"] + [label(c) for c in cols] + [f"x {label(c)}" for c in cols[1:]]
        table = []
        for bs in sorted({r["batch_size"] for r in rows}):
            v = [per.get((*c, bs)) for c in cols]
            table.append([str(bs)] + [format_seconds(x) for x in v] + [_speedup(v[0], x) for x in v[1:]])
        out.append(("digits_cnn seconds per sample, columns compared", header, table))
    return out


def tables(body: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    s = body["scale"]
    if t := mlp2_table(body):
        out.append((f"mlp2: {s['rows']:,} rows in batches of {s['batch_size']:,}, one epoch", *t))
    for model in ("mnist_mlp", "mnist_cnn"):
        if t := mnist_table(body, model):
            out.append((f"{model}: seconds per sample against batch size", *t))
    out += digits_tables(body)
    return out


def console_summary(body: Mapping[str, Any]) -> str:
    parts = []
    for title, header, rows in tables(body):
        parts.append(f"\n{title}\n" + console_table(header, rows, "l" + "r" * (len(header) - 1), indent="  "))
    return "".join(parts)


def markdown_report(doc: Mapping[str, Any], run_id: str, plots: Sequence[str]) -> str:
    m = doc.get("machine", {})
    lines = [f"# cortexbench experiments: {run_id}", ""]
    if not doc.get("complete", True):
        lines += ["**Partial results**: the run was stopped before the end.", ""]
    lines += [f"Backend `{doc['backend']}` (inference and training), engine `{doc.get('engine') or 'none'}` "
              f"(inference), devices {', '.join(doc['devices'])}; machine: {m.get('cpu_model', '?')}, "
              f"{m.get('usable_cores', '?')} usable cores "
              f"(OMP_NUM_THREADS={doc.get('omp_num_threads') or 'unset'}), GPUs: {', '.join(doc.get('gpus_on_machine') or []) or 'none'}.",
              "", "`x` columns: how many times faster than the first column (the backend on the CPU). "
              "`*`: a timing that did not become stable (the 95% confidence half-width of its mean stayed above "
              f"{doc['policy']['target_rel_spread']:.0%} for {doc['policy']['max_seconds']:g} s; `rel_spread` in "
              "results.json says by how much).", ""]
    lines += [f"- note: {n}" for n in doc.get("notes", [])]
    for title, header, rows in tables(doc):
        lines += ["", f"## {title}", "", markdown_table(header, rows, "l" + "r" * (len(header) - 1)).rstrip()]
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    return "\n".join(lines) + "\n"
