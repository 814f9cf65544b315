"""Batch policies: ``merged``, ``mixed`` and the measured-cost ``auto`` rule.

``auto`` compares, for the batch the scheduler proposes, the throughput (images per second) of

- merged: ``switch(primary weights not live) + n_merged * t_merged(shape, n_merged)``, serving only the
  tasks that share the primary's weights, and
- mixed:  ``switch(a task is merged, base needed) + n_mixed * t_mixed(shape, n_mixed)``, serving every
  waiting task of that input size in one forward with per-row adapters,

and picks the higher. So a batch of one task (or one that fills ``max_batch`` alone) is merged, and a long
tail of small queues, where merged would pay a switch for a few images each, goes mixed.

Costs are exponential moving averages of what the engine measures (warm-up seeds them), per mode, input
shape and batch-size class (1, 2-3, 4-7, 8-15, ...: the per-image cost of a forward falls with the batch
size, so a warm-up at batch 4 says little about batch 16). An estimate only changes when its mode runs,
so a wrong one (a warm-up taken while the machine was busy) would lock ``auto`` out of the better mode for
good; hence exploration: in a contested decision, a mode not chosen for ``explore_every`` contested
decisions on that shape is chosen once, and what it then measures replaces its stale estimates rather
than being averaged into them. That costs at most one batch in ``explore_every`` of the slower mode.
Before any measurement ``auto`` picks merged, which is always correct, only possibly slower.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import get_args

from .batcher import Candidate, Choose, Mode

MODES: tuple[Mode, ...] = get_args(Mode)


def size_class(images: int) -> int:
    """Batch-size class of ``images``: 1 for 1, 2 for 2-3, 3 for 4-7, 4 for 8-15, ... (bit length)."""
    return max(images, 1).bit_length()


def _class_label(k: int) -> str:
    lo, hi = 1 << (k - 1), (1 << k) - 1
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


class CostModel:
    """Measured switch and per-image forward costs (seconds), per mode, input shape and batch-size class,
    with the exploration that keeps them current (module docstring). Thread-safe."""

    def __init__(self, smoothing: float = 0.2, explore_every: int = 32) -> None:
        if explore_every < 1:
            raise ValueError("explore_every must be >= 1")
        self.smoothing, self.explore_every = smoothing, explore_every
        self.switch_s: float | None = None
        self._per_image: dict[tuple[Mode, Hashable], dict[int, float]] = {}
        self._idle: dict[tuple[Mode, Hashable], int] = {}  # contested decisions since the mode was chosen
        self._stale: set[tuple[Mode, Hashable]] = set()  # explored: the next measurement replaces estimates
        self.explorations = 0
        self._lock = threading.Lock()

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def observe_switch(self, seconds: float) -> None:
        with self._lock:
            self.switch_s = self._ema(self.switch_s, seconds)

    def observe_batch(self, mode: Mode, shape: Hashable, images: int, seconds: float) -> None:
        with self._lock:
            key = (mode, shape)
            if key in self._stale:
                self._stale.discard(key)
                self._per_image[key] = {}  # measured long ago, maybe on a busier machine: start over
            by_class = self._per_image.setdefault(key, {})
            k = size_class(images)
            by_class[k] = self._ema(by_class.get(k), seconds / max(images, 1))

    def per_image(self, mode: Mode, shape: Hashable, images: int = 1) -> float | None:
        """Estimated seconds per image of a ``mode`` forward of ``images`` images: the estimate of that
        batch-size class, else of the nearest measured one (the smaller on a tie)."""
        with self._lock:
            return self._estimate(mode, shape, images)

    def _estimate(self, mode: Mode, shape: Hashable, images: int) -> float | None:
        by_class = self._per_image.get((mode, shape))
        if not by_class:
            return None
        want = size_class(images)
        return by_class[min(by_class, key=lambda k: (abs(k - want), k))]

    def choose(self, c: Candidate) -> Mode:
        """The ``auto`` rule (module docstring)."""
        if c.mixed_images <= c.merged_images:
            return "merged"  # nothing else could join: mixing only adds per-row overhead
        with self._lock:
            mode = self._explore(c.shape) or self._cheaper(c)
            for m in MODES:
                self._idle[(m, c.shape)] = 0 if m == mode else self._idle.get((m, c.shape), 0) + 1
            return mode

    def _explore(self, shape: Hashable) -> Mode | None:
        """The mode left out of the last ``explore_every`` contested decisions on ``shape``, if any."""
        for m in MODES:
            if self._idle.get((m, shape), 0) >= self.explore_every:
                self._stale.add((m, shape))
                self.explorations += 1
                return m
        return None

    def _cheaper(self, c: Candidate) -> Mode:
        t_merged = self._estimate("merged", c.shape, c.merged_images)
        t_mixed = self._estimate("mixed", c.shape, c.mixed_images)
        if t_merged is None or t_mixed is None or self.switch_s is None:
            return "merged"
        merged_s = (self.switch_s if c.weight_key != c.live else 0.0) + c.merged_images * t_merged
        mixed_s = (self.switch_s if c.live is not None else 0.0) + c.mixed_images * t_mixed
        return "mixed" if c.mixed_images * merged_s > c.merged_images * mixed_s else "merged"

    def snapshot(self) -> dict[str, float | None]:
        """Current estimates, for logs and /readyz: ``switch_s`` and ``<mode>_per_image_s@<shape>/b<sizes>``."""
        with self._lock:
            out: dict[str, float | None] = {"switch_s": self.switch_s}
            for (mode, shape), by_class in self._per_image.items():
                for k, v in sorted(by_class.items()):
                    out[f"{mode}_per_image_s@{shape}/b{_class_label(k)}"] = v
            return out


def chooser(policy: str, costs: CostModel) -> tuple[bool, Choose]:
    """``(can_mix, choose)`` for the scheduler under ``policy`` (``auto``, ``merged`` or ``mixed``)."""
    if policy == "merged":
        return False, lambda _c: "merged"
    if policy == "mixed":
        return True, lambda _c: "mixed"
    if policy == "auto":
        return True, costs.choose
    raise ValueError(f"unknown policy {policy!r}")
