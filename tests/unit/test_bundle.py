"""Task bundles: round trip, validation before anything is touched, official checkpoint import."""

from __future__ import annotations

import json

import pytest
import torch

from repadapter import AdapterWeights, BackboneRef, Manifest, PackedBundle, TaskBundle, WeightSwitcher, attach_slots
from repadapter.bundle import import_official, parse_manifest
from repadapter.errors import BackboneMismatch, BundleError, CheckpointError, ChecksumMismatch
from tests.conftest import image_batch, random_adapters, rel_err


def make_bundle(backbone, sites, name: str = "demo", seed: int = 0, classes: int = 3) -> TaskBundle:
    g = torch.Generator().manual_seed(seed)
    manifest = Manifest(name=name, labels=[f"c{i}" for i in range(classes)],
                        backbone=BackboneRef(arch=backbone.arch, fingerprint=backbone.fingerprint),
                        preprocess=backbone.preprocess)
    return TaskBundle(manifest, random_adapters(sites, seed), torch.randn(classes, backbone.num_features, generator=g),
                      torch.randn(classes, generator=g))


def test_roundtrip_preserves_tensors_and_checksum(tiny_vit):
    bb = tiny_vit()
    sites = attach_slots(bb.model)
    bundle = make_bundle(bb, sites)
    manifest_bytes, data = bundle.serialize()
    loaded = TaskBundle.deserialize(manifest_bytes, data)
    assert loaded.manifest == bundle.manifest
    assert len(loaded.manifest.tensors_sha256) == 64
    assert set(loaded.adapters) == {s.name for s in sites}
    for site, w in bundle.adapters.items():
        for k, t in w.tensors().items():
            assert torch.equal(loaded.adapters[site].tensors()[k], t)
    assert torch.equal(loaded.head_weight, bundle.head_weight)
    loaded.check_compatible(bb.arch, bb.fingerprint, sites, bb.num_features)


def test_corrupted_tensors_fail_checksum(tiny_vit):
    bb = tiny_vit()
    manifest_bytes, data = make_bundle(bb, attach_slots(bb.model)).serialize()
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    with pytest.raises(ChecksumMismatch, match="sha256"):
        TaskBundle.deserialize(manifest_bytes, bytes(flipped))


def test_bundle_for_other_backbone_refused(tiny_vit):
    bb = tiny_vit()
    sites = attach_slots(bb.model)
    bundle = make_bundle(bb, sites)
    with pytest.raises(BackboneMismatch, match="trained for backbone"):
        bundle.check_compatible(bb.arch, "0" * 32, sites, bb.num_features)
    with pytest.raises(BundleError, match="features"):
        bundle.check_compatible(bb.arch, bb.fingerprint, sites, bb.num_features + 1)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.__setitem__("head.bias", torch.zeros(5)), "inconsistent"),
        (lambda t: t.__setitem__("head.weight", torch.zeros(4, 192)) or t.__setitem__("head.bias", torch.zeros(4)),
         "labels"),
        (lambda t: t.pop("head.weight"), "missing tensor"),
        (lambda t: t.__setitem__("extra", torch.zeros(1)), "unexpected tensor"),
        (lambda t: t.__setitem__("adapter.blocks.0.adapter_attn.bias_b", torch.full((192,), float("inf"))),
         "not finite"),
        (lambda t: t.pop("adapter.blocks.0.adapter_attn.bias_a"), "lacks"),
    ],
)
def test_malformed_tensors_refused(tiny_vit, mutate, message):
    bb = tiny_vit()
    bundle = make_bundle(bb, attach_slots(bb.model))
    tensors = bundle.tensors()
    mutate(tensors)
    with pytest.raises(BundleError, match=message):
        TaskBundle.from_tensors(bundle.manifest, tensors)


@pytest.mark.parametrize(
    ("patch", "field"),
    [({"name": "Bad Name!"}, "name"), ({"labels": []}, "labels"), ({"labels": ["a", "a"]}, "unique"),
     ({"schema_version": 2}, "schema_version"), ({"adapter": {"placement": "everywhere"}}, "placement"),
     ({"surprise": 1}, "surprise")],
)
def test_invalid_manifest_names_the_field(patch, field):
    doc = {"name": "ok", "labels": ["a", "b"], "backbone": {"arch": "x", "fingerprint": "y"}, **patch}
    with pytest.raises(BundleError, match=field):
        parse_manifest(json.dumps(doc))
    with pytest.raises(BundleError, match="manifest"):
        parse_manifest(b"{not json")


