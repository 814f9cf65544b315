"""The byte-bounded LRU every residency tier uses."""

from __future__ import annotations

import threading

import pytest

from service.lru import ByteLRU


def test_evicts_least_recently_used_until_the_bytes_fit():
    evicted = []
    lru = ByteLRU("t", 100, on_evict=lambda k, v: evicted.append((k, v)))
    assert lru.put("a", "A", 40)
    assert lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # a is now the most recently used
    assert lru.put("c", "C", 40)
    assert evicted == [("b", "B")]
    assert lru.keys() == ["a", "c"]
    assert lru.put("big", "BIG", 90)  # evicts both others
    assert evicted[1:] == [("a", "A"), ("c", "C")]
    stats = lru.stats()
    assert (stats.entries, stats.nbytes, stats.capacity, stats.evictions, stats.hits) == (1, 90, 100, 3, 1)


def test_an_entry_larger_than_the_capacity_is_not_kept():
    lru = ByteLRU("t", 10)
    lru.put("small", 1, 5)
    assert not lru.put("huge", 2, 11)
    assert lru.keys() == ["small"]  # nothing was evicted for it
    assert lru.get("huge") is None
    assert (lru.stats().misses, lru.stats().nbytes) == (1, 5)


def test_replace_resize_and_pop_keep_the_byte_count_exact():
    lru = ByteLRU("t", 100)
    lru.put("a", 1, 30)
    lru.put("a", 2, 50)  # replaced, not added twice
    assert (lru.peek("a"), lru.stats().nbytes, len(lru)) == (2, 50, 1)
    lru.put("b", 3, 40)
    lru.resize("a", 70)  # a grew (a fold was added): b goes, a stays (it is the most recently used)
    assert (lru.keys(), lru.stats().nbytes, lru.stats().evictions) == (["a"], 70, 1)
    lru.resize("a", 120)  # grew past the capacity: dropped
    assert (len(lru), lru.stats().nbytes, lru.stats().evictions) == (0, 0, 2)
    lru.put("c", 4, 10)
    assert lru.pop("c") == 4
    assert (lru.stats().nbytes, lru.stats().evictions) == (0, 2)  # popping is not evicting
    with pytest.raises(ValueError, match="capacity"):
        ByteLRU("t", -1)


def test_concurrent_use_never_exceeds_the_capacity():
    lru = ByteLRU("t", 1000)
    errors = []

    def work(seed: int) -> None:
        for i in range(2000):
            key = (seed * 7 + i) % 50
            if lru.get(key) is None:
                lru.put(key, key, 10 + key % 30)
            nbytes = lru.stats().nbytes
            if nbytes > 1000:
                errors.append(nbytes)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = lru.stats()
    assert stats.nbytes == sum(10 + k % 30 for k in lru)
    assert stats.nbytes <= 1000
    assert stats.hits + stats.misses == 8000
