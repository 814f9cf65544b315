"""Mixed-task batches: run several tasks' adapters unmerged, per row, in one forward pass.

Like multi-LoRA servers (Punica, S-LoRA), the base weights stay live and each row's input at each site
goes through its own task's adapter: the adapters of the batch's tasks are stacked (zero-padded to the
largest hidden size; a task without an adapter at a site gets zeros, i.e. the identity), gathered per row
and applied with two batched matmuls (:class:`RowAdapters`). Exactly equal in math to the per-task
merged forward.

A server keeps each task's adapters folded for this (:class:`PackedFolds`: every site's fold in ONE
buffer, computed with a handful of indexed ops from the bundle's buffer), so a batch of tasks that share
a layout costs one stack and one gather in all, not three of each per site.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import AdapterWeights, Layout
from .bundle import Layout as BundleLayout
from .bundle import PackedBundle, layout_positions, layout_sites
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


@dataclass(frozen=True)
class SiteFold:
    """Where one site's fold lies in a :class:`PackedFolds` buffer: ``a [r, d]``, ``sb [d, r]``, ``m [d]``."""

    name: str
    hidden: int
    dim: int
    a: int
    sb: int
    m: int

    def views(self, buffer: Tensor) -> RowFold:
        """The site's fold as views of ``buffer``: ``[F]`` gives ``[r, d]``..., ``[B, F]`` gives ``[B, r, d]``..."""
        r, d = self.hidden, self.dim
        a = buffer[..., self.a:self.a + r * d].unflatten(-1, (r, d))
        sb = buffer[..., self.sb:self.sb + d * r].unflatten(-1, (d, r))
        return RowFold(a, sb, buffer[..., self.m:self.m + d])


@dataclass(frozen=True, eq=False)
class FoldLayout:
    """Where every site's fold lies in a task's fold buffer, and the gathers that fill it from the task's
    bundle buffer (index tensors, built once per bundle layout: every task of one backbone and hidden size
    shares them)."""

    sites: tuple[SiteFold, ...]
    size: int
    index: dict[str, Tensor]  # CPU int64: a_src/a_dst, b_src/sb_dst, bb_src/m_dst, ba_src/m_row

    def on(self, device: torch.device) -> dict[str, Tensor]:
        return _index_on(self, str(device))


@functools.lru_cache(maxsize=64)
def _index_on(layout: FoldLayout, device: str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in layout.index.items()}


