"""Image decoding and preprocessing: the ONE path shared by training and serving (no train/serve skew).

:func:`decode_image` turns bytes, files, PIL images and arrays into RGB the same way everywhere (EXIF
orientation, every Pillow mode, transparency composited on :data:`BACKGROUND`, first frame of animations),
with limits checked on the header before any pixel is decoded. Preprocessing is data
(:class:`PreprocessConfig`, stored in every task's manifest), turned into a transform by timm's own
``create_transform``, as timm does for every backbone; :func:`build_transform` refuses an image whose
resize would be huge before resizing it. :func:`preprocess_batch` is both, and it is what the service runs.

Why the bounds are on the header and on the resize, not only on the file: a 661-byte PNG can declare
200,000 x 1 pixels. Decoding it is cheap, but the eval transform resizes the *short* side to
``floor(input / crop_pct)`` (256 px for 224) and the long side by the same factor: 51,200,000 x 256 px,
39 GB as RGB (torchvision's ``Resize(int)`` does exactly that before the centre crop). The aspect-ratio
limit refuses that shape from the header alone, and the transform refuses any resize beyond its pixel
bound, so neither relies on the other.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from timm.data import create_transform

from .errors import ImageError, PayloadTooLarge

# Transparent pixels are composited on white: it is how browsers, viewers and labelling tools show a
# transparent image (so the pixels match what whoever labelled it saw), how product photos with a removed
# background are published, and what the service has always answered with. Opaque images are unaffected.
BACKGROUND = (255, 255, 255)

# What Pillow may open. Common photo and web formats only: the others (EPS runs Ghostscript, PSD, JPEG
# 2000, ICO, the scientific formats...) are attack surface that no client of an image classifier needs.
# "JPEG" includes MPO, the multi-picture JPEG that cameras and phones write.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ORIENTATION = 0x0112  # the EXIF tag

Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Side = Annotated[int, Field(ge=8, le=2048)]
ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image | np.ndarray


class PreprocessConfig(BaseModel):
    """Input size and normalisation a task was trained with (timm data-config fields).

    Validated when a manifest is parsed: an interpolation or crop mode timm does not know, a zero or
    non-finite std, a non-finite mean or an absurd size would otherwise break every request of the task.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: tuple[Literal[3], Side, Side] = Field(
        (3, 224, 224), description="C, H, W fed to the backbone (3 channels, sides of 8 to 2048 px)")
    mean: tuple[Finite, Finite, Finite] = (0.485, 0.456, 0.406)
    std: tuple[PositiveFinite, PositiveFinite, PositiveFinite] = (0.229, 0.224, 0.225)
    interpolation: Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"] = "bilinear"
    crop_pct: float = Field(0.875, ge=0.5, le=1.5, allow_inf_nan=False,
                            description="Resize to input / crop_pct, then crop the input size (timm); "
                                        "above 1 pads, as some timm configs do (1.15)")
    crop_mode: Literal["center", "squash", "border"] = "center"

    @classmethod
    def from_timm(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        return cls(**{k: cfg[k] for k in cls.model_fields if k in cfg})

    def with_size(self, size: int) -> PreprocessConfig:
        """The same normalisation at another square input size (convolutional backbones accept any)."""
        return self.model_validate({**self.model_dump(), "input_size": (3, size, size)})

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]


@dataclass(frozen=True)
class ImageLimits:
    """What an image may cost before it is decoded; ``None`` lifts a limit.

    ``max_bytes``: encoded size. ``max_pixels``: width x height from the header (decompression bombs), and
    the most pixels the transform's resize may produce. ``max_aspect``: long side / short side, checked on
    the header too (a very long, thin image is cheap to decode but huge once its short side is resized).
    With every limit lifted, Pillow's own decompression-bomb error (above 179 Mpx) and the transform's
    default resize bound still apply.
    """

    max_bytes: int | None = 20 << 20
    max_pixels: int | None = 40_000_000
    max_aspect: float | None = 100.0


