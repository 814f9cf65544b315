"""Task bundles: ``manifest.json`` (pydantic, schema-versioned) + ``adapter.safetensors``.

Tensor keys: ``adapter.<site>.<weight_a|bias_a|weight_b|bias_b>`` for every site of the manifest's
placement (site = slot path, e.g. ``blocks.3.adapter_attn``; none when ``adapter.hidden`` is 0) and
``head.weight [C, F]``, ``head.bias [C]``, all float32. Bundles load with safetensors only (never pickle),
and every check runs before a bundle can touch a backbone. The adapter scale and groups are stored once,
in the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .adapter import AdapterWeights, shape_problem
from .errors import BackboneMismatch, BundleError, CheckpointError, ChecksumMismatch, describe_validation_error
from .inject import PLACEMENTS, Site
from .preprocess import PreprocessConfig

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "adapter.safetensors"
TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_PARAMS = ("weight_a", "bias_a", "weight_b", "bias_b")


def check_task_name(name: str) -> str:
    """``name`` if it is a valid task name (store keys, URL paths), else ``ValueError`` saying the rule."""
    if not TASK_NAME.match(name):
        raise ValueError("task names are 1-64 chars of a-z, 0-9, '_' or '-', starting with a letter or digit")
    return name


MAX_SCALE = 1e3
"""Largest ``|adapter.scale|`` a manifest may declare (the paper searches 0.1..10)."""
MAX_ABS_VALUE = 1e6
"""Largest ``|value|`` of a bundle tensor, far above what training produces: it names absurd tensors (1e18,
3e38) before any compute. No cheap bound rules out an overflow somewhere in a deep network, so the real
guard is the probe forward at registration (``service.validation``)."""


class AdapterConfig(BaseModel):
    """Adapter hyper-parameters. ``hidden=0`` means no adapters (a linear probe: head only)."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(8, ge=0, le=4096)
    groups: int = Field(2, ge=1)
    scale: float = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE, allow_inf_nan=False)
    placement: str = "block"
    dropout: float = Field(0.1, ge=0, lt=1)

    @field_validator("placement")
    @classmethod
    def _placement(cls, v: str) -> str:
        if v not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}")
        return v

    @model_validator(mode="after")
    def _groups_divide_hidden(self) -> AdapterConfig:
        if self.hidden % self.groups:
            raise ValueError(f"hidden={self.hidden} must be divisible by groups={self.groups}")
        return self


class BackboneRef(BaseModel):
    """Which backbone a bundle was trained on; a bundle for another one is refused."""

    arch: str
    fingerprint: str


