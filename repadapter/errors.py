"""The error hierarchy of RepServe.

The core raises these with a message a user can act on; the service maps each class to one HTTP
status in a single exception handler (``status_code`` below), so no route decides codes ad hoc.
"""

from __future__ import annotations


class RepServeError(Exception):
    """Base class: ``code`` is the machine-readable error name, ``status_code`` its HTTP status."""

    code = "repserve_error"
    status_code = 500


class BundleError(RepServeError):
    """A task bundle is malformed: bad manifest, wrong shapes, non-finite values, bad checksum."""

    code = "invalid_bundle"
    status_code = 422


class ChecksumMismatch(BundleError):
    """Stored tensor bytes do not match the manifest's sha256 (corruption or tampering)."""

    code = "checksum_mismatch"


class BackboneMismatch(RepServeError):
    """A bundle was trained for another backbone (architecture or weights fingerprint differ)."""

    code = "backbone_mismatch"
    status_code = 409


class TaskNotFound(RepServeError):
    """No task (or task version) of that name in the registry or store."""

    code = "task_not_found"
    status_code = 404


class TaskExists(RepServeError):
    """A task of that name exists and the caller did not ask to overwrite it."""

    code = "task_exists"
    status_code = 409


class UnsupportedBackbone(RepServeError):
    """The model's layout is not one we know how to adapt; raised loudly instead of guessing."""

    code = "unsupported_backbone"
    status_code = 422


class CheckpointError(RepServeError):
    """A backbone checkpoint cannot be read or does not fit the architecture."""

    code = "invalid_checkpoint"
    status_code = 422


class ImageError(RepServeError):
    """An uploaded payload is not a decodable image."""

    code = "unsupported_media"
    status_code = 415


class PayloadTooLarge(RepServeError):
    """An upload exceeds the byte or pixel limits (decompression-bomb guard)."""

    code = "payload_too_large"
    status_code = 413


class StoreError(RepServeError):
    """The store cannot complete an operation (I/O failure, lock timeout)."""

    code = "store_error"
    status_code = 503


class StoreFull(StoreError):
    """The store has no space left (disk or quota full): nothing was written."""

    code = "store_full"
    status_code = 507
