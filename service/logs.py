"""Logging for a replica: every line carries the request id of the request it belongs to, as text or as
one JSON object per line (tracebacks included, on the same line), so log pipelines can join a request's
lines and never split a record."""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Literal

request_id: ContextVar[str] = ContextVar("repserve_request_id", default="-")
"""The id of the request the current task serves (``-`` outside requests); set by the request-id
middleware in the request's own asyncio task, copied into threads that ``anyio.to_thread`` starts."""

TEXT_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s request_id=%(request_id)s %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (a handler filter, so records of every logger get it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """Root logging for the process (uvicorn's loggers propagate to it: ``log_config=None``)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
