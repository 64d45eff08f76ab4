"""The MXNet (1.x, Gluon) backend: builds, exports, loads, profiles and trains the registered models.

Networks come from MXNet's model zoo where it has them and from ``mxnet_nets`` otherwise.  Export
writes ``model_dir/mxnet/<model>-symbol.json`` and ``-0000.params`` (``HybridBlock.export``), each file
under a temporary name first and then renamed, so an interrupted export leaves no half-written file.
Loading reads both files from disk on every call and checks them against the model's spec.

Random weights are deterministic and portable: numpy's generator seeded with ``seed_for(name, seed)``
fills every weight from N(0, 2/fan_in) (MSRA), biases and BatchNorm shifts with 0, BatchNorm scales
with 1, and running statistics with mean 0 / variance 1.  The last BatchNorm of each residual branch
gets gamma 1/sqrt(number of residual blocks) so that the residual sums of ResNet-152 / ResNeXt-101
stay of order one instead of growing a million-fold (which would overflow fp16).

Threads: MXNet 1.x imperative and CachedOp calls on one block are not safe from several Python threads
at once, and MXNet has no per-call CUDA streams, so ``predict`` takes a lock: with ``lanes > 1`` the
lanes are served one batch at a time.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from cortexbench.errors import ConfigError, DeviceError
from cortexbench.models.backends import mxnet_nets
from cortexbench.models.backends.base import (
    BlobLoader,
    ExportResult,
    LoadedModel,
    LoadOptions,
    ModelLoader,
    NullModel,
    Tier,
    corrupt,
    export_null,
    files_size,
    load_null,
    null_file,
    parse_device,
    read_file,
    require_files,
    seed_for,
)
from cortexbench.models.registry import GROUPS, ModelSpec, file_stem

NAME = "mxnet"
_INPUT = "data"  # the input name HybridBlock.export gives a one-input network
_STATS = ("running_mean", "running_var")  # BatchNorm state: saved as aux, not counted as parameters
_DEFAULT_OPTIONS = LoadOptions()
_PROFILER_LOCK = threading.Lock()  # MXNet's profiler is one per process


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence MXNet's UserWarnings about input types it cannot infer before the first call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


_profile_tmp: list[Path] = []


def _profile_dir() -> Path:
    """A private temporary directory for the trace MXNet's profiler writes at exit (removed at exit)."""
    if not _profile_tmp:
        path = Path(tempfile.mkdtemp(prefix="cortexbench-mxprofile-"))
        atexit.register(shutil.rmtree, path, True)
        _profile_tmp.append(path)
    return _profile_tmp[0]


def num_gpus() -> int:
    """GPUs MXNet can use (0 on the CPU build, or when CUDA is broken)."""
    try:
        return int(mx.context.num_gpus())
    except Exception:  # the CPU build raises on some versions; no GPU then
        return 0


def context_of(device: str) -> mx.Context:
    """'cpu' -> mx.cpu(); 'gpu:N' -> mx.gpu(N); DeviceError for a device this machine does not have."""
    try:
        kind, index = parse_device(device)
    except ValueError as e:
        raise DeviceError(f"{e}") from None
    if kind == "cpu":
        return mx.cpu()
    have = num_gpus()
    if index >= have:
        seen = f"GPUs 0-{have - 1}" if have else "no GPU (is the mxnet-cuXXX build installed?)"
        raise DeviceError(f"device '{device}': MXNet sees {seen}; pick one of {', '.join(_devices())}")
    return mx.gpu(index)


def _devices() -> list[str]:
    return ["cpu"] + [f"gpu:{i}" for i in range(num_gpus())]


# --- building with deterministic weights --------------------------------------------------------


def _fill_params(net: gluon.HybridBlock, seed: int) -> None:
    """Overwrite every parameter with the deterministic values described in the module docstring."""
    rng = np.random.default_rng(seed)
    last_bns = mxnet_nets.residual_last_bns(net)
    residual_gammas = {bn.gamma.name for bn in last_bns}
    residual_gamma = 1.0 / np.sqrt(len(last_bns)) if last_bns else 1.0
    for name, p in net.collect_params().items():
        shape = p.shape
        if name.endswith("weight") and len(shape) >= 2:
            std = np.sqrt(2.0 / float(np.prod(shape[1:])))
            value = rng.standard_normal(shape, dtype=np.float32)
            value *= np.float32(std)
        elif name in residual_gammas:
            value = np.full(shape, residual_gamma, dtype=np.float32)
        elif name.endswith(("gamma", "running_var")):
            value = np.ones(shape, dtype=np.float32)
        elif name.endswith(("bias", "beta", "running_mean")):
            value = np.zeros(shape, dtype=np.float32)
        else:
            raise RuntimeError(f"model parameter '{name}' has no initialisation rule in mxnet_impl")
        p.set_data(mx.nd.array(value, ctx=p.list_ctx()[0], dtype=np.float32))


