"""Decoding untrusted images and the shared preprocessing path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from repadapter import PreprocessConfig, build_transform, decode_image
from repadapter.errors import ImageError, PayloadTooLarge
from repadapter.preprocess import ImageLimits


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_encode(img, "JPEG", exif=exif))
    assert decoded.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    img = Image.new(mode, (8, 6))
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB"
    assert out.size == (8, 6)


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert decode_image(_encode(img)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_keeps_its_range():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(arr), "TIFF"))
    assert out.getpixel((0, 0)) == (128, 128, 128)


def test_limits_and_garbage():
    with pytest.raises(ImageError, match="decodable"):
        decode_image(b"definitely not an image")
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode_image(b"x" * 101, ImageLimits(max_bytes=100))
    big = _encode(Image.new("L", (2000, 2000)))  # small file, many pixels: a decompression bomb shape
    assert len(big) < 50_000
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(big, ImageLimits(max_pixels=1_000_000))
    truncated = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    with pytest.raises(ImageError):
        decode_image(truncated)


def test_transform_shape_and_normalisation():
    cfg = PreprocessConfig(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    x = build_transform(cfg)(Image.new("RGB", (50, 40), (255, 255, 255)))
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, torch.ones_like(x))
    assert cfg.with_size(96).input_size == (3, 96, 96)
    assert cfg.with_size(96).mean == cfg.mean
