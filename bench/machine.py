"""What a reader needs to judge a figure: the machine, its software, and how loaded it was during a run."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import ROOT
from .memstat import meminfo_kib


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to judge a figure: hardware, software versions, threads, device."""
    import timm

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": round(meminfo_kib("MemTotal") / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "git": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_mem_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    return info


def describe_machine(m: dict[str, Any]) -> str:
    """One line for a report: ``AMD EPYC, 2 CPUs, 23 GiB, torch 2.14.1, 2 threads, cpu``."""
    dev = f"{m['gpu']} ({m['gpu_mem_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else m["device"]
    return (f"{m['cpu']}, {m['usable_cpus']}/{m['logical_cpus']} CPUs, {m['mem_total_gib']} GiB RAM; "
            f"Python {m['python']}, torch {m['torch']}, timm {m['timm']}; torch threads {m['torch_threads']}; "
            f"device {dev}; git {m['git']}")


def load_noise_note(payload: dict[str, Any]) -> str:
    """Flag a run taken on a loaded machine: load average above the thread count means sharing."""
    load, threads = payload["loadavg_1m"], payload["machine"]["torch_threads"]
    busy = max(load["start"], load["end"]) > threads
    return (f"load average {load['start']} -> {load['end']} on {payload['machine']['usable_cpus']} CPUs"
            + (": the machine was shared, absolute figures are noisy (ratios less so)" if busy else ""))


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loadavg() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else -1.0
