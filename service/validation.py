"""What a task must satisfy to be served by this replica, in two steps by what each needs to read.

- :meth:`TaskValidator.check_manifest`: the manifest alone (backbone, input size). Store scans run it
  on every new version, so a replica lists thousands of tasks without reading a tensor.
- :meth:`TaskValidator.check_bundle`: the tensors too (sites and shapes, head vs features, finite values
  also in the serving dtype). Registration runs it before anything is written; the residency runs it
  when a stored task is first loaded. The bundle's own checks (checksum, keys, head vs labels, finite
  float32) ran when it was parsed (:class:`repadapter.bundle.PackedBundle`).

The input size is also probed with a forward pass, which needs the engine's worker: the engine does that
(:meth:`service.engine.Engine.check_shape`).
"""

from __future__ import annotations

import torch

from repadapter import Backbone, Manifest
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
