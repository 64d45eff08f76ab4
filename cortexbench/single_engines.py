"""``single --engines``: the engine x precision axis of the single-device sweep, and each point's fidelity.

For every model the reference is fp32 eager torch on the CPU (``engines.REFERENCE``), run on the first
``single.fidelity_images`` images of the set.  Then for every device, engine and precision the engine is
built (``engines.load_engine``; int8 calibrated on the images after those, or on the same ones when the set
is too small, which the results say), compared with the reference on the same images (``fidelity``:
top-1 agreement, mean and largest absolute difference of the logits) and timed at every batch size as the
backend sweep times its points.  With ``--labels`` (image file name, class index) each combination and the
reference also get their top-1 accuracy on the labelled images of that set.  A combination an engine cannot run, or an engine that is not installed, is
a row of ``skipped`` with its reason; when nothing at all could run, the reasons are the error.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cortexbench.errors import BackendUnavailableError, ConfigError, UsageError
from cortexbench.models.registry import get_spec
from cortexbench.timing import measure_point

if TYPE_CHECKING:
    from cortexbench.progress import Progress
    from cortexbench.single import Inputs, Sweep

CALIBRATION_IMAGES = 32  # images after the fidelity set that int8 quantisation calibrates on
MIN_CALIBRATION = 8  # fewer left than this: calibrate on the fidelity images themselves


def fidelity(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How close ``logits`` are to ``reference`` (same images, same order): the share of images whose top-1
    class agrees, the mean and largest absolute difference, and the mean difference relative to the
    reference's mean magnitude."""
    if logits.shape != reference.shape:
        raise ValueError(f"logits {logits.shape} and reference {reference.shape} differ in shape")
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    scale = float(np.mean(np.abs(reference))) or 1.0
    return {"top1_agreement": float(np.mean(np.argmax(logits, 1) == np.argmax(reference, 1))),
            "logits_mad": float(diff.mean()), "logits_max_abs_diff": float(diff.max()),
            "logits_rel_mad": float(diff.mean()) / scale}


def predict_all(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, chunk: int) -> np.ndarray:
    """``predict`` over ``images`` in batches of ``chunk`` (``len(images)`` is a multiple of it)."""
    return np.concatenate([np.asarray(predict(images[i:i + chunk]), dtype=np.float32)
                           for i in range(0, len(images), chunk)])


