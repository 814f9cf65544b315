"""Image decoding and preprocessing: the ONE path shared by training and serving (no train/serve skew).

Preprocessing is data (:class:`PreprocessConfig`, stored in every task's manifest), turned into a
transform by timm's own ``create_transform``, as timm does for every backbone.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from timm.data import create_transform

from .errors import ImageError, PayloadTooLarge


class PreprocessConfig(BaseModel):
    """Input size and normalisation a task was trained with (timm data-config fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: tuple[int, int, int] = Field((3, 224, 224), description="C, H, W fed to the backbone")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = Field(0.875, gt=0, le=1)
    crop_mode: str = "center"

    @classmethod
    def from_timm(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        return cls(**{k: cfg[k] for k in cls.model_fields if k in cfg})

    def with_size(self, size: int) -> PreprocessConfig:
        """The same normalisation at another square input size (convolutional backbones accept any)."""
        return self.model_copy(update={"input_size": (3, size, size)})

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]


def build_transform(cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised float tensor ``[3, H, W]`` (resize, center crop, normalise)."""
    return create_transform(
        input_size=cfg.input_size, is_training=False, interpolation=cfg.interpolation,
        mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode,
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (L, P, RGBA, CMYK, I;16, ...) to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I"):  # 16/32-bit integer greyscale: scale to 8 bit
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def decode_image(data: bytes, *, max_bytes: int = 20 << 20, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode untrusted bytes into an RGB image, enforcing byte and pixel limits.

    Raises :class:`PayloadTooLarge` (413) over the limits, including decompression bombs (checked on the
    header before pixels are decoded), and :class:`ImageError` (415) for anything Pillow cannot decode.
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes, the limit is {max_bytes}")
    if not data:
        raise ImageError("empty body: expected image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels, the limit is {max_pixels}")
            img.load()
    except PayloadTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image rejected as a decompression bomb: {e}") from e
    except UnidentifiedImageError:
        raise ImageError("not a decodable image: unknown or unsupported format") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data in a known format
        raise ImageError(f"not a decodable image: {e}") from e
    return to_rgb(img)


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """Stack RGB images into ``[B, 3, H, W]`` with the task's config."""
    transform = build_transform(cfg)
    return torch.stack([transform(im) for im in images])
