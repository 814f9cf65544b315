"""Image inputs: one decode + preprocess path for training and serving, and hostile inputs that stay bounded.

Real photos (scikit-image's) in every awkward encoding go through the training datasets and through the
service's own decode functions and must give identical tensors. Hostile uploads each get an exact status and
JSON error body from a real app, quickly, without a 500 or a traceback, and the tiny-upload resize bombs are
measured in a fresh process: peak RSS may not grow by more than 200 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from pydantic import ValidationError

from repadapter import PreprocessConfig, build_transform, decode_image
from repadapter.bundle import parse_manifest
from repadapter.errors import BundleError, ImageError
from repadapter.preprocess import BACKGROUND, ImageLimits, preprocess_batch
from service.app import create_app
from service.errors import InferenceTimeout
from service.images import Deadline, preprocess, preprocess_async
from service.settings import Settings
from service.uploads import Upload
from tests.servicekit import TINY_ARCH, TINY_OPTIONS, answers, assert_predictions, wait_for
from training.batches import Transformed
from training.data import ArrayDataset, FolderDataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
CFG = PreprocessConfig()  # 224 px, crop 0.875: the shipped imagenet task's
SMALL = PreprocessConfig(input_size=(3, 96, 96))  # the shipped digits/fashion tasks'
ORIENTATION = 0x0112
ACCEPTED = "JPEG, PNG, GIF, WEBP, BMP, TIFF, PPM, AVIF"


def save(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png(width: int, height: int) -> bytes:
    """A complete, valid 8-bit greyscale PNG of zeros, built without allocating its pixels in Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\0" * (width + 1)) * height  # a filter byte, then the row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries one row of data (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def rotated_jpeg(photo: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return save(photo, "JPEG", exif=exif, quality=90)


@pytest.fixture(scope="module")
def awkward(photos) -> dict[str, bytes]:
    """The same real photos in every encoding where decoders disagree: alpha, palette transparency, CMYK,
    16-bit, EXIF orientation, animation."""
    chelsea, coffee, astronaut, rocket = (p.resize((160, 120)) for p in photos)
    rgba = chelsea.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 160).astype(np.uint8), (120, 1))
    alpha[:40, :60] = 0  # a fully transparent corner over photo content (not black pixels)
    rgba.putalpha(Image.fromarray(alpha))
    palette = coffee.quantize(64)
    clear = int(np.bincount(np.asarray(palette).ravel()).argmax())  # the commonest colour becomes transparent
    grey16 = (np.asarray(rocket.convert("L"), dtype=np.uint16) * 257
              + np.arange(120 * 160, dtype=np.uint16).reshape(120, 160) % 251)
    gif = save(chelsea, "GIF", save_all=True, append_images=[coffee, astronaut], duration=100, loop=0)
    return {
        "transparent.png": save(rgba, "PNG"),
        "palette-transparent.png": save(palette, "PNG", transparency=clear),
        "palette.gif": save(coffee.quantize(32), "GIF"),
        "cmyk.jpg": save(astronaut.convert("CMYK"), "JPEG", quality=90),
        "grey16.png": save(Image.fromarray(grey16), "PNG"),
        "exif6.jpg": rotated_jpeg(chelsea, 6),
        "exif3.jpg": rotated_jpeg(coffee, 3),
        "exif8.jpg": rotated_jpeg(rocket, 8),
        "animated.gif": gif,
        "animated.webp": save(chelsea, "WEBP", save_all=True, append_images=[coffee], lossless=True),
        "la.png": save(rgba.convert("LA"), "PNG"),
        "rgb.png": save(astronaut, "PNG"),
        "grey.png": save(rocket.convert("L"), "PNG"),
        "photo.jpg": save(coffee, "JPEG", quality=90),
    }


# ---- one decode + preprocess path -------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [CFG, SMALL], ids=["224", "96"])
def test_training_folder_and_service_give_identical_tensors(tmp_path, awkward, cfg):
    names = sorted(awkward)
    for i, name in enumerate(names):
        (tmp_path / f"{i:02d}-{name}").write_bytes(awkward[name])
    folder = Transformed(FolderDataset(sorted(tmp_path.iterdir()), np.zeros(len(names))), build_transform(cfg))
    training = torch.stack([folder[i][0] for i in range(len(names))])
    limits = ImageLimits(1 << 24, 40_000_000, 100.0)
    served = preprocess([Upload(awkward[n], n) for n in names], cfg, limits)  # the route's decode + transform
    for i, name in enumerate(names):
        assert torch.equal(training[i], served[i]), name
    assert torch.equal(preprocess_batch([awkward[n] for n in names], cfg), served)  # what the tests call


