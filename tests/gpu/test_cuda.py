"""The same guarantees on a CUDA device: tiers on the GPU, answers equal to the CPU reference, exact switching.

Skipped without CUDA (CI has none); ``scripts/gpu_check.sh`` runs them on a machine with a GPU.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator

import pytest
import torch

from repadapter import WeightSwitcher, attach_slots
from service.lifecycle import Runtime
from tests.conftest import random_adapters
from tests.servicekit import assert_predictions, runtimes, stored
from tests.unit.test_service_engine import classify

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TASKS = {"a": 1, "b": 2, "c": 3}


@pytest.fixture(scope="module")
def bundles(model):  # model: the CPU reference
    out = {name: model.bundle(name, seed) for name, seed in TASKS.items()}
    out["probe"] = model.bundle("probe", 4, adapters=False)
    return out


@pytest.fixture
def make_runtime(tmp_path, bundles) -> Iterator[Callable[..., Runtime]]:
    with runtimes(stored(tmp_path / "store", bundles.values()).root, device="cuda", max_delay_ms=20.0) as make:
        yield make


@pytest.mark.parametrize("policy", ["merged", "mixed", "auto"])
def test_cuda_answers_equal_the_cpu_reference_with_tiers_on_the_gpu(make_runtime, model, bundles, images, policy):
    runtime = make_runtime(policy=policy)

    async def all_at_once():
        return await asyncio.gather(*(classify(runtime, n, images) for n in [*TASKS, "probe"]))

    for name, result in zip([*TASKS, "probe"], asyncio.run(all_at_once()), strict=True):
        assert_predictions(result.predictions, model.predict(bundles[name], images), tol=1e-3)
    entry = runtime.residency.on_device.peek(runtime.registry.get("a").key)
    assert entry.head_weight.device.type == "cuda"
    assert all(w.weight_a.device.type == "cuda" for w in entry.adapters.values())
    assert runtime.residency.host.peek(runtime.registry.get("a").key).buffer.device.type == "cpu"
    assert runtime.engine.memory()["allocated"] > 0


def test_cuda_device_tier_evicts_and_reloads_identically(make_runtime, bundles, images):
    probe = make_runtime()
    one = probe.residency.build(bundles["a"].pack(), fold=True).nbytes()
    runtime = make_runtime(policy="merged", device_cache_bytes=int(1.5 * one))
    first = asyncio.run(classify(runtime, "a", images)).predictions
    asyncio.run(classify(runtime, "b", images))  # evicts a from the device tier
    assert runtime.residency.tier(runtime.registry.get("a")) == "host"
    assert asyncio.run(classify(runtime, "a", images)).predictions == first
    assert runtime.residency.stats()["device"].evictions >= 1


def test_cuda_bfloat16_close_to_float32(make_runtime, model, bundles, images):
    runtime = make_runtime(dtype="bfloat16", policy="auto")
    result = asyncio.run(classify(runtime, "a", images, top_k=1))
    expected = model.predict(bundles["a"], images, top_k=1)
    assert [p[0][0] for p in result.predictions] == [p[0][0] for p in expected]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_thousand_switches_are_bitwise_exact(tiny_vit, dtype):
    bb = tiny_vit("vit_tiny_patch16_224", depth=2)
    bb.model.to("cuda", dtype)
    sites = attach_slots(bb.model)
    sw = WeightSwitcher(sites, pack=True)
    every = range(len(sw.targets))
    pristine = [t.clone() for t in sw.live_tensors(every)]
    deltas = [sw.prepare(f"t{i}", {k: w.to("cuda") for k, w in random_adapters(sites, seed=i).items()})
              for i in range(4)]
    merged, first = {}, {}
    rng = random.Random(0)
    for _ in range(1000):
        delta = rng.choice([*deltas, None])
        sw.activate(delta, merged.get(delta.name) if delta is not None else None)
        if delta is not None and delta.name not in merged and rng.random() < 0.5:
            merged[delta.name] = sw.snapshot(delta)
        live = [t.clone() for t in sw.live_tensors(every)]
        ref = first.setdefault(delta.name if delta is not None else "base", live)
        assert all(torch.equal(x, y) for x, y in zip(live, ref, strict=True))
    sw.activate(None)
    assert all(torch.equal(x, y) for x, y in zip(sw.live_tensors(every), pristine, strict=True))
