"""Configuration: frozen dataclasses loaded once from ``config.json``; command-line flags override.

The original keys keep their meanings: ``models``, ``img_dir``, ``result_dir``, ``model_dir``,
``gpu_num``, ``batchsize`` and ``times``.  Everything newer sits beside them (``backend``, ``precision``,
``seed``) or in the sections ``single``, ``stream`` and ``images``.  ``cpu_fallback`` holds values that
replace the file's when a run has no GPU, so that the embedded default finishes in about a minute on a
laptop; flags given on the command line always win.  docs/config.md lists every key with its default.

Loading order, each step overriding the one before: dataclass defaults < config.json < ``cpu_fallback``
(only without a GPU) < command-line flags.  ``Config.sources`` says where each value came from.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from cortexbench.config_checks import check_semantics
from cortexbench.errors import ConfigError, did_you_mean

BackendName = Literal["auto", "mxnet", "torch", "onnxruntime"]
Precision = Literal["fp32", "fp16"]
BalancerName = Literal["round-robin", "least-outstanding", "p2c", "affinity"]
DispatchName = Literal["auto", "actor", "grouped", "compiled"]
RecordsFormat = Literal["csv.gz", "none"]
EngineName = Literal["eager", "graphs", "compile", "ort", "ort-basic", "ort-none", "openvino", "tensorrt"]
EnginePrecision = Literal["fp32", "fp16", "bf16", "int8"]
StreamEngine = Literal["backend", "eager", "graphs", "compile", "ort", "ort-basic", "ort-none", "openvino", "tensorrt"]
ChannelName = Literal["socket", "ray"]

DEFAULT_CONFIG = Path("config.json")
# The repository's config.json, shipped inside the package: what a run uses when there is no ./config.json
# (an installed ``cortexbench stream`` run from any directory).  Its relative paths resolve against the
# current directory, so data goes to ./data and results to ./results wherever the command is run.
BUILTIN_CONFIG = Path(__file__).with_name("default_config.json")


@dataclass(frozen=True)
class SingleConfig:
    """``python -m cortexbench.single``: the per-device sweep."""

    devices: tuple[str, ...] = ("auto",)
    warmup_runs: int = 3
    min_runs: int = 5
    max_seconds: float = 10.0
    target_rel_spread: float = 0.02
    profile_ops: bool = False
    train: bool = False
    engines: tuple[EngineName, ...] = ()  # the engine axis (models/engines); () = the backend as before
    precisions: tuple[EnginePrecision, ...] = ("fp32",)  # with engines: each engine at each precision
    fidelity_images: int = 64  # with engines: images each engine x precision is compared on
    labels: Path | None = None  # with engines: CSV of image file name, class index: top-1 accuracy too


@dataclass(frozen=True)
class StreamConfig:
    """``python -m cortexbench.stream``: the image stream over many workers."""

    modes: tuple[str, ...] = ("cached", "cold")
    balancer: BalancerName = "least-outstanding"
    concurrency: int = 64
    rate: float | None = None
    duration_s: float | None = None
    warmup: int = 200
    popularity: str = "uniform"
    arrivals: str = "poisson"  # open loop: poisson, gamma:CV or trace:FILE (schedule.parse_arrivals)
    model_weights: tuple[float, ...] = ()
    cpu_workers: int = 0
    address: str | None = None
    metrics_port: int = 8000
    metrics_host: str = "127.0.0.1"
    linger_s: float = 0.0
    dispatch: DispatchName = "auto"
    drivers: int = 0
    max_group: int = 0  # 0 = auto: the worker's lanes (more would make images wait for groupmates)
    lanes: int = 0
    retries: int = 2
    image_pool: int = 256
    drain_timeout_s: float = 10.0
    image_timeout_s: float = 600.0  # a worker call unanswered this long: the worker is hung and replaced
    cold_drop_cache: bool = False
    cold_rebuild: bool = False  # cold, swap: build each network's structure for every load (timed as 'build')
    on_demand_images: int = 0  # counted images in swap, cold and lru:K modes; 0 = 'times'
    inputs: Literal["pool", "jpeg"] = "pool"  # pool: decoded once, reused; jpeg: every image read and decoded
    decode: Literal["cpu", "gpu"] = "cpu"  # jpeg inputs: OpenCV on the CPU, or nvJPEG on the worker's GPU
    target: str | None = None  # an Open Inference Protocol server (http://HOST:PORT) instead of the Ray workers
    protocol: Literal["v2", "v2-json"] = "v2"
    input_name: str | None = None  # for a target model whose metadata lists no inputs
    input_shape: tuple[int, ...] = ()
    http_client: Literal["raw", "httpx"] = "raw"  # the HTTP target's client (bench/http_driver.py compares them)
    records: RecordsFormat = "csv.gz"
    find_peak: bool = False  # search the highest open-loop rate that meets every SLO (peak.py)
    slo: tuple[str, ...] = ()  # latency objectives of the search: 'p99=20ms', 'mean=8ms'
    peak_precision: float = 0.05  # the search stops when the bracket [met, missed] is this narrow (relative)
    peak_tolerance: float = 0.2  # a step's windows agree when each is within this of their median
    peak_late_ms: float = 1.0  # a step's image is late when sent more than this after its time; 1% may be
    sweep: str = ""  # 'lru:1,2,4,8', 'concurrency:1,4,16' or 'rate:50,100': the same stream at each value (sweep.py); '' = no sweep
    gpu_hour_cost: float | None = None  # price of a worker (GPU) hour: cost per million images per mode
    engine: StreamEngine = "backend"  # cached mode's engine (models/engines); backend = the backend's own path


@dataclass(frozen=True)
class ServeConfig:
    """``python -m cortexbench.serve``: the Ray workers behind an HTTP gateway (v2 protocol).  The workers
    are planned as the stream's (``gpu_num``, ``stream.cpu_workers``, ``stream.lanes``, ...)."""

    host: str = "127.0.0.1"
    port: int = 8080
    mode: str = "cached"
    balancer: BalancerName = "least-outstanding"
    max_inflight: int = 256  # inference requests in the gateway at once; more are answered 503
    max_body_bytes: int = 32 * 1024 * 1024  # a larger body is answered 413 before it is read whole
    call_timeout_s: float = 60.0  # a worker that does not answer within this: 503
    drain_timeout_s: float = 10.0  # on SIGTERM, how long in-flight requests may take to finish
    retry_after_s: int = 1  # the Retry-After of a 503
    channel: ChannelName = "socket"  # a worker on the gateway's machine: over a Unix socket, or a Ray actor call


