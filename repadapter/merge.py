"""Folding adapters into the backbone's linear maps, and switching tasks without drift.

For an adapter ``M x + m`` (``M = I + s B A``, ``m = s (B a + b)``) in front of ``z = W y + c``:

    W' = W + (s W B) A = W + U A          c' = c + s W (B a + b) = c + dc

``U [out, r]`` and ``dc [out]`` depend only on the base weights and the adapter, so they are computed
once per task (:class:`TaskDelta`); a switch is then one ``addmm`` per target layer, reading the pristine
base weights and writing the live ones. Because every switch recomputes from the same pristine copy
with the same deterministic kernel, switching never accumulates error: going back to base is a copy,
and a task's merged weights are bitwise identical every time it becomes active.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import AdapterWeights
from .errors import BundleError
from .inject import Site, Target

log = logging.getLogger(__name__)


def fold_delta(weight: Tensor, adapter: AdapterWeights) -> tuple[Tensor, Tensor]:
    """``(U, dc)`` of one adapter folded into the linear map with ``weight [out, in]``.

    Computed from the ORIGINAL weight (never from a view that a merge then updates in place), in float32 or
    in the weight's dtype when it is wider: a float32 fold in a float64 model would leave 1e-8..1e-7 of
    error where the model's own rounding is 1e-16. Returned in that dtype; callers cast to the model dtype.
    """
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    adapter = adapter.to(device=w.device, dtype=w.dtype)
    u = adapter.scale * (w @ adapter.dense_b())  # [out, r]
    dc = u @ adapter.bias_a + adapter.scale * (w @ adapter.bias_b)  # [out]
    return u, dc


@dataclass
class TargetDelta:
    """Precomputed fold for one target layer: ``W' = W + u @ a``; each bias part ``+= dc_part``.

    ``dc_parts`` are ``dc`` split like the target's bias parts, with the target's ``bias_sign`` applied
    (exact: a sign flip), so a switch adds them without any per-target arithmetic.
    """

    u: Tensor  # [out, r]
    a: Tensor  # [r, in]
    dc_parts: tuple[Tensor, ...]


@dataclass(eq=False)
class TaskDelta:
    """Everything a switch to one task needs, per target layer, in the model's dtype and device."""

    name: str
    targets: dict[int, TargetDelta]  # index into the switcher's flat target list, ascending

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.targets.values() for t in (d.u, d.a, *d.dc_parts))


