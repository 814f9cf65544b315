"""The error hierarchy of RepServe.

The core raises these with a message a user can act on and a machine-readable ``code``; it knows nothing
of HTTP: the service maps each class to its status in one table (``service.errors``), so no route decides
codes ad hoc and the library stays usable outside a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol


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


class VersionMismatch(RepServeError):
    """A conditional change named a version that is not the one served (the task was replaced since the caller
    looked): nothing changed."""

    code = "version_mismatch"


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


class _HasErrors(Protocol):
    def errors(self) -> Iterable[Mapping[str, Any]]: ...


def validation_problems(error: _HasErrors, *, flag_style: bool = False, empty: str = "value") -> list[str]:
    """``loc: msg`` for each error of a pydantic ``ValidationError`` (or FastAPI's ``RequestValidationError``):
    its location and message only, never its input value, which may be a secret (a token read from the
    environment). ``flag_style`` writes the location as the command-line flag (``--max-batch``); ``empty``
    names a location-less error (a model-level check)."""
    problems = []
    for err in error.errors():
        loc = ".".join(map(str, err.get("loc", ())))
        if flag_style:
            loc = "--" + (loc.replace("_", "-") or empty)
        problems.append(f"{loc or empty}: {err.get('msg', 'invalid')}")
    return problems


def describe_validation_error(error: _HasErrors, *, flag_style: bool = False, empty: str = "value") -> str:
    """:func:`validation_problems` on one line, ``; ``-separated: the one way RepServe words a validation error."""
    return "; ".join(validation_problems(error, flag_style=flag_style, empty=empty))
