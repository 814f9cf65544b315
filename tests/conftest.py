"""Shared fixtures: small real backbones (never mocked), real photos, a temporary store."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from repadapter import Backbone, LocalStore, load_backbone
from repadapter.testing import random_adapters  # noqa: F401 - re-exported for the tests

# Small randomly initialised ViT-family configs: exactness does not need pretrained weights.
TINY_VITS: dict[str, dict] = {
    "vit_tiny_patch16_224": {"img_size": 64, "depth": 3},
    "deit_tiny_patch16_224": {"img_size": 64, "depth": 3},
    "beit_base_patch16_224": {"img_size": 64, "depth": 2, "embed_dim": 96, "num_heads": 3},
    "eva_giant_patch14_224": {"img_size": 56, "depth": 2, "embed_dim": 96, "num_heads": 3, "mlp_ratio": 4.0},
}
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photos bundled with scikit-image."""
    return [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in PHOTOS]


@pytest.fixture
def tiny_vit() -> Callable[..., Backbone]:
    """Factory: a fresh small random timm ViT-family backbone (``arch`` from TINY_VITS)."""

    def make(arch: str = "vit_tiny_patch16_224", **kw: object) -> Backbone:
        return load_backbone(arch, seed=0, **{**TINY_VITS[arch], **kw})

    return make


@pytest.fixture
def embedded() -> Backbone:
    """A fresh copy of the embedded pretrained MobileNetV2 (cheap: ~0.3 s)."""
    return load_backbone()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    from tests.servicekit import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model():
    """An offline copy of the service tests' tiny ViT (``tests.servicekit.Model``): bundles and references."""
    from tests.servicekit import TINY_ARCH, TINY_OPTIONS, Model

    return Model.load(TINY_ARCH, **TINY_OPTIONS)


@pytest.fixture(scope="module")
def images(photos) -> list[bytes]:
    """Two real photos as small JPEGs, the request bodies of the service tests."""
    from tests.servicekit import encode

    return [encode(p, "JPEG", (96, 72)) for p in photos[:2]]


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def image_batch(images: list[Image.Image], backbone: Backbone) -> torch.Tensor:
    from repadapter.preprocess import preprocess_batch

    return preprocess_batch(images, backbone.preprocess)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (max abs value)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()




@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One S3 protocol server (moto) on loopback for the whole session; tests take fresh buckets."""
    from tests.s3kit import s3_server, use_credentials

    use_credentials()
    with s3_server() as endpoint:
        yield endpoint
