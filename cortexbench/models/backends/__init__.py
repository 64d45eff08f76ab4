"""Backends behind one interface (``base.Backend``): ``mxnet``, ``torch`` and ``onnxruntime``.

Each is an optional extra; ``get_backend`` imports it on first use and names the extra to install when
its framework is missing.  ``resolve_backend('auto', devices)`` picks MXNet when it is installed and can
use every device asked for (its GPU build is ``mxnet-cuXXX``), else torch, else ONNX Runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence

from cortexbench.errors import BackendUnavailableError, ConfigError, did_you_mean
from cortexbench.models.backends.base import BACKEND_IDS, Backend, BackendId

_MODULES: dict[str, tuple[str, str, str]] = {
    # backend: (module, framework package, extra)
    "mxnet": ("cortexbench.models.backends.mxnet_impl", "mxnet", "mxnet"),
    "torch": ("cortexbench.models.backends.torch_impl", "torch", "torch"),
    "onnxruntime": ("cortexbench.models.backends.onnx_impl", "onnxruntime", "onnx"),
}
_CACHE: dict[str, Backend] = {}


def installed(name: str) -> bool:
    """Whether the framework of backend ``name`` can be imported (without importing it)."""
    return importlib.util.find_spec(_MODULES[name][1]) is not None


def get_backend(name: str) -> Backend:
    """The backend called ``name``; BackendUnavailableError names the extra when it is not installed."""
    if name not in _MODULES:
        raise ConfigError(f"unknown backend '{name}'{did_you_mean(name, [*BACKEND_IDS, 'auto'])}")
    if name in _CACHE:
        return _CACHE[name]
    module, package, extra = _MODULES[name]
    if not installed(name):
        raise BackendUnavailableError(
            f"backend '{name}' needs the '{package}' package, which is not installed: "
            f"pip install 'cortexbench[{extra}]' (or pick another with --backend)")
    try:
        backend = importlib.import_module(module).BACKEND
    except ImportError as e:
        raise BackendUnavailableError(f"backend '{name}' failed to import: {e}") from None
    _CACHE[name] = backend
    return backend


def resolve_backend(name: str, devices: Sequence[str] = ("cpu",)) -> BackendId:
    """Turn 'auto' into a backend that is installed and can use all of ``devices``."""
    if name != "auto":
        get_backend(name)
        return name  # type: ignore[return-value]
    tried = []
    for candidate in ("mxnet", "torch", "onnxruntime"):
        if not installed(candidate):
            tried.append(f"{candidate}: not installed")
            continue
        have = set(get_backend(candidate).devices())
        missing = [d for d in devices if d not in have]
        if not missing:
            return candidate  # type: ignore[return-value]
        tried.append(f"{candidate}: cannot use {', '.join(missing)}")
    raise BackendUnavailableError(
        "no installed backend can use " + ", ".join(devices) + " (" + "; ".join(tried) + "); "
        "install one with pip install 'cortexbench[torch]' or pick devices with --devices")


__all__ = ["BACKEND_IDS", "Backend", "get_backend", "installed", "resolve_backend"]