def official_state_dict(adapters: dict[str, AdapterWeights], classes: int = 3, features: int = 192) -> dict:
    """``adapters`` in the official RepAdapter layout (Conv1d weights ``[out, in, 1]``), with a head."""
    g = torch.Generator().manual_seed(9)
    sd = {}
    for site, w in adapters.items():
        sd[f"{site}.conv_A.weight"] = w.weight_a[:, :, None].clone()
        sd[f"{site}.conv_A.bias"] = w.bias_a.clone()
        sd[f"{site}.conv_B.weight"] = w.weight_b[:, :, None].clone()
        sd[f"{site}.conv_B.bias"] = w.bias_b.clone()
    sd["head.weight"] = torch.randn(classes, features, generator=g)
    sd["head.bias"] = torch.randn(classes, generator=g)
    return sd


def test_import_official_checkpoint_layout(tiny_vit, photos):
    """A state dict in the official RepAdapter layout (Conv1d weights) serves like our own adapters, and its
    head comes with it."""
    bb = tiny_vit()
    sites = attach_slots(bb.model)
    ours = random_adapters(sites, seed=4, groups=2)
    official = official_state_dict(ours, features=bb.num_features)
    imported = import_official(official, scale=1.0, sites=sites)
    assert set(imported.adapters) == set(ours)
    assert all(w.groups == 2 for w in imported.adapters.values())
    assert imported.num_classes == 3
    assert torch.equal(imported.head_weight, official["head.weight"])
    x = image_batch(photos, bb)
    sw = WeightSwitcher(sites)
    with torch.no_grad():
        sw.activate(sw.prepare("ours", ours))
        ref = bb.model(x)
        sw.activate(sw.prepare("official", imported.adapters))
        assert rel_err(bb.model(x), ref) == 0.0
    bundle = imported.bundle(make_bundle(bb, sites).manifest)  # 3 labels, hidden 8, groups 2, scale 1
    bundle.check_compatible(bb.arch, bb.fingerprint, sites, bb.num_features)
    assert torch.equal(bundle.head_bias, official["head.bias"])
    with pytest.raises(BundleError, match="head has 3 outputs but 4 labels"):
        imported.bundle(make_bundle(bb, sites, classes=4).manifest)
    manifest = make_bundle(bb, sites).manifest
    rescaled = manifest.model_copy(update={"adapter": manifest.adapter.model_copy(update={"scale": 2.0})})
    with pytest.raises(BundleError, match=r"scale=1.0, groups=2; the manifest's adapter config says scale=2.0"):
        imported.bundle(rescaled)


def _conv3(sd: dict) -> None:
    key = "blocks.1.adapter_mlp.conv_B.weight"
    sd[key] = torch.cat([sd[key]] * 3, dim=2)  # [192, 4, 3]: a kernel that mixes neighbouring tokens


@pytest.mark.parametrize(("edit", "says"), [
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("blocks.2.adapter_mlp.")],
     r"no adapters for 1 of the 6 sites: \['blocks.2.adapter_mlp'\]"),
    (lambda sd: sd.pop("blocks.0.adapter_attn.conv_B.bias"), r"lacks \['blocks.0.adapter_attn.conv_B.bias'\]"),
    (_conv3, r"blocks.1.adapter_mlp.conv_B.weight has shape \(192, 4, 3\).*kernel-size-1"),
    (lambda sd: [sd.pop(k) for k in list(sd) if not k.startswith("head.")], "no adapter keys"),
    (lambda sd: sd.clear(), "no adapter keys.*nothing"),
    (lambda sd: sd.__setitem__("blocks.0.attn.qkv.weight", torch.zeros(1)), "unexpected key"),
    (lambda sd: sd.__setitem__("blocks.7.adapter_attn.conv_A.weight", torch.zeros(8, 192, 1)),
     r"sites the given sites do not include: \['blocks.7.adapter_attn'\]"),
    (lambda sd: sd.pop("head.bias"), r"head is incomplete.*lacking \['head.bias'\]"),
    (lambda sd: sd.__setitem__("blocks.0.adapter_attn.conv_A.bias", torch.zeros(8).long()), "floating"),
    (lambda sd: sd.__setitem__("blocks.0.adapter_attn.conv_B.bias", torch.full((192,), float("nan"))),
     "non-finite"),
])
def test_import_official_refuses_incomplete_checkpoints(tiny_vit, edit, says):
    """Every gap is named instead of imported: a missing site would be served as the identity (logits 7.7e-2
    off the official model's), a 3-tap conv truncated to one tap, a head-only checkpoint imported as nothing."""
    bb = tiny_vit()
    sites = attach_slots(bb.model)
    sd = official_state_dict(random_adapters(sites, seed=4), features=bb.num_features)
    edit(sd)
    with pytest.raises(CheckpointError, match=says):
        import_official(sd, scale=1.0, sites=sites)