def decode_image(source: ImageSource, limits: ImageLimits | None = None, *,
                 check: Callable[[], None] | None = None) -> Image.Image:
    """Any image (encoded bytes, a file path, a PIL image, a ``[H, W]``/``[H, W, C]`` uint8 or uint16 array)
    as an RGB PIL image, the same way for training and serving.

    EXIF orientation is applied; palette, greyscale, CMYK and the rest are converted by Pillow; 16/32-bit
    greyscale keeps its top 8 of 16 bits (Pillow's own conversion would clip it to white); transparency
    (alpha, or a palette/colour key) is composited on :data:`BACKGROUND`; animations give their first
    frame. An RGB image without orientation comes back as is (not copied).

    Raises :class:`PayloadTooLarge` (413) over ``limits`` (``ImageLimits()`` when ``None``), checked on the
    header before pixels are decoded, and for Pillow's decompression bombs; :class:`ImageError` (415) for
    anything Pillow cannot decode (unknown format, truncated or corrupt data). ``check`` is called between
    the steps (it may raise to stop, e.g. at a deadline).
    """
    limits = ImageLimits() if limits is None else limits
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = _from_array(source)
    else:
        img = _open(_read(source, limits.max_bytes))
    _check_size(img.size, limits)
    if check is not None:
        check()
    try:
        img.load()
        if img.getexif().get(_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        if check is not None:
            check()
        return _rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image rejected as a decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as e:
        # what Pillow raises on truncated or corrupt data of a known format (no traceback: a client error)
        raise ImageError(f"not a decodable image: {e}") from None


def _read(source: bytes | bytearray | memoryview | str | os.PathLike, max_bytes: int | None) -> bytes:
    if isinstance(source, str | os.PathLike):
        size = os.path.getsize(source)
        if max_bytes is not None and size > max_bytes:
            raise PayloadTooLarge(f"image is {size} bytes, the limit is {max_bytes}")
        with open(source, "rb") as f:
            return f.read()
    data = bytes(source)
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes, the limit is {max_bytes}")
    if not data:
        raise ImageError("empty body: expected image bytes")
    return data


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open: the header only (format, size, mode); no pixel is decoded yet."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image rejected as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not a decodable image: unknown or unsupported format (accepted: {', '.join(FORMATS)})"
                         ) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as e:
        raise ImageError(f"not a decodable image: {e}") from None


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype not in (np.uint8, np.uint16) or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ImageError(f"an image array must be uint8/uint16 [H, W] or [H, W, 1|3|4], got {a.dtype} "
                         f"{list(a.shape)}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype == np.uint16 and a.ndim == 3:
        raise ImageError("a uint16 image array must be greyscale [H, W]")
    return Image.fromarray(np.ascontiguousarray(a))


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if limits.max_pixels is not None and w * h > limits.max_pixels:
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels, the limit is {limits.max_pixels}")
    if w < 1 or h < 1:
        raise ImageError(f"image is {w}x{h}: no pixels")
    if limits.max_aspect is not None and max(w, h) > limits.max_aspect * min(w, h):
        raise PayloadTooLarge(f"image is {w}x{h}: its long side is {_number(max(w, h) / min(w, h))} times its short "
                              f"side, the limit is {_number(limits.max_aspect)}")


def _number(x: float) -> str:
    return f"{x:,.2f}".rstrip("0").rstrip(".")


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):  # 16/32-bit integer greyscale: the top 8 of 16 bits, not Pillow's clipping
        values = np.asarray(img)
        grey = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
        key = img.info.get("transparency")
        if isinstance(key, int):  # a transparent grey value (PNG tRNS)
            grey.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
        img = grey
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_bound(cfg: PreprocessConfig, size: tuple[int, int]) -> int:
    """At most how many pixels the transform's resize makes of an image of ``size`` (width, height).

    ``center`` resizes the short side to ``floor(side / crop_pct)`` and the long side by the same factor;
    ``squash`` and ``border`` fit the image in that square.
    """
    s = max(math.floor(side / cfg.crop_pct) for side in cfg.image_size)
    if cfg.crop_mode != "center":
        return s * s
    short, long = sorted(size)
    return s * math.ceil(s * long / max(short, 1))


class Transform:
    """PIL RGB image -> normalised float tensor ``[3, H, W]``: timm's eval transform (resize, crop,
    normalise) behind a check that the resize stays within ``max_pixels`` (:class:`PayloadTooLarge`).

    Stateless, hence safe to share between threads and to pickle into DataLoader workers.
    """

    def __init__(self, cfg: PreprocessConfig, max_pixels: int | None = ImageLimits.max_pixels) -> None:
        self.cfg, self.max_pixels = cfg, max_pixels
        self.inner = create_transform(
            input_size=cfg.input_size, is_training=False, interpolation=cfg.interpolation,
            mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode,
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.max_pixels is not None:
            resized = resize_bound(self.cfg, image.size)
            if resized > self.max_pixels:
                w, h = image.size
                raise PayloadTooLarge(f"image is {w}x{h}: resizing it to the task's input would make {resized} "
                                      f"pixels, the limit is {self.max_pixels}")
        return self.inner(image)


def build_transform(cfg: PreprocessConfig, max_pixels: int | None = ImageLimits.max_pixels) -> Transform:
    """The task's transform (see :class:`Transform`): the one training and serving apply."""
    return Transform(cfg, max_pixels)


@functools.lru_cache(maxsize=64)
def transform_for(cfg: PreprocessConfig, max_pixels: int | None = ImageLimits.max_pixels) -> Transform:
    """:func:`build_transform`, built once per distinct config (configs are frozen, hence hashable)."""
    return build_transform(cfg, max_pixels)


def preprocess_batch(images: Sequence[ImageSource], cfg: PreprocessConfig, limits: ImageLimits | None = None, *,
                     names: Sequence[str | None] | None = None,
                     check: Callable[[], None] | None = None) -> torch.Tensor:
    """Decode and preprocess ``images`` into ``[B, 3, H, W]`` float32: the service's path, the benchmark
    baseline's and the tests' (public API, docs/CORE_API.md).

    An image's error (:class:`ImageError`, :class:`PayloadTooLarge`) keeps its class (hence the service's
    answer to it) and names the image: ``image 3 (name): ...``, with ``names[3]`` when given. ``check`` runs before each
    image and between its decoding steps (e.g. to stop at a request's deadline; its errors pass unchanged),
    so work past it is at most one step of one image.
    """
    limits = ImageLimits() if limits is None else limits
    transform = transform_for(cfg, ImageLimits.max_pixels if limits.max_pixels is None else limits.max_pixels)
    out = torch.empty(len(images), *cfg.input_size)
    for i, source in enumerate(images):
        try:
            if check is not None:
                check()
            out[i] = transform(decode_image(source, limits, check=check))
        except (ImageError, PayloadTooLarge) as e:  # the image's fault: name it (not ``check``'s errors)
            name = names[i] if names is not None else None
            e.args = (f"image {i}{f' ({name})' if name else ''}: {e}", *e.args[1:])
            raise
    return out
