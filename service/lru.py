"""The one cache type of the residency tiers: a least-recently-used map bounded in bytes.

Like vLLM's LoRA adapter manager, each tier is an LRU whose capacity is a budget, not a count: tasks differ
in size (heads of 10 or 1,000 classes, merged weights of a CNN or a ViT-B), and what an operator sizes is
memory. Evicting only drops the cache's reference: whoever still holds a value (a queued request) keeps
it alive until done, so eviction never races with its use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    """Counters since creation and the current fill of one cache (for metrics)."""

    hits: int
    misses: int
    evictions: int
    entries: int
    nbytes: int
    capacity: int


class ByteLRU(Generic[K, V]):
    """``key -> value`` with each entry's size in bytes; ``put`` evicts least recently used entries until the
    total fits ``capacity``. An entry larger than the whole capacity is not kept (the caller still has it).

    ``on_evict(key, value)`` runs for every eviction (not for :meth:`pop`), after the lock is released, so
    it may call back into the cache. Thread-safe: every method takes one lock.
    """

    def __init__(self, name: str, capacity: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"{name}: capacity must be >= 0 bytes, got {capacity}")
        self.name, self.capacity, self.on_evict = name, capacity, on_evict
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._nbytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or ``None``; counted as a hit or a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._misses += 1
                return None
            self._hits += 1
            self._items.move_to_end(key)
            return item[0]

    def peek(self, key: K) -> V | None:
        """The value without touching recency or counters."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, key: K, value: V, nbytes: int) -> bool:
        """Insert or replace ``key`` as the most recently used entry; ``False`` if it can never fit."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._nbytes -= old[1]
            if nbytes > self.capacity:
                return False
            self._items[key] = (value, nbytes)
            self._nbytes += nbytes
            evicted = self._shrink(keep=key)
        self._notify(evicted)
        return True

    def resize(self, key: K, nbytes: int) -> None:
        """Record that ``key``'s value grew or shrank (e.g. a fold was added to it on use: it becomes the
        most recently used); may evict others, or the entry itself if it no longer fits at all."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return
            self._nbytes += nbytes - item[1]
            self._items[key] = (item[0], nbytes)
            self._items.move_to_end(key)
            if nbytes > self.capacity:
                self._items.pop(key)
                self._nbytes -= nbytes
                self._evictions += 1
                evicted = [(key, item[0])]
            else:
                evicted = self._shrink(keep=key)
        self._notify(evicted)

    def pop(self, key: K) -> V | None:
        """Remove ``key`` (not counted as an eviction: the caller knows it is stale)."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._nbytes -= item[1]
            return item[0]

    def keys(self) -> list[K]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self.keys())

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._items), self._nbytes,
                              self.capacity)

    def _shrink(self, keep: K) -> list[tuple[K, V]]:
        evicted = []
        while self._nbytes > self.capacity:
            key = next(k for k in self._items if k != keep)  # keep is the most recent and fits: others exist
            value, size = self._items.pop(key)
            self._nbytes -= size
            self._evictions += 1
            evicted.append((key, value))
        return evicted

    def _notify(self, evicted: list[tuple[K, V]]) -> None:
        if self.on_evict is not None:
            for key, value in evicted:
                self.on_evict(key, value)
