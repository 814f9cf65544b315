"""The scheduler alone (no model): batching, delays, starvation bound, modes, backpressure, shutdown."""

from __future__ import annotations

import random
import threading
import time

import pytest

from service.batcher import Batch, Candidate, Scheduler, WorkItem
from service.errors import QueueFull

SHAPE = (3, 32, 32)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def item(task: str, size: int = 1, *, adapters: bool = True, shape: tuple = SHAPE) -> WorkItem:
    key = (task, 1)
    return WorkItem(queue=key, weight_key=key if adapters else None, shape=shape, size=size, payload=task)


class Live:
    """The residency's record of the live weights, as the scheduler reads it."""

    def __init__(self) -> None:
        self.key: object = None

    def __call__(self) -> object:
        return self.key


def make(clock: Clock, *, mode: str = "merged", max_batch: int = 4, max_delay: float = 0.01,
         starvation: float = 0.1, max_queued: int = 100, live: Live | None = None) -> Scheduler:
    return Scheduler(max_batch=max_batch, max_delay_s=max_delay, starvation_s=starvation, max_queued=max_queued,
                     choose=lambda _c: mode, can_mix=mode != "merged", live=live or Live(), clock=clock)


def tasks_of(batch: Batch) -> list[str]:
    return [i.payload for i in batch.items]


def test_waits_for_max_delay_then_dispatches_fifo():
    clock = Clock()
    s = make(clock)
    s.put([item("a"), item("a", 2)])
    assert s.plan() is None  # 3 images < max_batch and no one waited max_delay yet
    clock.now = 0.011
    batch = s.plan()
    assert (tasks_of(batch), batch.size, batch.mode, batch.weight_key) == (["a", "a"], 3, "merged", ("a", 1))
    assert s.queued == 0
    assert s.plan() is None


def test_full_batch_goes_at_once_and_never_exceeds_max_batch():
    clock = Clock()
    s = make(clock)
    s.put([item("a", 3), item("a", 2), item("a", 1)])
    batch = s.plan()  # 6 images >= max_batch: no need to wait max_delay
    assert [i.size for i in batch.items] == [3]  # the 2 does not fit and FIFO keeps the 1 behind it
    assert s.plan() is None  # 3 images left: they wait for max_delay
    clock.now = 0.011
    assert [i.size for i in s.plan().items] == [2, 1]


def test_oversized_item_is_served_alone():
    clock = Clock()
    s = make(clock, max_batch=2)
    s.put([item("a", 5)])
    assert s.plan().size == 5


def test_bigger_queue_first_then_preference_for_live_weights():
    clock, live = Clock(), Live()
    s = make(clock, live=live)
    s.put([item("a")])
    s.put([item("b"), item("b")])
    clock.now = 0.02
    assert tasks_of(s.plan()) == ["b", "b"]  # more images served per switch
    s.put([item("c")])
    live.key = ("c", 1)
    clock.now = 0.04
    assert tasks_of(s.plan()) == ["c"]  # same size as a, but c's weights are live: no switch
    assert tasks_of(s.plan()) == ["a"]


def test_starving_queue_is_served_before_a_busy_one():
    clock = Clock()
    s = make(clock, starvation=0.1)
    s.put([item("cold")])
    clock.now = 0.05
    s.put([item("hot", 4)])
    assert tasks_of(s.plan()) == ["hot"]  # cold waited 50 ms < starvation: the full batch wins
    clock.now = 0.11
    s.put([item("hot", 4)])
    assert tasks_of(s.plan()) == ["cold"]  # cold waited 110 ms >= starvation: served first


def test_bounded_wait_under_sustained_load():
    """Simulated worker (each batch takes `batch_s`), one task flooding, five trickling: every request's
    wait stays within starvation + one batch per other queue."""
    rng = random.Random(0)
    clock = Clock()
    starvation, batch_s, tasks = 0.1, 0.01, ["hot", "t1", "t2", "t3", "t4", "t5"]
    s = make(clock, starvation=starvation, max_batch=8, max_queued=10_000)
    waits: dict[str, float] = {t: 0.0 for t in tasks}
    for step in range(2000):
        s.put([item("hot", 4)])  # more than the worker can serve: the hot queue never empties
        if rng.random() < 0.3:
            s.put([item(rng.choice(tasks[1:]))])
        batch = s.plan()
        if batch is not None:
            for i in batch.items:
                waits[i.payload] = max(waits[i.payload], clock.now - i.enqueued)
        clock.now = step * batch_s
    bound = starvation + len(tasks) * batch_s + batch_s
    assert all(waits[t] <= bound for t in tasks[1:]), waits
    assert all(waits[t] > 0 for t in tasks[1:])


