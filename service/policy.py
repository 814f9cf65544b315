"""Batch policies: ``merged``, ``mixed`` and the measured-cost ``auto`` rule.

``auto`` compares, for the batch the scheduler proposes, the throughput (images per second) of

- merged: ``switch(primary weights not live) + n_merged * t_merged(shape)``, serving only the tasks that
  share the primary's weights, and
- mixed:  ``switch(a task is merged, base needed) + n_mixed * t_mixed(shape)``, serving every waiting
  task of that input size in one forward with per-row adapters,

and picks the higher. So a batch of one task (or one that fills ``max_batch`` alone) is merged, and a long
tail of small queues, where merged would pay a switch for a few images each, goes mixed. Costs are
exponential moving averages of what the engine measures (warm-up seeds them); before any measurement
``auto`` picks merged, which is always correct, only possibly slower.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

from .batcher import Candidate, Choose, Mode


class CostModel:
    """Measured switch and per-image forward costs (seconds), per mode and input shape. Thread-safe."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.switch_s: float | None = None
        self._per_image: dict[tuple[Mode, Hashable], float] = {}
        self._lock = threading.Lock()

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def observe_switch(self, seconds: float) -> None:
        with self._lock:
            self.switch_s = self._ema(self.switch_s, seconds)

    def observe_batch(self, mode: Mode, shape: Hashable, images: int, seconds: float) -> None:
        with self._lock:
            key = (mode, shape)
            self._per_image[key] = self._ema(self._per_image.get(key), seconds / max(images, 1))

    def per_image(self, mode: Mode, shape: Hashable) -> float | None:
        return self._per_image.get((mode, shape))

    def choose(self, c: Candidate) -> Mode:
        """The ``auto`` rule (module docstring)."""
        if c.mixed_images <= c.merged_images:
            return "merged"  # nothing else could join: mixing only adds per-row overhead
        t_merged, t_mixed = self.per_image("merged", c.shape), self.per_image("mixed", c.shape)
        if t_merged is None or t_mixed is None or self.switch_s is None:
            return "merged"
        merged_s = (self.switch_s if c.weights != c.active else 0.0) + c.merged_images * t_merged
        mixed_s = (self.switch_s if c.active is not None else 0.0) + c.mixed_images * t_mixed
        return "mixed" if c.mixed_images * merged_s > c.merged_images * mixed_s else "merged"

    def snapshot(self) -> dict[str, float | None]:
        """Current estimates, for logs and /readyz."""
        with self._lock:
            out: dict[str, float | None] = {"switch_s": self.switch_s}
            for (mode, shape), v in self._per_image.items():
                out[f"{mode}_per_image_s@{shape}"] = v
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