@dataclass(frozen=True)
class ImagesConfig:
    """How many synthetic images to make when ``img_dir`` is missing."""

    synth_count: int = 500
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """The whole configuration of one invocation.  Never mutated: use ``dataclasses.replace``."""

    models: tuple[str, ...] = ("imagenet",)
    img_dir: Path = Path("data/images")
    result_dir: Path = Path("results")
    model_dir: Path = Path("data/models")
    gpu_num: int | Literal["auto"] = "auto"
    batchsize: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    times: int = 100_000
    backend: BackendName = "auto"
    precision: Precision = "fp32"
    seed: int = 0
    single: SingleConfig = field(default_factory=SingleConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cpu_fallback: Mapping[str, Any] = field(default_factory=dict)
    # Not keys of the file: where each dotted key's value came from, and the file that was read.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    path: Path | None = field(default=None, compare=False)
    builtin: bool = field(default=False, compare=False)  # path is the built-in default (no ./config.json)

    def source(self, key: str) -> str:
        """'default', 'file', 'cpu_fallback' or 'flag' for a dotted key such as 'stream.rate'."""
        return self.sources.get(key, "default")

    def from_flag(self, key: str) -> bool:
        return self.source(key) == "flag"

    def to_dict(self) -> dict[str, Any]:
        """The effective values as plain JSON types (for results.json)."""
        out = _to_plain(self)
        for k in _NOT_KEYS:
            out.pop(k, None)
        return out

    def describe(self) -> str:
        """One line saying which config file is in use (or the built-in default) and whether its
        ``cpu_fallback`` was applied, for the start of a run."""
        if self.path is None:
            where = "the dataclass defaults (no file)"
        elif self.builtin:
            where = f"the built-in default ({self.path}; paths relative to {Path.cwd()})"
        else:
            where = str(self.path.resolve())
        fallback = any(v == "cpu_fallback" for v in self.sources.values())
        return f"config: {where}" + (", with its cpu_fallback (no GPU)" if fallback else "")


_NOT_KEYS = {"sources", "path", "builtin"}


def keys_of(cls: type) -> list[str]:
    """Every valid dotted key of a config dataclass, for error messages and docs."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in _NOT_KEYS:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += [f"{f.name}.{k}" for k in keys_of(hints[f.name])]
        else:
            out.append(f.name)
    return out


def load_config(
    path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    has_gpu: bool | None = None,
    flags: Mapping[str, str] | None = None,
) -> Config:
    """Read config.json (or ``path``), apply ``cpu_fallback`` when ``has_gpu`` is False, then ``overrides``.

    ``overrides`` maps dotted keys (``"stream.rate"``) to values from the command line; ``flags`` maps
    those keys to the flags that set them, so that an error about a flag's value names the flag.  When
    ``path`` is None, ``./config.json`` is read if it exists, else the built-in default
    (``BUILTIN_CONFIG``, the repository's config.json) with its relative paths under the current directory.
    Raises ConfigError with one line naming the key (and the flag) and the nearest valid choice.
    """
    try:
        return _load(path, overrides or {}, has_gpu)
    except ConfigError as e:
        key = _key_of(str(e))
        flag = (flags or {}).get(key or "")
        if flag and key in (overrides or {}) and not str(e).startswith("--"):
            raise ConfigError(f"{flag}: {e}") from None
        raise


def _key_of(message: str) -> str | None:
    """The dotted key an error message is about: every message starts with it quoted ('stream.rate' ...)."""
    m = re.match(r"'([a-z_0-9]+(?:\.[a-z_0-9]+)?)'", message)
    return m.group(1) if m else None


def _load(path: Path | str | None, overrides: Mapping[str, Any], has_gpu: bool | None) -> Config:
    explicit = path is not None
    file_path = Path(path) if path is not None else DEFAULT_CONFIG
    builtin = not explicit and not file_path.exists()
    if builtin:
        file_path = BUILTIN_CONFIG
    raw: dict[str, Any] = {}
    if file_path.exists():
        try:
            raw = json.loads(file_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file_path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file_path}: the top level must be a JSON object")
    elif explicit:
        raise ConfigError(f"--config {file_path}: no such file")
    base_dir = file_path.resolve().parent if file_path.exists() and not builtin else Path.cwd()

    flat: dict[str, tuple[Any, str]] = {}
    _flatten(raw, "", flat, "file", str(file_path))
    fallback = raw.get("cpu_fallback", {})
    if has_gpu is False and fallback:
        if not isinstance(fallback, dict):
            raise ConfigError(f"{file_path}: 'cpu_fallback' must be an object of keys to use without a GPU")
        fb: dict[str, tuple[Any, str]] = {}
        _flatten(fallback, "", fb, "cpu_fallback", f"{file_path} (cpu_fallback)")
        flat.update(fb)
    file_flat = dict(flat)
    for key, value in overrides.items():
        if value is not None:
            if key in ("img_dir", "result_dir", "model_dir", "single.labels") and isinstance(value, (str, Path)) and str(value):
                value = str(Path(value).expanduser().absolute())  # a flag's path is relative to the cwd
            flat[key] = (value, "flag")

    nested, sources = _nest(flat, file_path)
    cfg = _build(Config, nested, "", base_dir)
    cfg = dataclasses.replace(cfg, cpu_fallback=dict(fallback) if isinstance(fallback, dict) else {},
                              sources=sources, path=file_path if file_path.exists() else None,
                              builtin=builtin and file_path.exists())
    check_semantics(cfg)
    shadowed = {k: file_flat[k] for k, v in overrides.items() if v is not None and k in file_flat}
    if shadowed:
        # the file's values that a flag overrides in this run are checked too, in the run's config: a wrong
        # value must not wait, silently, for the next run without that flag
        try:
            check_semantics(_build(Config, _nest({**flat, **shadowed}, file_path)[0], "", base_dir))
        except ConfigError as e:
            raise ConfigError(f"{file_path}: {e} (a flag overrides it in this run, but the file is wrong)") from None
    return cfg


def _nest(flat: Mapping[str, tuple[Any, str]], file_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Dotted keys to nested sections, and each key's origin; an unknown key names the nearest valid one."""
    nested: dict[str, Any] = {}
    sources: dict[str, str] = {}
    valid = [*keys_of(Config), "cpu_fallback"]
    for key, (value, origin) in flat.items():
        if key.startswith("cpu_fallback"):
            continue
        if key not in valid:
            where = "flag" if origin == "flag" else str(file_path)
            raise ConfigError(f"{where}: unknown key '{key}'{did_you_mean(key, valid)}")
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        sources[key] = origin
    return nested, sources


def _flatten(obj: Mapping[str, Any], prefix: str, out: dict[str, tuple[Any, str]], origin: str, where: str) -> None:
    sections = {"single", "stream", "images", "serve"}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: keys must be strings")
        key = f"{prefix}{k}"
        if k == "cpu_fallback" and not prefix:
            continue
        if not prefix and k in sections:
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: '{k}' must be an object (a section of keys)")
            _flatten(v, f"{k}.", out, origin, where)
        else:
            out[key] = (v, origin)


def _build(cls: type, values: Mapping[str, Any], prefix: str, base_dir: Path) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in _NOT_KEYS or f.name == "cpu_fallback" or f.name not in values:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values[f.name], f"{key}.", base_dir)
        else:
            kwargs[f.name] = _coerce(values[f.name], tp, key, base_dir)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if tp is Path:
        return "a path (string)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, base_dir: Path) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists to tuples, paths)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key, base_dir)
            except ConfigError:
                continue
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, not {json.dumps(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, not {json.dumps(value)}{hint}")
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if isinstance(value, str) and item is not str:
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, item, key, base_dir) for v in value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"'{key}' must be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, not {json.dumps(value)}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be an integer, not {json.dumps(value)}")
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"'{key}' must be a number, not {json.dumps(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be a string, not {json.dumps(value)}")
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            p = Path(value).expanduser()
            return p if p.is_absolute() else (base_dir / p)
        raise ConfigError(f"'{key}' must be a path (a string), not {json.dumps(value)}")
    if origin in (dict, Mapping) or tp is Mapping:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"'{key}' must be an object")
    raise ConfigError(f"'{key}': unsupported type {tp}")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
