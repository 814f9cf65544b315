"""Mixed-task batches: run several tasks' adapters unmerged, per row, in one forward pass.

Like multi-LoRA servers (Punica, S-LoRA), the base weights stay live and each row's input at each site
goes through its own task's adapter: the adapters of the batch's tasks are stacked (zero-padded to the
largest hidden size; a task without an adapter at a site gets zeros, i.e. the identity), gathered per row
and applied with two batched matmuls (:class:`RowAdapters`). Exactly equal in math to the per-task
merged forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import AdapterWeights, Layout
from .inject import Site


class RowAdapters:
    """The per-row adapter tensors of one site for one batch (set as ``AdapterSlot.mixed``).

    Folded so that a forward makes two passes over the activation instead of four (branch, scale,
    residual): ``x + s (B (A x + a) + b) = x + (s B) (A x) + m`` with ``m = s (B a + b)``, i.e. one small
    ``bmm`` into the hidden size, one ``baddbmm`` that adds the up-projection to ``x``, and the constant.
    """

    def __init__(self, a: Tensor, sb: Tensor, m: Tensor, layout: Layout) -> None:
        self.a, self.sb, self.m = a, sb, m  # [B, r, d], [B, d, r], [B, d]
        self.layout = layout

    def __call__(self, x: Tensor) -> Tensor:
        if self.layout == "token":  # x [B, N, d]
            h = torch.bmm(x, self.a.transpose(1, 2))  # [B, N, r]
            return torch.baddbmm(x, h, self.sb.transpose(1, 2)).add_(self.m[:, None, :])
        flat = x.flatten(2)  # [B, C, HW]
        h = torch.bmm(self.a, flat)  # [B, r, HW]
        return torch.baddbmm(flat, self.sb, h).add_(self.m[:, :, None]).view_as(x)


@dataclass(frozen=True)
class RowFold:
    """One adapter in the form :class:`RowAdapters` applies: ``a [r, d]``, ``sb = s B [d, r]``,
    ``m = s (B a + b) [d]``. Computing it is a few small ops per site; a server keeps it per task (in the
    serving dtype and device), so assembling a mixed batch is three stacks and three gathers per site."""

    a: Tensor
    sb: Tensor
    m: Tensor

    @classmethod
    def of(cls, w: AdapterWeights) -> RowFold:
        b = w.dense_b()
        return cls(w.weight_a, w.scale * b, w.scale * torch.addmv(w.bias_b, b, w.bias_a))

    @property
    def hidden(self) -> int:
        return self.a.shape[0]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.a, self.sb, self.m


TaskAdapters = Mapping[str, AdapterWeights | RowFold]
"""One task's adapters by site name, as bundles hold them or already folded (:meth:`RowFold.of`)."""


def _stack(site: Site, tasks: Sequence[TaskAdapters], ref: Tensor) -> list[Tensor]:
    """Stacked ``a [T, r, d]``, ``s B [T, d, r]`` and ``m [T, d]`` for one site, zero-padded to the max r
    (a task without an adapter at the site gets zeros: the identity)."""
    present = [t.get(site.name) for t in tasks]
    folds = [None if w is None else w if isinstance(w, RowFold) else RowFold.of(w) for w in present]
    hidden = {f.hidden for f in folds if f is not None}
    if len(hidden) == 1 and None not in folds:  # the common case: three stacks
        return [torch.stack(ts).to(ref) for ts in zip(*(f.tensors() for f in folds), strict=True)]
    r, n, d = max(hidden, default=1), len(tasks), site.dim
    out = [ref.new_zeros(n, r, d), ref.new_zeros(n, d, r), ref.new_zeros(n, d)]
    for i, f in enumerate(folds):
        if f is not None:
            k = f.hidden
            out[0][i, :k], out[1][i, :, :k], out[2][i] = f.tensors()
    return out


@contextmanager
def mixed_batch(sites: list[Site], tasks: Sequence[TaskAdapters], rows: Tensor) -> Iterator[None]:
    """Within the block, a forward pass applies ``tasks[rows[i]]``'s adapters to row ``i``.

    ``rows`` is a long tensor ``[B]`` of indices into ``tasks``. The base weights must be live (no task
    merged): the caller (the engine's worker) guarantees that.
    """
    index = rows.to(sites[0].targets[0].weight.device) if sites else rows
    try:
        for site in sites:
            ref = site.targets[0].weight
            site.slot.mixed = RowAdapters(*(t[index] for t in _stack(site, tasks, ref)), layout=site.layout)
        yield
    finally:
        for site in sites:
            site.slot.mixed = None
