"""This process's memory as the OS counts it (Linux ``/proc``), for the memory benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``VmRSS``; ``ru_maxrss`` peak elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settle_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so RSS counts live
    objects rather than what the allocator keeps from temporaries."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may include freed heap
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def meminfo_kib(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def available_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (0 if unknown)."""
    return meminfo_kib("MemAvailable") * 1024
