"""The benchmarks' backbones and dtypes by short name, how they are loaded, and what a model or a task costs
in bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from repadapter import (
    AdapterConfig,
    AdapterWeights,
    Backbone,
    BackboneRef,
    Manifest,
    PackedFolds,
    TaskBundle,
    load_backbone,
)
from repadapter.testing import random_adapters  # noqa: F401 - the benchmarks' adapters

ARCHS: dict[str, str] = {
    "embedded": "embedded",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
"""Short benchmark names -> ``load_backbone`` arch. ViTs are random-init (speed and memory do not depend
on the values); ``embedded`` is the shipped pretrained MobileNetV2, the default backbone."""


DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


IMG_SIZE = 224


def dtype_name(short: str) -> str:
    """The torch name of a short dtype (``bf16`` -> ``bfloat16``), as the servers' ``--dtype`` takes it."""
    return str(DTYPES[short]).removeprefix("torch.")


def arch_name(name: str) -> str:
    """The timm arch for a short name (``vit_base``) or a full one (passed through)."""
    return ARCHS.get(name, name)


def load(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Backbone:
    """The benchmark backbone at 224 px, frozen, on ``device`` in ``dtype`` (random ViT weights are by
    design here, so the loader's warning about them is silenced for this call)."""
    logger = logging.getLogger("repadapter.backbone")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return load_backbone(arch_name(name), device=str(device), dtype=dtype, seed=seed)
    finally:
        logger.setLevel(level)


def served_folds(bb: Backbone, adapters: dict[str, AdapterWeights], device: torch.device,
                 dtype: torch.dtype) -> PackedFolds:
    """``adapters`` as the service's device tier holds them for mixed batches (a task's bundle, packed)."""
    w = next(iter(adapters.values()))
    manifest = Manifest(name="bench", labels=["x"], adapter=AdapterConfig(hidden=w.hidden, groups=w.groups,
                                                                          scale=w.scale),
                        backbone=BackboneRef(arch=bb.arch, fingerprint=bb.fingerprint))
    packed = TaskBundle(manifest, adapters, torch.zeros(1, bb.num_features), torch.zeros(1)).pack()
    return PackedFolds.of(packed, packed.buffer.to(device), dtype)


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (what one more copy of the model costs)."""
    return nbytes([*model.parameters(), *model.buffers()])