def test_training_arrays_and_service_give_identical_tensors():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)  # the shape of the mnist/fashion pools
    rgb = rng.integers(0, 256, (3, 40, 30, 3), dtype=np.uint8)
    for pool in (grey, rgb):
        ds = Transformed(ArrayDataset(pool, np.zeros(len(pool)), np.arange(len(pool))), build_transform(SMALL))
        served = preprocess([Upload(save(Image.fromarray(a), "PNG")) for a in pool], SMALL, ImageLimits())
        assert torch.equal(torch.stack([ds[i][0] for i in range(len(pool))]), served)


def test_transparency_is_composited_on_white(awkward):
    img = decode_image(awkward["transparent.png"])
    assert BACKGROUND == (255, 255, 255)
    assert img.getpixel((10, 10)) == (255, 255, 255)  # alpha 0 over photo content
    half = Image.open(io.BytesIO(awkward["transparent.png"])).getpixel((80, 100))  # alpha ~128
    assert img.getpixel((80, 100)) == tuple(round((c * half[3] + 255 * (255 - half[3])) / 255) for c in half[:3])
    palette = Image.open(io.BytesIO(awkward["palette-transparent.png"]))
    clear = palette.info["transparency"]
    y, x = np.argwhere(np.asarray(palette) == clear)[0]
    assert decode_image(awkward["palette-transparent.png"]).getpixel((int(x), int(y))) == (255, 255, 255)