def build_net(spec: ModelSpec, seed: int, ctx: mx.Context | None = None) -> gluon.HybridBlock:
    """``spec`` as a hybridized Gluon block with deterministic random weights, run once on zeros
    (so its graph is cached and ``export`` can write it)."""
    if not mxnet_nets.has_definition(spec):
        raise NotImplementedError(f"model '{spec.name}' has no MXNet definition")
    ctx = ctx or mx.cpu()
    s = seed_for(spec.name, seed)
    mx.random.seed(s)  # dropout while training; the weights come from numpy below
    with mx.name.NameManager():  # fresh counters: the same parameter names on every build
        net = mxnet_nets.build_block(spec)
    net.collect_params().setattr("init", mx.init.Zero())  # cheap; _fill_params sets the real values
    net.initialize(ctx=ctx)
    net.hybridize()
    with _quiet():
        net(mx.nd.zeros((1, *spec.input_shape), ctx=ctx)).wait_to_read()  # finishes deferred shapes
    _fill_params(net, s)
    mx.nd.waitall()
    return net


def block_param_count(net: gluon.Block) -> int:
    """Trainable parameters (BatchNorm running statistics excluded, as torch counts them)."""
    return sum(int(np.prod(p.shape)) for name, p in net.collect_params().items() if not name.endswith(_STATS))


