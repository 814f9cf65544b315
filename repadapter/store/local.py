"""The directory store: versioned task bundles on disk, written atomically, verified on read, with a catalog.

Layout::

    <root>/<task>/v000001/{manifest.json, adapter.safetensors}
    <root>/.catalog/catalog.json   latest version of every task (kept by writers; see below)
    <root>/.tmp/...                in-flight writes and deleted tasks (never visible as tasks; ``gc``)
    <root>/.lock                   writer lock (fcntl), one writer at a time across processes and replicas

A version directory appears only by an atomic ``rename`` of a fully written, fsynced temp directory,
so a crash at any point leaves either the old state or the complete new version. Deleting a task
renames it into ``.tmp`` first (atomic disappearance), then removes the files.

The catalog makes reading the store independent of its size. The directories stay the truth; the
catalog is an index of them that every writer rewrites atomically (under the lock) after its change,
recording the root directory's mtime as it left it. A reader's :meth:`LocalStore.catalog` costs two
``stat`` calls while nothing changed; after a writer's change it parses one file; only when the root
directory changed behind the catalog's back (a task directory copied in or removed by hand, a writer that
crashed between its rename and its catalog update) does it walk the directories. A change inside an
existing task's directory made by hand is seen by a walk only: ``catalog(rescan=True)`` (the service
does it at start-up and on SIGHUP) or :meth:`LocalStore.reindex`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..atomic import fsync_dir, write_file_atomic
from ..bundle import MANIFEST_FILE, TASK_NAME, TENSORS_FILE, Manifest, PackedBundle, TaskBundle, parse_manifest
from ..errors import BundleError, StoreError, StoreFull, TaskExists, TaskNotFound
from .base import Catalog, TaskEntry, catalog_document, parse_catalog, version_name

log = logging.getLogger(__name__)

_VERSION_PREFIX = "v"
CATALOG_DIR, CATALOG_FILE = ".catalog", "catalog.json"


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _io(what: str) -> Iterator[None]:
    """An I/O failure of a write becomes a store error clients can act on: 507 when the disk or quota is
    full, 503 otherwise (read-only or unreachable store). Nothing half-written is left visible either way."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(f"{what} failed: the store is full ({e.strerror})") from e
        raise StoreError(f"{what} failed: {e.strerror or e}") from e