class Manifest(BaseModel):
    """Everything about a task except its tensors."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: int = Field(0, ge=0, description="assigned by the store on write")
    labels: list[str] = Field(min_length=1)
    method: Literal["repadapter", "linear", "pretrained"] = "repadapter"
    adapter: AdapterConfig = AdapterConfig()
    backbone: BackboneRef
    preprocess: PreprocessConfig = PreprocessConfig()
    metrics: dict[str, Any] = Field(default_factory=dict)
    tensors_sha256: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_task_name(v)

    @model_validator(mode="after")
    def _labels_unique(self) -> Manifest:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        return self


def parse_manifest(data: bytes | str) -> Manifest:
    """Parse and validate manifest JSON; any problem is a :class:`BundleError` naming the field."""
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as e:
        raise BundleError(f"invalid manifest: {describe_validation_error(e, empty='manifest')}") from e


@dataclass
class TaskBundle:
    """A task in memory: manifest, adapters per site (may be empty) and the classification head."""

    manifest: Manifest
    adapters: dict[str, AdapterWeights]
    head_weight: Tensor  # [C, F]
    head_bias: Tensor  # [C]

    def __post_init__(self) -> None:
        """Refuse adapters whose scale or groups differ from the manifest's: the file stores them once (in
        the manifest), so a mismatch would otherwise be served silently at the manifest's value."""
        cfg = self.manifest.adapter
        for site, w in self.adapters.items():
            if float(w.scale) != cfg.scale or w.groups != cfg.groups:
                raise BundleError(f"task {self.name!r}: adapter {site} has scale={w.scale}, groups={w.groups}; the "
                                  f"manifest's adapter config says scale={cfg.scale}, groups={cfg.groups}")

    @property
    def name(self) -> str:
        return self.manifest.name

    def tensors(self) -> dict[str, Tensor]:
        out = {f"adapter.{site}.{k}": v.detach().to("cpu", torch.float32).contiguous()
               for site, w in self.adapters.items() for k, v in w.tensors().items()}
        out["head.weight"] = self.head_weight.detach().to("cpu", torch.float32).contiguous()
        out["head.bias"] = self.head_bias.detach().to("cpu", torch.float32).contiguous()
        return out

    def serialize(self) -> tuple[bytes, bytes]:
        """``(manifest_json, safetensors_bytes)``, with the checksum filled into the manifest."""
        data = st_save(self.tensors(), metadata={"task": self.name})
        self.manifest = self.manifest.model_copy(update={"tensors_sha256": hashlib.sha256(data).hexdigest()})
        return self.manifest.model_dump_json(indent=2).encode(), data

    @classmethod
    def deserialize(cls, manifest: bytes | str | Manifest, data: bytes) -> TaskBundle:
        """Parse a bundle, verifying the checksum, key set, head shape vs labels and finiteness."""
        return PackedBundle.deserialize(manifest, data).unpack()

    def pack(self) -> PackedBundle:
        """This bundle, checked, in its one-buffer form (:class:`PackedBundle`)."""
        return PackedBundle.from_tensors(self.manifest, self.tensors())

    @classmethod
    def from_tensors(cls, manifest: Manifest, tensors: dict[str, Tensor]) -> TaskBundle:
        """A validated bundle from its tensors by key (see :meth:`PackedBundle.from_tensors`)."""
        return PackedBundle.from_tensors(manifest, tensors).unpack()

    def check_compatible(self, arch: str, fingerprint: str, sites: list[Site], num_features: int) -> None:
        """Refuse a bundle for another backbone (409) or whose tensors do not fit it (422), values included:
        the checks of :meth:`PackedBundle.from_tensors` and :meth:`PackedBundle.check_compatible`."""
        self.pack().check_compatible(arch, fingerprint, sites, num_features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


Layout = tuple[tuple[str, int, tuple[int, ...]], ...]
"""Where each tensor of a packed bundle lies in its buffer: ``(key, offset, shape)``, sorted by key."""


@functools.lru_cache(maxsize=256)
def _interned(layout: Layout) -> Layout:
    """One shared object per distinct layout (every task of one backbone and hidden size has the same)."""
    return layout


@functools.lru_cache(maxsize=256)
def layout_positions(layout: Layout) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``key -> (offset, shape)`` of a layout."""
    return {key: (offset, shape) for key, offset, shape in layout}


@functools.lru_cache(maxsize=256)
def layout_sites(layout: Layout) -> tuple[str, ...]:
    """The adapted sites of a layout (from its ``adapter.<site>.<param>`` keys), sorted."""
    return tuple(sorted({key[len("adapter."):].rpartition(".")[0] for key, _, _ in layout
                         if key.startswith("adapter.")}))


def check_backbone(manifest: Manifest, arch: str, fingerprint: str) -> None:
    """Refuse (409) a task trained for another backbone (architecture or weights fingerprint)."""
    ref = manifest.backbone
    if ref.arch != arch or ref.fingerprint != fingerprint:
        raise BackboneMismatch(f"task {manifest.name!r} was trained for backbone {ref.arch} "
                               f"({ref.fingerprint[:12]}), this server runs {arch} ({fingerprint[:12]})")


def _placement_sites(names: list[str] | tuple[str, ...], placement: str) -> list[str]:
    """The sites of ``placement`` among a backbone's ``block`` sites (``attn``: the attention inputs only)."""
    return [n for n in names if placement == "block" or n.endswith(f".adapter_{placement}")]


def _adapter_params(name: str, tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``site -> param -> tensor`` of a bundle's adapter tensors, after checking every key (the head's two
    present, nothing unknown) and dtype (float32); :class:`BundleError` naming the first problem."""
    for key in ("head.weight", "head.bias"):
        if key not in tensors:
            raise BundleError(f"task {name!r}: missing tensor {key!r}")
    sites: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if t.dtype != torch.float32:
            raise BundleError(f"task {name!r}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}; "
                              "bundle tensors are float32")
        if key.startswith("head."):
            if key not in ("head.weight", "head.bias"):
                raise BundleError(f"task {name!r}: unexpected tensor {key!r}")
            continue
        prefix, _, rest = key.partition(".")
        site, _, param = rest.rpartition(".")
        if prefix != "adapter" or param not in _PARAMS or not site:
            raise BundleError(f"task {name!r}: unexpected tensor {key!r}")
        sites.setdefault(site, {})[param] = t
    return sites


@functools.lru_cache(maxsize=256)
def _layout_problem(layout: Layout, groups: int, placement: str, site_dims: tuple[tuple[str, int], ...],
                    num_features: int) -> str:
    """What keeps bundles of ``layout`` from fitting a backbone with ``site_dims``, or ``""``. A bundle with
    adapters must have them at every site of its placement and nowhere else: one missing would serve a
    different function from the one trained, without an error."""
    shapes = {key: shape for key, _, shape in layout}
    if shapes["head.weight"][1] != num_features:
        return f"head takes {shapes['head.weight'][1]} features, the backbone gives {num_features}"
    dims = dict(site_dims)
    present = layout_sites(layout)
    unknown = [n for n in present if n not in dims]
    if unknown:
        return f"adapters for sites this backbone does not have: {unknown[:5]}"
    if present:
        wanted = _placement_sites(list(dims), placement)
        missing = [n for n in wanted if n not in present]
        if missing:
            return (f"no adapters for {len(missing)} of the {len(wanted)} sites of placement {placement!r}: "
                    f"{missing[:5]}")
        outside = [n for n in present if n not in wanted]
        if outside:
            return f"adapters at sites outside placement {placement!r}: {outside[:5]}"
    for name in present:
        problem = shape_problem({p: shapes[f"adapter.{name}.{p}"] for p in _PARAMS}, dims[name], groups)
        if problem:
            return f"adapter {name}: {problem}"
    return ""


@dataclass(frozen=True, eq=False)
class PackedBundle:
    """A verified bundle as ONE flat float32 buffer and its layout: the form for holding thousands of tasks.

    Why: as ~130 separate small tensors a bundle costs ~1.34x its payload in allocator and object
    overhead; as one buffer with a shared layout ~1.03x. :meth:`unpack` gives a :class:`TaskBundle`
    whose tensors are views of the buffer, or of a copy of it on another device and dtype, so moving a
    task to the GPU is one transfer. Every check of a bundle's tensors runs in :meth:`from_tensors`.
    """

    manifest: Manifest
    buffer: Tensor  # [n] float32
    layout: Layout

    @classmethod
    def deserialize(cls, manifest: bytes | str | Manifest, data: bytes) -> PackedBundle:
        """Parse bundle bytes, verifying the checksum (first: nothing else runs on tampered bytes)."""
        m = manifest if isinstance(manifest, Manifest) else parse_manifest(manifest)
        digest = hashlib.sha256(data).hexdigest()
        if m.tensors_sha256 and digest != m.tensors_sha256:
            raise ChecksumMismatch(f"task {m.name!r}: tensors sha256 {digest[:12]}... != manifest's "
                                   f"{m.tensors_sha256[:12]}...")
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise BundleError(f"task {m.name!r}: not a safetensors file: {e}") from e
        return cls.from_tensors(m.model_copy(update={"tensors_sha256": digest}), tensors)

    @classmethod
    def from_tensors(cls, manifest: Manifest, tensors: dict[str, Tensor]) -> PackedBundle:
        """Check keys, dtypes (float32, as bundles are written), shapes (head vs labels, each site's four
        parameters, hidden size vs the manifest: none at all when it is 0) and values (finite, at most
        :data:`MAX_ABS_VALUE`), then pack. Raises :class:`BundleError` naming what is wrong."""
        name, cfg = manifest.name, manifest.adapter
        sites = _adapter_params(name, tensors)
        if sites and not cfg.hidden:
            raise BundleError(f"task {name!r}: the manifest's adapter.hidden is 0 (no adapters) but the bundle has "
                              f"adapter tensors for {len(sites)} sites, e.g. {sorted(sites)[:3]}")
        for site, params in sites.items():
            missing = set(_PARAMS) - set(params)
            if missing:
                raise BundleError(f"task {name!r}: site {site} lacks {sorted(missing)}")
            if params["weight_a"].ndim != 2 or params["weight_a"].shape[0] != cfg.hidden:
                raise BundleError(f"task {name!r}: site {site} has weight_a {tuple(params['weight_a'].shape)}; "
                                  f"the manifest's adapter.hidden is {cfg.hidden}")
        if cfg.hidden and not sites:
            raise BundleError(f"task {name!r}: the manifest declares adapters (hidden={cfg.hidden}) but the "
                              "bundle has no adapter tensors")
        w, b = tensors["head.weight"], tensors["head.bias"]
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise BundleError(f"task {name!r}: head shapes {tuple(w.shape)}, {tuple(b.shape)} are inconsistent")
        if w.shape[0] != len(manifest.labels):
            raise BundleError(f"task {name!r}: head has {w.shape[0]} outputs but {len(manifest.labels)} labels")
        keys = sorted(tensors)
        buffer = torch.cat([tensors[k].detach().reshape(-1) for k in keys]).to("cpu", torch.float32)
        if not torch.isfinite(buffer).all():
            bad = next(k for k in keys if not torch.isfinite(tensors[k]).all())
            raise BundleError(f"task {name!r}: tensor {bad!r} is not finite (inf or NaN values)")
        if buffer.numel() and buffer.abs().max() > MAX_ABS_VALUE:
            bad = next(k for k in keys if tensors[k].numel() and tensors[k].abs().max() > MAX_ABS_VALUE)
            raise BundleError(f"task {name!r}: tensor {bad!r} has values up to {tensors[bad].abs().max().item():.3g}; "
                              f"bundle values are bounded by {MAX_ABS_VALUE:g}")
        layout, offset = [], 0
        for k in keys:
            layout.append((k, offset, tuple(tensors[k].shape)))
            offset += tensors[k].numel()
        return cls(manifest, buffer, _interned(tuple(layout)))

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def tensor(self, key: str, buffer: Tensor | None = None) -> Tensor:
        """One tensor by key, a view of ``buffer`` (default: this bundle's own)."""
        offset, shape = layout_positions(self.layout)[key]
        buffer = self.buffer if buffer is None else buffer
        return buffer[offset:offset + math.prod(shape)].view(shape)

    def check_compatible(self, arch: str, fingerprint: str, sites: list[Site], num_features: int) -> None:
        """:meth:`TaskBundle.check_compatible` from the layout alone (no tensor is touched), remembered per
        layout: thousands of tasks of one backbone share a handful of layouts."""
        check_backbone(self.manifest, arch, fingerprint)
        cfg = self.manifest.adapter
        problem = _layout_problem(self.layout, cfg.groups, cfg.placement, tuple((s.name, s.dim) for s in sites),
                                  num_features)
        if problem:
            raise BundleError(f"task {self.name!r}: {problem}")

    def views(self, buffer: Tensor | None = None) -> dict[str, Tensor]:
        """Every tensor by key, as views of ``buffer`` (default: this bundle's own; or a copy of it, e.g.
        on the serving device)."""
        buffer = self.buffer if buffer is None else buffer
        chunks = buffer.split([math.prod(shape) for _, _, shape in self.layout])  # layout: contiguous, in order
        return {k: chunk.view(shape) for (k, _, shape), chunk in zip(self.layout, chunks, strict=True)}

    def unpack(self, buffer: Tensor | None = None) -> TaskBundle:
        """The bundle, its tensors views of ``buffer`` (see :meth:`views`)."""
        tensors = self.views(buffer)
        cfg = self.manifest.adapter
        sites: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            if key.startswith("adapter."):
                site, _, param = key[len("adapter."):].rpartition(".")
                sites.setdefault(site, {})[param] = t
        adapters = {site: AdapterWeights(**p, groups=cfg.groups, scale=cfg.scale) for site, p in sites.items()}
        return TaskBundle(self.manifest, adapters, tensors["head.weight"], tensors["head.bias"])


_OFFICIAL_KEY = re.compile(r"^(blocks\.\d+\.adapter_(?:attn|mlp))\.(conv_[AB])\.(weight|bias)$")
_OFFICIAL_PARAMS = ("conv_A.weight", "conv_A.bias", "conv_B.weight", "conv_B.bias")
_HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class OfficialCheckpoint:
    """What :func:`import_official` read: adapters for every site, and the classifier head when present."""

    adapters: dict[str, AdapterWeights]
    head_weight: Tensor | None  # [C, F]
    head_bias: Tensor | None  # [C]

    @property
    def num_classes(self) -> int | None:
        """Rows of the imported head (the manifest needs as many labels), ``None`` without a head."""
        return None if self.head_weight is None else self.head_weight.shape[0]

    def bundle(self, manifest: Manifest) -> TaskBundle:
        """A checked :class:`TaskBundle` of this checkpoint under ``manifest`` (its labels must match the head,
        its adapter config the adapters' hidden size, groups and scale)."""
        if self.head_weight is None or self.head_bias is None:
            raise CheckpointError("the checkpoint has no head (head.weight, head.bias): a task needs one; train a "
                                  "head for these adapters or take it from elsewhere")
        bundle = TaskBundle(manifest, self.adapters, self.head_weight, self.head_bias)
        bundle.pack()  # every bundle check: hidden size, head vs labels, values
        return bundle


def _official_adapter(site: str, p: dict[str, Tensor], dim: int, *, groups: int | None,
                      scale: float) -> AdapterWeights:
    """One site's official ``conv_{A,B}.{weight,bias}`` as checked :class:`AdapterWeights` for a site of ``dim``
    channels (see :func:`import_official`); :class:`CheckpointError` naming the key at fault."""
    lacking = [k for k in _OFFICIAL_PARAMS if k not in p]
    if lacking:
        raise CheckpointError(f"{site} lacks {[f'{site}.{k}' for k in lacking]}")
    for k in _OFFICIAL_PARAMS:
        t, want = p[k], 3 if k.endswith("weight") else 1
        if not t.is_floating_point() or t.ndim != want or (want == 3 and t.shape[-1] != 1):
            raise CheckpointError(f"{site}.{k} has shape {tuple(t.shape)} ({t.dtype}); expected a floating "
                                  f"{'[out, in, 1] kernel-size-1 conv weight' if want == 3 else 'vector'}")
    a, b = p["conv_A.weight"][:, :, 0], p["conv_B.weight"][:, :, 0]
    if a.shape[0] % b.shape[1]:
        raise CheckpointError(f"{site}: conv_A has {a.shape[0]} outputs, not a multiple of conv_B's "
                              f"{b.shape[1]} inputs per group")
    w = AdapterWeights(a.float(), p["conv_A.bias"].float(), b.float(), p["conv_B.bias"].float(),
                       groups if groups is not None else a.shape[0] // b.shape[1], scale)
    try:
        w.validate(dim)
    except ValueError as e:
        raise CheckpointError(f"{site}: {e}") from e
    return w


def import_official(
    state_dict: dict[str, Tensor], *, scale: float, sites: Sequence[Site], groups: int | None = None
) -> OfficialCheckpoint:
    """Adapters (and the head) from a checkpoint of the official RepAdapter code (luogen1996/RepAdapter).

    Keys ``blocks.{i}.adapter_{attn,mlp}.conv_A.weight [r, d, 1]``, ``conv_A.bias [r]``,
    ``conv_B.weight [d, r/G, 1]``, ``conv_B.bias [d]``, and optionally ``head.weight [C, F]``,
    ``head.bias [C]``. The scale is not stored (the user gives it); ``groups`` is inferred as
    ``r / conv_B.weight.shape[1]``. Site names come out as ours (``blocks.{i}.adapter_attn``).

    Strict, unlike the official ``strict=False`` loader, because every gap would change the served function
    silently: ``sites`` (``attach_slots(model, placement)`` of the backbone) must each have all four keys
    (a missing site is named, not served as the identity); convs must have kernel size 1 (a wider kernel
    mixes neighbouring tokens and cannot fold into a linear map; truncating it to one tap would be wrong);
    a checkpoint without adapter keys (empty, head-only) and any other key are refused. Raises
    :class:`CheckpointError` naming the keys.

    Integrity: a ``.pt`` file has no checksum, so a corrupted one loads as long as it parses; compare its
    sha256 with the publisher's before importing. Once imported, the bundle's sha256 is recorded and
    verified on every read. Load the file with ``torch.load(path, weights_only=True)`` (never pickle).
    """
    found: dict[str, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        if key in _HEAD_KEYS:
            head[key] = t
            continue
        m = _OFFICIAL_KEY.match(key)
        if m is None:
            raise CheckpointError(f"unexpected key in RepAdapter checkpoint: {key!r}")
        found.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = t
    if not found:
        raise CheckpointError("no adapter keys (blocks.<i>.adapter_{attn,mlp}.conv_{A,B}.{weight,bias}) in the "
                              f"checkpoint; it holds {sorted(state_dict)[:6] or 'nothing'}")
    dims = {s.name: s.dim for s in sites}
    unknown = sorted(set(found) - set(dims))
    if unknown:
        raise CheckpointError(f"adapters for sites the given sites do not include: {unknown[:5]}")
    missing = [n for n in dims if n not in found]
    if missing:
        raise CheckpointError(f"the checkpoint has no adapters for {len(missing)} of the {len(dims)} sites: "
                              f"{missing[:8]}")
    out = {site: _official_adapter(site, p, dims[site], groups=groups, scale=scale) for site, p in found.items()}
    configs = {(w.hidden, w.groups) for w in out.values()}
    if len(configs) > 1:
        raise CheckpointError(f"the sites' adapters differ in (hidden, groups): {sorted(configs)}; a task has one")
    if not head:
        return OfficialCheckpoint(out, None, None)
    lacking = [k for k in _HEAD_KEYS if k not in head]
    hw, hb = head.get("head.weight"), head.get("head.bias")
    if lacking or hw.ndim != 2 or hb.shape != (hw.shape[0],) or not hw.is_floating_point():
        raise CheckpointError(f"the checkpoint's head is incomplete or inconsistent: "
                              f"{ {k: tuple(t.shape) for k, t in head.items()} }, lacking {lacking}")
    return OfficialCheckpoint(out, hw.float(), hb.float())
