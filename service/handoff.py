"""Handing an answer from a worker thread to the asyncio request waiting for it.

A worker thread must never touch an event loop's futures directly (they are not thread-safe): it schedules
the resolution on the future's own loop. Shared by the engine's worker and the benchmarks' baseline server,
so both hand answers over the same way (and a comparison of the two measures the rest).
"""

from __future__ import annotations

import asyncio
import contextlib


def _resolve(future: asyncio.Future, value: object) -> None:
    if future.done():  # the requester gave up (timeout, disconnect)
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def resolve_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: object) -> None:
    """Resolve ``future`` (of ``loop``) with ``value``, or fail it if ``value`` is an exception; from any
    thread. A future already done or a closed loop means nobody waits any more: nothing happens."""
    with contextlib.suppress(RuntimeError):  # a closed event loop
        loop.call_soon_threadsafe(_resolve, future, value)