def _etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalStore:
    """A directory of task bundles, safe for concurrent readers and writers (processes or replicas).

    Thread-safety: every method may be called from any thread; writers serialise on the file lock, and
    :meth:`catalog` on an internal lock around its cache.
    """

    def __init__(self, root: str | Path, *, lock_timeout_s: float = 30.0) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (".tmp", CATALOG_DIR):  # made up front: creating them later would change the root's mtime
            with contextlib.suppress(OSError):  # a read-only store: readers need neither
                (self.root / d).mkdir(exist_ok=True)
        self._catalog_path = self.root / CATALOG_DIR / CATALOG_FILE
        self._cache: tuple[tuple[Any, int], Catalog] | None = None  # (file signature, root mtime) -> catalog
        self._cache_lock = threading.Lock()

    @property
    def url(self) -> str:
        return str(self.root)

    def path(self, name: str, version: int) -> Path:
        """One version's directory (it holds ``manifest.json`` and ``adapter.safetensors``)."""
        return self._task_dir(name) / version_name(version)

    # ---- reading -------------------------------------------------------------------------------------

    def _task_dir(self, name: str) -> Path:
        if not TASK_NAME.match(name):
            raise TaskNotFound(f"no task {name!r} (invalid task name)")
        return self.root / name

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending (empty if the task does not exist)."""
        d = self._task_dir(name)
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(n[1:]) for n in names if n.startswith(_VERSION_PREFIX) and n[1:].isdigit()
                      and os.path.isfile(d / n / MANIFEST_FILE))

    def _entry(self, name: str) -> TaskEntry | None:
        """The latest complete version of one task directory, read from the directory itself."""
        vs = self.versions(name)
        if not vs:
            return None
        path = self.root / name / version_name(vs[-1])
        try:
            return TaskEntry(name, vs[-1], _etag((path / MANIFEST_FILE).stat()))
        except FileNotFoundError:  # deleted meanwhile
            return None

    def _walk(self) -> dict[str, TaskEntry]:
        entries = {}
        with os.scandir(self.root) as it:
            names = [e.name for e in it if not e.name.startswith(".") and TASK_NAME.match(e.name) and e.is_dir()]
        for name in names:
            entry = self._entry(name)
            if entry is not None:
                entries[name] = entry
        return entries

    def _signature(self) -> tuple[Any, int]:
        """What the catalog depends on: the catalog file's identity and the root directory's mtime."""
        try:
            st = self._catalog_path.stat()
            file_sig: Any = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            file_sig = None
        return file_sig, self.root.stat().st_mtime_ns

    def _read_catalog(self) -> tuple[dict[str, TaskEntry], dict[str, Any]] | None:
        """The catalog file's entries and document, or ``None`` if it is missing or unreadable (then a walk
        decides)."""
        try:
            return parse_catalog(self._catalog_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("store catalog unreadable, walking the directories store=%s error=%s", self.root, e)
            return None

    def catalog(self, *, rescan: bool = False) -> Catalog:
        """Every task's latest version. Costs two ``stat`` calls while the store is unchanged (and then
        returns the very same object); ``rescan`` walks the task directories whatever the catalog says."""
        with self._cache_lock:
            sig = self._signature()
            if not rescan and self._cache is not None and self._cache[0] == sig:
                return self._cache[1]
            read = None if rescan or sig[0] is None else self._read_catalog()
            if read is not None and read[1].get("root_mtime_ns") == sig[1]:
                entries = read[0]
            else:
                start = time.perf_counter()
                entries = self._walk()
                log.info("store walked store=%s tasks=%d seconds=%.3f reason=%s", self.root, len(entries),
                         time.perf_counter() - start, "rescan" if rescan else "catalog stale or missing")
            catalog = Catalog(entries)
            self._cache = (sig, catalog)
            return catalog

    def list(self) -> list[TaskEntry]:
        """Latest version of every task, sorted by name (from the catalog)."""
        return self.catalog().sorted()

    def entry(self, name: str, version: int) -> TaskEntry:
        """The entry of one stored version, read from its directory (e.g. right after :meth:`put`)."""
        try:
            st = (self._task_dir(name) / version_name(version) / MANIFEST_FILE).stat()
        except FileNotFoundError:
            raise TaskNotFound(f"task {name!r} has no version {version}") from None
        return TaskEntry(name, version, _etag(st))

    def _version_dir(self, name: str, version: int | None) -> Path:
        d = self._task_dir(name)
        if version is not None:
            path = d / version_name(version)
            if (path / MANIFEST_FILE).is_file():
                return path
        vs = self.versions(name)
        if not vs:
            raise TaskNotFound(f"no task {name!r} in the store")
        if version is not None:
            raise TaskNotFound(f"task {name!r} has no version {version} (versions: {vs})")
        return d / version_name(vs[-1])

    def manifest_bytes(self, name: str, version: int | None = None) -> bytes:
        try:
            return (self._version_dir(name, version) / MANIFEST_FILE).read_bytes()
        except FileNotFoundError as e:  # deleted between listing and reading
            raise TaskNotFound(f"task {name!r} disappeared while being read") from e

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        """The stored manifest only (no tensors are read)."""
        return parse_manifest(self.manifest_bytes(name, version))

    def get(self, name: str, version: int | None = None) -> TaskBundle:
        """Load a bundle (latest version by default), verifying its sha256 against the manifest."""
        return self.get_packed(name, version).unpack()

    def get_packed(self, name: str, version: int | None = None) -> PackedBundle:
        """Load a bundle in its compact form (one buffer), verifying its sha256 against the manifest."""
        d = self._version_dir(name, version)
        try:
            manifest = parse_manifest((d / MANIFEST_FILE).read_bytes())
            data = (d / TENSORS_FILE).read_bytes()
        except FileNotFoundError as e:  # deleted between listing and reading
            raise TaskNotFound(f"task {name!r} disappeared while being read") from e
        if not manifest.tensors_sha256:
            raise BundleError(f"stored task {name!r} has no checksum in its manifest")
        return PackedBundle.deserialize(manifest, data)

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

    def _update_catalog(self, name: str, before_mtime_ns: int) -> None:
        """Rewrite the catalog after this writer's change to ``name`` (writer lock held).

        ``before_mtime_ns`` is the root's mtime before the change: if the catalog was not written at that
        state, something changed behind its back and the whole catalog is rebuilt by a walk."""
        read = self._read_catalog()
        if read is None or read[1].get("root_mtime_ns") != before_mtime_ns:
            entries = self._walk()
        else:
            entries = read[0]
            entry = self._entry(name)
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        self._write_catalog(entries)

    def _write_catalog(self, entries: Mapping[str, TaskEntry]) -> None:
        write_file_atomic(self._catalog_path, catalog_document(entries, root_mtime_ns=self.root.stat().st_mtime_ns))

    def reindex(self) -> Catalog:
        """Rebuild the catalog file from the directories (after tasks were copied in by hand)."""
        with self.lock():
            entries = self._walk()
            self._write_catalog(entries)
        return self.catalog()

    def put(self, bundle: TaskBundle, *, overwrite: bool = False) -> Manifest:
        """Write ``bundle`` as the task's next version; returns the stored manifest.

        Refuses an existing task unless ``overwrite`` (then it becomes a new version; old versions stay).
        """
        name = bundle.name
        with _io(f"writing task {name!r}"), self.lock():
            existing = self.versions(name)
            if existing and not overwrite:
                raise TaskExists(f"task {name!r} exists (version {existing[-1]}); pass overwrite to replace it")
            version = (existing[-1] if existing else 0) + 1
            bundle.manifest = bundle.manifest.model_copy(update={"version": version})
            manifest_bytes, data = bundle.serialize()
            before = self.root.stat().st_mtime_ns
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root / ".tmp"))
            try:
                _write_file(tmp / TENSORS_FILE, data)
                _write_file(tmp / MANIFEST_FILE, manifest_bytes)
                fsync_dir(tmp)
                task_dir = self.root / name
                task_dir.mkdir(exist_ok=True)
                os.rename(tmp, task_dir / version_name(version))
                fsync_dir(task_dir)
                fsync_dir(self.root)
                self._update_catalog(name, before)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("stored task=%s version=%d bytes=%d", name, version, len(data))
        return bundle.manifest

    def delete(self, name: str) -> None:
        """Remove a task and all its versions (atomically invisible, then deleted)."""
        with _io(f"deleting task {name!r}"), self.lock():
            d = self._task_dir(name)
            if not self.versions(name):
                raise TaskNotFound(f"no task {name!r} in the store")
            before = self.root.stat().st_mtime_ns
            grave = Path(tempfile.mkdtemp(prefix=f"deleted-{name}-", dir=self.root / ".tmp"))
            os.rename(d, grave / name)
            fsync_dir(self.root)
            self._update_catalog(name, before)
        shutil.rmtree(grave, ignore_errors=True)
        log.info("deleted task=%s", name)

    def gc(self, *, older_than_s: float = 0.0) -> int:
        """Remove leftovers of crashed writers (every ``.tmp`` entry); returns how many were removed.

        Every writer holds the lock while its temp directory exists, so under the lock each entry is a dead
        writer's, whatever its age: ``older_than_s`` (the grace an S3 store needs) is not needed here."""
        removed = 0
        with _io("collecting leftovers"), self.lock():
            for p in (self.root / ".tmp").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("store gc store=%s removed=%d", self.root, removed)
        return removed
