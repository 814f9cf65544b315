"""Request images -> model input, within the request's deadline and a bound on concurrent decodes.

Decoding and preprocessing are the core's :func:`repadapter.preprocess.preprocess_batch`, the code training
and the tests use, so serving sees exactly what the task was trained on. It runs in a worker thread (never
on the event loop): Pillow decoding and resizing are CPU work.

Bounds: every image is checked on its header (bytes, pixels, aspect ratio) before it is decoded, and its
resize before it is resized (:mod:`repadapter.preprocess`); at most ``decode_concurrency`` requests decode
at once, so peak decoding memory is that many times one image's (about 9 bytes a pixel at worst: 340 MB
for a 40 Mpx RGBA PNG, measured); and the request's deadline is checked before every image and between its steps,
so a request stops decoding (503 ``timeout``) within one step of one image after ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
import time
import warnings
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio
import torch
from PIL import Image
from starlette.datastructures import State

from repadapter import PreprocessConfig
from repadapter.preprocess import ImageLimits, preprocess_batch

from .errors import InferenceTimeout
from .uploads import Upload

__all__ = ["Deadline", "ImageLimits", "decode_slots", "preprocess", "preprocess_async"]

T = TypeVar("T")

# Every image's pixels are checked against max_image_pixels on its header, before decoding, so Pillow's warning
# about 89-179 Mpx headers only adds a log line per distinct size a client cares to send (above 179 Mpx Pillow
# raises, which is a 413 too).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Deadline:
    """A request's deadline: ``timeout_s`` after it started, on the monotonic clock (any thread may check it)."""

    at: float
    timeout_s: float

    @classmethod
    def after(cls, timeout_s: float) -> Deadline:
        return cls(time.monotonic() + timeout_s, timeout_s)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self, doing: str) -> InferenceTimeout:
        return InferenceTimeout(f"no answer within request_timeout_s={self.timeout_s:g} s: the deadline passed "
                                f"while {doing}")

    def check(self, doing: str = "decoding the images") -> None:
        """Raise :class:`InferenceTimeout` (503 ``timeout``) once the deadline has passed."""
        if time.monotonic() >= self.at:
            raise self.expired(doing)

    async def run(self, awaitable: Awaitable[T], doing: str) -> T:
        """Await ``awaitable``, cancelled at the deadline (then :class:`InferenceTimeout`)."""
        scope = asyncio.timeout(self.remaining())
        try:
            async with scope:
                return await awaitable
        except TimeoutError:
            if not scope.expired():
                raise
            raise self.expired(doing) from None


def preprocess(uploads: Sequence[Upload], cfg: PreprocessConfig, limits: ImageLimits,
               deadline: Deadline | None = None) -> torch.Tensor:
    """Decode and preprocess every upload into ``[n, 3, H, W]`` float32 (blocking: call from a thread).

    An error names the offending image (index and file name) and keeps its class, hence its HTTP status
    (413 over the limits, 415 not an image, 503 past the deadline).
    """
    return preprocess_batch([up.data for up in uploads], cfg, limits, names=[up.filename for up in uploads],
                            check=None if deadline is None else deadline.check)


def decode_slots(state: State, slots: int) -> anyio.CapacityLimiter:
    """The app's bound on requests decoding at once (made on first use: it belongs to the running loop)."""
    limiter: anyio.CapacityLimiter | None = getattr(state, "decode_slots", None)
    if limiter is None or limiter.total_tokens != slots:
        limiter = state.decode_slots = anyio.CapacityLimiter(slots)
    return limiter


async def preprocess_async(uploads: Sequence[Upload], cfg: PreprocessConfig, limits: ImageLimits,
                           deadline: Deadline, slots: anyio.CapacityLimiter) -> torch.Tensor:
    """:func:`preprocess` in a worker thread once one of ``slots`` is free, both within ``deadline``.

    Waiting for a slot is cancelled at the deadline; the thread is never abandoned (it would keep its
    memory while another takes its slot): it checks the deadline itself and stops within one step.
    """
    await deadline.run(slots.acquire(), "waiting to decode: every decode slot is busy; the server is overloaded")
    try:
        return await anyio.to_thread.run_sync(functools.partial(preprocess, uploads, cfg, limits, deadline))
    finally:
        slots.release()
