"""What every store backend promises, and the small values they hand out.

A store holds versioned task bundles (manifest + safetensors tensors). Whatever the backend, a writer's
change is all-or-nothing for readers (a version appears complete or not at all), tensors are checked
against the manifest's sha256 on every read, concurrent writers (threads, processes, replicas) never lose
a version, and :meth:`Store.catalog` is cheap while nothing changed, so replicas can poll it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..bundle import Manifest, PackedBundle, TaskBundle

CATALOG_FORMAT = 1


@dataclass(frozen=True)
class TaskEntry:
    """A stored task's latest version. ``etag`` identifies that stored version (different for a task
    deleted and stored again), so a reader can tell a changed task from an unchanged one without reading it."""

    name: str
    version: int
    etag: str


@dataclass(frozen=True)
class Catalog:
    """Every stored task's latest version, by name, as of one reading of the store (never mutated).

    A store returns the same object while it is unchanged, so ``is`` tells a caller that nothing changed."""

    entries: Mapping[str, TaskEntry] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def sorted(self) -> list[TaskEntry]:
        return [self.entries[n] for n in sorted(self.entries)]


def catalog_document(entries: Mapping[str, TaskEntry], **extra: Any) -> bytes:
    """The catalog file's bytes (the same format in every backend)."""
    doc = {"format": CATALOG_FORMAT, **extra,
           "tasks": {n: [e.version, e.etag] for n, e in sorted(entries.items())}}
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_catalog(data: bytes) -> tuple[dict[str, TaskEntry], dict[str, Any]]:
    """``(entries, document)`` of a catalog file; raises ``ValueError`` on anything else."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != CATALOG_FORMAT or not isinstance(doc.get("tasks"), dict):
        raise ValueError("not a RepServe store catalog (format 1)")
    return {name: TaskEntry(name, int(version), str(etag)) for name, (version, etag) in doc["tasks"].items()}, doc


def version_name(version: int) -> str:
    return f"v{version:06d}"


@runtime_checkable
class Store(Protocol):
    """The interface the service and the training CLI use; :func:`repadapter.store.open_store` picks one."""

    @property
    def url(self) -> str:
        """Where the store is (a directory or ``s3://bucket/prefix``), for logs and messages."""
        ...

    def catalog(self, *, rescan: bool = False) -> Catalog:
        """Every task's latest version; cheap and the same object while nothing changed. ``rescan`` reads
        every task whatever the catalog file says (start-up, SIGHUP, tasks copied in by hand)."""
        ...

    def list(self) -> list[TaskEntry]: ...

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending (empty if the task does not exist)."""
        ...

    def entry(self, name: str, version: int) -> TaskEntry: ...

    def manifest_bytes(self, name: str, version: int | None = None) -> bytes: ...

    def manifest(self, name: str, version: int | None = None) -> Manifest: ...

    def get(self, name: str, version: int | None = None) -> TaskBundle: ...

    def get_packed(self, name: str, version: int | None = None) -> PackedBundle: ...

    def put(self, bundle: TaskBundle, *, overwrite: bool = False) -> Manifest:
        """Write ``bundle`` as the task's next version (refused for an existing task unless ``overwrite``)."""
        ...

    def delete(self, name: str) -> None: ...

    def reindex(self) -> Catalog:
        """Rebuild the catalog file from the stored tasks."""
        ...

    def gc(self, *, older_than_s: float = 0.0) -> int:
        """Remove what crashed writers left behind (never a readable version); returns how many objects."""
        ...