def fidelity_count(available: int, want: int, chunk: int) -> int:
    """How many images the fidelity set holds: ``want`` or all there are, in whole chunks, at least one
    chunk (cycling through the images when there are fewer)."""
    return max(chunk, (min(want, available) // chunk) * chunk)


def read_labels(path: Path) -> dict[str, int]:
    """``--labels``: a CSV of image file name (as in ``img_dir``, without the directory) and class index,
    one image a line; a first line whose label is not a number is a header.  ConfigError for a file that
    cannot be read or a line that is not name,index."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--labels: cannot read {path}: {e.strerror or e}") from None
    out: dict[str, int] = {}
    for number, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[1].strip().lstrip("-").isdigit():
            if number == 1 and len(row) == 2:
                continue  # a header
            raise ConfigError(f"--labels: {path} line {number} is not 'image name,class index': {','.join(row)[:80]}")
        out[Path(row[0].strip()).name] = int(row[1])
    return out


def accuracy(logits: np.ndarray, labels: Sequence[int | None]) -> float | None:
    """The share of the labelled images (label not None) whose top-1 class is their label."""
    known = [(i, y) for i, y in enumerate(labels) if y is not None]
    if not known:
        return None
    top = np.argmax(logits, 1)
    return float(np.mean([top[i] == y for i, y in known]))


def split_images(images: np.ndarray, want: int, chunk: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(fidelity images, calibration images, whether they are the same images): the first ``want`` (a
    multiple of ``chunk``, at least one chunk) and up to CALIBRATION_IMAGES after them."""
    n = fidelity_count(len(images), want, chunk)
    fid = images[np.arange(n) % len(images)]
    rest = images[n:n + CALIBRATION_IMAGES]
    if len(rest) >= MIN_CALIBRATION:
        return fid, rest, False
    return fid, fid[:CALIBRATION_IMAGES], True


def _skip(sweep: Sweep, model: str, engine: str, precision: str, device: str, reason: str) -> None:
    sweep.skipped.append({"what": "engine", "model": model, "engine": engine, "precision": precision,
                          "device": device, "reason": reason})


def run_engines(sweep: Sweep, inputs: Inputs, bar: Progress) -> None:
    """Every (model, device, engine, precision) of the plan: build, fidelity, then a point per batch size."""
    from cortexbench.models import engines as eng
    from cortexbench.models.backends import get_backend
    from cortexbench.models.backends.base import LoadOptions

    plan = sweep.plan
    cfg = plan.cfg
    ref_engine, ref_precision, ref_device = eng.REFERENCE
    chunk = min(max(plan.batch_sizes), cfg.single.fidelity_images)
    labels = read_labels(cfg.single.labels) if cfg.single.labels is not None else None
    for name in plan.models:
        spec = get_spec(name)
        images = inputs.for_model(spec)
        fid, calib, same = split_images(images, cfg.single.fidelity_images, chunk)
        truth: list[int | None] = []
        if labels is not None:
            names = inputs.names[(spec.input_kind, spec.input_shape)]
            truth = [labels.get(names[i % len(images)]) for i in range(len(fid))]
            if all(y is None for y in truth):
                raise ConfigError(f"--labels: {cfg.single.labels} labels none of the {len(fid)} images the "
                                  f"engines are compared on (names as in {cfg.img_dir}, e.g. {names[0]})")
        bar.advance(0, note=f"{name}: the fp32 eager reference on {len(fid)} images")
        ref_model = get_backend("torch").load(spec, cfg.model_dir, ref_device, LoadOptions())
        try:
            reference = predict_all(ref_model.predict, fid, chunk)
            ref_accuracy = accuracy(reference, truth) if labels is not None else None
            sweep.models.setdefault(name, {}).update(param_count=ref_model.param_count,
                                                     size_bytes=ref_model.size_bytes)
        finally:
            ref_model.close()
        for device in plan.devices:
            for engine in plan.engines:
                for precision in plan.precisions:
                    n_bs = len(plan.batch_sizes)
                    bar.advance(0, note=f"{name} on {device}: {engine} {precision}, building")
                    try:
                        model = eng.load_engine(engine, precision, spec, cfg.model_dir, device, calib,
                                                inputs.batch(spec, chunk))
                    except (eng.EngineSkip, BackendUnavailableError) as e:
                        _skip(sweep, name, engine, precision, device, str(e))
                        bar.advance(n_bs)
                        continue
                    try:
                        logits = predict_all(model.predict, fid, chunk)
                        f = fidelity(logits, reference)
                        if labels is not None:
                            f.update(top1_accuracy=accuracy(logits, truth), reference_top1_accuracy=ref_accuracy,
                                     labelled_images=sum(y is not None for y in truth))
                        sweep.fidelity.append({"model": name, "engine": engine, "precision": precision,
                                               "device": device, "runtime": eng.runtime(engine), "images": len(fid),
                                               "reference": f"{ref_engine} {ref_precision} {ref_device}",
                                               "calibration_images": len(calib) if precision == "int8" else 0,
                                               "calibrated_on_fidelity_images": same and precision == "int8",
                                               **f})
                        for bs in plan.batch_sizes:
                            bar.advance(0, note=f"{name} on {device}: {engine} {precision}, batch {bs}")
                            timing = measure_point(model.predict, inputs.batch(spec, bs), plan.policy)
                            sweep.points.append({"model": name, "backend": eng.runtime(engine), "engine": engine,
                                                 "device": device, "precision": precision, **timing.to_dict()})
                            bar.advance(1)
                    finally:
                        model.close()
    if not sweep.points and sweep.skipped:
        reasons = list(dict.fromkeys(s["reason"] for s in sweep.skipped))
        if len(reasons) == 1 and "pip install" in reasons[0]:
            raise BackendUnavailableError(reasons[0])
        raise UsageError("no engine x precision x device of this sweep can run here: " + "; ".join(reasons))


def engine_fields(plan: Any) -> dict[str, Any]:
    """What results.json's body adds with an engine axis."""
    return {"engines": list(plan.engines), "precisions": list(plan.precisions),
            "fidelity_images": plan.cfg.single.fidelity_images}


__all__ = ["CALIBRATION_IMAGES", "accuracy", "engine_fields", "fidelity", "fidelity_count", "predict_all",
           "read_labels", "run_engines", "split_images"]