def test_import_official_without_head_gives_adapters_but_no_bundle(tiny_vit):
    bb = tiny_vit()
    sites = attach_slots(bb.model, "attn")  # the official attention-only placement
    sd = {k: v for k, v in official_state_dict(random_adapters(sites, seed=4)).items() if not k.startswith("head.")}
    imported = import_official(sd, scale=0.5, sites=sites)
    assert (set(imported.adapters), imported.num_classes) == ({s.name for s in sites}, None)
    assert {w.scale for w in imported.adapters.values()} == {0.5}
    with pytest.raises(CheckpointError, match="no head"):
        imported.bundle(make_bundle(bb, sites).manifest)


def test_official_grouped_conv_semantics_match():
    """conv_B as the official Conv1d(r, d, 1, groups=G) computes exactly our dense block-diagonal B."""
    torch.manual_seed(0)
    d, r, g = 16, 8, 2
    conv_a, conv_b = torch.nn.Conv1d(d, r, 1), torch.nn.Conv1d(r, d, 1, groups=g)
    x = torch.randn(3, d, 7)  # official layout: [B, C, N]
    official = x + 0.5 * conv_b(conv_a(x))
    w = AdapterWeights(conv_a.weight[:, :, 0].detach(), conv_a.bias.detach(), conv_b.weight[:, :, 0].detach(),
                       conv_b.bias.detach(), g, 0.5)
    from repadapter import RepAdapter

    ours = RepAdapter.from_weights(w).eval()(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


def test_packed_bundle_is_one_buffer_and_unpacks_to_views(tiny_vit):
    """Thousands of tasks are held packed: one float32 buffer per task (its payload, not ~130 allocations),
    one layout object shared by every task of the same shapes, and views instead of copies on unpack."""
    bb = tiny_vit()
    sites = attach_slots(bb.model)
    one, two = make_bundle(bb, sites, "one", seed=1), make_bundle(bb, sites, "two", seed=2)
    p1, p2 = one.pack(), two.pack()
    payload = sum(t.numel() * t.element_size() for t in one.tensors().values())
    assert p1.nbytes == payload
    assert p1.layout is p2.layout
    unpacked = p1.unpack()
    tensors = [unpacked.head_weight, unpacked.head_bias, *(t for w in unpacked.adapters.values()
                                                           for t in w.tensors().values())]
    assert {t.untyped_storage().data_ptr() for t in tensors} == {p1.buffer.untyped_storage().data_ptr()}
    assert all(torch.equal(unpacked.adapters[s].weight_a, w.weight_a) for s, w in one.adapters.items())
    assert torch.equal(unpacked.head_bias, one.head_bias)
    manifest, data = one.serialize()
    assert torch.equal(PackedBundle.deserialize(manifest, data).buffer, p1.buffer)


def test_manifest_hidden_size_must_match_the_adapters(tiny_vit):
    bb = tiny_vit()
    bundle = make_bundle(bb, attach_slots(bb.model))
    tensors = bundle.tensors()
    as_probe = bundle.manifest.model_copy(update={"adapter": bundle.manifest.adapter.model_copy(update={"hidden": 0})})
    with pytest.raises(BundleError, match=r"adapter\.hidden is 0"):
        PackedBundle.from_tensors(as_probe, tensors)
    head_only = {k: v for k, v in tensors.items() if k.startswith("head.")}
    with pytest.raises(BundleError, match="declares adapters"):
        PackedBundle.from_tensors(bundle.manifest, head_only)
