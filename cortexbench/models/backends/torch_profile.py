"""Per-operator profile of a torch model (``single --profile-ops``, the ``digits`` experiment): the
profiler's events attributed to the operator types of ``base.OP_TYPES``."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from cortexbench.models.backends import torch_nets
from cortexbench.models.backends.base import OP_TYPES
from cortexbench.models.backends.torch_impl import TorchModel

_OP_NAMES = {  # aten op names with leading/trailing underscores stripped
    "activation": {"relu", "gelu", "sigmoid", "tanh", "clamp_min", "hardtanh", "silu", "leaky_relu", "elu",
                   "threshold", "prelu", "prelu_kernel", "mish", "hardswish", "hardsigmoid", "softplus"},
    "dense": {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "addmm_activation", "mkldnn_linear"},
    "concat": {"cat", "concat", "concatenate", "stack"},
    "softmax": {"softmax", "log_softmax"},
    "dropout": {"dropout", "feature_dropout", "native_dropout", "alpha_dropout"},
    "reshape": {"view", "reshape", "reshape_alias", "unsafe_view", "flatten", "squeeze", "unsqueeze", "permute",
                "transpose", "t"},
    "copy": {"copy", "to", "to_copy", "clone", "contiguous", "copy_from", "copy_from_and_resize"},
    "elementwise": {"add", "sub", "mul", "div", "pow", "sqrt", "rsqrt", "exp", "log", "neg", "reciprocal",
                    "maximum", "minimum", "addcmul", "addcdiv", "where", "abs", "square"},
    "normalization": {"local_response_norm", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm",
                      "instance_norm"},
}


def op_category(name: str) -> str:
    """The OP_TYPES entry of one profiler event name ('aten::cudnn_convolution' -> 'convolution')."""
    if name == torch_nets.LRN.PROFILE_NAME:
        return "normalization"
    op = name.rsplit("::", 1)[-1].lower().strip("_")
    if "batch_norm" in op:
        return "batch_norm"
    if "conv" in op and "convert" not in op:
        return "convolution"
    if "pool" in op:
        return "pooling"
    for category, ops in _OP_NAMES.items():
        if op in ops:
            return category
    return "other"


def attribute_events(events: Any, device_time: bool) -> dict[str, float]:
    """Microseconds per OP_TYPES entry from a profiler's events.

    Each event counts its *self* time (CPU time, or on a GPU the device time of the kernels it launched
    itself), so nothing is counted twice; the time goes to the category of its outermost categorised
    ancestor: the internals of ``aten::linear`` (``aten::t``, ``aten::addmm``) are dense, those of
    ``aten::adaptive_avg_pool2d`` (``aten::mean``) pooling, and everything under CaffeNet's LRN range is
    normalization."""
    cpu = torch.autograd.DeviceType.CPU
    memo: dict[int, str] = {}

    def category(e: Any) -> str:
        if id(e) not in memo:
            above = category(e.cpu_parent) if e.cpu_parent is not None else "other"
            memo[id(e)] = above if above != "other" else op_category(e.name)
        return memo[id(e)]

    totals = dict.fromkeys(OP_TYPES, 0.0)
    for e in events:
        if e.device_type != cpu or getattr(e, "is_async", False):
            continue  # device-side events are already counted through the CPU op that launched them
        if device_time:
            t = e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
        else:
            t = e.self_cpu_time_total
        if t > 0:
            totals[category(e)] += float(t)
    return totals


def profile_model(model: TorchModel, batch: np.ndarray, runs: int) -> dict[str, float]:
    """Seconds per batch and op type: CPU self time on the CPU, kernel time on a GPU (eager, lane 0;
    a CUDA graph would hide the operators)."""
    from torch.profiler import ProfilerActivity, profile

    runs = max(1, runs)
    model._predict(batch, 0, graphs=False)  # warm-up: cuDNN autotuning, allocator, lazy init
    gpu = model._cuda is not None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    lrns = [m for m in model.net.modules() if isinstance(m, torch_nets.LRN)]
    for m in lrns:
        m.annotate = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Profiler clears events")  # one cycle here
            with profile(activities=activities) as prof:
                for _ in range(runs):
                    model._predict(batch, 0, graphs=False)
    finally:
        for m in lrns:
            m.annotate = False
    return {k: v / 1e6 / runs for k, v in attribute_events(prof.events(), device_time=gpu).items()}
