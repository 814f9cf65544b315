"""The one timing helper of the in-process benchmarks, and the statistics of its samples.

Timing is built for a noisy shared machine: the variants of one comparison run interleaved in the same
rounds (A, B, A, B ... with the starting case rotated every round), after warm-up, with the thread count
fixed; a figure is the median of per-round ratios, so a slow spell hits both sides of a ratio alike.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock interval covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One timed variant: ``run`` is timed; ``setup`` (untimed) runs before every timed call, e.g. to
    put the switcher back into the state the timed call starts from."""

    run: Callable[[], object]
    setup: Callable[[], object] | None = None


def _timed(case: Case, device: torch.device) -> float:
    if case.setup is not None:
        case.setup()
    synchronize(device)
    start = time.perf_counter()
    case.run()
    synchronize(device)
    return time.perf_counter() - start


def measure(cases: dict[str, Case], *, repeats: int, device: torch.device, warmup: int = 1,
            min_time: float = 0.0, max_inner: int = 1000) -> dict[str, list[float]]:
    """Seconds per call of each case, one sample per round, cases interleaved within each round.

    Every case is warmed up first (at least once: first calls pay allocation and kernel selection). A
    sample averages ``inner`` calls, ``inner`` chosen per case from its warm-up so that a sample lasts at
    least ``min_time`` seconds (short calls would otherwise measure timer jitter); ``setup`` is never
    inside the clock. Round ``r`` starts at case ``r mod n``, so no case always runs first.
    """
    names = list(cases)
    inner: dict[str, int] = {}
    for name in names:
        last = min(_timed(cases[name], device) for _ in range(max(1, warmup)))
        inner[name] = min(max_inner, max(1, math.ceil(min_time / max(last, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(sum(_timed(cases[name], device) for _ in range(inner[name])) / inner[name])
    return samples


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Median and quartiles (seconds) of one case's samples."""
    s = sorted(samples)
    q1, q3 = (statistics.quantiles(s, n=4)[0::2] if len(s) >= 2 else (s[0], s[0]))
    return {"median_s": statistics.median(s), "q1_s": q1, "q3_s": q3, "min_s": s[0], "n": len(s)}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``: both sides of each ratio come from the same round."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))
