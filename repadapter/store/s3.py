"""The S3 store: the directory store's guarantees on any S3-compatible object store (AWS, MinIO, Ceph).

Layout under ``s3://bucket/prefix/``::

    <task>/v000001.json                  version 1's manifest (or an empty object: the task was deleted)
    <task>/tensors/<sha256>.safetensors  tensors, addressed by their checksum
    .catalog/catalog.json                latest version of every task (kept by writers)

Object stores have no rename and no lock, so the guarantees come from the order of writes and from
**conditional writes** (``If-None-Match: *`` / ``If-Match: <etag>``, which AWS S3, MinIO and Ceph RGW honour):

- *Readers never see half a task.* A writer uploads the tensors first and the manifest last; a version
  exists only once its manifest object does (an object appears whole), and every read checks the tensors'
  sha256 against the manifest.
- *Concurrent writers never lose a version.* A version's manifest is created with ``If-None-Match: *``:
  of two writers that chose the same next number, one succeeds and the other gets 412, reads the versions
  again and takes the next number (or refuses: the task exists). Tensors are keyed by checksum, so two
  writers never overwrite each other's tensors with different bytes.
- *A delete is one write too*: an empty version object (a tombstone) after the latest version. The task
  disappears atomically, and a delete racing a put is ordered by the same conditional create.
- *The catalog is updated by compare-and-swap*: each writer re-reads it and replaces it with ``If-Match``
  on the ETag it read, retrying on 412, so concurrent writers' entries all survive. A writer that dies
  between its version and its catalog update leaves the catalog behind until a rescan (start-up, SIGHUP)
  or the task's next write.

Nothing is deleted on the write path; :meth:`S3Store.gc` removes tombstoned tasks and unreferenced tensors
(crashed writers'), both only when older than a grace period that outlasts any write in flight.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..bundle import TASK_NAME, Manifest, PackedBundle, TaskBundle, parse_manifest
from ..errors import BundleError, StoreError, TaskExists, TaskNotFound
from .base import Catalog, TaskEntry, catalog_document, parse_catalog, version_name

log = logging.getLogger(__name__)

CATALOG_KEY = ".catalog/catalog.json"
_VERSION_KEY = re.compile(r"^(?P<task>[^/]+)/v(?P<version>\d{6,})\.json$")
_TENSORS_KEY = re.compile(r"^(?P<task>[^/]+)/tensors/(?P<sha>[0-9a-f]{64})\.safetensors$")
_CAS_ATTEMPTS = 50  # conditional-write retries before giving up (each one means another writer got there first)


@dataclass(frozen=True)
class _Object:
    key: str
    size: int
    etag: str
    modified: float  # unix time


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")`` (prefix empty or ending in ``/``)."""
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", url)
    if not m:
        raise StoreError(f"not an S3 store URL: {url!r} (expected s3://bucket[/prefix])")
    prefix = (m.group(2) or "").strip("/")
    return m.group(1), f"{prefix}/" if prefix else ""