def _old_training_decode(data: bytes) -> Image.Image:
    """training.data's decoder before this change (the shipped tasks were trained with it)."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):
            im = Image.fromarray((np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8))
        return im.convert("RGB")


@pytest.mark.parametrize("name", ["palette.gif", "cmyk.jpg", "grey16.png", "exif6.jpg", "exif3.jpg", "exif8.jpg",
                                  "rgb.png", "grey.png", "photo.jpg", "opaque-rgba.png"])
def test_opaque_images_decode_as_training_always_did(awkward, photos, name):
    data = save(photos[3].convert("RGBA"), "PNG") if name == "opaque-rgba.png" else awkward[name]
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(_old_training_decode(data)))


def test_exif_orientation_and_first_frames(awkward, photos):
    assert decode_image(awkward["exif6.jpg"]).size == (120, 160)  # 160x120 stored, shown rotated
    gif = Image.open(io.BytesIO(awkward["animated.gif"]))
    first = np.asarray(gif.convert("RGB"))
    gif.seek(1)
    assert np.array_equal(np.asarray(decode_image(awkward["animated.gif"])), first)
    assert not np.array_equal(first, np.asarray(gif.convert("RGB")))
    chelsea = np.asarray(photos[0].resize((160, 120)))
    assert np.array_equal(np.asarray(decode_image(awkward["animated.webp"])), chelsea)  # lossless first frame


def test_arrays_and_pil_images_decode_like_their_encodings(photos):
    photo = photos[1].resize((64, 48))
    assert decode_image(photo) is photo  # RGB, no orientation: not copied
    assert np.array_equal(np.asarray(decode_image(np.asarray(photo))), np.asarray(photo))
    grey16 = np.full((4, 4), 40000, dtype=np.uint16)
    assert decode_image(grey16).getpixel((0, 0)) == (156, 156, 156)
    assert np.array_equal(np.asarray(decode_image(grey16)), np.asarray(decode_image(save(Image.fromarray(grey16),
                                                                                          "PNG"))))
    with pytest.raises(ImageError, match="uint8/uint16"):
        decode_image(np.zeros((4, 4), dtype=np.float32))


# ---- preprocess config is validated at parse time ----------------------------------------------------------


BAD_CONFIGS = [
    ({"crop_mode": "bogus"}, "crop_mode: Input should be 'center', 'squash' or 'border'"),
    ({"interpolation": "bogus"}, "interpolation: Input should be 'nearest', 'bilinear', 'bicubic', 'box', "
                                 "'hamming' or 'lanczos'"),
    ({"std": [0, 0, 0]}, "std.0: Input should be greater than 0; preprocess.std.1: Input should be greater than 0; "
                         "preprocess.std.2: Input should be greater than 0"),
    ({"std": [0.2, -1, 0.2]}, "std.1: Input should be greater than 0"),
    ({"mean": ["NaN", 0.5, 0.5]}, "mean.0: Input should be a finite number"),
    ({"std": [0.2, 0.2, "Infinity"]}, "std.2: Input should be a finite number"),
    ({"input_size": [3, 0, 224]}, "input_size.1: Input should be greater than or equal to 8"),
    ({"input_size": [3, 224, 100000]}, "input_size.2: Input should be less than or equal to 2048"),
    ({"input_size": [1, 224, 224]}, "input_size.0: Input should be 3"),
    ({"crop_pct": 0.01}, "crop_pct: Input should be greater than or equal to 0.5"),
    ({"crop_pct": 7}, "crop_pct: Input should be less than or equal to 1.5"),
]


@pytest.mark.parametrize(("change", "says"), BAD_CONFIGS)
def test_bad_preprocess_configs_are_refused(model, change, says):
    with pytest.raises(ValidationError):
        PreprocessConfig.model_validate({**CFG.model_dump(), **change})
    manifest = json.loads(model.bundle("bad", 1).serialize()[0])
    manifest["preprocess"].update(change)
    text = json.dumps(manifest).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")  # JSON's spellings
    with pytest.raises(BundleError) as e:
        parse_manifest(text)
    assert str(e.value) == f"invalid manifest: preprocess.{says}"


def test_timm_configs_still_parse():
    assert PreprocessConfig.from_timm({"input_size": (3, 288, 288), "interpolation": "bicubic", "crop_pct": 1.15,
                                      "crop_mode": "center", "mean": (0.5,) * 3, "std": (0.5,) * 3}).crop_pct == 1.15
    with pytest.raises(ValidationError):
        CFG.with_size(4)


# ---- hostile inputs through a real app -------------------------------------------------------------------


@contextlib.contextmanager
def _start(store: Path, **kw: object) -> Iterator[TestClient]:
    settings = Settings(backbone=TINY_ARCH, backbone_options=TINY_OPTIONS, store=store, max_delay_ms=2.0,
                        store_poll_s=0, **kw)
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "readiness")
        yield client


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[TestClient]:
    """An open app with the default pixel and aspect limits, 3 images and 200 kB per request."""
    with _start(tmp_path_factory.mktemp("inputs") / "store", max_images_per_request=3,
                max_image_bytes=200_000) as client:
        yield client


def files(*blobs: bytes, name: str = "img{}.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name.format(i), b, "image/png")) for i, b in enumerate(blobs)]


def body(response) -> dict:
    assert response.headers["content-type"] == "application/json"
    return response.json()


NOISE = save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)),
             "PNG")  # incompressible: ~270 kB > 200 kB
GRADIENT_JPEG = save(Image.linear_gradient("L").resize((64, 64)).convert("RGB"), "JPEG", quality=95)  # 1,213 B
TRUNCATED_PNG = png(64, 64)[:-40]

HOSTILE = {  # name: (request, status, exact JSON body)
    "200000x1": (files(png(200_000, 1)), 413, "image 0 (img0.png): image is 200000x1: its long side is 200,000 "
                 "times its short side, the limit is 100"),
    "1000000x1": (files(png(1_000_000, 1)), 413, "image 0 (img0.png): image is 1000000x1: its long side is "
                  "1,000,000 times its short side, the limit is 100"),
    "1x4000000": (files(png(1, 4_000_000)), 413, "image 0 (img0.png): image is 1x4000000: its long side is "
                  "4,000,000 times its short side, the limit is 100"),
    "40Mpx+1": (files(png_header(8000, 5001)), 413, "image 0 (img0.png): image is 8000x5001 = 40008000 pixels, "
                "the limit is 40000000"),
    "bomb-100Mpx": (files(png_header(10_000, 10_000)), 413, "image 0 (img0.png): image is 10000x10000 = "
                    "100000000 pixels, the limit is 40000000"),
    "bomb-400Mpx": (files(png_header(20_000, 20_000)), 413, "image 0 (img0.png): image rejected as a "
                    "decompression bomb: Image size (400000000 pixels) exceeds limit of 178956970 pixels, could be "
                    "decompression bomb DOS attack."),
    "truncated-jpeg": (files(GRADIENT_JPEG[:-200], name="t{}.jpg"), 415, "image 0 (t0.jpg): not a decodable image: "
                       "image file is truncated (27 bytes not processed)"),
    "truncated-jpeg-header": (files(GRADIENT_JPEG[:300], name="t{}.jpg"), 415, "image 0 (t0.jpg): not a decodable "
                              "image: Truncated File Read"),
    "truncated-png": (files(TRUNCATED_PNG), 415, "image 0 (img0.png): not a decodable image: image file is "
                      "truncated"),
    "text-as-png": ({"content": b"hello, I am text", "headers": {"Content-Type": "image/png"}}, 415,
                    f"image 0: not a decodable image: unknown or unsupported format (accepted: {ACCEPTED})"),
    "eps": (files(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"), 415, "image 0 (img0.png): "
            f"not a decodable image: unknown or unsupported format (accepted: {ACCEPTED})"),
    "empty": ({"content": b"", "headers": {"Content-Type": "image/png"}}, 415,
              "image 0: empty body: expected image bytes"),
    "four-files": (files(*[png(8, 8)] * 4), 413, "at most 3 files per request"),
    "oversized-file": (files(NOISE), 413, f"files file 'img0.png' is {len(NOISE)} bytes, the limit is 200000"),
    "oversized-body": ({"content": NOISE, "headers": {"Content-Type": "image/png"}}, 413,
                       f"the request body is {len(NOISE)} bytes, the limit is 200000"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the service ignores it too
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_inputs_get_exact_errors_quickly(app, caplog, case):
    request, status, detail = HOSTILE[case]
    kwargs = {"files": request} if isinstance(request, list) else request
    start = time.perf_counter()
    with caplog.at_level(logging.INFO):
        r = app.post("/classify?task=imagenet", **kwargs)
    elapsed = time.perf_counter() - start
    assert r.status_code == status, r.text
    error = {413: "payload_too_large", 415: "unsupported_media"}[status]
    assert body(r) == {"error": error, "detail": detail}
    assert elapsed < 3.0, elapsed  # was 48 s and 12.7 GB for 200000x1, a MemoryError 500 from 1000000x1
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING or rec.exc_info], caplog.text


@pytest.mark.parametrize("image", [Image.new("RGB", (1, 1), (9, 99, 199)), Image.new("L", (37, 23), 77),
                                   Image.new("1", (100, 1), 1), Image.new("RGB", (100, 1))],
                         ids=["1x1", "grey", "1-bit 100x1", "100x1"])
def test_small_odd_images_are_answered(app, image):
    r = app.post("/classify?task=imagenet&top_k=2", files=files(save(image, "PNG")))
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["predictions"]) == 2


def test_animated_gif_is_classified_by_its_first_frame(app, awkward):
    first = save(Image.open(io.BytesIO(awkward["animated.gif"])).convert("RGB"), "PNG")
    second = Image.open(io.BytesIO(awkward["animated.gif"]))
    second.seek(1)
    got = [answers(app.post("/classify?task=imagenet", files=files(b)).json())
           for b in (awkward["animated.gif"], first, save(second.convert("RGB"), "PNG"))]
    assert_predictions(got[0], got[1])
    assert got[0] != got[2]


def test_awkward_images_are_answered_as_training_sees_them(app, awkward):
    blobs = [awkward[n] for n in ("transparent.png", "cmyk.jpg", "grey16.png")]
    r = app.post("/classify?task=imagenet", files=files(*blobs))
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3


def test_a_bundle_with_a_bad_preprocess_section_is_refused_with_422(app, model):
    manifest, tensors = model.bundle("badprep", 5).serialize()
    m = json.loads(manifest)
    m["preprocess"]["crop_mode"] = "bogus"
    r = app.post("/tasks", files=[("manifest", ("m.json", json.dumps(m).encode(), "application/json")),
                                  ("tensors", ("t", tensors, "application/octet-stream"))])
    assert r.status_code == 422, r.text
    assert body(r) == {"error": "invalid_bundle", "detail": "invalid manifest: preprocess.crop_mode: Input should be "
                                                             "'center', 'squash' or 'border'"}
    assert "badprep" not in {t["name"] for t in app.get("/tasks").json()["tasks"]}


# ---- the deadline ----------------------------------------------------------------------------------------


def _gradient(side: int) -> bytes:
    ramp = np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8)
    return save(Image.fromarray(np.repeat(np.tile(ramp, (side, 1))[:, :, None], 3, axis=2)), "PNG")


def test_decoding_stops_at_the_request_deadline(tmp_path):
    blobs = [_gradient(3000)] * 40  # 9 Mpx each, ~35 kB: about 7 s of decoding on one core
    with _start(tmp_path / "store", request_timeout_s=1.0) as client:
        start = time.perf_counter()
        r = client.post("/classify?task=imagenet", files=files(*blobs))
        elapsed = time.perf_counter() - start
        assert r.status_code == 503, r.text
        assert body(r) == {"error": "timeout", "detail": "no answer within request_timeout_s=1 s: the deadline "
                                                          "passed while decoding the images"}
        assert r.headers["Retry-After"] == "1"
        assert elapsed < 3.0, elapsed  # the deadline plus at most one image's decoding step
        ok = client.post("/classify?task=imagenet", files=files(save(Image.new("RGB", (32, 32)), "PNG")))
        assert ok.status_code == 200, ok.text


def test_a_request_waits_for_a_decode_slot_only_until_its_deadline():
    async def scenario() -> str:
        slots, other = anyio.CapacityLimiter(1), object()
        slots.acquire_on_behalf_of_nowait(other)  # another request is decoding
        try:
            await preprocess_async([Upload(png(8, 8))], CFG, ImageLimits(), Deadline.after(0.2), slots)
        except InferenceTimeout as e:
            assert slots.borrowed_tokens == 1  # the waiter took nothing
            return str(e)
        finally:
            slots.release_on_behalf_of(other)
        raise AssertionError("no timeout")

    assert asyncio.run(scenario()) == ("no answer within request_timeout_s=0.2 s: the deadline passed while waiting "
                                       "to decode: every decode slot is busy; the server is overloaded")


def test_an_expired_deadline_stops_before_decoding():
    with pytest.raises(InferenceTimeout, match="while decoding the images"):
        preprocess([Upload(png(8, 8))], CFG, ImageLimits(), Deadline(time.monotonic() - 1, 5.0))


# ---- resize bombs are bounded in memory and time ---------------------------------------------------------


_CHILD = r"""
import json, struct, sys, time, zlib
sys.path.insert(0, sys.argv[1])
from repadapter import PreprocessConfig
from repadapter.errors import PayloadTooLarge
from repadapter.preprocess import ImageLimits
from service.images import preprocess
from service.uploads import Upload

