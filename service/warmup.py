"""Input-size probes and warm-up: what the engine's worker runs before a size's first request.

A size is probed once, with a forward at batch 1 on the base weights: a backbone that cannot take it (a
fixed-size ViT) is recorded, and its tasks are refused (422 at registration, 503 for stored ones). With
warm-up on, each new size also gets the forwards that pay allocations and kernel choice, and a switch and
a mixed forward of a synthetic task, each timed into the cost model that ``auto`` decides on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from repadapter import AdapterConfig, BackboneRef, Manifest, mixed_batch
from repadapter.bundle import PackedBundle
from repadapter.errors import BundleError

from .execution import BatchExecutor
from .policy import CostModel
from .registry import TaskRef
from .residency import DeviceTask

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]


class InputProbe:
    """The input sizes seen so far and the backbone's verdict on each. :meth:`probe` runs on the engine's
    worker only; :meth:`verdict` may be read from any thread (a dict lookup)."""

    def __init__(self, executor: BatchExecutor, costs: CostModel, *, max_batch: int, warmup: bool) -> None:
        self.executor, self.costs = executor, costs
        self.max_batch, self.warmup = max_batch, warmup
        self._shapes: dict[Shape, BundleError | None] = {}  # None = the backbone takes it

    def known(self, shape: Shape) -> bool:
        return tuple(shape) in self._shapes

    def verdict(self, shape: Shape) -> BundleError | None:
        """The error a probed size is refused with (``None``: taken); KeyError if not probed yet."""
        return self._shapes[tuple(shape)]

    def fine(self, shape: Shape) -> bool:
        """Probed and taken (what a request can skip the probe for)."""
        return self._shapes.get(tuple(shape), True) is None

    def probe(self, shapes: Sequence[Shape]) -> dict[str, float | None]:
        """Each new input size: a forward at batch 1 (refused sizes are recorded), then, with warm-up on,
        the timed paths of :meth:`_warmup_shape`. Returns the cost model's estimates."""
        new = [s for s in dict.fromkeys(tuple(s) for s in shapes) if s not in self._shapes]
        synthetic = self._synthetic_task() if new and self.warmup else None
        ex = self.executor
        with torch.no_grad():
            ex.activate(None, None)  # probes run on the base weights; a failure here is not the size's
            for shape in new:
                try:
                    ex.forward(torch.zeros(1, *shape))
                except Exception as e:
                    self._shapes[shape] = BundleError(
                        f"the backbone {ex.backbone.arch} cannot take input size {shape}: {type(e).__name__}: {e}")
                    log.warning("input size refused shape=%s error=%s", shape, e)
                    continue
                if synthetic is not None:
                    self._warmup_shape(shape, synthetic)
                self._shapes[shape] = None
        if synthetic is not None:
            ex.residency.forget([synthetic[0]])
        snapshot = self.costs.snapshot()
        if new and self.warmup:
            log.info("warm-up done shapes=%s costs=%s", new, snapshot)
        return snapshot

    def _synthetic_task(self) -> tuple[TaskRef, DeviceTask] | None:
        """A task with adapters on every site (zeros: the cost of an adapter does not depend on its values),
        built and folded through the residency like a served one, for timing; ``None`` without sites."""
        ex = self.executor
        if not ex.sites:
            return None
        bb, hidden = ex.backbone, 8
        manifest = Manifest(name="warmup", labels=["warmup"], adapter=AdapterConfig(hidden=hidden, groups=1),
                            backbone=BackboneRef(arch=bb.arch, fingerprint=bb.fingerprint), preprocess=bb.preprocess)
        tensors = {"head.weight": torch.zeros(1, bb.num_features), "head.bias": torch.zeros(1)}
        for site in ex.sites:
            for param, shape in (("weight_a", (hidden, site.dim)), ("bias_a", (hidden,)),
                                 ("weight_b", (site.dim, hidden)), ("bias_b", (site.dim,))):
                tensors[f"adapter.{site.name}.{param}"] = torch.zeros(shape)
        task = TaskRef(manifest)
        return task, ex.residency.build(PackedBundle.from_tensors(manifest, tensors), fold=True)

    def _warmup_shape(self, shape: Shape, synthetic: tuple[TaskRef, DeviceTask]) -> None:
        """Base forwards at batch n (allocations, kernel choice); a switch there and back and a mixed
        forward, each timed into the cost model."""
        ex = self.executor
        n = max(1, min(self.max_batch, 4))
        x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
        self.costs.observe_batch("merged", shape, n, ex.timed(lambda: ex.forward(x)))
        task, entry = synthetic
        ex.activate(task, entry)
        ex.activate(None, None)
        rows = torch.arange(n, device=ex.device) % 2
        with mixed_batch(ex.sites, [entry.folds, None], rows):
            ex.forward(x)
            self.costs.observe_batch("mixed", shape, n, ex.timed(lambda: ex.forward(x)))
