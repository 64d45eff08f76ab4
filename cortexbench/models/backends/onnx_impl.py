"""The ONNX Runtime backend: ``model_dir/onnx/<model>.onnx`` served by an ``InferenceSession``.

Export builds the torch network of ``torch_nets`` with the same seed as the torch backend (so the torch
and ONNX files of one seed hold the same weights) and writes it with torch's TorchScript-based exporter
(opset 17, input ``data``, output ``output``, dynamic batch axis; CaffeNet's LRN becomes an ONNX
``LRN`` node).  Without torch but with MXNet it converts the MXNet backend's files with
``mxnet.onnx.export_model`` instead (their weights are MXNet's, not torch's).  The model name, seed and
parameter count are stored in the file's ``metadata_props``.

Loading reads the file from disk and hands the bytes to ONNX Runtime (CUDA execution provider for
``gpu:N``, CPU otherwise).  ``session.run`` is thread-safe, so lanes need nothing more.  fp16 is not
offered here: ``--backend torch`` runs fp16.

``profile_ops`` runs a second session with ONNX Runtime's profiler and sums the ``Node`` events by
operator type.  Fused nodes count as their main operator (a Conv with a fused ReLU or batch norm is
convolution).  On a GPU, the CUDA provider launches kernels asynchronously, so its per-node times are
host-side launch times, not kernel times.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cortexbench import machine
from cortexbench.errors import BackendUnavailableError, ConfigError, DeviceError
from cortexbench.models.backends.base import (
    OP_TYPES,
    BackendId,
    BlobLoader,
    ExportResult,
    LoadedModel,
    LoadOptions,
    ModelLoader,
    NullModel,
    Tier,
    corrupt,
    export_null_result,
    files_size,
    load_null,
    null_file,
    parse_device,
    read_file,
    require_files,
)
from cortexbench.models.registry import ModelSpec, file_stem

OPSET = 17
INPUT, OUTPUT = "data", "output"
_DEFAULTS = LoadOptions()
_STATS = ("running_mean", "running_var", "moving_mean", "moving_var", "num_batches_tracked")
_SHIM_LOCK = threading.Lock()

# ONNX operator types (and ONNX Runtime's fused / layout-transformed ones) onto OP_TYPES.
_ONNX_OPS: dict[str, tuple[str, ...]] = {
    "convolution": ("Conv", "ConvTranspose", "FusedConv", "NhwcConv", "NhwcFusedConv", "QLinearConv",
                    "ConvInteger"),
    "activation": ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "FastGelu", "BiasGelu", "Clip", "Elu",
                   "HardSigmoid", "HardSwish", "Softplus", "PRelu", "QuickGelu"),
    "pooling": ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "NhwcMaxPool",
                "QLinearAveragePool", "QLinearGlobalAveragePool"),
    "batch_norm": ("BatchNormalization",),
    "normalization": ("LRN", "LayerNormalization", "InstanceNormalization", "GroupNorm",
                      "SkipLayerNormalization", "SimplifiedLayerNormalization"),
    "dense": ("Gemm", "MatMul", "FusedGemm", "FusedMatMul", "MatMulInteger", "QGemm", "QLinearMatMul"),
    "concat": ("Concat",),
    "elementwise": ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Neg", "Reciprocal", "Sum",
                    "Max", "Min", "Abs", "BiasAdd"),
    "softmax": ("Softmax", "LogSoftmax"),
    "dropout": ("Dropout",),
    "reshape": ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"),
    "copy": ("Identity", "Cast", "MemcpyToHost", "MemcpyFromHost", "ReorderInput", "ReorderOutput"),
}
_OP_TYPE_OF = {op: category for category, ops in _ONNX_OPS.items() for op in ops}


def op_category(op_type: str) -> str:
    """The OP_TYPES entry of one ONNX operator type ('GlobalAveragePool' -> 'pooling')."""
    return _OP_TYPE_OF.get(op_type, "other")


def aggregate_profile(events: list[dict[str, Any]], runs: int, skip_runs: int = 0) -> dict[str, float]:
    """Seconds per run and op type from an ONNX Runtime profile (the JSON list of trace events), leaving
    out the first ``skip_runs`` model runs (warm-up)."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = starts[skip_runs] if skip_runs and len(starts) > skip_runs else -math.inf
    totals = dict.fromkeys(OP_TYPES, 0.0)
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e.get("ts", 0) < after:
            continue
        totals[op_category(str(e.get("args", {}).get("op_name", "")))] += float(e.get("dur", 0)) / 1e6
    return {k: v / max(1, runs) for k, v in totals.items()}