@functools.lru_cache(maxsize=64)
def fold_layout(bundle_layout: BundleLayout, groups: int) -> FoldLayout:
    """The fold layout of bundles with ``bundle_layout`` (keys ``adapter.<site>.<param>``, shapes checked
    by :class:`PackedBundle`) and ``groups``."""
    where = layout_positions(bundle_layout)
    sites, size = [], 0
    idx: dict[str, list[Tensor]] = {k: [] for k in ("a_src", "a_dst", "b_src", "sb_dst", "bb_src", "m_dst", "ba_src",
                                                     "m_row")}
    for name in layout_sites(bundle_layout):
        (oa, (r, d)), (oba, _), (ob, _), (obb, _) = (where[f"adapter.{name}.{p}"] for p in
                                                       ("weight_a", "bias_a", "weight_b", "bias_b"))
        site = SiteFold(name, r, d, size, size + r * d, size + 2 * r * d)
        sites.append(site)
        size += 2 * r * d + d
        rg, dg = r // groups, d // groups
        i, k = torch.arange(d)[:, None], torch.arange(rg)[None, :]
        idx["a_src"].append(oa + torch.arange(r * d))
        idx["a_dst"].append(site.a + torch.arange(r * d))
        idx["b_src"].append((ob + i * rg + k).reshape(-1))  # B [d, r/G]: output i sees hidden group i // dg
        idx["sb_dst"].append((site.sb + i * r + (i // dg) * rg + k).reshape(-1))  # its block of the dense [d, r]
        idx["bb_src"].append(obb + torch.arange(d))
        idx["m_dst"].append(site.m + torch.arange(d))
        idx["ba_src"].append((oba + (i // dg) * rg + k).reshape(-1))
        idx["m_row"].append((site.m + i).expand(d, rg).reshape(-1))
    index = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in idx.items()}
    return FoldLayout(tuple(sites), size, index)


@dataclass(frozen=True, eq=False)
class PackedFolds:
    """Every site's :class:`RowFold` of one task in one buffer ``[F]`` (serving dtype and device)."""

    buffer: Tensor
    layout: FoldLayout

    @classmethod
    def of(cls, packed: PackedBundle, buffer: Tensor | None = None, dtype: torch.dtype | None = None) -> PackedFolds:
        """Fold a bundle whose (float32) buffer is ``buffer`` (default: its own), in float32, cast to ``dtype``:
        ``a = A``, ``sb = s B`` (dense, block-diagonal), ``m = s (B a + b)``, with seven indexed ops for all
        sites together."""
        src = packed.buffer if buffer is None else buffer
        cfg = packed.manifest.adapter
        layout = fold_layout(packed.layout, cfg.groups)
        ix = layout.on(src.device)
        out = src.new_zeros(layout.size)
        out[ix["a_dst"]] = src[ix["a_src"]]
        sb = src[ix["b_src"]] * cfg.scale
        out[ix["sb_dst"]] = sb
        out[ix["m_dst"]] = src[ix["bb_src"]] * cfg.scale
        out.index_add_(0, ix["m_row"], sb * src[ix["ba_src"]])
        return cls(out.to(dtype or out.dtype), layout)

    def sites(self) -> dict[str, RowFold]:
        """Per site, views of the buffer (the per-site form :func:`mixed_batch` also takes)."""
        return {s.name: s.views(self.buffer) for s in self.layout.sites}


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
def mixed_batch(sites: list[Site], tasks: Sequence[TaskAdapters | PackedFolds | None], rows: Tensor) -> Iterator[None]:
    """Within the block, a forward pass applies ``tasks[rows[i]]``'s adapters to row ``i``.

    ``rows`` is a long tensor ``[B]`` of indices into ``tasks``; a task is its adapters by site, its
    :class:`PackedFolds`, or ``None`` / ``{}`` (no adapters: the identity). When every task with adapters is
    packed with one layout, the batch is one stack and one gather of the tasks' fold buffers; otherwise
    the adapters are stacked per site (zero-padded to the largest hidden size). The base weights must be
    live (no task merged): the caller (the engine's worker) guarantees that.
    """
    index = rows.to(sites[0].targets[0].weight.device) if sites else rows
    packed = [t for t in tasks if isinstance(t, PackedFolds)]
    try:
        if packed and len({id(p.layout) for p in packed}) == 1 and all(
                isinstance(t, PackedFolds) or not t for t in tasks):
            _set_packed(sites, tasks, packed[0], index)
        else:
            tasks = [t.sites() if isinstance(t, PackedFolds) else (t or {}) for t in tasks]
            for site in sites:
                ref = site.targets[0].weight
                site.slot.mixed = RowAdapters(*(t[index] for t in _stack(site, tasks, ref)), layout=site.layout)
        yield
    finally:
        for site in sites:
            site.slot.mixed = None


def _set_packed(sites: list[Site], tasks: Sequence[TaskAdapters | PackedFolds | None], first: PackedFolds,
                index: Tensor) -> None:
    """Every task's folds share ``first``'s layout (tasks without adapters: zeros, the identity)."""
    zeros = None
    buffers = []
    for t in tasks:
        if isinstance(t, PackedFolds):
            buffers.append(t.buffer)
        else:
            zeros = first.buffer.new_zeros(first.buffer.shape) if zeros is None else zeros
            buffers.append(zeros)
    rows = torch.stack(buffers).index_select(0, index)  # [B, F]
    by_name = {s.name: s for s in sites}
    for fold in first.layout.sites:
        site = by_name[fold.name]
        site.slot.mixed = RowAdapters(*fold.views(rows).tensors(), layout=site.layout)
