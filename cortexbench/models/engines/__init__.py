"""Inference engines for ``single``'s engine axis: one model file, several ways to run it.

An engine implies its framework and its file: ``eager``, ``graphs`` and ``compile`` run the torch file
(``torch/<model>.safetensors``) through torch; ``ort``, ``ort-basic``, ``ort-none``, ``openvino`` and
``tensorrt`` run the ONNX file (``onnx/<model>.onnx``, exported from the same torch network with the same
seed, so both hold the same weights).  Each engine family is one module, imported on first use:

    torch_engines     eager (the torch backend), graphs (CUDA graphs, GPU), compile (torch.compile, inductor)
    ort_engines       ONNX Runtime at graph optimisation level all / basic / none; int8 as static QDQ
    openvino_engine   OpenVINO on the CPU, from the ONNX file (fp32), or from the int8 QDQ file
    tensorrt_engine   ONNX Runtime's TensorRT execution provider, where it is installed (GPU)

``load_engine`` returns the backends' ``LoadedModel`` (``predict``, ``close``, ``param_count``,
``size_bytes``).  A combination an engine cannot run (CUDA graphs on the CPU, int8 in torch, ...) raises
``EngineSkip`` with the reason, which ``single`` records in results.json's ``skipped``; an engine whose
package is missing raises ``BackendUnavailableError`` naming the extra to install.  This module imports no
framework.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cortexbench.config import EngineName, EnginePrecision
from cortexbench.errors import BackendUnavailableError, CortexbenchError, DeviceError
from cortexbench.models.backends.base import LoadedModel
from cortexbench.models.registry import ModelSpec

ENGINES: tuple[EngineName, ...] = ("eager", "graphs", "compile", "ort", "ort-basic", "ort-none", "openvino",
                                   "tensorrt")
PRECISIONS: tuple[EnginePrecision, ...] = ("fp32", "fp16", "bf16", "int8")
REFERENCE = ("eager", "fp32", "cpu")  # fidelity is measured against this engine, precision and device


@dataclass(frozen=True)
class Family:
    """What an engine needs: the module that runs it, the backend whose files it reads, the package that
    must be importable and the extra that installs it."""

    module: str
    files: Literal["torch", "onnxruntime"]
    package: str
    extra: str


_FAMILIES = {
    "torch": Family("cortexbench.models.engines.torch_engines", "torch", "torch", "torch"),
    "ort": Family("cortexbench.models.engines.ort_engines", "onnxruntime", "onnxruntime", "onnx"),
    "openvino": Family("cortexbench.models.engines.openvino_engine", "onnxruntime", "openvino", "openvino"),
    "tensorrt": Family("cortexbench.models.engines.tensorrt_engine", "onnxruntime", "tensorrt", "tensorrt"),
}
_FAMILY_OF: dict[str, str] = {"eager": "torch", "graphs": "torch", "compile": "torch", "ort": "ort",
                              "ort-basic": "ort", "ort-none": "ort", "openvino": "openvino",
                              "tensorrt": "tensorrt"}


class EngineSkip(CortexbenchError):
    """This engine cannot run this precision on this device (or failed to build); the point is skipped
    with this message as its reason."""


def family(engine: str) -> Family:
    return _FAMILIES[_FAMILY_OF[engine]]


def framework(engine: str) -> str:
    """The backend whose files ``engine`` runs ('torch' or 'onnxruntime'); results' ``backend`` says
    the engine's own runtime (``runtime``)."""
    return family(engine).files


def runtime(engine: str) -> str:
    """The library that runs ``engine``: torch, onnxruntime, openvino or tensorrt."""
    return family(engine).package


def missing(engine: str) -> str | None:
    """None when ``engine``'s package can be imported, else one line naming the extra to install."""
    fam = family(engine)
    packages = [fam.package] + (["onnx"] if fam.files == "onnxruntime" else [])
    for package in packages:
        if importlib.util.find_spec(package) is None:
            return (f"engine '{engine}' needs the '{package}' package, which is not installed: "
                    f"pip install 'cortexbench[{fam.extra}]'")
    return None


def load_engine(engine: str, precision: str, spec: ModelSpec, model_dir: Path, device: str,
                calibration: np.ndarray, sample: np.ndarray) -> LoadedModel:
    """``spec`` on ``device`` through ``engine`` at ``precision``, built and run once on ``sample`` (so that
    a lazy compiler fails here, as an ``EngineSkip``, not in the timing).  ``calibration``: preprocessed
    images of the run's set for post-training int8 quantisation (quantised files are cached in
    ``model_dir`` beside the originals)."""
    why = missing(engine)
    if why:
        raise BackendUnavailableError(why)
    module = importlib.import_module(family(engine).module)
    try:
        model: LoadedModel = module.load(engine, precision, spec, Path(model_dir), device, calibration)
    except DeviceError as e:  # this engine's runtime cannot use the device (say onnxruntime without CUDA)
        raise EngineSkip(f"{engine} {precision} on {device}: {e}") from None
    try:
        model.predict(sample)
    except CortexbenchError:
        model.close()
        raise
    except Exception as e:  # a compiler that is missing or fails: this point cannot run here
        model.close()
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise EngineSkip(f"{engine} {precision} failed to build or run on {device}: "
                         f"{type(e).__name__}: {(lines[0] if lines else '')[:200]}") from None
    return model


__all__ = ["ENGINES", "PRECISIONS", "REFERENCE", "EngineName", "EnginePrecision", "EngineSkip", "family",
           "framework", "load_engine", "missing", "runtime"]
