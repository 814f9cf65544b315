"""What a task must satisfy to be served by this replica, in two steps by what each needs to read.

- :meth:`TaskValidator.check_manifest`: the manifest alone (backbone, input size). Store scans run it
  on every new version, so a replica lists thousands of tasks without reading a tensor.
- :meth:`TaskValidator.check_bundle`: the tensors too (sites and shapes, head vs features, finite values
  also in the serving dtype). Registration runs it before anything is written; the residency runs it
  when a stored task is first loaded. The bundle's own checks (checksum, keys, head vs labels, finite
  float32) ran when it was parsed (:class:`repadapter.bundle.PackedBundle`).

The input size is also probed with a forward pass, which needs the engine's worker: the engine does that
(:meth:`service.engine.Engine.check_shape`). Registration then runs the task itself once on a fixed image
(:func:`probe_input`, :func:`check_probe`): bounds on values cannot rule out an overflow deep in the
network, and a task whose logits are not finite would answer every request with ``score: null``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from repadapter import Backbone, Manifest, build_transform
from repadapter.bundle import PackedBundle, check_backbone
from repadapter.errors import BundleError
from repadapter.inject import Site

MAX_INPUT_SIDE = 4096
"""Largest input height/width a task may declare (a bound on per-image memory)."""


class TaskValidator:
    """The checks against one backbone (its architecture, fingerprint, sites, features, serving dtype).
    Stateless after construction: safe from any thread."""

    def __init__(self, backbone: Backbone, sites: list[Site]) -> None:
        self.arch, self.fingerprint = backbone.arch, backbone.fingerprint
        self.num_features, self.dtype = backbone.num_features, backbone.dtype
        self.sites = sites

    def check_manifest(self, m: Manifest) -> None:
        """Refuse a manifest for another backbone (409) or with an input size no request may have (422)."""
        check_backbone(m, self.arch, self.fingerprint)
        c, h, w = m.preprocess.input_size
        if c != 3 or not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
            raise BundleError(f"task {m.name!r}: input size {(c, h, w)} must be 3 channels and "
                              f"1..{MAX_INPUT_SIDE} px per side")

    def check_bundle(self, packed: PackedBundle) -> None:
        """Every check of a task's tensors against this backbone (raises BundleError / BackboneMismatch)."""
        self.check_manifest(packed.manifest)  # the backbone included
        packed.check_compatible(self.arch, self.fingerprint, self.sites, self.num_features)
        if self.dtype != torch.float32 and not torch.isfinite(packed.buffer.to(self.dtype)).all():
            bad = next(k for k, t in packed.views().items() if not torch.isfinite(t.to(self.dtype)).all())
            raise BundleError(f"task {packed.name!r}: tensor {bad!r} overflows the serving dtype {self.dtype}")


PROBE_SEED = 0
"""Seed of the probe image: the same pixels for every task, so a refusal is reproducible."""


def probe_input(m: Manifest) -> Tensor:
    """``[1, 3, H, W]`` float32: a fixed noise image, 5/4 of the task's input size (so resize and crop both
    run), through the task's own preprocessing. Refuses (422) preprocessing that fails or gives non-finite
    values (zero or NaN std or mean, unknown interpolation or crop mode)."""
    _, h, w = m.preprocess.input_size
    pixels = np.random.default_rng(PROBE_SEED).integers(0, 256, (h * 5 // 4, w * 5 // 4, 3), dtype=np.uint8)
    try:
        x = build_transform(m.preprocess)(Image.fromarray(pixels))[None]
    except Exception as e:  # whatever timm/torchvision raise for a config they cannot run
        raise BundleError(f"task {m.name!r}: its preprocessing {_fields(m)} fails on a test image: "
                          f"{type(e).__name__}: {e}") from e
    if not torch.isfinite(x).all():
        raise BundleError(f"task {m.name!r}: its preprocessing {_fields(m)} turns a test image into non-finite "
                          "values (check preprocess.mean and preprocess.std)")
    return x


def check_probe(name: str, dtype: torch.dtype, feats: Tensor, logits: Tensor) -> None:
    """Refuse (422) a task whose probe forward (:func:`probe_input` through its adapters and head, in the
    serving ``dtype``) gives non-finite features or logits, naming which part overflowed."""
    if not torch.isfinite(feats).all():
        raise BundleError(f"task {name!r}: a probe forward on a fixed image gives non-finite features in {dtype}: "
                          "its adapters overflow (check adapter.scale and the adapter tensors)")
    if not torch.isfinite(logits).all():
        raise BundleError(f"task {name!r}: a probe forward on a fixed image gives non-finite logits in {dtype}: "
                          "its head overflows (check head.weight and head.bias)")


def _fields(m: Manifest) -> str:
    p = m.preprocess
    return (f"(mean={list(p.mean)}, std={list(p.std)}, interpolation={p.interpolation!r}, "
            f"crop_mode={p.crop_mode!r}, crop_pct={p.crop_pct})")