# --- export ---------------------------------------------------------------------------------------


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _metadata(spec: ModelSpec, seed: int | None, params: int, exporter: str) -> bytes:
    """A serialized ModelProto holding only ``metadata_props``.  Appending it to a serialized model merges
    the two (protobuf concatenation), which adds the properties without parsing the weights again."""
    import onnx

    props = {"model": spec.name, "seed": "" if seed is None else str(seed), "params": str(params),
             "exporter": exporter}
    return onnx.ModelProto(metadata_props=[onnx.StringStringEntryProto(key=k, value=v)
                                           for k, v in props.items()]).SerializeToString()


def export_from_torch(spec: ModelSpec, seed: int) -> tuple[bytes, int]:
    """The ONNX bytes of the torch network of ``spec`` (``torch_nets.build(spec, seed)``) and its parameter count."""
    import torch

    from cortexbench.models.backends import torch_nets

    net = torch_nets.build(spec, seed)
    kwargs: dict[str, Any] = dict(input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET,
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: the dynamo one needs onnxscript
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (torch.zeros((2, *spec.input_shape)),), buf, **kwargs)
    return buf.getvalue(), sum(p.numel() for p in net.parameters())


@contextlib.contextmanager
def _onnx_mapping_shim() -> Iterator[None]:
    """MXNet 1.9's exporter imports ``onnx.mapping``, which onnx 1.15 removed; provide the two tables
    it uses (from onnx.helper's public functions) for the duration of the export."""
    import onnx
    import onnx.helper

    if importlib.util.find_spec("onnx.mapping") is not None:
        yield
        return
    with _SHIM_LOCK:
        shim = types.ModuleType("onnx.mapping")
        to_tensor = {np.dtype(t): onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t))
                     for t in ("float32", "float16", "float64", "int8", "int32", "int64", "uint8", "bool")}
        shim.NP_TYPE_TO_TENSOR_TYPE = to_tensor  # type: ignore[attr-defined]
        shim.TENSOR_TYPE_TO_NP_TYPE = {v: k for k, v in to_tensor.items()}  # type: ignore[attr-defined]
        sys.modules["onnx.mapping"], onnx.mapping = shim, shim  # type: ignore[attr-defined]
        try:
            yield
        finally:
            sys.modules.pop("onnx.mapping", None)
            with contextlib.suppress(AttributeError):
                delattr(onnx, "mapping")


