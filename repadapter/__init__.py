"""RepAdapter core: adapters, injection into timm models, reversible merging, bundles and the store.

No web code lives here; ``service/`` and ``training/`` build on this package.
"""

from .adapter import AdapterWeights, RepAdapter, dense_up
from .backbone import Backbone, load_backbone
from .bundle import AdapterConfig, BackboneRef, Manifest, PackedBundle, TaskBundle
from .inject import AdapterSlot, Site, add_adapters, attach_slots, clear_adapters
from .merge import MergedWeights, TaskDelta, WeightSwitcher
from .mixed import PackedFolds, RowFold, mixed_batch
from .preprocess import PreprocessConfig, build_transform, decode_image
from .store import LocalStore, S3Store, open_store

__all__ = [
    "AdapterConfig", "AdapterSlot", "AdapterWeights", "Backbone", "BackboneRef", "LocalStore", "Manifest",
    "MergedWeights", "PackedBundle", "PackedFolds", "PreprocessConfig", "RepAdapter", "RowFold", "S3Store", "Site",
    "TaskBundle", "TaskDelta", "WeightSwitcher", "add_adapters", "attach_slots",
    "build_transform", "clear_adapters", "decode_image", "dense_up", "load_backbone", "mixed_batch",
    "open_store",
]
