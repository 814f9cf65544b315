"""The task store: versioned bundles, verified on read, shared by every replica.

Two backends keep the same promises (see :class:`Store`): :class:`LocalStore`, a directory (a local disk
or a ReadWriteMany volume), and :class:`S3Store`, an S3-compatible bucket. :func:`open_store` picks one by
URL.
"""

from __future__ import annotations

from pathlib import Path

from .base import Catalog, Store, TaskEntry
from .local import LocalStore
from .s3 import S3Store


def open_store(url: str | Path, *, endpoint_url: str | None = None) -> LocalStore | S3Store:
    """``s3://bucket/prefix`` -> :class:`S3Store` (``endpoint_url`` for MinIO/Ceph); anything else is a
    directory -> :class:`LocalStore`."""
    if str(url).startswith("s3://"):
        return S3Store(str(url), endpoint_url=endpoint_url)
    return LocalStore(url)


__all__ = ["Catalog", "LocalStore", "S3Store", "Store", "TaskEntry", "open_store"]
