"""The ONNX Runtime engines: one ONNX file at three graph optimisation levels, fp32 or int8.

    ort         GraphOptimizationLevel.ORT_ENABLE_ALL (constant folding, node fusions, layout changes)
    ort-basic   ORT_ENABLE_BASIC (constant folding and redundant node removal only)
    ort-none    ORT_DISABLE_ALL (the graph as exported)

int8 is post-training static quantisation in QDQ form (``onnxruntime.quantization.quantize_static``:
int8 weights per output channel, int8 activations with MinMax ranges from a calibration subset of the
run's own image set, preprocessed as the model sees them).  The quantised file is made on first use and
cached beside the original as ``onnx/<model>.int8.onnx`` (delete it to calibrate again); OpenVINO's int8
runs the same file.  fp16 and bf16 are not offered (the CPU provider has no fast fp16 kernels).  On a GPU
the CUDA execution provider runs, where this onnxruntime has it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cortexbench.models.backends.base import LoadedModel, require_files
from cortexbench.models.backends.onnx_impl import BACKEND, OnnxModel
from cortexbench.models.engines import EngineSkip
from cortexbench.models.registry import ModelSpec, file_stem

LEVELS = {"ort": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "ort-basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "ort-none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
CALIBRATION_BATCH = 8


def int8_file(spec: ModelSpec, model_dir: Path) -> Path:
    return Path(model_dir) / "onnx" / f"{file_stem(spec.name)}.int8.onnx"


class _Reader:
    """``quantize_static``'s CalibrationDataReader: the calibration images in batches."""

    def __init__(self, name: str, images: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter([np.ascontiguousarray(images[i:i + CALIBRATION_BATCH])
                                                    for i in range(0, len(images), CALIBRATION_BATCH)])
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}


def quantized(spec: ModelSpec, model_dir: Path, calibration: np.ndarray) -> Path:
    """The int8 QDQ file of ``spec`` (made now from ``calibration`` when it is not there yet)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cortexbench.results import write_bytes

    out = int8_file(spec, model_dir)
    if out.exists():
        return out
    (src,) = BACKEND.model_files(spec, model_dir)
    require_files(spec, [src], BACKEND.name)
    if len(calibration) == 0:
        raise EngineSkip("int8: no calibration images")
    with tempfile.TemporaryDirectory(prefix="cortexbench-quant-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(q), _Reader("data", calibration.astype(np.float32)),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        write_bytes(out, q.read_bytes())
    return out


def session_model(spec: ModelSpec, path: Path, device: str, level: ort.GraphOptimizationLevel,
                  lanes: int = 1) -> OnnxModel:
    """An ``OnnxModel`` of the file ``path`` at optimisation ``level`` on ``device``, called from ``lanes``
    lanes (threads) at once."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    data = path.read_bytes()
    session = BACKEND._session(data, device, options)
    meta = session.get_modelmeta().custom_metadata_map
    params = int(meta["params"]) if meta.get("params", "").isdigit() else None
    return OnnxModel(spec, device, session, path, len(data), lanes, params)


def load(engine: str, precision: str, spec: ModelSpec, model_dir: Path, device: str,
         calibration: np.ndarray, lanes: int = 1) -> LoadedModel:
    """(engines.check has refused fp16 and bf16; an ORT session is safe for several threads: ``lanes``
    needs nothing.)"""
    BACKEND._providers(device)  # a GPU without the CUDA provider (DeviceError: a skip), before the quantisation
    if precision == "int8":
        path = quantized(spec, model_dir, calibration)
    else:
        (path,) = BACKEND.model_files(spec, model_dir)
        require_files(spec, [path], BACKEND.name)
    return session_model(spec, path, device, LEVELS[engine], lanes)