def png(width, height):  # as in the test module, which this process does not import
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\0" * (width + 1)) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))

def status_mb(key):  # VmRSS now, VmHWM its peak since clear_refs (ru_maxrss would include the parent's
    with open("/proc/self/status") as f:  # peak from before exec: a child of a 1.3 GB pytest reads 1.3 GB)
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

cfg = PreprocessConfig()
preprocess([Upload(png(640, 480))], cfg, ImageLimits())  # warm up: transforms, allocator
inputs = {"200000x1": png(200_000, 1), "1000000x1": png(1_000_000, 1), "1x4000000": png(1, 4_000_000)}

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS, so the next peak is the phase's own
    except OSError:
        pass  # then the peak may predate the phase: the growth is over-estimated, never under

out = {"sizes": {k: len(v) for k, v in inputs.items()}, "seconds": {}, "errors": {}, "growth_mb": {}}
for phase, limits in (("header", ImageLimits()), ("resize", ImageLimits(max_aspect=None))):
    reset_peak()  # phase "header": the aspect check; phase "resize": the transform's resize bound alone
    before = status_mb("VmRSS")
    for name, data in inputs.items():
        key = f"{name} {phase}"
        start = time.perf_counter()
        try:
            preprocess([Upload(data)], cfg, limits)
        except PayloadTooLarge as e:
            out["errors"][key] = str(e)
        out["seconds"][key] = time.perf_counter() - start
    out["growth_mb"][phase] = status_mb("VmHWM") - before
print(json.dumps(out))
"""


def test_resize_bombs_stay_bounded_in_a_fresh_process():
    run = subprocess.run([sys.executable, "-c", _CHILD, str(REPO)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert max(out["sizes"].values()) < 10_000  # bytes on the wire
    assert len(out["errors"]) == 6, out  # every one refused...
    assert "resizing it to the task's input would make 13107200000 pixels" in out["errors"]["200000x1 resize"]
    assert max(out["seconds"].values()) < 10.0, out  # ...quickly (was 48 s; 0.3 s quiet, slack for a busy CPU)
    # ...and without the gigabytes: peak RSS over the warmed-up process (refused on the header: ~0; decoded and
    # refused at the resize: Pillow's row pointers for 4M rows, ~80 MB)
    assert max(out["growth_mb"].values()) < 200, out