def test_merged_batches_share_base_weights_but_not_adapter_weights():
    clock = Clock()
    s = make(clock, max_batch=8)
    s.put([item("probe1", adapters=False), item("probe2", adapters=False), item("a"), item("b")])
    clock.now = 1.0
    first = s.plan()
    assert first.mode == "merged"
    groups = [tasks_of(first), tasks_of(s.plan()), tasks_of(s.plan())]
    assert sorted(map(sorted, groups)) == [["a"], ["b"], ["probe1", "probe2"]]  # head-only tasks share the base


def test_mixed_batches_take_every_task_of_one_shape_only():
    clock = Clock()
    s = make(clock, mode="mixed", max_batch=8)
    s.put([item("a"), item("b"), item("probe", adapters=False), item("big", shape=(3, 64, 64))])
    clock.now = 1.0
    first = s.plan()
    assert (first.mode, first.weight_key) == ("mixed", None)
    assert sorted(tasks_of(first)) in (["a", "b", "probe"], ["big"])
    second = s.plan()
    assert sorted(tasks_of(first) + tasks_of(second)) == ["a", "b", "big", "probe"]
    assert {i.shape for i in first.items} != {i.shape for i in second.items}


def test_policy_sees_the_queue_mix():
    seen: list[Candidate] = []

    def choose(c: Candidate) -> str:
        seen.append(c)
        return "merged"

    clock, live = Clock(), Live()
    s = Scheduler(max_batch=4, max_delay_s=0.0, starvation_s=1.0, max_queued=100, choose=choose, can_mix=True,
                  live=live, clock=clock)
    live.key = ("b", 1)
    s.put([item("a", 2), item("b"), item("c", 3)])
    s.plan()
    c = seen[0]
    assert (c.weight_key, c.live, c.merged_images, c.mixed_images) == (("c", 1), ("b", 1), 3, 4)


def test_queue_full_is_all_or_nothing():
    clock = Clock()
    s = make(clock, max_queued=5)
    s.put([item("a", 3)])
    with pytest.raises(QueueFull, match="limit of 5"):
        s.put([item("b", 1), item("b", 2)])
    assert s.depths() == {("a", 1): 3}
    s.put([item("b", 2)])
    assert s.queued == 5


def test_abandoned_items_are_dropped_unserved():
    clock = Clock()
    s = make(clock)
    gone, kept = item("a", 2), item("a", 1)
    s.put([gone, kept])
    gone.abandoned = True
    clock.now = 1.0
    assert s.plan().items == [kept]
    assert s.queued == 0


def test_close_returns_leftovers_and_refuses_new_work():
    clock = Clock()
    s = make(clock)
    left = item("a")
    s.put([left])
    assert s.close() == [left]
    assert s.next_batch(timeout=1.0) is None
    with pytest.raises(QueueFull):
        s.put([item("a")])


def test_next_batch_blocks_until_work_arrives_and_can_be_interrupted():
    s = Scheduler(max_batch=2, max_delay_s=0.0, starvation_s=1.0, max_queued=10, choose=lambda _c: "merged",
                  can_mix=False)
    got: list[Batch | None] = []
    worker = threading.Thread(target=lambda: got.append(s.next_batch(timeout=5.0)))
    worker.start()
    time.sleep(0.05)
    s.put([item("a")])
    worker.join(5.0)
    assert tasks_of(got[0]) == ["a"]
    start = time.monotonic()
    threading.Timer(0.05, s.interrupt).start()
    assert s.next_batch(timeout=5.0) is None
    assert time.monotonic() - start < 2.0
    assert s.next_batch(timeout=0.05) is None  # plain timeout
