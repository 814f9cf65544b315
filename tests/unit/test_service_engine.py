"""The engine with a real tiny backbone, without HTTP: policies agree, version binding, timeouts, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import torch

from repadapter.errors import TaskNotFound
from service.errors import InferenceFailed, InferenceTimeout, QueueFull, ShuttingDown
from service.lifecycle import Runtime
from tests.servicekit import assert_predictions, runtimes, stored

TASKS = {"a": 1, "b": 2, "c": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundles(model):
    out = {name: model.bundle(name, seed) for name, seed in TASKS.items()}
    out["probe"] = model.bundle("probe", 4, adapters=False)
    return out


@pytest.fixture
def make_runtime(tmp_path, bundles) -> Iterator[Callable[..., Runtime]]:
    """Factory: a started, warmed-up Runtime over a store holding ``bundles``."""
    with runtimes(stored(tmp_path / "store", bundles.values()).root, max_delay_ms=50.0) as make:
        yield make


def tensor(runtime: Runtime, name: str, images: list[bytes]) -> torch.Tensor:
    from service.images import ImageLimits, preprocess
    from service.uploads import Upload

    task = runtime.registry.get(name)
    return preprocess([Upload(b) for b in images], task.manifest.preprocess, ImageLimits(1 << 24, 1 << 24))


async def classify(runtime: Runtime, name: str, images: list[bytes], top_k: int = 5):
    return await runtime.engine.submit(runtime.registry.get(name), tensor(runtime, name, images), top_k)


@pytest.mark.parametrize("policy", ["merged", "mixed", "auto"])
def test_policies_give_the_offline_merged_predictions(make_runtime, model, bundles, images, policy):
    runtime = make_runtime(policy=policy)
    names = [*TASKS, "probe"]

    async def all_at_once():
        return await asyncio.gather(*(classify(runtime, n, images) for n in names))

    results = asyncio.run(all_at_once())
    for name, result in zip(names, results, strict=True):
        assert result.task.version == 1
        assert_predictions(result.predictions, model.predict(bundles[name], images))
    modes = {m for r in results for m in r.modes}
    sizes = [s for r in results for s in r.batch_sizes]
    if policy == "mixed":  # everything waited together: one forward for all four tasks
        assert modes == {"mixed"}
        assert sizes == [8] * 4
    elif policy == "merged":  # one forward per weight set
        assert modes == {"merged"}
        assert sizes == [2] * 4


def test_builtin_task_is_the_backbones_classifier(make_runtime, model, images):
    runtime = make_runtime(policy="merged")
    result = asyncio.run(classify(runtime, "imagenet", images, top_k=3))
    feats = model.backbone.model(tensor(runtime, "imagenet", images))
    weight, bias = model.backbone.classifier
    probs = (feats @ weight.t() + bias).softmax(-1)
    top = probs.topk(3, dim=-1)
    labels = runtime.registry.get("imagenet").labels
    expected = [[(labels[i], s) for i, s in zip(ri, rs, strict=True)]
                for ri, rs in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
    assert_predictions(result.predictions, expected)
    assert len(set(labels)) == 1000


def test_base_weights_are_restored_exactly(make_runtime, images):
    runtime = make_runtime(policy="merged")

    async def run():
        await classify(runtime, "a", images)
        assert runtime.engine.active_task == "a"
        await classify(runtime, "probe", images)

    asyncio.run(run())
    assert runtime.engine.active_task is None
    assert runtime.residency.live is None
    assert runtime.residency.switcher.is_base
    assert runtime.residency.switcher.drift() == 0.0
    assert runtime.metrics.switches._value.get() >= 2


@pytest.mark.parametrize("policy", ["merged", "mixed"])
def test_replaced_while_queued_is_answered_by_the_accepted_version(make_runtime, model, bundles, images, policy):
    runtime = make_runtime(policy=policy, max_delay_ms=300.0)
    new = model.bundle("a", 11)

    async def run():
        old = asyncio.create_task(classify(runtime, "a", images))
        await asyncio.sleep(0.05)  # queued, waiting for its batch to fill
        await asyncio.to_thread(runtime.register, new.pack(), overwrite=True)
        fresh = await classify(runtime, "a", images)
        return await old, fresh

    old, fresh = asyncio.run(run())
    assert (old.task.version, fresh.task.version) == (1, 2)
    assert_predictions(old.predictions, model.predict(bundles["a"], images))
    assert_predictions(fresh.predictions, model.predict(new, images))


def test_deleted_while_queued_is_answered_by_the_accepted_version(make_runtime, model, bundles, images):
    runtime = make_runtime(policy="auto", max_delay_ms=300.0)

    async def run():
        queued = asyncio.create_task(classify(runtime, "b", images))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(runtime.delete, "b")
        return await queued

    result = asyncio.run(run())
    assert result.task.version == 1
    assert_predictions(result.predictions, model.predict(bundles["b"], images))
    with pytest.raises(TaskNotFound):
        runtime.registry.get("b")
    assert "b" not in [e.name for e in runtime.store.list()]


@pytest.mark.parametrize("policy", ["merged", "mixed"])
def test_deleted_and_registered_again_never_shares_weights(make_runtime, model, bundles, images, policy):
    """The new task restarts at version 1: queued requests of the old one must still get the old weights,
    and the new one must never be served with the old (cached or live) weights."""
    runtime = make_runtime(policy=policy, max_delay_ms=300.0)
    reborn = model.bundle("c", 99)

    async def run():
        await classify(runtime, "c", images)  # the old c's weights become live (merged) and cached
        old = asyncio.create_task(classify(runtime, "c", images))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(runtime.delete, "c")
        await asyncio.to_thread(runtime.register, reborn.pack())
        return await old, await classify(runtime, "c", images)

    old, new = asyncio.run(run())
    assert (old.task.version, new.task.version) == (1, 1)
    assert_predictions(old.predictions, model.predict(bundles["c"], images))
    assert_predictions(new.predictions, model.predict(reborn, images))


def test_timeout_gives_up_and_the_item_is_dropped(make_runtime, images):
    runtime = make_runtime(request_timeout_s=0.05, max_delay_ms=300.0, starvation_ms=1000.0)
    with pytest.raises(InferenceTimeout, match=r"no answer within 0\.05 s"):
        asyncio.run(classify(runtime, "c", images))
    assert runtime.engine.scheduler.next_batch(timeout=0.6) is None  # dropped when it came due, not served
    assert runtime.engine.scheduler.queued == 0
    assert runtime.metrics.images.labels(task="c")._value.get() == 0


def test_queue_full_refuses_without_queueing(make_runtime, images):
    runtime = make_runtime(max_queue_images=1)
    with pytest.raises(QueueFull, match="limit of 1"):
        asyncio.run(classify(runtime, "a", images))
    assert runtime.engine.scheduler.queued == 0


def test_shutdown_fails_queued_requests(make_runtime, images):
    runtime = make_runtime(max_delay_ms=2000.0, starvation_ms=5000.0)

    async def run():
        queued = asyncio.create_task(classify(runtime, "a", images))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(runtime.close)
        return await queued

    with pytest.raises(ShuttingDown):
        asyncio.run(run())
    assert not runtime.engine.alive


def test_bfloat16_serving_stays_close_to_float32(make_runtime, model, bundles, images):
    runtime = make_runtime(dtype="bfloat16", policy="merged")
    result = asyncio.run(classify(runtime, "a", images, top_k=1))
    expected = model.predict(bundles["a"], images, top_k=1)
    assert [p[0][0] for p in result.predictions] == [p[0][0] for p in expected]
    assert all(abs(g[0][1] - e[0][1]) < 0.05 for g, e in zip(result.predictions, expected, strict=True))


def test_failed_switch_restores_every_weight(make_runtime, model, bundles, images):
    """A switch that dies halfway (device error) must not leave half-merged weights behind."""
    runtime = make_runtime(policy="merged")
    switcher = runtime.residency.switcher
    original = switcher.activate
    calls = []

    def dies_halfway(delta, merged=None):
        calls.append(delta)
        if len(calls) == 1:
            switcher.targets[0].weight_2d.add_(1.0)  # one target already written
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(delta, merged)

    switcher.activate = dies_halfway
    try:
        with pytest.raises(InferenceFailed, match="illegal memory access"):
            asyncio.run(classify(runtime, "a", images))
    finally:
        switcher.activate = original
    assert switcher.drift() == 0.0  # every target restored from the pristine copies
    assert runtime.residency.live is None
    assert runtime.engine.alive
    probe = asyncio.run(classify(runtime, "probe", images))
    assert_predictions(probe.predictions, model.predict(bundles["probe"], images))
    a = asyncio.run(classify(runtime, "a", images))
    assert_predictions(a.predictions, model.predict(bundles["a"], images))
