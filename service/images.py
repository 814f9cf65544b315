"""Request images -> model input: decode untrusted bytes and preprocess them with the task's config.

Runs in a worker thread (never on the event loop): Pillow decoding and resizing are CPU work. Decoding
and the transform are the core's (:func:`repadapter.decode_image`, :func:`repadapter.build_transform`),
the same code training uses, so serving sees exactly what the task was trained on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from repadapter import PreprocessConfig, build_transform, decode_image
from repadapter.errors import RepServeError

from .uploads import Upload


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@functools.lru_cache(maxsize=64)
def transform_for(cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The task's transform, built once per distinct config (configs are frozen, hence hashable)."""
    return build_transform(cfg)


def preprocess(uploads: Sequence[Upload], cfg: PreprocessConfig, limits: ImageLimits) -> torch.Tensor:
    """Decode and preprocess every upload into ``[n, 3, H, W]`` float32.

    An error names the offending image (index and file name) and keeps its class, hence its HTTP status
    (413 over the limits, 415 not an image).
    """
    transform = transform_for(cfg)
    tensors = []
    for i, up in enumerate(uploads):
        try:
            image = decode_image(up.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        except RepServeError as e:
            where = f"image {i}" + (f" ({up.filename})" if up.filename else "")
            raise type(e)(f"{where}: {e}") from e
        tensors.append(transform(image))
    return torch.stack(tensors)
