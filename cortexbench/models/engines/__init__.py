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


def check(engine: str, precision: str, device: str) -> None:
    """``EngineSkip`` when ``engine`` cannot run ``precision`` on ``device`` at all: the combinations known
    without importing a framework (``stream --engine`` says them before the run; ``load_engine`` checks
    them first, and its build can still find more, such as a missing compiler or execution provider)."""
    gpu = device.startswith("gpu")
    fam = _FAMILY_OF[engine]
    if fam == "torch":
        if precision == "int8":
            raise EngineSkip(f"{engine} int8: torch's int8 paths are not an engine here; int8 runs in ort and openvino")
        if engine == "graphs" and not gpu:
            raise EngineSkip("graphs: CUDA graphs need a GPU")
        if precision == "fp16" and not gpu:
            raise EngineSkip(f"{engine} fp16 on cpu: torch has no fast fp16 CPU kernels; use bf16 on the CPU")
    elif fam == "ort":
        if precision in ("fp16", "bf16"):
            raise EngineSkip(f"{engine} {precision}: not offered (ONNX Runtime's CPU kernels are fp32 and int8); "
                             f"torch runs {precision}")
    elif fam == "openvino":
        if gpu:
            raise EngineSkip("openvino: runs on the CPU here (its GPU plugin is for Intel GPUs)")
        if precision == "fp16":
            raise EngineSkip("openvino fp16: not a CPU precision; bf16 and int8 are")
    elif fam == "tensorrt":
        if not gpu:
            raise EngineSkip("tensorrt: needs a GPU")
        if precision not in ("fp32", "fp16"):
            raise EngineSkip(f"tensorrt {precision}: not offered (fp32 and fp16 are)")


def load_engine(engine: str, precision: str, spec: ModelSpec, model_dir: Path, device: str,
                calibration: np.ndarray, sample: np.ndarray, lanes: int = 1) -> LoadedModel:
    """``spec`` on ``device`` through ``engine`` at ``precision``, built and run once on ``sample`` (so that
    a lazy compiler fails here, as an ``EngineSkip``, not in the timing).  ``calibration``: preprocessed
    images of the run's set for post-training int8 quantisation (quantised files are cached in
    ``model_dir`` beside the originals).  ``lanes``: threads that will call ``predict`` at once, each with
    its own lane index (a stream worker's lanes: a CUDA stream each in torch, an infer request each in
    OpenVINO)."""
    why = missing(engine)
    if why:
        raise BackendUnavailableError(why)
    check(engine, precision, device)
    module = importlib.import_module(family(engine).module)
    try:
        model: LoadedModel = module.load(engine, precision, spec, Path(model_dir), device, calibration, lanes)
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


__all__ = ["ENGINES", "PRECISIONS", "REFERENCE", "EngineName", "EnginePrecision", "EngineSkip", "check", "family",
           "framework", "load_engine", "missing", "runtime"]
