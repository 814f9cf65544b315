"""The error hierarchy of RepServe.

The core raises these with a message a user can act on and a machine-readable ``code``; it knows nothing
of HTTP: the service maps each class to its status in one table (``service.errors``), so no route decides
codes ad hoc and the library stays usable outside a server.
"""

from __future__ import annotations


class RepServeError(Exception):
    """Base class: ``code`` is the machine-readable error name (the ``error`` field of a service's answer)."""

    code = "repserve_error"


class BundleError(RepServeError):
    """A task bundle is malformed: bad manifest, wrong shapes, non-finite values, bad checksum."""

    code = "invalid_bundle"


class ChecksumMismatch(BundleError):
    """Stored tensor bytes do not match the manifest's sha256 (corruption or tampering)."""

    code = "checksum_mismatch"


class BackboneMismatch(RepServeError):
    """A bundle was trained for another backbone (architecture or weights fingerprint differ)."""

    code = "backbone_mismatch"


class TaskNotFound(RepServeError):
    """No task (or task version) of that name in the registry or store."""

    code = "task_not_found"


class TaskExists(RepServeError):
    """A task of that name exists and the caller did not ask to overwrite it."""

    code = "task_exists"


class UnsupportedBackbone(RepServeError):
    """The model's layout is not one we know how to adapt; raised loudly instead of guessing."""

    code = "unsupported_backbone"


class CheckpointError(RepServeError):
    """A backbone checkpoint cannot be read or does not fit the architecture."""

    code = "invalid_checkpoint"


class ImageError(RepServeError):
    """An uploaded payload is not a decodable image."""

    code = "unsupported_media"


class PayloadTooLarge(RepServeError):
    """An upload exceeds the byte or pixel limits (decompression-bomb guard)."""

    code = "payload_too_large"


class StoreError(RepServeError):
    """The store cannot complete an operation (I/O failure, lock timeout)."""

    code = "store_error"


class StoreFull(StoreError):
    """The store has no space left (disk or quota full): nothing was written."""

    code = "store_full"
