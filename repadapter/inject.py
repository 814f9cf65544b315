"""Find where adapters go in a timm model and attach empty adapter slots there.

A *site* is the input of a module whose only consumers are linear maps we can fold into:
- ViT-family blocks (timm ``vit_*``, ``deit*``, ``beit*``, ``eva*`` with a plain MLP): ``attn`` (its input
  feeds only ``attn.qkv``) and ``mlp`` (feeds only ``mlp.fc1``), the official RepAdapter placement.
- Inverted-residual CNN blocks (timm ``mobilenetv2_*``, ``efficientnet_*``, ``tf_efficientnet_lite*``):
  the 1x1 ``conv_pw`` and ``conv_pwl``; they have no bias, so the constant folds into the next
  BatchNorm's running mean (exact in eval mode).

Each site gets an :class:`AdapterSlot` child (``adapter_attn``, ``adapter_mlp``, ``adapter_pw``,
``adapter_pwl``: the official checkpoint naming) which, while it holds an adapter, transforms the
consuming module's input through a forward pre-hook, so timm's own block forward (LayerScale,
drop-path, fused attention) runs untouched. Layouts we do not
know raise :class:`UnsupportedBackbone` instead of being adapted wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .adapter import Layout, RepAdapter
from .errors import UnsupportedBackbone

Placement = Literal["block", "attn"]
PLACEMENTS: tuple[str, ...] = ("block", "attn")


@dataclass
class Target:
    """A linear map fed by a site: its live weight and the live vectors its constant term folds into.

    ``weight`` is viewed as ``[out, in]``; the concatenation of ``bias_parts`` is ``[out]``; the fold adds
    ``bias_sign * dc`` to it (``-1`` for a BatchNorm running mean, which is subtracted before scaling).
    """

    weight: Tensor
    bias_parts: tuple[Tensor, ...]
    bias_sign: float = 1.0

    @property
    def weight_2d(self) -> Tensor:
        return self.weight.view(self.weight.shape[0], -1)


class AdapterSlot(nn.Module):
    """What transforms one site's input: nothing (base or merged weights), one adapter, or a mixed batch.

    The slot is an identity until ``adapter`` (training, unmerged serving) or ``mixed`` (per-row
    adapters of several tasks in one batch, set by :mod:`repadapter.mixed`) is set. Its forward pre-hook
    on the consuming module exists only while one of them is set: an empty slot costs nothing, so a
    merged forward runs exactly the plain backbone's modules (no Python hook dispatch per layer).
    """

    def __init__(self, dim: int, layout: Layout, consumer: nn.Module | None = None) -> None:
        super().__init__()
        self.dim, self.layout = dim, layout
        object.__setattr__(self, "_consumer", consumer)  # a plain reference, not a submodule
        object.__setattr__(self, "_hook", None)
        self.adapter: RepAdapter | None = None
        self.mixed: Any = None

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("adapter", "mixed"):
            self._sync_hook()

    def _sync_hook(self) -> None:
        needed = getattr(self, "adapter", None) is not None or getattr(self, "mixed", None) is not None
        hook: RemovableHandle | None = self._hook
        if needed and hook is None and self._consumer is not None:
            hook = self._consumer.register_forward_pre_hook(_slot_hook(self), with_kwargs=True)
        elif not needed and hook is not None:
            hook.remove()
            hook = None
        object.__setattr__(self, "_hook", hook)

    @property
    def hooked(self) -> bool:
        """Whether the slot currently intercepts its consumer's input."""
        return self._hook is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.mixed is not None:
            return self.mixed(x)
        if self.adapter is not None:
            return self.adapter(x)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layout={self.layout}"


@dataclass
class Site:
    """One adapter position: ``name`` is the slot's module path, the key used in bundles."""

    name: str
    slot: AdapterSlot
    targets: list[Target]

    @property
    def dim(self) -> int:
        return self.slot.dim

    @property
    def layout(self) -> Layout:
        return self.slot.layout


def _slot_hook(slot: AdapterSlot):
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (slot(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: slot(kwargs[key])}

    return hook


def _linear_target(linear: nn.Module, where: str, owner: nn.Module | None = None) -> Target:
    if type(linear) is not nn.Linear:
        raise UnsupportedBackbone(f"{where} is {type(linear).__name__}, expected nn.Linear")
    q_bias = getattr(owner, "q_bias", None) if owner is not None else None
    if q_bias is not None:  # BEiT/EVA: qkv has no bias, q/k/v biases are separate tensors
        if linear.bias is not None:
            raise UnsupportedBackbone(f"{where} has both a bias and separate q/k/v biases")
        return Target(linear.weight, (owner.q_bias, owner.k_bias, owner.v_bias))
    if linear.bias is None:  # a zero bias gives the constant term somewhere to go; forward unchanged
        linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features), requires_grad=False)
    return Target(linear.weight, (linear.bias,))


