"""Both store backends keep one contract (directory and S3, the latter on a real S3 protocol server):
versions, refusals, checksums, a catalog that follows other writers, concurrent writers losing nothing,
and garbage collection that never touches a readable version."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from repadapter import LocalStore, S3Store, attach_slots, open_store
from repadapter.errors import ChecksumMismatch, StoreError, TaskExists, TaskNotFound
from repadapter.store import Store
from tests.s3kit import client, new_bucket
from tests.unit.test_bundle import make_bundle


@pytest.fixture
def vit(tiny_vit):
    bb = tiny_vit()
    return bb, attach_slots(bb.model)


@pytest.fixture(params=["directory", "s3"])
def open_replica(request, tmp_path) -> Callable[[], Store]:
    """Factory: another handle on ONE store (a new process or replica would hold exactly this)."""
    if request.param == "directory":
        return lambda: LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    url = f"s3://{new_bucket(endpoint)}/tasks"
    return lambda: open_store(url, endpoint_url=endpoint)


def bundle(vit, name: str, seed: int):
    bb, sites = vit
    return make_bundle(bb, sites, name, seed=seed)


def test_put_get_versions_delete(open_replica, vit):
    store = open_replica()
    b1, b2 = bundle(vit, "flowers", 1), bundle(vit, "flowers", 2)
    assert store.put(b1).version == 1
    with pytest.raises(TaskExists):
        store.put(bundle(vit, "flowers", 3))
    assert store.put(b2, overwrite=True).version == 2
    assert store.versions("flowers") == [1, 2]
    assert [(e.name, e.version) for e in store.list()] == [("flowers", 2)]
    assert torch.equal(store.get("flowers").head_weight, b2.head_weight)
    assert torch.equal(store.get("flowers", 1).head_weight, b1.head_weight)
    assert store.manifest("flowers", 1).tensors_sha256 == b1.manifest.tensors_sha256
    with pytest.raises(TaskNotFound, match="no version 7"):
        store.get("flowers", 7)
    with pytest.raises(TaskNotFound, match="invalid task name"):
        store.get("../etc")
    store.delete("flowers")
    assert store.list() == []
    assert store.versions("flowers") == []
    with pytest.raises(TaskNotFound):
        store.get("flowers")
    with pytest.raises(TaskNotFound):
        store.delete("flowers")
    again = store.put(bundle(vit, "flowers", 4))  # a deleted name is free again, without overwrite
    assert store.versions("flowers") == [again.version]
    assert torch.equal(store.get("flowers").head_weight, bundle(vit, "flowers", 4).head_weight)


def test_catalog_follows_another_writer_and_is_the_same_object_while_unchanged(open_replica, vit):
    writer, reader = open_replica(), open_replica()
    first = reader.catalog()
    assert len(first) == 0
    writer.put(bundle(vit, "a", 1))
    seen = reader.catalog()
    assert seen is not first
    assert [e.name for e in seen.sorted()] == ["a"]
    assert seen.entries["a"].etag == writer.entry("a", 1).etag
    assert reader.catalog() is seen  # nothing changed: the very same object
    writer.put(bundle(vit, "a", 2), overwrite=True)
    changed = reader.catalog().entries["a"]
    assert (changed.version, changed.etag) == (2, writer.entry("a", 2).etag)
    assert changed.etag != seen.entries["a"].etag
    writer.delete("a")
    assert len(reader.catalog()) == 0
    assert reader.catalog(rescan=True).entries == {}


def test_concurrent_writers_on_different_replicas_lose_no_version(open_replica, vit):
    """Six replicas write one task (overwrite) and one task each, all at once: six versions, six tasks."""
    bundles = [bundle(vit, "shared", seed) for seed in range(6)]
    own = [bundle(vit, f"own{i}", 10 + i) for i in range(6)]
    replicas = [open_replica() for _ in range(6)]
    start, errors = threading.Barrier(6), []

    def write(i: int) -> None:
        try:
            start.wait()
            replicas[i].put(bundles[i], overwrite=True)
            replicas[i].put(own[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    store = open_replica()
    assert store.versions("shared") == [1, 2, 3, 4, 5, 6]
    stored = {store.manifest("shared", v).tensors_sha256 for v in range(1, 7)}
    assert stored == {b.manifest.tensors_sha256 for b in bundles}  # each writer's own tensors, none overwritten
    for v in range(1, 7):
        store.get("shared", v)  # every version reads back whole (checksum verified)
    catalog = store.catalog()
    assert sorted(catalog.entries) == ["own0", "own1", "own2", "own3", "own4", "own5", "shared"]
    assert catalog.entries["shared"].version == 6


# ---- S3 specifics ----------------------------------------------------------------------------------------


@pytest.fixture
def s3(s3_endpoint) -> tuple[S3Store, str, str]:
    bucket = new_bucket(s3_endpoint)
    return S3Store(f"s3://{bucket}/p", endpoint_url=s3_endpoint), bucket, s3_endpoint


def keys(endpoint: str, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", []))


def test_s3_layout_and_a_flipped_byte_is_refused(s3, vit):
    store, bucket, endpoint = s3
    sha = store.put(bundle(vit, "cars", 1)).tensors_sha256
    tensors_key = f"p/cars/tensors/{sha}.safetensors"
    assert keys(endpoint, bucket) == sorted(["p/.catalog/catalog.json", "p/cars/v000001.json", tensors_key])
    s3c = client(endpoint)
    data = bytearray(s3c.get_object(Bucket=bucket, Key=tensors_key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3c.put_object(Bucket=bucket, Key=tensors_key, Body=bytes(data))
    with pytest.raises(ChecksumMismatch):
        store.get("cars")


def test_s3_delete_is_a_tombstone_and_gc_removes_only_what_no_version_reads(s3, vit):
    store, bucket, endpoint = s3
    store.put(bundle(vit, "gone", 1))
    store.put(bundle(vit, "kept", 2))
    store.delete("gone")  # v2 of `gone` is an empty object
    assert store.put(bundle(vit, "gone", 3)).version == 3  # numbers go on after the tombstone
    store.delete("gone")
    # a writer that died after uploading its tensors, before its manifest: invisible to readers
    leftover = f"p/kept/tensors/{'0' * 64}.safetensors"
    client(endpoint).put_object(Bucket=bucket, Key=leftover, Body=b"half a task")
    assert store.versions("kept") == [1]
    assert [e.name for e in store.catalog(rescan=True).sorted()] == ["kept"]
    assert store.gc(older_than_s=3600) == 0  # everything is younger than the grace period
    assert store.gc(older_than_s=0) == 7  # gone: v1, tomb v2, v3, tomb v4, its two tensors; kept's leftover
    remaining = keys(endpoint, bucket)
    assert remaining == sorted(["p/.catalog/catalog.json", "p/kept/v000001.json",
                                f"p/kept/tensors/{store.manifest('kept').tensors_sha256}.safetensors"])
    assert torch.equal(store.get("kept").head_weight, bundle(vit, "kept", 2).head_weight)
    assert store.put(bundle(vit, "gone", 5)).version == 1  # history collected: numbering starts afresh


def test_s3_catalog_costs_one_request_while_unchanged(s3, vit):
    store, _, _ = s3
    store.put(bundle(vit, "a", 1))
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    first = store.catalog()
    calls.clear()
    for _ in range(5):
        assert store.catalog() is first
    assert calls == ["HeadObject"] * 5


def test_open_store_picks_the_backend_by_url(tmp_path, s3_endpoint):
    assert isinstance(open_store(tmp_path / "d"), LocalStore)
    with pytest.raises(StoreError, match="not an S3 store URL"):
        open_store("s3://Bad_Bucket/x", endpoint_url=s3_endpoint)
    with pytest.raises(StoreError, match="head_bucket"):
        open_store("s3://no-such-bucket-here/x", endpoint_url=s3_endpoint)


def test_local_gc_removes_every_leftover_under_the_lock_and_waits_for_a_writer(store):
    """Writers hold the lock while their temp directory exists: gc under the lock may remove all it finds,
    however young, and a writer in flight (holding the lock) makes it wait instead."""
    leftover = store.root / ".tmp" / "flowers-abc"
    leftover.mkdir()
    (leftover / "adapter.safetensors").write_bytes(b"half")
    assert store.gc(older_than_s=3600) == 1
    assert not leftover.exists()
    slow = LocalStore(store.root, lock_timeout_s=0.2)
    with store.lock(), pytest.raises(StoreError, match="locked"):
        slow.gc()
