"""The on-disk store: versions, atomicity, checksums, locking, and a writer killed mid-put."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from repadapter import LocalStore, attach_slots
from repadapter.errors import ChecksumMismatch, StoreError
from tests.unit.test_bundle import make_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def vit_sites(tiny_vit):
    bb = tiny_vit()
    return bb, attach_slots(bb.model)


def test_corruption_on_disk_is_detected(store, vit_sites):
    bb, sites = vit_sites
    store.put(make_bundle(bb, sites, "cars"))
    path = store.path("cars", 1) / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        store.get("cars")


def test_lock_excludes_second_writer(tmp_path, vit_sites):
    bb, sites = vit_sites
    a = LocalStore(tmp_path / "s", lock_timeout_s=0.2)
    b = LocalStore(tmp_path / "s", lock_timeout_s=0.2)
    with a.lock(), pytest.raises(StoreError, match="locked"):
        b.put(make_bundle(bb, sites, "x"))
    assert b.put(make_bundle(bb, sites, "x")).version == 1  # released afterwards


_WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from repadapter import LocalStore, load_backbone, attach_slots
    from tests.conftest import TINY_VITS
    from tests.unit.test_bundle import make_bundle
    import repadapter.store.local as st

    calls = []
    real_fsync = os.fsync
    def slow_fsync(fd):  # the tensors file is on disk, then the writer hangs until it is killed
        calls.append(fd)
        real_fsync(fd)
        if len(calls) == 1:
            print("WRITING", flush=True)
            time.sleep(60)
    st.os.fsync = slow_fsync
    bb = load_backbone("vit_tiny_patch16_224", **TINY_VITS["vit_tiny_patch16_224"])
    sites = attach_slots(bb.model)
    LocalStore({store!r}).put(make_bundle(bb, sites, "flowers", seed=9, classes=5), overwrite=True)
    print("DONE", flush=True)
""")


def test_writer_killed_mid_put_leaves_store_consistent(store, vit_sites):
    bb, sites = vit_sites
    store.put(make_bundle(bb, sites, "flowers", seed=1))
    before = store.get("flowers")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), store=str(store.root))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        assert any((store.root / ".tmp").iterdir())  # a half-written version exists on disk
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # the old version is intact and the only one visible; no half task anywhere in listings
    assert [(e.name, e.version) for e in store.list()] == [("flowers", 1)]
    assert store.versions("flowers") == [1]
    after = store.get("flowers")
    assert after.manifest == before.manifest
    assert (after.head_weight == before.head_weight).all()
    # the dead writer's lock is gone with its process; leftovers are collected
    assert store.gc() == 1
    assert not any((store.root / ".tmp").iterdir())
    assert store.put(make_bundle(bb, sites, "flowers", seed=3), overwrite=True).version == 2


def test_listing_ignores_foreign_and_incomplete_entries(store, vit_sites):
    bb, sites = vit_sites
    store.put(make_bundle(bb, sites, "ok"))
    (store.root / "half" / "v000001").mkdir(parents=True)  # no manifest: incomplete, invisible
    (store.root / ".seed-copy").mkdir()
    (store.root / "README.txt").write_text("hello")
    assert [e.name for e in store.list()] == ["ok"]
    start = time.monotonic()
    assert store.versions("half") == []
    assert time.monotonic() - start < 1


def test_catalog_is_change_based(store, vit_sites):
    """While nothing changes a scan returns the very same catalog; a writer's change is seen through the
    catalog file, a task directory copied in by hand through the root's mtime, a version added by hand
    inside an existing task only by a walk (``rescan``), and the next writer repairs the catalog file."""
    bb, sites = vit_sites
    store.put(make_bundle(bb, sites, "a", seed=1))
    first = store.catalog()
    assert store.catalog() is first
    assert LocalStore(store.root).catalog().entries == first.entries  # another process reads the same file
    store.put(make_bundle(bb, sites, "b", seed=2))
    second = store.catalog()
    assert second is not first
    assert sorted(second.entries) == ["a", "b"]
    assert second.entries["a"] == first.entries["a"]  # unchanged entries keep their etag

    staging = LocalStore(store.root.parent / "staging")
    staging.put(make_bundle(bb, sites, "c", seed=3))
    staging.put(make_bundle(bb, sites, "a", seed=4))
    staging.put(make_bundle(bb, sites, "a", seed=6), overwrite=True)
    shutil.copytree(staging.root / "c", store.root / "c")  # a new task directory: the root's mtime changes
    assert sorted(store.catalog().entries) == ["a", "b", "c"]
    shutil.copytree(staging.root / "a" / "v000002", store.root / "a" / "v000002")  # inside a task: unseen...
    assert store.catalog().entries["a"].version == 1
    assert store.catalog(rescan=True).entries["a"].version == 2  # ...until a walk
    reader = LocalStore(store.root)
    store.put(make_bundle(bb, sites, "d", seed=5))  # the writer finds the catalog stale and rebuilds it
    assert {n: e.version for n, e in reader.catalog().entries.items()} == {"a": 2, "b": 1, "c": 1, "d": 1}
    store.delete("b")
    assert sorted(reader.catalog().entries) == ["a", "c", "d"]
    assert store.entry("a", 2) == reader.catalog().entries["a"]


def test_catalog_of_a_store_without_one_is_walked(tmp_path, vit_sites):
    """A store written before catalogs existed (or with its catalog removed) is read by walking it."""
    bb, sites = vit_sites
    store = LocalStore(tmp_path / "s")
    store.put(make_bundle(bb, sites, "x"))
    (store.root / ".catalog" / "catalog.json").unlink()
    assert [e.name for e in LocalStore(store.root).list()] == ["x"]
    (store.root / ".catalog" / "catalog.json").write_text("{not json")
    assert [e.name for e in LocalStore(store.root).list()] == ["x"]
    assert store.reindex().entries["x"].version == 1