def _rename(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.name == old:
            vi.name = new


def export_from_mxnet(spec: ModelSpec, model_dir: Path, seed: int) -> tuple[bytes, int]:
    """Convert the MXNet backend's files of ``spec`` (exporting them first when missing) to ONNX bytes,
    with initializers taken out of the graph inputs and the names ``data`` / ``output``."""
    import mxnet.onnx
    import onnx

    from cortexbench.models.backends import get_backend

    sym_file, params_file = get_backend("mxnet").model_files(spec, model_dir)
    if not (sym_file.exists() and params_file.exists()):
        get_backend("mxnet").export(spec, model_dir, seed)
    with _onnx_mapping_shim(), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        mxnet.onnx.export_model(str(sym_file), str(params_file), [(1, *spec.input_shape)], [np.float32], str(out),
                                dynamic=True, dynamic_input_shapes=[(None, *spec.input_shape)])
        model = onnx.load(str(out))
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise BackendUnavailableError(f"model '{spec.name}': the MXNet graph has {len(inputs)} inputs and "
                                      f"{len(graph.output)} outputs; export ONNX with torch: pip install 'cortexbench[torch]'")
    del graph.input[:]
    graph.input.extend(inputs)
    _rename(graph, inputs[0].name, INPUT)
    _rename(graph, graph.output[0].name, OUTPUT)
    params = sum(math.prod(t.dims) for t in graph.initializer if not t.name.endswith(_STATS))
    return model.SerializeToString(), params


def file_param_count(path: Path) -> int:
    """Parameters of an ONNX file: its ``params`` metadata, else the sizes of its float initializers."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("params", "").isdigit():
        return int(meta["params"])
    return sum(math.prod(t.dims) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and not t.name.endswith(_STATS))


# --- the loaded model -----------------------------------------------------------------------------


class OnnxModel:
    """An ONNX Runtime session on one device."""

    def __init__(self, spec: ModelSpec, device: str, session: ort.InferenceSession, path: Path,
                 size_bytes: int, lanes: int, params: int | None) -> None:
        self.spec, self.device, self.path, self.size_bytes, self.lanes = spec, device, path, size_bytes, lanes
        self.providers = tuple(session.get_providers())
        self._session: ort.InferenceSession | None = session
        self._input, self._output = session.get_inputs()[0].name, session.get_outputs()[0].name
        self._params = params

    @property
    def param_count(self) -> int:
        """From the file's metadata; a file without it is parsed once, on first use (not during load)."""
        if self._params is None:
            try:
                self._params = file_param_count(self.path)
            except Exception:  # onnx missing or the file replaced since: the count is informational
                self._params = 0
        return self._params

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise RuntimeError(f"model '{self.spec.name}' on {self.device} was closed")
        return self._session

    def predict(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != len(self.spec.input_shape) + 1 or x.shape[1:] != self.spec.input_shape:
            raise ValueError(f"model '{self.spec.name}' takes (N, {', '.join(map(str, self.spec.input_shape))}), "
                             f"got {x.shape}")
        if not 0 <= lane < self.lanes:
            raise ValueError(f"lane {lane} does not exist (this model was loaded with {self.lanes} lanes)")
        out = self.session.run([self._output], {self._input: x})[0]
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self._session = None


# --- the backend ----------------------------------------------------------------------------------


def _cuda_provider() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _check_io(spec: ModelSpec, session: ort.InferenceSession) -> str | None:
    """None when the session takes and gives what ``spec`` says, else what is wrong (one line)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        return f"it has {len(inputs)} inputs and {len(outputs)} outputs (cortexbench feeds one input)"
    shape, want = inputs[0].shape, (None, *spec.input_shape)
    if len(shape) != len(want) or any(isinstance(d, int) and w is not None and d != w for d, w in zip(shape, want, strict=True)):
        return f"its input '{inputs[0].name}' has shape {shape}, the model takes (N, {', '.join(map(str, spec.input_shape))})"
    out = outputs[0].shape
    if not out or (isinstance(out[-1], int) and out[-1] != spec.num_classes):
        return f"its output has shape {out}, the model gives {spec.num_classes} classes"
    return None


class OnnxBackend:
    name: BackendId = "onnxruntime"

    def devices(self) -> list[str]:
        gpus = [f"gpu:{g.index}" for g in machine.gpus()] if _cuda_provider() else []
        return ["cpu", *gpus]

    def supports(self, spec: ModelSpec) -> bool:
        return True

    def model_files(self, spec: ModelSpec, model_dir: Path) -> list[Path]:
        if spec.is_null:
            return [null_file(model_dir)]
        return [Path(model_dir) / "onnx" / f"{file_stem(spec.name)}.onnx"]

    def export(self, spec: ModelSpec, model_dir: Path, seed: int, *, force: bool = False) -> ExportResult:
        start = time.perf_counter()
        model_dir = Path(model_dir)
        if spec.is_null:
            return export_null_result(spec, model_dir, self.name, start)
        (path,) = self.model_files(spec, model_dir)
        if path.exists() and not force:
            return self._existing(spec, path, start)
        if _have("torch"):
            import torch

            data, params = export_from_torch(spec, seed)
            exporter = f"torch {torch.__version__}"
        elif _have("mxnet"):
            data, params = export_from_mxnet(spec, model_dir, seed)
            exporter = "mxnet"
        else:
            raise BackendUnavailableError(f"model '{spec.name}': exporting ONNX files needs torch (or mxnet): "
                                          f"pip install 'cortexbench[torch]'")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.write(_metadata(spec, seed, params, exporter))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return ExportResult(spec.name, self.name, (path,), spec.input_shape, params, files_size([path]),
                            "random-init", seed, time.perf_counter() - start)

    def _existing(self, spec: ModelSpec, path: Path, start: float) -> ExportResult:
        """A file already there is kept: report what it holds."""
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise corrupt(spec, path, self.name, e) from None
        meta = {p.key: p.value for p in model.metadata_props}
        del model
        seed = int(meta["seed"]) if meta.get("seed", "").isdigit() else None
        return ExportResult(spec.name, self.name, (path,), spec.input_shape, file_param_count(path),
                            files_size([path]), "user", seed, time.perf_counter() - start)

    def _providers(self, device: str) -> list[Any]:
        kind, index = parse_device(device)
        if kind == "cpu":
            return ["CPUExecutionProvider"]
        if not _cuda_provider():
            raise DeviceError(f"device '{device}': this onnxruntime {ort.__version__} has no CUDA provider "
                              f"(install onnxruntime-gpu); use --devices cpu or --backend torch")
        if index >= len(machine.gpus()):
            raise DeviceError(f"device '{device}' does not exist: this machine has {len(machine.gpus())} GPU(s)")
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]

    def _session(self, data: bytes, device: str, options: ort.SessionOptions) -> ort.InferenceSession:
        options.log_severity_level = 3  # errors only: no per-initializer warnings
        session = ort.InferenceSession(data, options, providers=self._providers(device))
        if parse_device(device)[0] == "gpu" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise DeviceError(f"device '{device}': onnxruntime could not start its CUDA provider (CUDA or cuDNN "
                              f"libraries missing?); use --backend torch or --devices cpu")
        return session

    def load(self, spec: ModelSpec, model_dir: Path, device: str, options: LoadOptions = _DEFAULTS) -> LoadedModel:
        model_dir = Path(model_dir)
        if spec.is_null:
            parse_device(device)
            return load_null(spec, model_dir, device)
        self._check_options(options)
        self._providers(device)  # device errors before the (slow) read
        files = self.model_files(spec, model_dir)
        require_files(spec, files, self.name)
        try:
            data = read_file(files[0])
        except OSError as e:
            raise corrupt(spec, files[0], self.name, e.strerror or e) from None
        return self.load_blobs(spec, [data], files, device, options)

    def _check_options(self, options: LoadOptions) -> None:
        if options.precision == "fp16":
            raise ConfigError("precision 'fp16' is not supported by the onnxruntime backend; "
                              "use the torch backend for fp16 (--backend torch)")
        if options.lanes < 1:
            raise ConfigError(f"lanes must be 1 or more, got {options.lanes}")

    def load_blobs(self, spec: ModelSpec, blobs: Sequence[bytes], paths: Sequence[Path], device: str,
                   options: LoadOptions = _DEFAULTS) -> LoadedModel:
        if spec.is_null:
            parse_device(device)
            return load_null(spec, paths[0].parent.parent, device, blobs[0])
        self._check_options(options)
        (path,), (data,) = paths, blobs
        try:
            session = self._session(bytes(data), device, ort.SessionOptions())
        except DeviceError:
            raise
        except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, InvalidGraph, ...
            raise corrupt(spec, path, self.name, e) from None
        problem = _check_io(spec, session)
        meta = session.get_modelmeta().custom_metadata_map
        if problem is None and meta.get("model") not in (None, spec.name):
            problem = f"it holds model '{meta['model']}'"
        if problem:
            raise corrupt(spec, path, self.name, problem)
        params = int(meta["params"]) if meta.get("params", "").isdigit() else None
        return OnnxModel(spec, device, session, path, len(data), options.lanes, params)

    def loader(self, model_dir: Path, device: str, options: LoadOptions, tier: Tier, *,
               drop_cache: bool = False, rebuild: bool = False, slots: int = 0) -> ModelLoader:
        return BlobLoader(self, model_dir, device, options, tier, drop_cache=drop_cache)

    def profile_ops(self, model: LoadedModel, batch: np.ndarray, runs: int) -> dict[str, float]:
        if isinstance(model, NullModel):
            return {t: (model.spec.service_s if t == "other" else 0.0) for t in OP_TYPES}
        if not isinstance(model, OnnxModel):
            raise TypeError(f"profile_ops of the onnxruntime backend needs an ONNX model, got {type(model).__name__}")
        runs = max(1, runs)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        with tempfile.TemporaryDirectory(prefix="cortexbench-ort-") as tmp:
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "profile")
            session = self._session(model.path.read_bytes(), model.device, options)
            feed = {session.get_inputs()[0].name: x}
            for _ in range(runs + 1):  # the first run is a warm-up, left out below
                session.run(None, feed)
            trace = Path(session.end_profiling())
            events = json.loads((trace if trace.is_absolute() else Path(tmp) / trace.name).read_text())
        return aggregate_profile(events, runs, skip_runs=1)

    def train_step_s(self, spec: ModelSpec, device: str, batch_size: int, steps: int, seed: int) -> float:
        raise NotImplementedError("ONNX Runtime does not train here; use --backend torch or mxnet")


BACKEND = OnnxBackend()
