"""The trained model: frozen backbone (+ RepAdapters in its slots) and a linear head, and its train mode.

The train-mode policy is where the BN-in-eval trap (DESIGN.md §1) is avoided: for ``repadapter`` the
backbone stays in eval mode (frozen BatchNorm statistics, so folding an adapter's constant into a BN
running mean stays exact); only adapters, dropout and DropPath modules switch to train mode. ``full``
fine-tuning trains everything, BatchNorm statistics included.
"""

from __future__ import annotations

import logging

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from repadapter import Backbone, RepAdapter, Site, add_adapters, load_backbone

from .config import Method, TrainConfig

log = logging.getLogger(__name__)


class TaskModel(nn.Module):
    """``head(features(x))``: the backbone, or nothing for a linear probe on cached features ``[B, F]``."""

    def __init__(self, features: nn.Module | None, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.features = features if features is not None else nn.Identity()
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # [B, C]


def load_task_backbone(cfg: TrainConfig, device: torch.device) -> Backbone:
    """The backbone of ``cfg``, with stochastic depth when the method trains through it and timm allows it.

    Drop-path has no parameters, so the fingerprint, and thus bundle compatibility, is unchanged.
    """
    kwargs = {"drop_path_rate": cfg.drop_path} if cfg.method != "linear" and cfg.drop_path > 0 else {}
    try:
        return load_backbone(cfg.backbone, cfg.checkpoint, device=str(device), seed=cfg.seed, **kwargs)
    except TypeError:
        log.warning("backbone %s does not take drop_path_rate: training without drop-path", cfg.backbone)
        return load_backbone(cfg.backbone, cfg.checkpoint, device=str(device), seed=cfg.seed)


def build_model(cfg: TrainConfig, backbone: Backbone, sites: list[Site], num_classes: int,
                scale: float) -> TaskModel:
    """A fresh, seeded model for one trial. ``sites`` are the backbone's slots (``repadapter`` only).

    ``linear`` gets a head alone (it trains on cached features); ``full`` unfreezes the backbone, which
    therefore cannot be reused by another trial.
    """
    torch.manual_seed(cfg.seed)
    if cfg.method == "repadapter":
        add_adapters(sites, cfg.hidden, cfg.groups, scale, cfg.dropout)
    if cfg.method == "full":
        backbone.model.requires_grad_(True)
    features = None if cfg.method == "linear" else backbone.model
    return TaskModel(features, backbone.num_features, num_classes).to(backbone.device)


def set_train_mode(model: TaskModel, method: Method) -> None:
    """Train mode for what trains, eval mode (frozen BatchNorm statistics) for the frozen backbone."""
    if method == "full":
        model.train()
        return
    model.eval()
    for module in model.modules():
        if isinstance(module, RepAdapter | nn.Dropout | DropPath):
            module.train()
    model.head.train()


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_state(model: TaskModel, method: Method) -> dict[str, Tensor]:
    """What a checkpoint must hold to restore the model: trainable parameters, or everything for ``full``."""
    if method == "full":
        return dict(model.state_dict())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in model.state_dict().items() if n in names}


def adapters_of(sites: list[Site]) -> dict[str, RepAdapter]:
    """The adapters currently in the slots (empty for a linear probe)."""
    return {s.name: s.slot.adapter for s in sites if s.slot.adapter is not None}
