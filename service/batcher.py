"""Per-task request queues and the dynamic-batching scheduler (pure Python: no model, no tensors).

Each task version has its own FIFO queue of :class:`WorkItem` (one request chunk, ``size`` images). The
scheduler hands the engine's worker one :class:`Batch` at a time:

1. **Which task next.** A queue whose oldest item waited ``starvation_s`` or more is served first, oldest
   first: that bounds every task's wait. Otherwise, among *ready* queues (oldest item waited
   ``max_delay_s``, or enough images to fill ``max_batch``), the one that fills the most of a merged
   batch, preferring the weights already live (no switch; ``live()`` says which), then the oldest.
2. **Which mode.** ``choose`` (the policy, see :mod:`service.policy`) picks ``merged`` (one weight set: one
   adapter task, or any tasks without adapters, which all run on the base weights) or ``mixed`` (several
   tasks in one forward with per-row adapters).
3. **Fill.** Whole items, FIFO within a queue, up to ``max_batch`` images, starting with the chosen
   queue; only items of one input ``shape`` share a batch.

Thread-safety: every public method takes the scheduler's lock; ``next_batch`` blocks on its condition.
``live`` is called under that lock: it must only read (the residency's record of the live weights).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import QueueFull

Mode = Literal["merged", "mixed"]


@dataclass(eq=False)
class WorkItem:
    """One unit of queued work: ``size`` images of one task version.

    ``weight_key`` names the weight set a merged forward needs (``None``: the base weights, for tasks
    without adapters); ``shape`` the input size (only equal shapes share a batch). ``abandoned`` is set by
    the requester when it stops waiting; the scheduler then drops the item unserved.
    """

    queue: Hashable
    weight_key: Hashable
    shape: Hashable
    size: int
    payload: Any = None
    enqueued: float = 0.0
    abandoned: bool = False


@dataclass
class Batch:
    """Items served by one forward pass. ``weight_key``: the weight set to make live (``None`` for mixed:
    the base)."""

    items: list[WorkItem]
    mode: Mode
    weight_key: Hashable = None

    @property
    def size(self) -> int:
        return sum(i.size for i in self.items)


@dataclass(frozen=True)
class Candidate:
    """What the policy decides on: the next batch's task and the two ways of serving it."""

    shape: Hashable
    weight_key: Hashable  # weight set of the chosen queue
    live: Hashable  # weight set live now
    merged_images: int  # images a merged batch would take (<= max_batch)
    mixed_images: int  # images a mixed batch would take (<= max_batch)


Choose = Callable[[Candidate], Mode]


@dataclass
class _Queue:
    items: deque[WorkItem] = field(default_factory=deque)

    @property
    def head(self) -> WorkItem:
        return self.items[0]

    @property
    def images(self) -> int:
        return sum(i.size for i in self.items)


