"""What a benchmark ran on: CPU, threads, torch and, on CUDA, the card and its settings (for BENCHMARKS.md)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = _cpu_name()
    info: dict[str, Any] = {"device": str(device), "device_name": cpu, "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "python": platform.python_version(),
                            "platform": platform.platform(), "cpu": cpu, "cpu_count": _cpu_count(),
                            "float32_matmul_precision": torch.get_float32_matmul_precision(),
                            "numba": _numba_version(),  # the compiled CPU kernels (earlyprop.native); None: absent
                            "small_gemm": _small_gemm()}  # whether earlyprop.small_gemm's products run here
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = info["device_name"] = torch.cuda.get_device_name(device)
        info.update(cuda=torch.version.cuda, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_sms=props.multi_processor_count,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    fp32_precision=getattr(torch.backends.cuda.matmul, "fp32_precision", None),
                    max_memory_allocated_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1))
    return info


def _numba_version() -> str | None:
    from earlyprop import native

    return native.numba.__version__ if native.available() else None


def _small_gemm() -> str:
    from earlyprop import small_gemm

    if not small_gemm.installed():
        return "absent (no llvmlite)"
    if small_gemm.available():
        return "on"
    return "off (" + ("more than one thread" if torch.get_num_threads() > 1 else "no AVX-512") + ")"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