def _conv_target(conv: nn.Module, bn: nn.Module, where: str) -> Target:
    if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        raise UnsupportedBackbone(f"{where} must be a plain 1x1 nn.Conv2d (stride 1, groups 1), got {conv}")
    if conv.bias is not None:
        return Target(conv.weight, (conv.bias,))
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
        raise UnsupportedBackbone(f"{where} has no bias and is not followed by a BatchNorm2d with running stats")
    return Target(conv.weight, (bn.running_mean,), bias_sign=-1.0)


def _vit_sites(name: str, block: nn.Module, placement: Placement) -> list[tuple[str, nn.Module, Target, int]]:
    attn, mlp = block.attn, block.mlp
    if getattr(attn, "gate", None) is not None or getattr(attn, "qkv", None) is None:
        raise UnsupportedBackbone(f"{name}.attn has no single qkv projection (gated or split q/k/v)")
    qkv = _linear_target(attn.qkv, f"{name}.attn.qkv", owner=attn)
    sites = [("adapter_attn", attn, qkv, attn.qkv.in_features)]
    if placement == "block":
        fc1 = getattr(mlp, "fc1", None)
        if fc1 is None or getattr(mlp, "fc1_g", None) is not None:
            raise UnsupportedBackbone(f"{name}.mlp has no single fc1 (e.g. SwiGLU): not foldable as one map")
        sites.append(("adapter_mlp", mlp, _linear_target(fc1, f"{name}.mlp.fc1"), fc1.in_features))
    return sites


def _cnn_sites(name: str, block: nn.Module, placement: Placement) -> list[tuple[str, nn.Module, Target, int]]:
    if placement != "block":
        raise UnsupportedBackbone(f"placement {placement!r} needs attention blocks; CNN backbones take 'block'")
    if getattr(block, "conv_s2d", None) is not None:
        raise UnsupportedBackbone(f"{name} has a space-to-depth stem; not supported")
    if isinstance(block, InvertedResidual):
        return [
            ("adapter_pw", block.conv_pw, _conv_target(block.conv_pw, block.bn1, f"{name}.conv_pw"),
             block.conv_pw.in_channels),
            ("adapter_pwl", block.conv_pwl, _conv_target(block.conv_pwl, block.bn3, f"{name}.conv_pwl"),
             block.conv_pwl.in_channels),
        ]
    return [("adapter_pw", block.conv_pw, _conv_target(block.conv_pw, block.bn2, f"{name}.conv_pw"),
             block.conv_pw.in_channels)]


def _is_vit_block(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("norm1", "attn", "norm2", "mlp"))


def find_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model`` that take adapters, as ``(path, block)``, in forward order."""
    return [(n, m) for n, m in model.named_modules()
            if _is_vit_block(m) or isinstance(m, InvertedResidual | DepthwiseSeparableConv)]


def attach_slots(model: nn.Module, placement: Placement = "block") -> list[Site]:
    """Attach an empty :class:`AdapterSlot` at every site of ``model`` and return the sites.

    Idempotence is refused: attaching twice raises, since two hooks would apply adapters twice.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if any(isinstance(m, AdapterSlot) for m in model.modules()):
        raise UnsupportedBackbone("model already has adapter slots attached")
    blocks = find_sites(model)
    if not blocks:
        raise UnsupportedBackbone(
            f"{type(model).__name__} has no ViT blocks (norm1/attn.qkv/norm2/mlp.fc1) and no inverted-residual "
            "blocks (conv_pw/conv_pwl): supported families are vit_*, deit*, beit*, eva* (plain MLP), "
            "mobilenetv2_*, efficientnet_*, tf_efficientnet_lite*"
        )
    sites: list[Site] = []
    for name, block in blocks:
        found = _vit_sites(name, block, placement) if _is_vit_block(block) else _cnn_sites(name, block, placement)
        for slot_name, consumer, target, dim in found:
            layout: Layout = "token" if _is_vit_block(block) else "channel"
            slot = AdapterSlot(dim, layout, consumer)
            block.add_module(slot_name, slot)
            sites.append(Site(f"{name}.{slot_name}", slot, [target]))
    return sites


def add_adapters(sites: list[Site], hidden: int = 8, groups: int = 2, scale: float = 1.0,
                 dropout: float = 0.1) -> dict[str, RepAdapter]:
    """Put a fresh (identity-initialised) trainable :class:`RepAdapter` into every slot."""
    adapters = {}
    for site in sites:
        ref = site.targets[0].weight
        adapter = RepAdapter(site.dim, hidden, groups, scale, dropout, site.layout).to(ref.device)
        site.slot.adapter = adapter
        adapters[site.name] = adapter
    return adapters


def clear_adapters(sites: list[Site]) -> None:
    """Empty every slot (the model becomes the plain backbone again, given base weights). Public API
    (docs/CORE_API.md: the undo of :func:`add_adapters`, e.g. after training), although only tests call it here."""
    for site in sites:
        site.slot.adapter = None
        site.slot.mixed = None
