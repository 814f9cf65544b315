"""The RepAdapter module: a linear (affine) bottleneck ``x + s * (B (A x + a) + b)``.

A is dense ``[r, d]``; B is grouped like the paper's ``Conv1d(r, d, 1, groups=G)``: its weight is stored
as ``[d, r/G]`` and used as the block-diagonal dense ``[d, r]`` (``dense_up``). There is no activation,
so the whole adapter is affine and folds into the next linear map (see ``merge.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Layout = Literal["token", "channel"]
"""``token``: features on the last dim (``[B, N, D]``); ``channel``: on dim 1 (``[B, C, H, W]``)."""


def dense_up(weight_b: Tensor, groups: int) -> Tensor:
    """Block-diagonal dense form ``[d, r]`` of a grouped up-projection weight ``[d, r/groups]``.

    Output chunk ``j`` (rows ``j*d/G ..``) sees only hidden chunk ``j`` (columns ``j*r/G ..``), exactly as
    ``Conv1d(r, d, 1, groups=G)`` does. Gradients flow only into the stored blocks.
    """
    d = weight_b.shape[0]
    if groups == 1:
        return weight_b
    if d % groups:
        raise ValueError(f"dim {d} is not divisible by groups={groups}")
    return torch.block_diag(*weight_b.chunk(groups, dim=0))  # [d, rg * groups]


def shape_problem(shapes: dict[str, tuple[int, ...]], dim: int, groups: int) -> str:
    """What keeps an adapter with parameter ``shapes`` (``weight_a``, ``bias_a``, ``weight_b``, ``bias_b``)
    from fitting an input of width ``dim`` with ``groups``, or ``""``: the one statement of the shape rules."""
    r = shapes["weight_a"][0]
    if r < 1:
        return "weight_a has no rows: an adapter needs hidden >= 1 (a task without adapters has none at all)"
    if groups < 1 or r % groups or dim % groups:
        return f"hidden={r} and dim={dim} must both be divisible by groups={groups}"
    want = {"weight_a": (r, dim), "bias_a": (r,), "weight_b": (dim, r // groups), "bias_b": (dim,)}
    for name, shape in want.items():
        if shapes[name] != shape:
            return f"{name} has shape {shapes[name]}, expected {shape}"
    return ""


@dataclass
class AdapterWeights:
    """Plain tensors of one adapter: what bundles store and what merging and mixed batches consume.

    Shapes: ``weight_a [r, d]``, ``bias_a [r]``, ``weight_b [d, r/groups]``, ``bias_b [d]``.
    """

    weight_a: Tensor
    bias_a: Tensor
    weight_b: Tensor
    bias_b: Tensor
    groups: int
    scale: float

    @property
    def dim(self) -> int:
        return self.weight_a.shape[1]

    @property
    def hidden(self) -> int:
        return self.weight_a.shape[0]

    def dense_b(self) -> Tensor:
        """B as a dense ``[d, r]`` matrix."""
        return dense_up(self.weight_b, self.groups)

    def tensors(self) -> dict[str, Tensor]:
        return {"weight_a": self.weight_a, "bias_a": self.bias_a,
                "weight_b": self.weight_b, "bias_b": self.bias_b}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AdapterWeights:
        return AdapterWeights(
            **{k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()},
            groups=self.groups, scale=self.scale,
        )

    def validate(self, dim: int) -> None:
        """Raise ``ValueError`` unless the shapes fit an input of width ``dim`` and all values are finite."""
        problem = shape_problem({k: tuple(t.shape) for k, t in self.tensors().items()}, dim, self.groups)
        if problem:
            raise ValueError(problem)
        for name, t in self.tensors().items():
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} has non-finite values")
        if not torch.isfinite(torch.tensor(self.scale)):
            raise ValueError("scale is not finite")


def apply_affine(x: Tensor, a: Tensor, bias_a: Tensor, b_dense: Tensor, bias_b: Tensor, layout: Layout,
                 dropout: nn.Module | None = None) -> Tensor:
    """The adapter branch ``B (drop(A x + a)) + b`` (without the residual or the scale)."""
    if layout == "token":
        h = F.linear(x, a, bias_a)
        if dropout is not None:
            h = dropout(h)
        return F.linear(h, b_dense, bias_b)
    h = F.conv2d(x, a[:, :, None, None], bias_a)
    if dropout is not None:
        h = dropout(h)
    return F.conv2d(h, b_dense[:, :, None, None], bias_b)


class RepAdapter(nn.Module):
    """A trainable RepAdapter, initialised as the identity (A xavier-uniform, B and biases zero).

    ``dropout`` acts on the hidden vector in training mode only, so the eval-mode module is exactly the
    affine map that ``merge.py`` folds.
    """

    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.1,
                 layout: Layout = "token") -> None:
        super().__init__()
        if hidden % groups or dim % groups:
            raise ValueError(f"hidden={hidden} and dim={dim} must be divisible by groups={groups}")
        self.dim, self.hidden, self.groups, self.scale, self.layout = dim, hidden, groups, float(scale), layout
        self.weight_a = nn.Parameter(torch.empty(hidden, dim))
        self.bias_a = nn.Parameter(torch.zeros(hidden))
        self.weight_b = nn.Parameter(torch.zeros(dim, hidden // groups))
        self.bias_b = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.weight_a)

    def forward(self, x: Tensor) -> Tensor:
        branch = apply_affine(x, self.weight_a, self.bias_a, dense_up(self.weight_b, self.groups),
                              self.bias_b, self.layout, self.dropout)
        return x + self.scale * branch

    def weights(self) -> AdapterWeights:
        """Detached tensors of this adapter (for bundles and merging)."""
        return AdapterWeights(self.weight_a.detach(), self.bias_a.detach(), self.weight_b.detach(),
                              self.bias_b.detach(), self.groups, self.scale)

    @classmethod
    def from_weights(cls, w: AdapterWeights, layout: Layout = "token", dropout: float = 0.0) -> RepAdapter:
        module = cls(w.dim, w.hidden, w.groups, w.scale, dropout, layout)
        with torch.no_grad():
            for name, t in w.tensors().items():
                getattr(module, name).copy_(t)
        return module.to(w.weight_a.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, groups={self.groups}, scale={self.scale}, layout={self.layout}"
