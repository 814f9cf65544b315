"""Tiered residency with a real tiny backbone and a real store: byte bounds, eviction and reload, lazy start-up,
one load per cold task, and the live weights recorded once."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from repadapter import LocalStore
from repadapter.errors import BackboneMismatch, TaskNotFound
from service.errors import InferenceTimeout
from service.lifecycle import Runtime
from tests.servicekit import assert_predictions, runtimes, stored, wait_for
from tests.unit.test_service_engine import classify

TASKS = {"a": 1, "b": 2, "c": 3, "d": 4}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundles(model):
    return {name: model.bundle(name, seed) for name, seed in TASKS.items()}


@pytest.fixture
def store(tmp_path, bundles) -> LocalStore:
    return stored(tmp_path / "store", bundles.values())


@pytest.fixture
def make_runtime(store) -> Iterator[Callable[..., Runtime]]:
    with runtimes(store.root, builtin_task="", max_delay_ms=1.0) as make:
        yield make


def loads(runtime: Runtime) -> dict[str, float]:
    """Loads performed so far, by the tier they filled (``repserve_task_loads_total``)."""
    return {tier: runtime.metrics.task_loads.labels(tier=tier)._value.get() for tier in ("host", "device")}


@pytest.fixture(scope="module")
def sizes(model, bundles) -> dict[str, int]:
    """Bytes one task takes in each tier (every task has the same shapes)."""
    packed = bundles["a"].pack()
    with torch.no_grad():
        model.switcher.activate(model.switcher.prepare("a", bundles["a"].adapters))
        snapshot = model.switcher.snapshot_nbytes(model.switcher.prepare("a", bundles["a"].adapters))
        model.switcher.activate(None)
    return {"host": packed.nbytes, "snapshot": snapshot}


def test_every_tier_evicts_by_bytes_and_a_reloaded_task_answers_identically(make_runtime, model, bundles, images,
                                                                             sizes):
    """Two tasks fit each tier: a third evicts the least recently used one, which then comes back from the
    store (host), the host (device) or pristine (live) and answers bit for bit as before."""
    probe = make_runtime()
    device_bytes = probe.residency.build(bundles["a"].pack(), fold=True).nbytes()
    runtime = make_runtime(policy="merged", host_cache_bytes=int(2.5 * sizes["host"]),
                           device_cache_bytes=int(2.5 * device_bytes), live_cache_bytes=int(1.5 * sizes["snapshot"]))
    r = runtime.residency
    first = {}
    for name in ["a", "b", "c", "a"]:  # a is evicted from every tier by b and c, then loaded again
        result = asyncio.run(classify(runtime, name, images))
        assert_predictions(result.predictions, model.predict(bundles[name], images))
        assert first.setdefault(name, result.predictions) == result.predictions  # bitwise the same answers
        for tier in r.stats().values():
            assert tier.nbytes <= tier.capacity
    stats = r.stats()
    assert (stats["host"].entries, stats["device"].entries, stats["live"].entries) == (2, 2, 1)
    assert (stats["host"].evictions, stats["device"].evictions) == (2, 2)  # a (by c), then b (by a)
    assert stats["live"].evictions == 3  # one snapshot fits: each merge evicts the previous one
    assert loads(runtime) == {"host": 4, "device": 4}  # a twice, b, c
    assert [runtime.residency.tier(runtime.registry.get(n)) for n in "abcd"] == ["device", "store", "device", "store"]
    # the live tier: a switch back to the last merged task is a copy of its snapshot, bitwise the first merge
    live_hits = stats["live"].hits
    asyncio.run(classify(runtime, "c", images))
    asyncio.run(classify(runtime, "a", images))
    assert r.stats()["live"].hits == live_hits  # c and a evict each other's snapshot: every merge is cold
    assert r.live == runtime.registry.get("a").weight_key
    assert not r.switcher.is_base


def test_live_tier_switch_is_a_copy_of_the_first_merge(make_runtime, bundles, images, sizes):
    runtime = make_runtime(policy="merged", live_cache_bytes=4 * sizes["snapshot"])
    r = runtime.residency
    weights: dict[str, list[torch.Tensor]] = {}
    for name in ["a", "b", "a", "b", "a"]:
        asyncio.run(classify(runtime, name, images))
        live = [t.clone() for t in r.switcher.live_tensors(range(len(r.switcher.targets)))]
        ref = weights.setdefault(name, live)
        assert all(torch.equal(x, y) for x, y in zip(live, ref, strict=True))
    assert r.stats()["live"].hits == 3  # a, b merged once each; every later switch copied a snapshot


def test_concurrent_requests_for_a_cold_task_load_it_once(make_runtime, model, bundles, images):
    runtime = make_runtime(policy="auto")
    assert runtime.residency.tier(runtime.registry.get("b")) == "store"

    async def burst():
        return await asyncio.gather(*(classify(runtime, "b", images) for _ in range(8)))

    results = asyncio.run(burst())
    for result in results:
        assert_predictions(result.predictions, model.predict(bundles["b"], images))
    assert loads(runtime) == {"host": 1, "device": 1}
    assert runtime.residency.stats()["device"].misses >= 1
    assert any(r.load_s > 0 for r in results)


def test_start_up_reads_manifests_only(store, make_runtime, model, bundles, images):
    """No tensor file is opened before the first request; a corrupt one is found then, for its task only."""
    for entry in store.list():  # every tensor file unreadable as safetensors
        (store.path(entry.name, entry.version) / "adapter.safetensors").write_bytes(b"not a bundle")
    opened: list[str] = []
    watching = [True]

    def audit(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], str | bytes):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: this one stops recording at the end of the test
    try:
        runtime = make_runtime(policy="auto")
        assert not [p for p in opened if p.endswith("adapter.safetensors")]
        assert sum(p.endswith("manifest.json") for p in opened) >= len(TASKS)
    finally:
        watching[0] = False
    assert sorted(t.name for t in runtime.registry.tasks()) == sorted(TASKS)
    assert all(runtime.residency.tier(t) == "store" for t in runtime.registry.tasks())
    from service.errors import TaskUnavailable

    with pytest.raises(TaskUnavailable, match="sha256"):
        asyncio.run(classify(runtime, "a", images))


def test_manifest_for_another_backbone_is_refused_at_the_scan(store, make_runtime, bundles):
    foreign = bundles["d"].manifest.model_copy(update={"name": "foreign"})
    foreign = foreign.model_copy(update={"backbone": foreign.backbone.model_copy(update={"fingerprint": "0" * 32})})
    store.put(type(bundles["d"])(foreign, bundles["d"].adapters, bundles["d"].head_weight, bundles["d"].head_bias))
    runtime = make_runtime()
    assert "foreign" not in runtime.registry
    assert runtime.metrics.store_errors.labels(reason=BackboneMismatch.code)._value.get() == 1
    runtime.sync()  # an unchanged store is not re-read, so the refusal is not counted again
    assert runtime.metrics.store_errors.labels(reason=BackboneMismatch.code)._value.get() == 1


def test_delete_and_replace_drop_the_old_versions_from_every_tier(make_runtime, model, bundles, images):
    runtime = make_runtime(policy="merged")
    asyncio.run(classify(runtime, "a", images))
    old = runtime.registry.get("a")
    assert old.key in runtime.residency.merged
    runtime.register(model.bundle("a", 7).pack(), overwrite=True)
    new = runtime.registry.get("a")
    assert all(old.key not in tier for tier in (runtime.residency.host, runtime.residency.on_device,
                                                runtime.residency.merged))
    assert runtime.residency.tier(new) == "device"  # registered tasks are admitted, not read back
    runtime.delete("a")
    assert all(new.key not in tier for tier in (runtime.residency.host, runtime.residency.on_device))


def test_a_slow_cold_load_blocks_neither_other_tasks_nor_past_the_request_timeout(make_runtime, model, bundles,
                                                                                   images, monkeypatch):
    """While one task's bundle is being read (held here on a gate), resident tasks are served; a request
    that waits for the load longer than the request timeout gets 503 ``timeout``, and the load still lands."""
    runtime = make_runtime(policy="auto", request_timeout_s=2.0)
    asyncio.run(classify(runtime, "a", images))  # resident
    gate = threading.Event()
    read = runtime.store.get_packed

    def slow(name: str, version: int | None = None):
        if name == "b":
            gate.wait(10)
        return read(name, version)

    monkeypatch.setattr(runtime.store, "get_packed", slow)

    async def run():
        cold = asyncio.create_task(classify(runtime, "b", images))
        await asyncio.sleep(0.05)
        warm = await classify(runtime, "a", images)  # served while b's load waits
        assert not cold.done()
        with pytest.raises(InferenceTimeout, match="was not loaded within"):
            await cold
        gate.set()
        return warm

    warm = asyncio.run(run())
    assert_predictions(warm.predictions, model.predict(bundles["a"], images))
    wait_for(lambda: runtime.residency.tier(runtime.registry.get("b")) == "device", 10, "the load to land")
    again = asyncio.run(classify(runtime, "b", images))
    assert_predictions(again.predictions, model.predict(bundles["b"], images))
    assert again.load_s < 0.05  # resident now


def test_start_up_collects_store_leftovers_unless_turned_off(store, make_runtime):
    """Crashed writers' temp directories go after start-up (the directory store's writers hold its lock, so
    any it finds is dead); ``store_gc_grace_s=0`` turns collection off."""
    leftover = store.root / ".tmp" / "a-crashed"
    leftover.mkdir()
    (leftover / "adapter.safetensors").write_bytes(b"half")
    make_runtime(store_gc_grace_s=0)
    assert leftover.exists()
    runtime = make_runtime(store_gc_grace_s=3600)
    assert not leftover.exists()
    assert sorted(t.name for t in runtime.registry.tasks()) == sorted(TASKS)


def test_wait_ready_returns_when_ready_and_raises_on_failure_or_timeout(make_runtime):
    runtime = make_runtime()
    runtime.wait_ready(1.0)  # ready: returns at once
    runtime.ready.clear()
    with pytest.raises(RuntimeError, match=r"not ready after 0\.2 s"):
        runtime.wait_ready(0.2)
    runtime.failure = "OSError: store unreachable"
    with pytest.raises(RuntimeError, match="start-up failed: OSError: store unreachable"):
        runtime.wait_ready()


def test_a_version_deleted_before_its_first_load_is_404_not_503(store, make_runtime, images):
    """A request accepted for a listed task whose version is deleted before it was ever loaded: it cannot
    be answered by that version any more, and retrying cannot help either, so 404 (not 503 "retry")."""
    runtime = make_runtime()
    store.delete("c")  # the registry still lists it: no scan yet
    with pytest.raises(TaskNotFound, match="'c' version 1 was deleted while this request waited"):
        asyncio.run(classify(runtime, "c", images))
    assert asyncio.run(classify(runtime, "a", images)).predictions  # the others are unaffected
