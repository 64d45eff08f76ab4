"""What machine a result was measured on: CPU, cores, memory, GPUs, library versions.

Plain Python: GPUs are found through ``nvidia-smi`` (or ``/proc/driver/nvidia``), not through a framework,
so that asking costs no CUDA context.  ``CUDA_VISIBLE_DEVICES`` is honoured.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LIBRARIES = ("cortexbench", "numpy", "mxnet", "torch", "torchvision", "onnxruntime", "onnx", "opencv-python-headless",
             "ray", "prometheus-client", "hdrhistogram", "fastapi", "uvicorn", "httpx")


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    memory_bytes: int


@functools.lru_cache(maxsize=1)
def gpus() -> tuple[GPUInfo, ...]:
    """The GPUs this process may use (after CUDA_VISIBLE_DEVICES), or () when there is none."""
    found: list[GPUInfo] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
            for line in out.strip().splitlines():
                idx, name, mem = (s.strip() for s in line.split(",", 2))
                found.append(GPUInfo(int(idx), name, int(float(mem)) * 1024 * 1024))
        except (subprocess.SubprocessError, OSError, ValueError):
            found = []
    if not found and Path("/proc/driver/nvidia/gpus").is_dir():
        for i, _ in enumerate(sorted(Path("/proc/driver/nvidia/gpus").iterdir())):
            found.append(GPUInfo(i, "NVIDIA GPU", 0))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        keep = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        by_index = {str(g.index): g for g in found}
        found = [GPUInfo(i, by_index[k].name, by_index[k].memory_bytes) for i, k in enumerate(keep) if k in by_index]
    return tuple(found)


def gpu_count() -> int:
    return len(gpus())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine_info() -> dict[str, Any]:
    """Everything results.json records about the machine."""
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count() or 1,
        "usable_cores": usable_cores(),
        "memory_bytes": memory_bytes(),
        "gpus": [asdict(g) for g in gpus()],
        "libraries": library_versions(),
    }


def device_memory_bytes(device: str) -> int:
    """GPU memory this process holds on ``device``: torch's reserved memory (its caching allocator) when
    torch is loaded, else this process's use from NVML (pynvml, when installed); -1 on the CPU or when
    neither can say."""
    if not device.startswith("gpu:"):
        return -1
    index = int(device[4:])
    if "torch" in sys.modules:
        try:
            import torch

            if torch.cuda.is_initialized():
                return int(torch.cuda.memory_reserved(index))
        except Exception:
            pass
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        physical = visible[index].strip() if index < len(visible) and visible[index].strip() else str(index)
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(physical)) if physical.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(physical))
        pid = os.getpid()
        return int(sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                       if p.pid == pid))
    except Exception:
        return -1


def host_memory_bytes(pid: int | None = None) -> int:
    """The resident host memory (RSS) of this process, or of process ``pid``, bytes; 0 when /proc cannot say
    (the process is gone)."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
