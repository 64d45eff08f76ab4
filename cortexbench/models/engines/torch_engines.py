"""The torch engines: ``eager``, ``graphs`` and ``compile`` on the torch file of a model.

- ``eager``: the torch backend as it is (``torch_impl.TorchBackend.load``), fp32, fp16 (GPU) or bf16.
- ``graphs``: the same with CUDA graphs (one captured per batch size on first use); GPU only.
- ``compile``: ``torch.compile`` with the inductor backend, mode ``COMPILE_MODE``, static shapes (one
  compilation per batch size, on its first call: the warm-up, outside the timing).  On the CPU inductor
  needs a C++ compiler; without one the first call fails and the point is skipped with the reason.

Precisions: fp32 everywhere; bf16 on the CPU and GPU (weights and activations in bf16, logits back in
fp32); fp16 on a GPU only (torch has no fast fp16 CPU kernels: use bf16 there); int8 is not a torch engine
here (``ort`` and ``openvino`` run int8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cortexbench.models.backends.base import LoadedModel, LoadOptions, parse_device
from cortexbench.models.backends.torch_impl import BACKEND, REDUCED, TorchModel
from cortexbench.models.registry import ModelSpec

COMPILE_MODE = "default"  # torch.compile's mode; 'max-autotune' tunes longer (minutes per model on 2 cores)


class CompiledModel:
    """A torch network run through ``torch.compile`` (inductor) on one device: fp32 numpy in, fp32 out."""

    def __init__(self, inner: TorchModel, precision: str) -> None:
        self.spec, self.device = inner.spec, inner.device
        self.param_count, self.size_bytes = inner.param_count, inner.size_bytes
        self._inner: TorchModel | None = inner
        self._dtype = REDUCED.get(precision)
        kind, index = parse_device(inner.device)
        self._cuda = torch.device("cuda", index) if kind == "gpu" else None
        self._fn = torch.compile(inner.net, mode=COMPILE_MODE, dynamic=False)

    def predict(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        if self._inner is None:
            raise RuntimeError(f"model '{self.spec.name}' on {self.device} was closed")
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            if self._cuda is not None:
                x = x.to(self._cuda, non_blocking=False)
            if self._dtype is not None:
                x = x.to(self._dtype)
            y = self._fn(x).float()
            out = y.cpu().numpy() if self._cuda is not None else y.numpy()
        return out

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
        self._inner, self._fn = None, None  # type: ignore[assignment]


def load(engine: str, precision: str, spec: ModelSpec, model_dir: Path, device: str,
         calibration: np.ndarray, lanes: int = 1) -> LoadedModel:
    options = LoadOptions(precision=precision, cuda_graphs=engine == "graphs", lanes=lanes)  # type: ignore[arg-type]
    model = BACKEND.load(spec, model_dir, device, options)
    if engine != "compile":
        return model
    assert isinstance(model, TorchModel)
    return CompiledModel(model, precision)
