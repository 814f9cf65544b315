"""The service's one table from error classes (core and service) to HTTP: complete, and what clients rely on."""

from __future__ import annotations

import repadapter.errors as core
import service.errors as service
from repadapter.errors import ChecksumMismatch, RepServeError, StoreFull
from service.errors import TaskUnavailable, Unauthorized, http_headers, http_status


def _error_classes() -> list[type[RepServeError]]:
    return [c for module in (core, service) for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, RepServeError) and c.__module__ == module.__name__]


def test_every_error_class_has_its_own_entry_but_checksum_mismatch():
    """A new error must be placed on purpose: only ChecksumMismatch inherits its base's entry."""
    unlisted = [c.__name__ for c in _error_classes() if c not in service._HTTP]
    assert unlisted == ["ChecksumMismatch"]
    assert http_status(ChecksumMismatch) == 422
    assert http_status(StoreFull) == 507


def test_headers_for_retries_and_authentication():
    assert http_headers(TaskUnavailable("broken")) == {}  # retrying cannot help
    assert http_headers(TaskUnavailable("store down", retry_after_s=2.2)) == {"Retry-After": "3"}
    assert http_headers(service.QueueFull("busy")) == {"Retry-After": "1"}
    assert http_headers(Unauthorized("no token")) == {"WWW-Authenticate": "Bearer"}
    assert http_status(service.ClientClosed) == 499