@dataclass(eq=False)
class MergedWeights:
    """A task's merged weights and biases as a switch first computed them (:meth:`WeightSwitcher.snapshot`),
    so switching to the task again is one copy, bitwise the same values: a copy of the switcher's packed
    buffer when the task adapts every target, else one tensor per :meth:`WeightSwitcher.live_tensors`
    entry over the delta's targets. Whoever keeps them decides how many (the service: its live tier)."""

    tensors: list[Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def _addmm_into(out: Tensor, base: Tensor, u: Tensor, a: Tensor) -> None:
    """``out = base + u @ a``, deterministic. CPU half-precision matmuls have no fast kernel, so there
    the sum is formed in float32 and rounded once (also the more accurate result)."""
    if out.device.type == "cpu" and out.dtype in (torch.float16, torch.bfloat16):
        out.copy_(torch.addmm(base.float(), u.float(), a.float()))
    else:
        torch.addmm(base, u, a, out=out)


def check_adapters(sites: list[Site], adapters: dict[str, AdapterWeights]) -> None:
    """Refuse adapters for unknown sites, with wrong shapes, or with non-finite values (BundleError)."""
    by_name = {s.name: s for s in sites}
    unknown = sorted(set(adapters) - set(by_name))
    if unknown:
        raise BundleError(f"adapters for sites this backbone does not have: {unknown[:5]}")
    for name, w in adapters.items():
        try:
            w.validate(by_name[name].dim)
        except ValueError as e:
            raise BundleError(f"adapter {name}: {e}") from e


def pack_tensors(tensors: Sequence[Tensor], align_bytes: int = 256) -> Tensor | None:
    """Move ``tensors`` into one new flat buffer, in place, and return it (``None``: not packable).

    Each tensor keeps its identity, shape, strides and values, but views the buffer afterwards
    (``Tensor.set_``), at an offset aligned to ``align_bytes``; so one ``copy_`` of the buffer rewrites
    all of them at memory-bandwidth speed, with no per-tensor work. Packable: distinct, contiguous tensors
    of one device and dtype (anything else is left as it is).
    """
    if not tensors or len({id(t) for t in tensors}) != len(tensors):
        return None
    dtype, device = tensors[0].dtype, tensors[0].device
    if any(t.dtype != dtype or t.device != device or not t.is_contiguous() for t in tensors):
        return None
    align = max(1, align_bytes // tensors[0].element_size())
    offsets, size = [], 0
    for t in tensors:
        size = -(-size // align) * align
        offsets.append(size)
        size += t.numel()
    buffer = torch.zeros(size, dtype=dtype, device=device)
    with torch.no_grad():
        for t, offset in zip(tensors, offsets, strict=True):
            buffer[offset:offset + t.numel()].copy_(t.reshape(-1))
            t.set_(buffer.untyped_storage(), offset, t.shape, t.stride())
    return buffer


class WeightSwitcher:
    """Owns the live weights of every target layer and switches them between base and task-merged.

    Keeps a pristine copy of each target weight and bias part (same device and dtype: the fastest
    restore, at the cost of one extra copy of the affected tensors). With ``pack`` the switcher also owns
    their memory: the live tensors are moved into one flat buffer (:func:`pack_tensors`; parameters keep
    their identity), so that restoring the base, or switching to a task from its :class:`MergedWeights`
    when it adapts every target, is ONE copy of that buffer, the bandwidth floor. Without it (a model
    whose memory others rely on, e.g. a training model) the same switches are one multi-tensor copy.

    The switcher knows which targets differ from pristine (to restore exactly those), not which task is
    live: that is its caller's to record.

    Threading: ``activate``, ``snapshot`` and ``reset`` read or mutate the live weights and must run on the
    one thread that runs forwards (the engine's worker). ``prepare`` only reads the pristine copies, which
    never change after construction, so it may run on any thread.
    """

    def __init__(self, sites: list[Site], *, pack: bool = False) -> None:
        self.sites = sites
        self.targets: list[Target] = []
        self._index: dict[str, list[int]] = {}
        for site in sites:
            self._index[site.name] = list(range(len(self.targets), len(self.targets) + len(site.targets)))
            self.targets.extend(site.targets)
        owned = [t for target in self.targets for t in (target.weight, *target.bias_parts)]
        self._buffer = pack_tensors(owned) if pack else None
        if pack and self._buffer is None:
            log.warning("target tensors not packable (mixed dtypes/devices or non-contiguous): switching per tensor")
        # the live tensors as views made once (after packing): a switch of many small layers is bound by
        # per-tensor work, and the views stay valid while the parameters are updated in place
        self._live = [(t.weight_2d, *t.bias_parts) for t in self.targets]
        with torch.no_grad():
            if self._buffer is not None:
                self._pristine_buffer = self._buffer.clone()
                # pristine twins of ``_live``: views of the pristine buffer at the live tensors' offsets
                self._base = [tuple(self._pristine_buffer.as_strided(v.shape, v.stride(), v.storage_offset())
                                    for v in live) for live in self._live]
            else:
                self._base = [tuple(v.detach().clone() for v in live) for live in self._live]
        self._modified: frozenset[int] = frozenset()  # targets that differ from pristine now

    @property
    def packed(self) -> bool:
        """Whether the live target tensors share one flat buffer (see ``pack``)."""
        return self._buffer is not None

    @property
    def is_base(self) -> bool:
        """Whether every target holds its pristine weights."""
        return not self._modified

    @property
    def pristine_nbytes(self) -> int:
        if self._buffer is not None:
            return self._pristine_buffer.numel() * self._pristine_buffer.element_size()
        return sum(t.numel() * t.element_size() for t in self._pristine_tensors(range(len(self.targets))))

    def _whole(self, indices: Sized) -> bool:
        """Whether a switch over ``indices`` covers every target of a packed buffer: one flat copy."""
        return self._buffer is not None and len(indices) == len(self.targets)

    def prepare(self, name: str, adapters: dict[str, AdapterWeights]) -> TaskDelta:
        """Precompute the task's fold against the pristine base weights (validates first)."""
        check_adapters(self.sites, adapters)
        deltas: dict[int, TargetDelta] = {}
        for site_name, w in adapters.items():
            for i in self._index[site_name]:
                base, target = self._base[i][0], self.targets[i]
                u, dc = fold_delta(base, w)
                u, dc = u.to(base.dtype), (target.bias_sign * dc).to(base.dtype)
                if not (torch.isfinite(u).all() and torch.isfinite(dc).all()):
                    raise BundleError(f"task {name!r}: folding {site_name} overflows {base.dtype}")
                parts = tuple(dc.split([p.numel() for p in target.bias_parts]))
                deltas[i] = TargetDelta(u, w.weight_a.to(base), parts)
        deltas = dict(sorted(deltas.items()))
        return TaskDelta(name, deltas)

    def live_tensors(self, indices: Iterable[int]) -> list[Tensor]:
        """The live weight (as ``[out, in]``) and bias parts of the targets ``indices``, in that order."""
        return [t for i in indices for t in self._live[i]]

    def _pristine_tensors(self, indices: Iterable[int]) -> list[Tensor]:
        return [t for i in indices for t in self._base[i]]

    @torch.no_grad()
    def activate(self, delta: TaskDelta | None, merged: MergedWeights | None = None) -> None:
        """Make ``delta``'s task live (``None``: the plain backbone). Goes A -> B directly.

        Every target the new task touches is recomputed from pristine (one rank-r ``addmm``), or copied
        from ``merged`` (the task's :meth:`snapshot`, taken after an earlier activation of the same
        delta); every other target the old task had touched is restored by a copy. The result is bitwise
        independent of the switch history. Copies and bias updates are multi-tensor (``torch._foreach_*``)
        ops: one dispatch for all targets, not a few per layer, which is what a switch of many small
        layers (a CNN, a GPU) is bound by.
        """
        touched = delta.targets if delta is not None else {}
        stale = [i for i in sorted(self._modified) if i not in touched]
        self._modified = frozenset(range(len(self.targets)))  # unknown until done: a failure restores all
        self._restore(stale)
        if merged is not None and touched:
            if self._whole(touched):
                self._buffer.copy_(merged.tensors[0])
            else:
                torch._foreach_copy_(self.live_tensors(touched), merged.tensors)
        elif touched:
            for i, d in touched.items():
                _addmm_into(self._live[i][0], self._base[i][0], d.u, d.a)
            live = [p for i in touched for p in self._live[i][1:]]
            base = [p for i in touched for p in self._base[i][1:]]
            torch._foreach_copy_(live, torch._foreach_add(base, [p for d in touched.values() for p in d.dc_parts]))
        self._modified = frozenset(touched)
        log.debug("activated task=%s", delta.name if delta is not None else None)

    @torch.no_grad()
    def snapshot(self, delta: TaskDelta) -> MergedWeights:
        """A copy of the live merged weights of ``delta``'s targets; call right after ``activate(delta)``."""
        if self._whole(delta.targets):
            return MergedWeights([self._buffer.clone()])
        return MergedWeights([t.clone() for t in self.live_tensors(delta.targets)])

    def snapshot_nbytes(self, delta: TaskDelta) -> int:
        """What :meth:`snapshot` of ``delta`` would hold, without taking it."""
        if self._whole(delta.targets):
            return self._buffer.numel() * self._buffer.element_size()
        return sum(t.numel() * t.element_size() for t in self.live_tensors(delta.targets))

    @torch.no_grad()
    def reset(self) -> None:
        """Restore every target from pristine, whatever state the weights are in (e.g. after a failure
        part-way through ``activate``)."""
        self._restore(range(len(self.targets)))
        self._modified = frozenset()

    def _restore(self, indices: Sequence[int]) -> None:
        if self._whole(indices):
            self._buffer.copy_(self._pristine_buffer)
        elif indices:
            torch._foreach_copy_(self.live_tensors(indices), self._pristine_tensors(indices))

    def drift(self) -> float:
        """Max abs difference of live vs pristine weights (0.0 means bitwise equal); for the base state."""
        every = range(len(self.targets))
        return max((live - base).abs().max().item()
                   for live, base in zip(self.live_tensors(every), self._pristine_tensors(every), strict=True))

