"""The adapter store: versioned task bundles on disk, written atomically, verified on read.

Layout::

    <root>/<task>/v000001/{manifest.json, adapter.safetensors}
    <root>/.tmp/...       in-flight writes (never visible as tasks; removed by ``gc``)
    <root>/.lock          writer lock (fcntl), one writer at a time across processes and replicas

A version directory appears only by an atomic ``rename`` of a fully written, fsynced temp directory,
so a crash at any point leaves either the old state or the complete new version. Deleting a task
renames it into ``.tmp`` first (atomic disappearance), then removes the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .bundle import MANIFEST_FILE, TASK_NAME, TENSORS_FILE, Manifest, TaskBundle, parse_manifest
from .errors import BundleError, StoreError, TaskExists, TaskNotFound

log = logging.getLogger(__name__)

_VERSION_PREFIX = "v"


@dataclass(frozen=True)
class TaskEntry:
    """A stored task's latest version, for listings."""

    name: str
    version: int
    path: Path
    mtime: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalStore:
    """A directory of task bundles, safe for concurrent readers and writers (processes or replicas)."""

    def __init__(self, root: str | Path, *, lock_timeout_s: float = 30.0) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".tmp").mkdir(exist_ok=True)

    # ---- reading -------------------------------------------------------------------------------------

    def _task_dir(self, name: str) -> Path:
        if not TASK_NAME.match(name):
            raise TaskNotFound(f"no task {name!r} (invalid task name)")
        return self.root / name

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending (empty if the task does not exist)."""
        d = self._task_dir(name)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            if p.name.startswith(_VERSION_PREFIX) and p.name[1:].isdigit() and (p / MANIFEST_FILE).is_file():
                out.append(int(p.name[1:]))
        return sorted(out)

    def list(self) -> list[TaskEntry]:
        """Latest version of every task, sorted by name."""
        entries = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir() or not TASK_NAME.match(d.name):
                continue
            vs = self.versions(d.name)
            if vs:
                path = d / f"{_VERSION_PREFIX}{vs[-1]:06d}"
                entries.append(TaskEntry(d.name, vs[-1], path, (path / MANIFEST_FILE).stat().st_mtime))
        return entries

    def _version_dir(self, name: str, version: int | None) -> Path:
        vs = self.versions(name)
        if not vs:
            raise TaskNotFound(f"no task {name!r} in the store")
        v = vs[-1] if version is None else version
        if v not in vs:
            raise TaskNotFound(f"task {name!r} has no version {v} (versions: {vs})")
        return self._task_dir(name) / f"{_VERSION_PREFIX}{v:06d}"

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        return parse_manifest((self._version_dir(name, version) / MANIFEST_FILE).read_bytes())

    def get(self, name: str, version: int | None = None) -> TaskBundle:
        """Load a bundle (latest version by default), verifying its sha256 against the manifest."""
        d = self._version_dir(name, version)
        try:
            manifest = parse_manifest((d / MANIFEST_FILE).read_bytes())
            data = (d / TENSORS_FILE).read_bytes()
        except FileNotFoundError as e:  # deleted between listing and reading
            raise TaskNotFound(f"task {name!r} disappeared while being read") from e
        if not manifest.tensors_sha256:
            raise BundleError(f"stored task {name!r} has no checksum in its manifest")
        return TaskBundle.deserialize(manifest, data)

    # ---- writing -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock (``flock`` on ``<root>/.lock``), waiting up to ``lock_timeout_s``."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(f"store {self.root} is locked by another writer") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def put(self, bundle: TaskBundle, *, overwrite: bool = False) -> Manifest:
        """Write ``bundle`` as the task's next version; returns the stored manifest.

        Refuses an existing task unless ``overwrite`` (then it becomes a new version; old versions stay).
        """
        name = bundle.name
        with self.lock():
            existing = self.versions(name)
            if existing and not overwrite:
                raise TaskExists(f"task {name!r} exists (version {existing[-1]}); pass overwrite to replace it")
            version = (existing[-1] if existing else 0) + 1
            bundle.manifest = bundle.manifest.model_copy(update={"version": version})
            manifest_bytes, data = bundle.serialize()
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root / ".tmp"))
            try:
                _write_file(tmp / TENSORS_FILE, data)
                _write_file(tmp / MANIFEST_FILE, manifest_bytes)
                _fsync_dir(tmp)
                task_dir = self.root / name
                task_dir.mkdir(exist_ok=True)
                final = task_dir / f"{_VERSION_PREFIX}{version:06d}"
                os.rename(tmp, final)
                _fsync_dir(task_dir)
                _fsync_dir(self.root)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreError(f"writing task {name!r} failed: {e}") from e
        log.info("stored task=%s version=%d bytes=%d", name, version, len(data))
        return bundle.manifest

    def delete(self, name: str) -> None:
        """Remove a task and all its versions (atomically invisible, then deleted)."""
        with self.lock():
            d = self._task_dir(name)
            if not self.versions(name):
                raise TaskNotFound(f"no task {name!r} in the store")
            grave = Path(tempfile.mkdtemp(prefix=f"deleted-{name}-", dir=self.root / ".tmp"))
            os.rename(d, grave / name)
            _fsync_dir(self.root)
        shutil.rmtree(grave, ignore_errors=True)
        log.info("deleted task=%s", name)

    def gc(self) -> int:
        """Remove leftovers of crashed writers (``.tmp`` entries); returns how many were removed."""
        with self.lock():
            leftovers = list((self.root / ".tmp").iterdir())
            for p in leftovers:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return len(leftovers)