class Scheduler:
    """Dynamic batching over per-task queues; see the module docstring for the rules."""

    def __init__(self, *, max_batch: int, max_delay_s: float, starvation_s: float, max_queued: int,
                 choose: Choose, can_mix: bool, live: Callable[[], Hashable] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_batch, self.max_delay_s, self.starvation_s = max_batch, max_delay_s, starvation_s
        self.max_queued, self.choose, self.can_mix, self.clock = max_queued, choose, can_mix, clock
        self.live = live
        self._queues: dict[Hashable, _Queue] = {}
        self._cond = threading.Condition()
        self._queued = 0
        self._closed = False
        self._interrupted = False

    # ---- producer side -------------------------------------------------------------------------------

    def put(self, items: Sequence[WorkItem]) -> None:
        """Enqueue all ``items`` or none (:class:`QueueFull` when they would exceed ``max_queued`` images)."""
        n = sum(i.size for i in items)
        with self._cond:
            if self._closed:
                raise QueueFull("the engine is shutting down")
            if self._queued + n > self.max_queued:
                raise QueueFull(f"{self._queued} images are queued; {n} more would exceed the limit of "
                                f"{self.max_queued}: retry later")
            now = self.clock()
            for item in items:
                item.enqueued = now
                self._queues.setdefault(item.queue, _Queue()).items.append(item)
            self._queued += n
            self._cond.notify()

    def depths(self) -> dict[Hashable, int]:
        """Queued images per queue key (abandoned items included until the scheduler drops them)."""
        with self._cond:
            return {k: q.images for k, q in self._queues.items()}

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- consumer side (the engine's worker) --------------------------------------------------------

    def interrupt(self) -> None:
        """Make the pending (or next) ``next_batch`` return ``None`` at once (the worker has other work)."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """Block until a batch is due; ``None`` on timeout, on :meth:`interrupt` or once closed."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while not self._closed:
                if self._interrupted:
                    self._interrupted = False
                    return None
                now = self.clock()
                batch = self._plan(now)
                if batch is not None:
                    return batch
                waits = [q.head.enqueued + self.max_delay_s - now for q in self._queues.values()]
                if deadline is not None:
                    if now >= deadline:
                        return None
                    waits.append(deadline - now)
                self._cond.wait(max(min(waits), 1e-4) if waits else None)
        return None

    def plan(self, now: float | None = None) -> Batch | None:
        """The batch due at ``now`` (default: the clock), removed from the queues; ``None`` if none is due."""
        with self._cond:
            return self._plan(self.clock() if now is None else now)

    def close(self) -> list[WorkItem]:
        """Stop scheduling; returns the items still queued (the caller fails them)."""
        with self._cond:
            self._closed = True
            left = [i for q in self._queues.values() for i in q.items if not i.abandoned]
            self._queues.clear()
            self._queued = 0
            self._cond.notify_all()
        return left

    # ---- internals (lock held) ----------------------------------------------------------------------

    def _drop_abandoned(self) -> None:
        for key in list(self._queues):
            q = self._queues[key]
            if any(i.abandoned for i in q.items):
                kept = deque(i for i in q.items if not i.abandoned)
                self._queued -= q.images - sum(i.size for i in kept)
                q.items = kept
            if not q.items:
                del self._queues[key]

    def _plan(self, now: float) -> Batch | None:
        self._drop_abandoned()
        if not self._queues:
            return None
        merged_images: dict[tuple[Hashable, Hashable], int] = {}
        shape_images: dict[Hashable, int] = {}
        for q in self._queues.values():
            h = q.head
            merged_images[h.weight_key, h.shape] = merged_images.get((h.weight_key, h.shape), 0) + q.images
            shape_images[h.shape] = shape_images.get(h.shape, 0) + q.images

        def age(key: Hashable) -> float:
            return now - self._queues[key].head.enqueued

        def group(key: Hashable) -> int:
            h = self._queues[key].head
            return merged_images[h.weight_key, h.shape]

        def batchable(key: Hashable) -> int:
            return shape_images[self._queues[key].head.shape] if self.can_mix else group(key)

        live = self.live()
        starving = [k for k in self._queues if age(k) >= self.starvation_s]
        if starving:
            primary = max(starving, key=age)
        else:
            ready = [k for k in self._queues if age(k) >= self.max_delay_s or batchable(k) >= self.max_batch]
            if not ready:
                return None
            primary = max(ready, key=lambda k: (min(group(k), self.max_batch),
                                                self._queues[k].head.weight_key == live, age(k)))
        head = self._queues[primary].head
        mode = self.choose(Candidate(
            shape=head.shape, weight_key=head.weight_key, live=live,
            merged_images=min(group(primary), self.max_batch),
            mixed_images=min(shape_images[head.shape], self.max_batch),
        ))
        if mode == "merged":
            keys = [k for k in self._queues
                    if (self._queues[k].head.weight_key, self._queues[k].head.shape) == (head.weight_key, head.shape)]
        else:
            keys = [k for k in self._queues if self._queues[k].head.shape == head.shape]
        keys.sort(key=lambda k: (k != primary, -age(k)))
        items = self._take(keys)
        return Batch(items, mode, head.weight_key if mode == "merged" else None)

    def _take(self, keys: list[Hashable]) -> list[WorkItem]:
        room = self.max_batch
        taken: list[WorkItem] = []
        for key in keys:
            q = self._queues[key]
            # The first item always goes (even if larger than max_batch: callers chunk requests, so only a
            # misconfigured caller gets here, and refusing would starve it forever).
            while q.items and (q.head.size <= room or not taken):
                item = q.items.popleft()
                taken.append(item)
                room -= item.size
            if not q.items:
                del self._queues[key]
            if room <= 0:
                break
        self._queued -= sum(i.size for i in taken)
        return taken
