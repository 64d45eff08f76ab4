"""The OpenVINO engine (``openvino``, the extra ``.[openvino]``): the model's ONNX file on OpenVINO's CPU plugin.

On first use the ONNX file is converted (``openvino.convert_model``) and the IR is cached in
``model_dir/openvino/<model>[.int8].xml`` and ``.bin`` (weights kept fp32: ``compress_to_fp16=False``);
later runs read the IR.  The CPU plugin is compiled with ``INFERENCE_PRECISION_HINT`` set to the precision
asked for, so fp32 is fp32 (the plugin's default on a CPU with bf16 units would be bf16):

- fp32: ``f32``;
- bf16: ``bf16`` where the plugin takes it (on a CPU with AVX-512 but no bf16 instructions it converts in
  software); where it keeps fp32 instead, the point is skipped with that reason;
- int8: the int8 QDQ file that ONNX Runtime's static quantisation makes from the run's calibration images
  (``ort_engines.quantized``; OpenVINO runs QDQ models as int8), so it needs onnxruntime as well.  NNCF is
  not used: its releases that install beside numpy 1.23 pull in pandas, scipy and scikit-learn.
- fp16 is not a CPU precision: skipped.

One infer request per lane (``predict``'s ``lane``), made on a lane's first call, each used by one thread
at a time (its lock), so a stream worker's lanes run a model at once; OpenVINO runs each request on its own
thread pool (every core of the machine).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openvino as ov

from cortexbench.models.backends.base import LoadedModel, files_size, require_files
from cortexbench.models.backends.onnx_impl import BACKEND as ONNX
from cortexbench.models.backends.onnx_impl import file_param_count
from cortexbench.models.engines import EngineSkip
from cortexbench.models.registry import ModelSpec, file_stem

_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 comes from the QDQ graph; the rest stays f32
_CORE: ov.Core | None = None


def core() -> ov.Core:
    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


def ir_file(spec: ModelSpec, model_dir: Path, int8: bool) -> Path:
    return Path(model_dir) / "openvino" / f"{file_stem(spec.name)}{'.int8' if int8 else ''}.xml"


def converted(spec: ModelSpec, onnx_file: Path, xml: Path) -> Path:
    """The IR of ``onnx_file`` at ``xml`` (converted now when it is not there yet; written to temporary
    names and renamed, the .bin first, so a half-written pair is never read)."""
    if xml.exists() and xml.with_suffix(".bin").exists():
        return xml
    import os

    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.tmp.xml")
    try:
        ov.save_model(ov.convert_model(str(onnx_file)), str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return xml


class OpenVinoModel:
    """A compiled OpenVINO model and an infer request per lane (lane 0's made now), each behind a lock."""

    def __init__(self, spec: ModelSpec, device: str, compiled: ov.CompiledModel, size_bytes: int, params: int) -> None:
        self.spec, self.device, self.size_bytes, self.param_count = spec, device, size_bytes, params
        self._compiled: ov.CompiledModel | None = compiled
        self._lock = threading.Lock()  # guards _requests (making a lane's request)
        self._requests: dict[int, tuple[threading.Lock, ov.InferRequest]] = {
            0: (threading.Lock(), compiled.create_infer_request())}
        self.inference_precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))

    def _request(self, lane: int) -> tuple[threading.Lock, ov.InferRequest]:
        entry = self._requests.get(lane)
        if entry is None:
            with self._lock:
                entry = self._requests.get(lane)
                if entry is None:
                    compiled = self._compiled
                    if compiled is None:
                        raise RuntimeError(f"model '{self.spec.name}' on {self.device} was closed")
                    entry = self._requests[lane] = (threading.Lock(), compiled.create_infer_request())
        return entry

    def predict(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        if self._compiled is None:
            raise RuntimeError(f"model '{self.spec.name}' on {self.device} was closed")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        lock, request = self._request(lane)
        with lock:
            request.infer({0: x})
            return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    def close(self) -> None:
        with self._lock:
            self._compiled, self._requests = None, {}


def load(engine: str, precision: str, spec: ModelSpec, model_dir: Path, device: str,
         calibration: np.ndarray, lanes: int = 1) -> LoadedModel:
    if precision == "int8":
        from cortexbench.models.engines.ort_engines import quantized

        src, xml = quantized(spec, model_dir, calibration), ir_file(spec, model_dir, True)
    else:
        (src,) = ONNX.model_files(spec, model_dir)
        require_files(spec, [src], ONNX.name)
        xml = ir_file(spec, model_dir, False)
    converted(spec, src, xml)
    compiled = core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": _HINT[precision]})
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if precision == "bf16" and "bf16" not in got and "bfloat16" not in got:
        raise EngineSkip(f"openvino bf16: this CPU has no bf16 instructions (the plugin runs {got})")
    params = file_param_count(ONNX.model_files(spec, model_dir)[0])
    return OpenVinoModel(spec, device, compiled, files_size([xml, xml.with_suffix(".bin")]), params)
