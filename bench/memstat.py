"""This process's memory as the OS counts it (Linux ``/proc``), for the memory benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path


def kib_fields(path: str | Path) -> dict[str, int]:
    """The ``Key:  123 kB`` lines of a /proc file (``status``, ``meminfo``) as ``{key: KiB}``; empty when it
    cannot be read (not Linux, a process that is gone)."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0])
    return fields


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Resident (``VmRSS``) and peak resident (``VmHWM``) KiB of a process, from ``/proc/<pid>/status``."""
    fields = kib_fields(f"/proc/{pid}/status")
    return {key: fields[key] for key in ("VmRSS", "VmHWM") if key in fields}


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``VmRSS``; ``ru_maxrss`` peak elsewhere)."""
    rss = process_memory().get("VmRSS")
    if rss is not None:
        return rss * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak resident size (``VmHWM``) to its current one (Linux >= 4.0: ``clear_refs``);
    False where that is not possible, and the peak then covers the whole process life."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
        return True
    return False


def peak_rss_bytes() -> int:
    """This process's peak resident size since start or :func:`reset_peak_rss` (``ru_maxrss`` off Linux)."""
    peak = process_memory().get("VmHWM")
    if peak is not None:
        return peak * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settle_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so RSS counts live
    objects rather than what the allocator keeps from temporaries."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may include freed heap
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def meminfo_kib(key: str) -> int:
    return kib_fields("/proc/meminfo").get(key, 0)


def available_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (0 if unknown)."""
    return meminfo_kib("MemAvailable") * 1024