class S3Store:
    """Task bundles in an S3 bucket under a prefix; safe for concurrent readers and writers anywhere.

    Thread-safety: every method may be called from any thread (boto3 clients are thread-safe; the catalog
    cache has its own lock). ``client`` is a boto3 S3 client; by default one is made for ``endpoint_url``
    (MinIO, Ceph) or boto3's own configuration (``AWS_*`` environment, profiles, instance roles).
    """

    def __init__(self, url: str, *, endpoint_url: str | None = None, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as e:  # the `s3` extra
                raise StoreError("an s3:// store needs boto3: pip install 'repserve[s3]'") from e
            client = boto3.client("s3", endpoint_url=endpoint_url,
                                  config=Config(retries={"mode": "standard", "max_attempts": 5},
                                                max_pool_connections=32))
        self.client = client
        self._cache: tuple[str, Catalog] | None = None  # (catalog object's ETag, catalog)
        self._cache_lock = threading.Lock()
        self._call("head_bucket", Bucket=self.bucket)  # fail at start-up, not at the first request

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # ---- S3 calls ------------------------------------------------------------------------------------

    def _call(self, op: str, **kwargs: Any) -> Any:
        """One client call; S3 errors become :class:`StoreError` except those the caller handles by code."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(**kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if op != "head_bucket" and (code in ("NoSuchKey", "404", "NotFound") or status == 404):
                raise KeyError(kwargs.get("Key")) from None
            if code == "PreconditionFailed" or status in (409, 412):
                raise _Conflict(kwargs.get("Key", "")) from None
            raise StoreError(f"S3 {op} on {self.url} failed: {code or status}: {e}") from e
        except BotoCoreError as e:
            raise StoreError(f"S3 {op} on {self.url} failed: {e}") from e

    def _get(self, key: str) -> tuple[bytes, str]:
        """``(body, etag)`` of an object; ``KeyError`` if it does not exist."""
        r = self._call("get_object", Bucket=self.bucket, Key=self.prefix + key)
        return r["Body"].read(), r["ETag"].strip('"')

    def _put(self, key: str, body: bytes, **conditions: str) -> str:
        """Write an object (``IfNoneMatch="*"`` / ``IfMatch=etag`` make it conditional); returns its ETag."""
        r = self._call("put_object", Bucket=self.bucket, Key=self.prefix + key, Body=body, **conditions)
        return r["ETag"].strip('"')

    def _list(self, under: str = "") -> list[_Object]:
        """Every object whose key (relative to the prefix) starts with ``under``."""
        from botocore.exceptions import BotoCoreError, ClientError

        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=self.prefix + under):
                out += [_Object(o["Key"][len(self.prefix):], o["Size"], o["ETag"].strip('"'),
                                o["LastModified"].timestamp()) for o in page.get("Contents", ())]
        except (ClientError, BotoCoreError) as e:
            raise StoreError(f"S3 list on {self.url} failed: {e}") from e
        return out

    def _modified(self, key: str) -> float | None:
        """An object's last-modified time now (``None`` if it is gone)."""
        try:
            return self._call("head_object", Bucket=self.bucket, Key=self.prefix + key)["LastModified"].timestamp()
        except KeyError:
            return None

    # ---- versions ------------------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> None:
        if not TASK_NAME.match(name):
            raise TaskNotFound(f"no task {name!r} (invalid task name)")

    def _version_objects(self, name: str) -> list[tuple[int, _Object]]:
        """Every version object of one task (manifests and tombstones), ascending."""
        self._check_name(name)
        found = []
        for o in self._list(f"{name}/v"):
            m = _VERSION_KEY.match(o.key)
            if m and m["task"] == name:
                found.append((int(m["version"]), o))
        return sorted(found, key=lambda vo: vo[0])

    @staticmethod
    def _live(objects: list[tuple[int, _Object]]) -> list[tuple[int, _Object]]:
        """The versions after the last tombstone (an empty object)."""
        live: list[tuple[int, _Object]] = []
        for v, o in objects:
            live = [] if o.size == 0 else [*live, (v, o)]
        return live

    def versions(self, name: str) -> list[int]:
        return [v for v, _ in self._live(self._version_objects(name))]

    def _latest(self, name: str) -> TaskEntry | None:
        live = self._live(self._version_objects(name))
        return TaskEntry(name, live[-1][0], live[-1][1].etag) if live else None

    def _resolve(self, name: str, version: int | None) -> int:
        vs = self.versions(name)
        if not vs:
            raise TaskNotFound(f"no task {name!r} in the store")
        if version is None:
            return vs[-1]
        if version not in vs:
            raise TaskNotFound(f"task {name!r} has no version {version} (versions: {vs})")
        return version

    def entry(self, name: str, version: int) -> TaskEntry:
        self._check_name(name)
        try:
            r = self._call("head_object", Bucket=self.bucket, Key=f"{self.prefix}{name}/{version_name(version)}.json")
        except KeyError:
            raise TaskNotFound(f"task {name!r} has no version {version}") from None
        if r["ContentLength"] == 0:
            raise TaskNotFound(f"task {name!r} was deleted")
        return TaskEntry(name, version, r["ETag"].strip('"'))

    def manifest_bytes(self, name: str, version: int | None = None) -> bytes:
        self._check_name(name)
        if version is None:
            version = self._resolve(name, None)
        try:
            data, _ = self._get(f"{name}/{version_name(version)}.json")
        except KeyError:
            raise TaskNotFound(f"task {name!r} has no version {version}") from None
        if not data:
            raise TaskNotFound(f"task {name!r} was deleted")
        return data

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        return parse_manifest(self.manifest_bytes(name, version))

    def get(self, name: str, version: int | None = None) -> TaskBundle:
        return self.get_packed(name, version).unpack()

    def get_packed(self, name: str, version: int | None = None) -> PackedBundle:
        """Load a bundle (latest version by default), verifying its tensors' sha256 against the manifest."""
        manifest = parse_manifest(self.manifest_bytes(name, version))
        if not manifest.tensors_sha256:
            raise BundleError(f"stored task {name!r} has no checksum in its manifest")
        try:
            data, _ = self._get(f"{name}/tensors/{manifest.tensors_sha256}.safetensors")
        except KeyError:
            raise TaskNotFound(f"task {name!r} disappeared while being read") from None
        return PackedBundle.deserialize(manifest, data)

    # ---- catalog -------------------------------------------------------------------------------------

    def _walk(self) -> dict[str, TaskEntry]:
        by_task: dict[str, list[tuple[int, _Object]]] = defaultdict(list)
        for o in self._list():
            m = _VERSION_KEY.match(o.key)
            if m and TASK_NAME.match(m["task"]):
                by_task[m["task"]].append((int(m["version"]), o))
        entries = {}
        for name, objects in by_task.items():
            live = self._live(sorted(objects, key=lambda vo: vo[0]))
            if live:
                entries[name] = TaskEntry(name, live[-1][0], live[-1][1].etag)
        return entries

    def _read_catalog(self) -> tuple[dict[str, TaskEntry], str] | None:
        """``(entries, etag)`` of the catalog object, or ``None`` if it is missing or unreadable."""
        try:
            data, etag = self._get(CATALOG_KEY)
        except KeyError:
            return None
        try:
            return parse_catalog(data)[0], etag
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("store catalog unreadable, listing the bucket store=%s error=%s", self.url, e)
            return None

    def catalog(self, *, rescan: bool = False) -> Catalog:
        """Every task's latest version: one HEAD request while nothing changed (the same object back), one
        GET after a writer's change, a listing of the prefix on ``rescan`` or without a catalog object."""
        with self._cache_lock:
            if not rescan:
                try:
                    etag = self._call("head_object", Bucket=self.bucket,
                                      Key=self.prefix + CATALOG_KEY)["ETag"].strip('"')
                except KeyError:
                    etag = None
                if etag is not None and self._cache is not None and self._cache[0] == etag:
                    return self._cache[1]
            read = None if rescan else self._read_catalog()
            if read is not None:
                entries, etag = read
            else:
                start = time.perf_counter()
                entries, etag = self._walk(), ""
                log.info("store listed store=%s tasks=%d seconds=%.3f reason=%s", self.url, len(entries),
                         time.perf_counter() - start, "rescan" if rescan else "no catalog")
            catalog = Catalog(entries)
            self._cache = (etag, catalog) if etag else None
            return catalog

    def list(self) -> list[TaskEntry]:
        return self.catalog().sorted()

    def _update_catalog(self, change: dict[str, TaskEntry] | None = None, names: tuple[str, ...] = ()) -> None:
        """Compare-and-swap the catalog: set ``names`` to what their version objects say now (or replace
        everything with ``change`` when given), retrying while other writers get there first."""
        for attempt in range(_CAS_ATTEMPTS):
            read = self._read_catalog()
            if change is not None or read is None:
                entries = dict(change) if change is not None else self._walk()
            else:
                entries = dict(read[0])
                for name in names:
                    latest = self._latest(name)
                    if latest is None:
                        entries.pop(name, None)
                    else:
                        entries[name] = latest
            condition = {"IfMatch": read[1]} if read is not None else {"IfNoneMatch": "*"}
            try:
                self._put(CATALOG_KEY, catalog_document(entries), **condition)
                return
            except _Conflict:
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise StoreError(f"store {self.url}: catalog update lost {_CAS_ATTEMPTS} races in a row")

    def reindex(self) -> Catalog:
        self._update_catalog(change=self._walk())
        return self.catalog()

    # ---- writing -------------------------------------------------------------------------------------

    def _create_version(self, name: str, body_for: Any, *, overwrite: bool, deleting: bool) -> int:
        """Create the task's next version object (``body_for(version) -> bytes``) by conditional write."""
        for _ in range(_CAS_ATTEMPTS):
            objects = self._version_objects(name)
            live = self._live(objects)
            if deleting and not live:
                raise TaskNotFound(f"no task {name!r} in the store")
            if live and not overwrite and not deleting:
                raise TaskExists(f"task {name!r} exists (version {live[-1][0]}); pass overwrite to replace it")
            version = (objects[-1][0] if objects else 0) + 1
            try:
                self._put(f"{name}/{version_name(version)}.json", body_for(version), IfNoneMatch="*")
                return version
            except _Conflict:  # another writer took this number: look again
                continue
        raise StoreError(f"store {self.url}: task {name!r} lost {_CAS_ATTEMPTS} version races in a row")

    def put(self, bundle: TaskBundle, *, overwrite: bool = False) -> Manifest:
        """Write ``bundle`` as the task's next version: tensors first, then the manifest (conditionally)."""
        name = bundle.name
        self._check_name(name)
        _, data = bundle.serialize()
        self._put(f"{name}/tensors/{bundle.manifest.tensors_sha256}.safetensors", data)

        def body_for(version: int) -> bytes:
            bundle.manifest = bundle.manifest.model_copy(update={"version": version})
            return bundle.manifest.model_dump_json(indent=2).encode()

        version = self._create_version(name, body_for, overwrite=overwrite, deleting=False)
        self._update_catalog(names=(name,))
        log.info("stored task=%s version=%d bytes=%d store=%s", name, version, len(data), self.url)
        return bundle.manifest

    def delete(self, name: str) -> None:
        """Remove a task: one tombstone object makes every version invisible at once."""
        self._create_version(name, lambda _version: b"", overwrite=True, deleting=True)
        self._update_catalog(names=(name,))
        log.info("deleted task=%s store=%s", name, self.url)

    def gc(self, *, older_than_s: float = 3600.0) -> int:
        """Delete deleted tasks' objects and unreferenced tensors (crashed or refused writers') last written
        more than ``older_than_s`` ago; the grace keeps a write in flight (its tensors not yet referenced)
        safe. Returns how many objects were deleted.

        A task's history up to its last tombstone goes in ascending order, the tombstone last, so a gc that
        dies half-way never makes a deleted version visible again. A tensors object is looked at again just
        before it is deleted: a writer storing the same bytes again has refreshed it, and it stays."""
        cutoff = datetime.now(UTC).timestamp() - older_than_s
        versions: dict[str, list[tuple[int, _Object]]] = defaultdict(list)
        tensors: dict[str, list[tuple[str, _Object]]] = defaultdict(list)
        for o in self._list():
            if m := _VERSION_KEY.match(o.key):
                versions[m["task"]].append((int(m["version"]), o))
            elif m := _TENSORS_KEY.match(o.key):
                tensors[m["task"]].append((m["sha"], o))
        removed = 0
        for name in sorted(set(versions) | set(tensors)):
            objects = sorted(versions.get(name, []), key=lambda vo: vo[0])
            live = self._live(objects)
            history = objects[:len(objects) - len(live)]  # up to and including the last tombstone
            if history and history[-1][1].modified < cutoff:
                for _, o in history:
                    self._call("delete_object", Bucket=self.bucket, Key=self.prefix + o.key)
                removed += len(history)
            old = [(sha, o) for sha, o in tensors.get(name, []) if o.modified < cutoff]
            if old and len(tensors[name]) > len(live):  # more tensors than live versions: some are leftovers
                referenced = {self.manifest(name, v).tensors_sha256 for v, _ in live}
                for sha, o in old:
                    modified = self._modified(o.key)
                    if sha not in referenced and modified is not None and modified < cutoff:
                        self._call("delete_object", Bucket=self.bucket, Key=self.prefix + o.key)
                        removed += 1
        if removed:
            log.info("store gc store=%s removed=%d", self.url, removed)
        return removed


class _Conflict(Exception):
    """A conditional write lost a race (HTTP 412/409)."""
