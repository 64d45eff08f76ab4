"""The TensorRT engine (``tensorrt``): the model's ONNX file through ONNX Runtime's TensorRT execution
provider, on a GPU, fp32 or fp16 (``trt_fp16_enable``); int8 would need TensorRT's own calibration and is
not offered.  The engine needs the ``tensorrt`` package and an onnxruntime build with the provider
(onnxruntime-gpu); where either is missing the engine is skipped with one line that says so.  Engines are
built on first use and cached in ``model_dir/tensorrt/`` (TensorRT's engine cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from cortexbench.models.backends.base import LoadedModel, parse_device, require_files
from cortexbench.models.backends.onnx_impl import BACKEND, OnnxModel
from cortexbench.models.engines import EngineSkip
from cortexbench.models.registry import ModelSpec

PROVIDER = "TensorrtExecutionProvider"


def load(engine: str, precision: str, spec: ModelSpec, model_dir: Path, device: str,
         calibration: np.ndarray, lanes: int = 1) -> LoadedModel:
    _, index = parse_device(device)  # a GPU, fp32 or fp16: engines.check said so
    if PROVIDER not in ort.get_available_providers():
        raise EngineSkip(f"tensorrt: this onnxruntime {ort.__version__} has no {PROVIDER} "
                         "(install onnxruntime-gpu with the TensorRT libraries)")
    (path,) = BACKEND.model_files(spec, model_dir)
    require_files(spec, [path], BACKEND.name)
    cache = Path(model_dir) / "tensorrt"
    cache.mkdir(parents=True, exist_ok=True)
    trt = {"device_id": index, "trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
           "trt_engine_cache_path": str(cache)}
    data = path.read_bytes()
    session = ort.InferenceSession(data, ort.SessionOptions(),
                                   providers=[(PROVIDER, trt), ("CUDAExecutionProvider", {"device_id": index})])
    if session.get_providers()[0] != PROVIDER:
        raise EngineSkip("tensorrt: onnxruntime could not start its TensorRT provider (libraries missing?)")
    return OnnxModel(spec, device, session, path, len(data), lanes, None)
