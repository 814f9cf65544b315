"""Mixed-task batches: run several tasks' adapters unmerged, per row, in one forward pass.

Like multi-LoRA servers (Punica, S-LoRA), the base weights stay live and each row's input at each site
goes through its own task's adapter: the adapters of the batch's tasks are stacked (zero-padded to the
largest hidden size; a task without an adapter at a site gets zeros, i.e. the identity), gathered per row
and applied with two batched matmuls. Exactly equal in math to the per-task merged forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .adapter import AdapterWeights, Layout
from .inject import Site


class RowAdapters:
    """The per-row adapter tensors of one site for one batch (set as ``AdapterSlot.mixed``)."""

    def __init__(self, a: Tensor, bias_a: Tensor, b: Tensor, bias_b: Tensor, scale: Tensor, layout: Layout):
        self.a, self.bias_a, self.b, self.bias_b, self.scale = a, bias_a, b, bias_b, scale  # [B, r, d] ...
        self.layout = layout

    def __call__(self, x: Tensor) -> Tensor:
        if self.layout == "token":  # x [B, N, d]
            h = torch.baddbmm(self.bias_a[:, None, :], x, self.a.transpose(1, 2))  # [B, N, r]
            y = torch.baddbmm(self.bias_b[:, None, :], h, self.b.transpose(1, 2))  # [B, N, d]
            return x + self.scale[:, None, None] * y
        flat = x.flatten(2)  # [B, C, HW]
        h = torch.baddbmm(self.bias_a[:, :, None], self.a, flat)  # [B, r, HW]
        y = torch.baddbmm(self.bias_b[:, :, None], self.b, h)  # [B, C, HW]
        return x + self.scale[:, None, None, None] * y.view_as(x)


def _stack(site: Site, tasks: Sequence[dict[str, AdapterWeights]], ref: Tensor) -> list[Tensor]:
    """Stacked ``[T, r, d], [T, r], [T, d, r], [T, d], [T]`` for one site, zero-padded to the max r."""
    present = [t.get(site.name) for t in tasks]
    r = max((w.hidden for w in present if w is not None), default=1)
    n, d = len(tasks), site.dim
    a = ref.new_zeros(n, r, d)
    bias_a = ref.new_zeros(n, r)
    b = ref.new_zeros(n, d, r)
    bias_b = ref.new_zeros(n, d)
    scale = ref.new_zeros(n)
    for i, w in enumerate(present):
        if w is None:
            continue
        k = w.hidden
        a[i, :k] = w.weight_a
        bias_a[i, :k] = w.bias_a
        b[i, :, :k] = w.dense_b()
        bias_b[i] = w.bias_b
        scale[i] = w.scale
    return [a, bias_a, b, bias_b, scale]


@contextmanager
def mixed_batch(sites: list[Site], tasks: Sequence[dict[str, AdapterWeights]], rows: Tensor) -> Iterator[None]:
    """Within the block, a forward pass applies ``tasks[rows[i]]``'s adapters to row ``i``.

    ``rows`` is a long tensor ``[B]`` of indices into ``tasks``. The base weights must be live (no task
    merged): the caller (the engine's worker) guarantees that.
    """
    try:
        for site in sites:
            ref = site.targets[0].weight
            stacked = _stack(site, tasks, ref)
            site.slot.mixed = RowAdapters(*(t[rows.to(ref.device)] for t in stacked), layout=site.layout)
        yield
    finally:
        for site in sites:
            site.slot.mixed = None
