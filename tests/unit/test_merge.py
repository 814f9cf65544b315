"""The heart: merged == unmerged, drift-free switching, mixed batches, and refusal of bad adapters."""

from __future__ import annotations

import copy
import random
from collections import OrderedDict

import pytest
import torch

from repadapter import RepAdapter, RowFold, WeightSwitcher, attach_slots, clear_adapters, mixed_batch
from repadapter.adapter import AdapterWeights
from repadapter.errors import BundleError, UnsupportedBackbone
from repadapter.merge import fold_delta, pack_tensors
from repadapter.mixed import PackedFolds
from tests.conftest import TINY_VITS, image_batch, random_adapters, rel_err
from tests.unit.test_bundle import make_bundle


def _head(num_features: int, classes: int = 10, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(num_features, classes)


@torch.no_grad()
def _unmerged_logits(backbone, sites, adapters, head, x):
    for s in sites:
        if s.name in adapters:
            s.slot.adapter = RepAdapter.from_weights(adapters[s.name], s.layout).to(x.dtype).eval()
    try:
        return head(backbone.model(x))
    finally:
        clear_adapters(sites)


@pytest.mark.parametrize("arch", list(TINY_VITS))
@pytest.mark.parametrize("placement", ["block", "attn"])
def test_merged_equals_unmerged_vit_families(tiny_vit, photos, arch, placement):
    bb = tiny_vit(arch)
    sites = attach_slots(bb.model, placement)
    assert len(sites) == TINY_VITS[arch]["depth"] * (2 if placement == "block" else 1)
    adapters = random_adapters(sites, seed=1)
    head = _head(bb.num_features)
    x = image_batch(photos, bb)
    with torch.no_grad():
        plain = head(bb.model(x))
        unmerged = _unmerged_logits(bb, sites, adapters, head, x)
        sw = WeightSwitcher(sites)
        sw.activate(sw.prepare("t", adapters))
        merged = head(bb.model(x))
    assert rel_err(unmerged, plain) > 1e-3  # the adapters really change the output (100x the tolerance)
    assert rel_err(merged, unmerged) <= 1e-5
    assert torch.equal(merged.argmax(1), unmerged.argmax(1))


def test_merged_equals_unmerged_embedded_cnn(embedded, photos):
    sites = attach_slots(embedded.model)
    assert len(sites) == 33  # 16 inverted residuals x (pw, pwl) + the depthwise-separable block's pw
    assert all(t.bias_sign == -1.0 for s in sites for t in s.targets)  # constants fold into BN means
    adapters = random_adapters(sites, seed=2, std=0.05)
    w, b = embedded.classifier
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    head.weight.data, head.bias.data = w, b
    x = image_batch(photos, embedded)
    with torch.no_grad():
        unmerged = _unmerged_logits(embedded, sites, adapters, head, x)
        sw = WeightSwitcher(sites)
        sw.activate(sw.prepare("t", adapters))
        merged = head(embedded.model(x))
        sw.activate(None)
        plain = head(embedded.model(x))
    assert rel_err(unmerged, plain) > 1e-2
    assert rel_err(merged, unmerged) <= 1e-5
    assert torch.equal(merged.argmax(1), unmerged.argmax(1))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_merged_close_to_unmerged_low_precision(tiny_vit, photos, dtype, tol):
    bb = tiny_vit("vit_tiny_patch16_224", )
    bb.model.to(dtype)
    sites = attach_slots(bb.model)
    adapters = random_adapters(sites, seed=3)
    head = _head(bb.num_features).to(dtype)
    x = image_batch(photos, bb).to(dtype)
    with torch.no_grad():
        unmerged = _unmerged_logits(bb, sites, adapters, head, x)
        sw = WeightSwitcher(sites)
        sw.activate(sw.prepare("t", adapters))
        merged = head(bb.model(x))
    assert rel_err(merged, unmerged) <= tol


def _live(sw: WeightSwitcher) -> list[torch.Tensor]:
    return [t.weight_2d.clone() for t in sw.targets] + [p.clone() for t in sw.targets for p in t.bias_parts]


class HotCache:
    """Snapshots of the ``size`` most recently merged tasks, used as a server's live tier uses them."""

    def __init__(self, sw: WeightSwitcher, size: int) -> None:
        self.sw, self.size, self.merged = sw, size, OrderedDict()

    def activate(self, delta) -> None:
        merged = self.merged.pop(delta.name, None) if delta is not None else None
        self.sw.activate(delta, merged)
        if delta is not None and self.size:
            self.merged[delta.name] = merged or self.sw.snapshot(delta)
            while len(self.merged) > self.size:
                self.merged.popitem(last=False)


@pytest.mark.parametrize(("dtype", "hot_cache", "pack"), [
    (torch.float32, 0, False), (torch.float16, 0, False), (torch.bfloat16, 0, False), (torch.float32, 2, False),
    (torch.bfloat16, 2, False), (torch.float32, 0, True), (torch.float32, 2, True), (torch.bfloat16, 2, True)])
def test_thousand_random_switches_are_bitwise_exact(tiny_vit, dtype, hot_cache, pack):
    bb = tiny_vit("vit_tiny_patch16_224", depth=2)
    bb.model.to(dtype)
    sites = attach_slots(bb.model)
    sw = WeightSwitcher(sites, pack=pack)
    hot = HotCache(sw, hot_cache)
    assert sw.packed is pack
    pristine = _live(sw)
    deltas = [sw.prepare(f"t{i}", random_adapters(sites, seed=10 + i)) for i in range(5)]
    # a 6th task adapting only half the sites: switching to it must restore the others exactly
    half = dict(list(random_adapters(sites, seed=99).items())[::2])
    deltas.append(sw.prepare("half", half))
    first: dict[str, list[torch.Tensor]] = {}
    rng = random.Random(0)
    for _ in range(1000):
        choice = rng.randrange(len(deltas) + 1)
        delta = deltas[choice] if choice < len(deltas) else None
        hot.activate(delta)
        live = _live(sw)
        key = delta.name if delta is not None else "base"
        ref = first.setdefault(key, live)
        assert all(torch.equal(a, b) for a, b in zip(live, ref, strict=True)), f"{key} drifted"
    sw.activate(None)
    assert all(torch.equal(a, b) for a, b in zip(_live(sw), pristine, strict=True))
    assert sw.drift() == 0.0
    assert len(first) == len(deltas) + 1
    assert len(hot.merged) == hot_cache


def test_packed_switcher_owns_one_buffer_and_changes_nothing_else(embedded, photos):
    """Packing moves the target tensors into one buffer without changing a value, a parameter's identity,
    or any result: merged weights are bitwise those of an unpacked switcher, hot or cold."""
    twin = copy.deepcopy(embedded.model)
    params = {n: id(p) for n, p in embedded.model.named_parameters()}
    sites, twin_sites = attach_slots(embedded.model), attach_slots(twin)
    x = image_batch(photos, embedded)
    with torch.no_grad():
        before = embedded.model(x)
        sw = WeightSwitcher(sites, pack=True)
        assert sw.packed
        assert torch.equal(embedded.model(x), before)
    assert {n: id(p) for n, p in embedded.model.named_parameters()} == params
    owned = [t for target in sw.targets for t in (target.weight, *target.bias_parts)]
    assert len({t.untyped_storage().data_ptr() for t in owned}) == 1  # one buffer...
    assert all(t.storage_offset() * t.element_size() % 256 == 0 for t in owned)  # ...each at an aligned offset
    assert sw.pristine_nbytes >= sum(t.numel() * t.element_size() for t in owned)
    ref = WeightSwitcher(twin_sites)
    a, b = random_adapters(sites, seed=4, std=0.05), random_adapters(sites, seed=5, std=0.05)
    deltas = {"a": (sw.prepare("a", a), ref.prepare("a", a)), "b": (sw.prepare("b", b), ref.prepare("b", b))}
    hot = HotCache(sw, 1)
    for name in ["a", "b", "a", None, "a"]:  # the third "a" is cold again (hot_cache 1), the last one hot
        mine, theirs = deltas[name] if name else (None, None)
        hot.activate(mine)
        ref.activate(theirs)
        assert all(torch.equal(p, q) for p, q in zip(_live(sw), _live(ref), strict=True)), name
    sw.activate(None)
    assert sw.drift() == 0.0
    with torch.no_grad():
        assert torch.equal(embedded.model(x), before)


def test_unpackable_targets_fall_back_to_per_tensor_switching(tiny_vit):
    bb = tiny_vit("vit_tiny_patch16_224", depth=2)
    sites = attach_slots(bb.model)
    sites[0].targets[0].bias_parts[0].data = sites[0].targets[0].bias_parts[0].data.double()  # mixed dtypes
    assert pack_tensors([t for s in sites for t in s.targets[0].bias_parts]) is None
    sw = WeightSwitcher(sites, pack=True)
    assert not sw.packed
    sw.activate(sw.prepare("t", random_adapters(sites, seed=6)))
    sw.activate(None)
    assert sw.drift() == 0.0


def test_empty_slots_leave_the_forward_untouched(tiny_vit, photos):
    """Merged serving runs exactly the plain modules: hooks exist only while a slot holds something."""
    bb = tiny_vit("vit_tiny_patch16_224", depth=2)
    sites = attach_slots(bb.model)
    consumers = [bb.model.blocks[0].attn, bb.model.blocks[0].mlp]
    assert not any(s.slot.hooked for s in sites)
    assert all(len(c._forward_pre_hooks) == 0 for c in consumers)
    adapters = random_adapters(sites, seed=50)
    x = image_batch(photos[:1], bb)
    with torch.no_grad():
        plain = bb.model(x)
        sites[0].slot.adapter = RepAdapter.from_weights(adapters[sites[0].name]).eval()
        assert sites[0].slot.hooked
        assert len(consumers[0]._forward_pre_hooks) == 1
        assert rel_err(bb.model(x), plain) > 1e-3
        with mixed_batch(sites, [adapters], torch.zeros(1, dtype=torch.long)):
            assert all(s.slot.hooked for s in sites)
        clear_adapters(sites)
        assert not any(s.slot.hooked for s in sites)
        assert all(len(c._forward_pre_hooks) == 0 for c in consumers)
        assert torch.equal(bb.model(x), plain)


def test_subtractive_unmerge_drifts_in_bf16(tiny_vit):
    """The failure mode we avoid (PEFT-style W += dW; W -= dW): shows the bitwise test can fail."""
    bb = tiny_vit("vit_tiny_patch16_224", depth=1)
    sites = attach_slots(bb.model)
    w = sites[0].targets[0].weight_2d.detach().to(torch.bfloat16)
    u, _ = fold_delta(w, random_adapters(sites, seed=5)[sites[0].name])
    dw = (u @ random_adapters(sites, seed=5)[sites[0].name].weight_a).to(torch.bfloat16)
    cur = w.clone()
    for _ in range(100):
        cur = (cur + dw) - dw
    assert (cur.float() - w.float()).abs().max() > 0


def _woodbury_unmerge(weight: torch.Tensor, bias: torch.Tensor,
                      adapter: AdapterWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover ``(W, c)`` from merged ``(W', c')`` without a pristine copy: the exact unmerge of DESIGN.md, kept
    here as the measurement behind the choice of pristine copies (the library does not ship it).

    Woodbury: ``W = W' (I + s B A)^-1 = W' - s (W' B) (I_r + s A B)^-1 A``, an ``r x r`` inverse only;
    ``c = c' - s W (B a + b)``. Computed in float64 and cast back; it is exact up to rounding, so repeated
    merge/unmerge cycles drift, which is why serving restores from pristine copies. Measured on a ViT qkv
    (random non-trivial adapter), max error relative to the weights' scale: fp32 1.1e-7 after one cycle,
    4.7e-6 after 100, 1.7e-5 after 1,000; bf16 (rounding the merged weights each cycle) 5.7e-3 after one,
    8.6e-2 after 100.
    """
    w1 = weight.detach().double()
    a = adapter.weight_a.double()
    b = adapter.dense_b().double()
    s = adapter.scale
    core = torch.eye(a.shape[0], dtype=torch.float64) + s * (a @ b)  # [r, r]
    w = w1 - s * (w1 @ b) @ torch.linalg.solve(core, a)
    c = bias.detach().double() - s * (w @ (b @ adapter.bias_a.double() + adapter.bias_b.double()))
    return w.to(weight.dtype), c.to(bias.dtype)


def test_algebraic_unmerge_recovers_weights(tiny_vit):
    bb = tiny_vit("vit_tiny_patch16_224", depth=1)
    sites = attach_slots(bb.model)
    target = sites[0].targets[0]
    with torch.no_grad():
        target.bias_parts[0].normal_()  # random init leaves biases at zero: make the bias check meaningful
    adapter = random_adapters(sites, seed=6)[sites[0].name]
    w0 = target.weight_2d.detach().clone()
    c0 = torch.cat(target.bias_parts).detach().clone()
    cur_w, cur_c = w0.clone(), c0.clone()
    for _ in range(100):  # 100 merge / Woodbury-unmerge cycles in fp32
        u, dc = fold_delta(cur_w, adapter)
        cur_w, cur_c = _woodbury_unmerge(cur_w + u @ adapter.weight_a, cur_c + dc, adapter)
    # documented bound: relative drift below 1e-5 after 100 fp32 cycles (it is not zero: rounding)
    assert rel_err(cur_w, w0) < 1e-5
    assert rel_err(cur_c, c0) < 1e-5


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "embedded"])
def test_mixed_batch_equals_per_task_merged(tiny_vit, embedded, photos, arch):
    bb = embedded if arch == "embedded" else tiny_vit(arch)
    sites = attach_slots(bb.model)
    tasks = [random_adapters(sites, seed=20, std=0.05),
             random_adapters(sites, seed=21, hidden=4, groups=1, std=0.05),  # another hidden size: padded
             {}]  # a task without adapters (linear probe / pretrained head): identity
    x = image_batch(photos, bb)
    rows = torch.tensor([0, 1, 2, 1])
    with torch.no_grad(), mixed_batch(sites, tasks, rows):
        mixed = bb.model(x)
    assert all(s.slot.mixed is None for s in sites)  # context cleared
    _assert_rows_are_merged(bb, sites, tasks, rows, x, mixed)


@torch.no_grad()
def _assert_rows_are_merged(bb, sites, tasks, rows, x, mixed) -> None:
    """Row ``i`` of a mixed forward equals task ``rows[i]`` merged (tasks without adapters: the base)."""
    sw = WeightSwitcher(sites)
    for i, t in enumerate(rows.tolist()):
        sw.activate(sw.prepare(str(t), tasks[t]) if tasks[t] else None)
        assert rel_err(mixed[i : i + 1], bb.model(x[i : i + 1])) <= 1e-5
    sw.activate(None)


def test_mixed_batch_of_pre_folded_tasks_equals_per_task_merged(tiny_vit, photos):
    """The serving path: every task pre-folded (RowFold), one hidden size, so the batch is plain stacks."""
    bb = tiny_vit("vit_tiny_patch16_224")
    sites = attach_slots(bb.model)
    tasks = [random_adapters(sites, seed=30 + i, std=0.05) for i in range(3)]
    folds = [{site: RowFold.of(w) for site, w in t.items()} for t in tasks]
    x = image_batch(photos, bb)
    rows = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        with mixed_batch(sites, folds, rows):
            mixed = bb.model(x)
        with mixed_batch(sites, tasks, rows):  # folded on the fly: the same numbers
            assert torch.equal(bb.model(x), mixed)
    _assert_rows_are_merged(bb, sites, tasks, rows, x, mixed)


def test_non_finite_adapter_refused_before_touching_weights(tiny_vit):
    bb = tiny_vit("vit_tiny_patch16_224", depth=1)
    sites = attach_slots(bb.model)
    sw = WeightSwitcher(sites)
    before = _live(sw)
    bad = random_adapters(sites, seed=7)
    bad[sites[0].name].bias_b[3] = float("nan")
    with pytest.raises(BundleError, match="non-finite"):
        sw.prepare("bad", bad)
    wrong = random_adapters(sites, seed=7, hidden=4)
    wrong[sites[1].name].weight_a = torch.zeros(4, 5)
    with pytest.raises(BundleError, match="shape"):
        sw.prepare("wrong", wrong)
    with pytest.raises(BundleError, match="sites this backbone does not have"):
        sw.prepare("unknown", {"blocks.99.adapter_attn": bad[sites[0].name]})
    assert all(torch.equal(a, b) for a, b in zip(_live(sw), before, strict=True))


def test_unknown_layout_fails_loudly():
    class NotAViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(UnsupportedBackbone, match="supported families"):
        attach_slots(NotAViT())


def test_block_with_changed_layout_fails_loudly(tiny_vit):
    bb = tiny_vit("vit_tiny_patch16_224", depth=1)
    bb.model.blocks[0].attn.qkv = torch.nn.Identity()  # a timm change we do not know
    with pytest.raises(UnsupportedBackbone, match=r"expected nn\.Linear"):
        attach_slots(bb.model)


def test_attach_twice_refused(tiny_vit):
    bb = tiny_vit("vit_tiny_patch16_224", depth=1)
    attach_slots(bb.model)
    with pytest.raises(UnsupportedBackbone, match="already"):
        attach_slots(bb.model)


def test_qkv_without_bias_gets_exact_fold(tiny_vit, photos):
    """The official code's merge breaks for qkv without bias; ours adds a zero bias and stays exact."""
    bb = tiny_vit("vit_tiny_patch16_224", qkv_bias=False)
    sites = attach_slots(bb.model)
    adapters = random_adapters(sites, seed=8)
    head = _head(bb.num_features)
    x = image_batch(photos, bb)
    with torch.no_grad():
        unmerged = _unmerged_logits(bb, sites, adapters, head, x)
        sw = WeightSwitcher(sites)
        sw.activate(sw.prepare("t", adapters))
        assert rel_err(head(bb.model(x)), unmerged) <= 1e-5


@pytest.mark.parametrize("arch", ["efficientnet_b0", "tf_efficientnet_lite0", "mobilenetv2_050"])
def test_merged_equals_unmerged_other_cnn_families(arch, photos):
    from repadapter import load_backbone
    from repadapter.preprocess import preprocess_batch

    bb = load_backbone(arch)
    sites = attach_slots(bb.model)
    assert len(sites) > 10
    adapters = random_adapters(sites, seed=30, std=0.05)
    head = _head(bb.num_features)
    x = preprocess_batch(photos[:2], bb.preprocess.with_size(64))
    with torch.no_grad():
        bb.model(x)  # random-init BN statistics are trivial: give them spread so the mean fold matters
        for m in bb.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        unmerged = _unmerged_logits(bb, sites, adapters, head, x)
        sw = WeightSwitcher(sites)
        sw.activate(sw.prepare("t", adapters))
        merged = head(bb.model(x))
    assert rel_err(merged, unmerged) <= 1e-5
    with pytest.raises(UnsupportedBackbone, match="placement"):
        attach_slots(load_backbone(arch).model, "attn")


def test_reset_restores_every_target_after_a_partial_switch(tiny_vit):
    bb = tiny_vit("vit_tiny_patch16_224", depth=2)
    sites = attach_slots(bb.model)
    sw = WeightSwitcher(sites)
    pristine = _live(sw)
    delta = sw.prepare("t", random_adapters(sites, seed=40))
    with torch.no_grad():
        sw.targets[0].weight_2d.add_(1.0)  # what a switch interrupted half-way leaves: base state, one layer off
    assert sw.is_base  # the switcher does not know: only reset() restores what it did not do
    sw.reset()
    assert all(torch.equal(a, b) for a, b in zip(_live(sw), pristine, strict=True))
    sw.activate(delta)
    assert not sw.is_base
    sw.reset()
    assert sw.is_base
    assert sw.drift() == 0.0


@pytest.mark.parametrize(("arch", "groups"),
                         [("vit_tiny_patch16_224", 2), ("embedded", 2), ("vit_tiny_patch16_224", 1)])
def test_packed_folds_equal_per_site_folds_and_serve_mixed_batches(tiny_vit, embedded, photos, arch, groups):
    """A task's folds computed in one buffer with indexed ops equal :meth:`RowFold.of` per site, and a mixed
    batch of packed tasks (one stack, one gather) equals each task merged; a task without adapters is None."""
    bb = embedded if arch == "embedded" else tiny_vit(arch)
    sites = attach_slots(bb.model)
    tasks = [random_adapters(sites, seed=50 + i, groups=groups, scale=0.7, std=0.05) for i in range(2)]
    packed = []
    for i, t in enumerate(tasks):
        bundle = make_bundle(bb, sites, f"t{i}", seed=i)
        bundle.adapters = t
        bundle.manifest = bundle.manifest.model_copy(update={"adapter": bundle.manifest.adapter.model_copy(
            update={"groups": groups, "scale": 0.7})})
        packed.append(PackedFolds.of(bundle.pack()))
    for t, p in zip(tasks, packed, strict=True):
        got = p.sites()
        assert set(got) == set(t)
        for name, w in t.items():
            ref = RowFold.of(w)
            for x, y in zip(got[name].tensors(), ref.tensors(), strict=True):
                assert rel_err(x, y) < 1e-6
    x = image_batch(photos, bb)
    rows = torch.tensor([1, 2, 0, 1])
    with torch.no_grad(), mixed_batch(sites, [*packed, None], rows):
        mixed = bb.model(x)
    _assert_rows_are_merged(bb, sites, [*tasks, {}], rows, x, mixed)
