"""Checkpoints of the official RepAdapter code (luogen1996/RepAdapter) as task bundles.

The official training script saves only what trained: ``blocks.{i}.adapter_{attn,mlp}.conv_{A,B}.{weight,bias}``
and ``head.{weight,bias}``. Those keys tell the placement (``adapter_mlp`` keys: ``block``, else ``attn``),
the depth and width of the ViT (block indices, ``conv_A``'s input channels), the adapter's hidden size and
groups, and the number of classes; they do not tell the scale (a training flag), the class names, or which
weights the backbone had (the task is bound to them by the backbone's fingerprint). :func:`inspect_official`
reads what the keys tell; :func:`official_bundle` asks for the rest and builds a checked bundle through the
strict :func:`~repadapter.bundle.import_official`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import ValidationError
from torch import Tensor

from .backbone import Backbone
from .bundle import AdapterConfig, BackboneRef, Manifest, TaskBundle, import_official
from .errors import BundleError, CheckpointError, describe_validation_error
from .inject import PLACEMENTS, attach_slots
from .preprocess import PreprocessConfig

OFFICIAL_ARCHS: dict[tuple[int, int], str] = {
    (192, 12): "vit_tiny_patch16_224",
    (384, 12): "vit_small_patch16_224",
    (768, 12): "vit_base_patch16_224",
    (1024, 24): "vit_large_patch16_224",
}
"""``(embed dim, blocks) -> timm architecture`` of the ViTs the official code fine-tunes (the paper: ViT-B/16);
a checkpoint of another shape needs its architecture named."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SITE = re.compile(r"^blocks\.(\d+)\.adapter_(attn|mlp)\.conv_A\.weight$")


@dataclass(frozen=True)
class OfficialShape:
    """What an official checkpoint's keys and shapes tell about the model it was trained on."""

    depth: int  # blocks (highest adapted block index + 1)
    dim: int  # embed dim: conv_A's input channels
    hidden: int  # adapter hidden size r: conv_A's output channels
    groups: int  # r / conv_B's input channels per group
    placement: str  # "block" when any MLP adapter is present, else "attn"
    num_classes: int | None  # rows of head.weight; None without a head

    @property
    def arch(self) -> str | None:
        """The timm ViT of this width and depth (:data:`OFFICIAL_ARCHS`), ``None`` when not a standard one."""
        return OFFICIAL_ARCHS.get((self.dim, self.depth))


def inspect_official(state_dict: dict[str, Tensor]) -> OfficialShape:
    """Read depth, width, hidden size, groups, placement and classes from an official checkpoint's keys.

    Only what the shape needs is checked here (one ``conv_A``/``conv_B`` pair per site, 3-D weights); every
    other check is :func:`~repadapter.bundle.import_official`'s. Raises :class:`CheckpointError`.
    """
    found = {(int(m.group(1)), m.group(2)): key for key in state_dict if (m := _SITE.match(key))}
    if not found:
        raise CheckpointError("not a RepAdapter checkpoint: no blocks.<i>.adapter_{attn,mlp}.conv_A.weight keys "
                              f"(it holds {sorted(state_dict)[:6] or 'nothing'})")
    (block, kind), key = min(found.items())
    a, b = state_dict[key], state_dict.get(key.replace("conv_A", "conv_B"))
    if a.ndim != 3 or b is None or b.ndim != 3 or b.shape[1] == 0 or a.shape[0] % b.shape[1]:
        raise CheckpointError(f"blocks.{block}.adapter_{kind}: conv_A.weight {tuple(a.shape)} and conv_B.weight "
                              f"{None if b is None else tuple(b.shape)} are not a RepAdapter's [r, d, 1] and "
                              "[d, r/G, 1] conv weights")
    head = state_dict.get("head.weight")
    return OfficialShape(
        depth=max(i for i, _ in found) + 1, dim=a.shape[1], hidden=a.shape[0], groups=a.shape[0] // b.shape[1],
        placement="block" if any(k == "mlp" for _, k in found) else "attn",
        num_classes=None if head is None or head.ndim != 2 else head.shape[0],
    )


def official_preprocess(size: int) -> PreprocessConfig:
    """The official code's transform (its ``dataset.py``: ``Resize((size, size), bicubic)``, ``ToTensor``,
    ``Normalize`` with ImageNet's mean and std): the whole image squashed to a square, no crop. Not the timm
    default of its ViT (mean and std 0.5, crop 0.9): a task is served with what it was trained on."""
    return PreprocessConfig(input_size=(3, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
                            crop_pct=1.0, crop_mode="squash")


def read_labels(text: str) -> list[str]:
    """Class names from a labels file: one per line, blank lines and surrounding spaces ignored."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def official_bundle(state_dict: dict[str, Tensor], backbone: Backbone, *, task: str, scale: float,
                    placement: str | None = None, labels: list[str] | None = None,
                    description: str = "") -> TaskBundle:
    """A task bundle of an official checkpoint for ``backbone`` (the one the task will be served on).

    ``placement`` defaults to what the keys tell and, when given, must agree with them; ``labels`` default to
    ``class_0 ..`` and must number the head's rows. The manifest takes the backbone's arch and fingerprint, and
    the official code's preprocessing (:func:`official_preprocess`) at the backbone's input size. Slots are
    attached to ``backbone.model`` (a backbone without slots; it is left with empty ones). The bundle passes
    every check the service runs at registration except the probe forward. Raises
    :class:`CheckpointError` (what the checkpoint lacks) or :class:`BundleError` (what does not fit).
    """
    shape = inspect_official(state_dict)
    if placement is not None and placement not in PLACEMENTS:
        raise CheckpointError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "attn" and shape.placement == "block":
        raise CheckpointError("the checkpoint has MLP adapters (blocks.<i>.adapter_mlp): its placement is 'block', "
                              "not 'attn'")
    placement = placement or shape.placement
    sites = attach_slots(backbone.model, placement)  # checked against PLACEMENTS above
    imported = import_official(state_dict, scale=scale, sites=sites)
    if imported.num_classes is None:
        raise CheckpointError("the checkpoint has no head (head.weight, head.bias): a task needs one")
    labels = labels if labels is not None else [f"class_{i}" for i in range(imported.num_classes)]
    if len(labels) != imported.num_classes:
        raise BundleError(f"the head has {imported.num_classes} classes but {len(labels)} labels were given")
    try:
        manifest = Manifest(
            name=task, labels=labels, method="repadapter",
            adapter=AdapterConfig(hidden=shape.hidden, groups=shape.groups, scale=scale, placement=placement),
            backbone=BackboneRef(arch=backbone.arch, fingerprint=backbone.fingerprint),
            preprocess=official_preprocess(backbone.preprocess.input_size[-1]), description=description,
        )
    except ValidationError as e:
        raise BundleError(f"invalid task: {describe_validation_error(e)}") from e
    bundle = imported.bundle(manifest)
    bundle.check_compatible(backbone.arch, backbone.fingerprint, sites, backbone.num_features)
    return bundle