def _infer(spec: ModelSpec, sym: mx.sym.Symbol, path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """Shapes of the symbol's parameters for one sample of ``spec``; ModelFileError when it is not
    a network of this input and output size."""
    try:
        with _quiet():
            arg_shapes, out_shapes, aux_shapes = sym.infer_shape(**{_INPUT: (1, *spec.input_shape)})
    except Exception as e:
        raise corrupt(spec, path, NAME, f"not a network of input {spec.input_shape}: {e}") from None
    if arg_shapes is None or out_shapes is None or aux_shapes is None:
        raise corrupt(spec, path, NAME, f"cannot infer shapes for input {spec.input_shape}") from None
    if len(out_shapes) != 1 or tuple(out_shapes[0]) != (1, spec.num_classes):
        raise corrupt(spec, path, NAME, f"output shape {[tuple(s) for s in out_shapes]} is not "
                                        f"(1, {spec.num_classes}): a file of another model?")
    args = dict(zip(sym.list_arguments(), map(tuple, arg_shapes), strict=True))
    if _INPUT not in args:
        raise corrupt(spec, path, NAME, f"the symbol has no input called '{_INPUT}'")
    del args[_INPUT]
    count = sum(int(np.prod(s)) for s in args.values())
    args.update(zip(sym.list_auxiliary_states(), map(tuple, aux_shapes), strict=True))
    return args, count


def _load_symbol(spec: ModelSpec, path: Path) -> mx.sym.Symbol:
    try:
        return mx.sym.load(str(path))
    except Exception as e:
        raise corrupt(spec, path, NAME, e) from None


@contextlib.contextmanager
def _atomic_prefix(directory: Path, stem: str) -> Iterator[str]:
    """A temporary export prefix in ``directory``; whatever is left under it is removed afterwards."""
    prefix = str(directory / f".{stem}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield prefix
    finally:
        for suffix in ("-symbol.json", "-0000.params"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(prefix + suffix)


# --- the loaded model ---------------------------------------------------------------------------


class MxnetModel:
    """A network read from ``model_dir`` onto one device (implements ``base.LoadedModel``).

    ``predict`` holds a lock: MXNet 1.x blocks must not be called from several threads at once, so
    concurrent lanes take turns."""

    def __init__(self, spec: ModelSpec, device: str, net: gluon.SymbolBlock, ctx: mx.Context,
                 options: LoadOptions, param_count: int, size_bytes: int) -> None:
        self.spec = spec
        self.device = device
        self.param_count = param_count
        self.size_bytes = size_bytes
        self.options = options
        self._net: gluon.SymbolBlock | None = net
        self._ctx = ctx
        self._dtype = np.float16 if options.precision == "fp16" else np.float32
        self._lock = threading.Lock()

    @property
    def block(self) -> gluon.SymbolBlock:
        if self._net is None:
            raise RuntimeError(f"model '{self.spec.name}' on {self.device} was closed")
        return self._net

    def predict(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        if batch.shape[1:] != self.spec.input_shape:
            raise ValueError(f"model '{self.spec.name}' takes (N, {', '.join(map(str, self.spec.input_shape))}), "
                             f"got {batch.shape}")
        if not 0 <= lane < max(1, self.options.lanes):
            raise ValueError(f"lane {lane} is not in 0..{max(1, self.options.lanes) - 1}")
        with self._lock:
            x = mx.nd.array(batch, ctx=self._ctx, dtype=self._dtype)
            out = self.block(x).asnumpy()  # asnumpy waits for the device
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        with self._lock:
            if self._net is None:
                return
            self._net = None
            mx.nd.waitall()
            gc.collect(1)  # Gluon blocks hold young reference cycles; a full collection costs 40+ ms
            if self._ctx.device_type == "gpu":
                with contextlib.suppress(Exception):
                    self._ctx.empty_cache()


# --- the backend --------------------------------------------------------------------------------


_OP_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # (type, substrings of the lower-cased MXNet operator name); the first match wins
    ("softmax", ("softmax",)),
    ("batch_norm", ("batchnorm", "batch_norm")),
    ("normalization", ("lrn", "layernorm", "instancenorm", "groupnorm", "l2normalization")),
    ("concat", ("concat",)),
    ("convolution", ("conv",)),
    ("dense", ("fullyconnected", "fully_connected")),
    ("activation", ("activation", "relu", "sigmoid", "tanh", "softsign")),
    ("pooling", ("pool",)),
    ("dropout", ("dropout",)),
    ("reshape", ("flatten", "reshape", "transpose", "expand_dims", "squeeze")),
    ("copy", ("copy",)),
    ("elementwise", ("elemwise", "broadcast_", "_plus", "_add", "_minus", "_sub", "_mul", "_div",
                     "add_n", "elementwisesum")),
)


def op_type(op: str) -> str:
    """The ``base.OP_TYPES`` entry of an MXNet operator name (as its profiler reports it)."""
    low = op.lower()
    for kind, needles in _OP_RULES:
        if any(n in low for n in needles):
            return kind
    return "other"


# The engine's bookkeeping in the "operator" table, not operators: WaitForVar is the caller waiting for a
# result (it overlaps the operators it waits for), DeleteVariable frees arrays.
_ENGINE_ENTRIES = ("WaitForVar", "DeleteVariable")


def aggregate_by_type(stats_json: str, runs: int) -> dict[str, float]:
    """Seconds per run in each operator type, from ``mx.profiler.dumps(format='json')``."""
    data = json.loads(stats_json)
    scale = {"ms": 1e-3, "us": 1e-6, "s": 1.0}.get(str(data.get("Unit", {}).get("Time", "ms")), 1e-3)
    out: dict[str, float] = {}
    for op, row in data.get("Time", {}).get("operator", {}).items():
        total = float(row.get("Total", 0.0)) * scale
        if total > 0 and op not in _ENGINE_ENTRIES:
            kind = op_type(op)
            out[kind] = out.get(kind, 0.0) + total / runs
    return out


class MxnetBackend:
    """MXNet 1.x through Gluon (implements ``base.Backend``)."""

    name = NAME

    def devices(self) -> list[str]:
        return _devices()

    def supports(self, spec: ModelSpec) -> bool:
        return spec.is_null or mxnet_nets.has_definition(spec)

    def model_files(self, spec: ModelSpec, model_dir: Path) -> list[Path]:
        if spec.is_null:
            return [null_file(Path(model_dir))]
        stem = Path(model_dir) / NAME / file_stem(spec.name)
        return [Path(f"{stem}-symbol.json"), Path(f"{stem}-0000.params")]

    def export(self, spec: ModelSpec, model_dir: Path, seed: int, *, force: bool = False) -> ExportResult:
        start = time.perf_counter()
        model_dir = Path(model_dir)
        files = self.model_files(spec, model_dir)
        if spec.is_null:
            existed = files[0].exists()
            if force and existed:
                files[0].unlink()
            path = export_null(model_dir)
            return ExportResult(spec.name, NAME, (path,), spec.input_shape, 0, files_size([path]),
                                "user" if existed and not force else "random-init",
                                None if existed and not force else seed, time.perf_counter() - start)
        if not force and all(f.exists() for f in files):
            _, count = _infer(spec, _load_symbol(spec, files[0]), files[0])
            return ExportResult(spec.name, NAME, tuple(files), spec.input_shape, count, files_size(files),
                                "user", None, time.perf_counter() - start)
        net = build_net(spec, seed)
        write_net(net, spec, model_dir)
        return ExportResult(spec.name, NAME, tuple(files), spec.input_shape, block_param_count(net),
                            files_size(files), "random-init", seed, time.perf_counter() - start)

    def load(self, spec: ModelSpec, model_dir: Path, device: str, options: LoadOptions = _DEFAULT_OPTIONS) -> LoadedModel:
        context_of(device)
        if spec.is_null:
            return load_null(spec, Path(model_dir), device)
        files = self.model_files(spec, Path(model_dir))
        require_files(spec, files, NAME)
        blobs = []
        for f in files:
            try:
                blobs.append(read_file(f))
            except OSError as e:
                raise corrupt(spec, f, NAME, e.strerror or e) from None
        return self.load_blobs(spec, blobs, files, device, options)

    def load_blobs(self, spec: ModelSpec, blobs: Sequence[bytes], paths: Sequence[Path], device: str,
                   options: LoadOptions = _DEFAULT_OPTIONS) -> LoadedModel:
        ctx = context_of(device)
        if spec.is_null:
            return load_null(spec, paths[0].parent.parent, device, blobs[0])
        if options.precision == "fp16" and ctx.device_type == "cpu":
            raise ConfigError("precision 'fp16' needs a GPU with the mxnet backend; use fp32 on cpu")
        sym_file, params_file = paths
        sym_blob, params_blob = blobs
        try:
            sym = mx.sym.load_json(bytes(sym_blob).decode())
        except Exception as e:
            raise corrupt(spec, sym_file, NAME, e) from None
        shapes, count = _infer(spec, sym, sym_file)
        try:
            with _quiet():
                net = gluon.SymbolBlock(sym, mx.sym.var(_INPUT))
                net.collect_params().load_dict(mx.nd.load_frombuffer(bytes(params_blob)), ctx=ctx, cast_dtype=True,
                                               dtype_source="saved", filename=str(params_file))
        except Exception as e:
            raise corrupt(spec, params_file, NAME, e) from None
        dtypes = set()
        for name, p in net.collect_params().items():
            data = p.data(ctx)  # p.shape stays unset on a SymbolBlock until its first call
            if tuple(data.shape) != shapes.get(name):
                raise corrupt(spec, params_file, NAME, f"parameter '{name}' has shape {tuple(data.shape)}, "
                                                       f"input {spec.input_shape} needs {shapes.get(name)}: "
                                                       "a file of another model?")
            dtypes.add(np.dtype(data.dtype))
        want = "float16" if options.precision == "fp16" else "float32"
        if dtypes != {np.dtype(want)}:
            net.cast(want)
        net.hybridize(static_alloc=True)
        return MxnetModel(spec, device, net, ctx, options, count, sum(len(b) for b in blobs))

    def loader(self, model_dir: Path, device: str, options: LoadOptions, tier: Tier, *,
               drop_cache: bool = False, rebuild: bool = False, slots: int = 0) -> ModelLoader:
        return BlobLoader(self, model_dir, device, options, tier, drop_cache=drop_cache)

    def profile_ops(self, model: LoadedModel, batch: np.ndarray, runs: int) -> dict[str, float]:
        if isinstance(model, NullModel):
            return {}
        if not isinstance(model, MxnetModel):
            raise TypeError(f"the mxnet backend cannot profile a {type(model).__name__}")
        runs = max(1, int(runs))
        model.predict(batch)  # builds the cached graph outside the profile
        with _PROFILER_LOCK:
            # The same settings every time: MXNet refuses some reconfigurations of a used profiler.
            mx.profiler.set_config(profile_all=True, aggregate_stats=True, continuous_dump=False,
                                   filename=str(_profile_dir() / "profile.json"))
            mx.profiler.dumps(reset=True)  # forget whatever was aggregated before
            mx.profiler.set_state("run")
            try:
                for _ in range(runs):
                    model.predict(batch)
            finally:
                mx.profiler.set_state("stop")
            stats = mx.profiler.dumps(reset=True, format="json")
        return aggregate_by_type(stats, runs)

    def train_step_s(self, spec: ModelSpec, device: str, batch_size: int, steps: int, seed: int) -> float:
        if not spec.trainable:
            raise NotImplementedError(f"model '{spec.name}' is not timed in training; --train takes the "
                                      f"small models ({', '.join(GROUPS['small'])})")
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be at least 1 (got {batch_size}, {steps})")
        ctx = context_of(device)
        net = build_net(spec, seed, ctx)
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        rng = np.random.default_rng(seed_for(spec.name, seed))
        x = mx.nd.array(rng.standard_normal((batch_size, *spec.input_shape), dtype=np.float32), ctx=ctx)
        y = mx.nd.array(rng.integers(0, spec.num_classes, batch_size), ctx=ctx)

        def step() -> None:
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(batch_size)
            mx.nd.waitall()

        with _quiet():
            for _ in range(2):
                step()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            return (time.perf_counter() - start) / steps


def write_net(net: gluon.HybridBlock, spec: ModelSpec, model_dir: Path) -> list[Path]:
    """Export a built (hybridized, run once) block to ``model_dir/mxnet``; each file appears whole."""
    files = BACKEND.model_files(spec, Path(model_dir))
    files[0].parent.mkdir(parents=True, exist_ok=True)
    with _atomic_prefix(files[0].parent, file_stem(spec.name)) as prefix:
        net.export(prefix, epoch=0)
        os.replace(prefix + "-0000.params", files[1])
        os.replace(prefix + "-symbol.json", files[0])
    return files


BACKEND = MxnetBackend()
