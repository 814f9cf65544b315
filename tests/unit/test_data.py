"""training.data on the real embedded datasets and on real ImageFolder trees written with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ArrayDataset,
    FolderDataset,
    load_dataset,
    mixed_pool,
    stratified_split,
)

NEEDS_FASHION = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (CI installs it)",
)


def assert_stratified(split_labels: np.ndarray, pool_labels: np.ndarray) -> None:
    """Every class count within ±1 of its proportional share of the pool."""
    pool_counts = np.bincount(pool_labels, minlength=10)
    expected = len(split_labels) * pool_counts / len(pool_labels)
    got = np.bincount(split_labels, minlength=len(pool_counts))
    assert np.all(np.abs(got - expected) <= 1), (got, expected)


# --- stratified_split ---------------------------------------------------------------------------------


def test_stratified_split_sizes_disjoint_and_proportional():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), [3, 17, 40, 101, 9]))
    for seed in range(20):
        parts = stratified_split(labels, [60, 25, 50], seed)
        assert [len(p) for p in parts] == [60, 25, 50]
        joined = np.concatenate(parts)
        assert len(np.unique(joined)) == len(joined)
        rest = np.setdiff1d(np.arange(len(labels)), joined)
        for part in [*parts, rest]:
            counts = np.bincount(labels[part], minlength=5)
            assert np.all(np.abs(counts - len(part) * np.bincount(labels) / len(labels)) <= 1)


def test_stratified_split_seeded():
    labels = np.repeat(np.arange(3), 30)
    a = stratified_split(labels, [20, 10], seed=1)
    b = stratified_split(labels, [20, 10], seed=1)
    c = stratified_split(labels, [20, 10], seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_stratified_split_all_and_too_many():
    labels = np.array([0, 0, 1, 1, 1])
    (everything,) = stratified_split(labels, [5], seed=0)
    np.testing.assert_array_equal(everything, np.arange(5))
    with pytest.raises(ValueError, match="cannot take"):
        stratified_split(labels, [4, 2], seed=0)


# --- named datasets -----------------------------------------------------------------------------------


def check_images(ds: ArrayDataset, size: tuple[int, int], n_classes: int = 10) -> None:
    for i in (0, len(ds) - 1):
        image, label = ds[i]
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB"
        assert image.size == size
        assert 0 <= label < n_classes
        assert label == ds.labels[i]
    assert ds.labels.min() >= 0
    assert ds.labels.max() < n_classes


@NEEDS_FASHION
def test_fashion_mnist_default_protocol():
    splits = load_dataset("fashion-mnist")
    assert splits.classes == FASHION_MNIST_CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (800, 200, 2000)
    assert splits.train.images.shape == (60000, 28, 28)
    assert splits.train.images.dtype == np.uint8
    assert splits.test.images.shape == (10000, 28, 28)  # the t10k split, not the training pool
    assert not set(splits.train.indices) & set(splits.val.indices)
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [80] * 10)  # 6,000 of each class
    np.testing.assert_array_equal(np.bincount(splits.val.labels), [20] * 10)
    np.testing.assert_array_equal(np.bincount(splits.test.labels), [200] * 10)
    for ds in (splits.train, splits.val, splits.test):
        check_images(ds, (28, 28))
    pixels = np.asarray(splits.train[0][0])
    assert pixels.max() > 100  # real pixels in 0..255, not normalised
    assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grayscale replicated to RGB


@NEEDS_FASHION
def test_fashion_mnist_all_left_after_val():
    splits = load_dataset("fashion-mnist", n_train=None, n_test=None)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (59800, 200, 10000)
    assert len(set(splits.train.indices) | set(splits.val.indices)) == 60000


@pytest.mark.parametrize(
    ("name", "pool_size", "size", "n_test"), [("mnist", 5000, (28, 28), 2000), ("digits", 1797, (8, 8), 797)]
)
def test_digit_sets_default_protocol(name, pool_size, size, n_test):
    splits = load_dataset(name)
    assert splits.classes == [str(d) for d in range(10)]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (800, 200, n_test)
    parts = [splits.train.indices, splits.val.indices, splits.test.indices]
    assert len(np.unique(np.concatenate(parts))) == 800 + 200 + n_test  # disjoint
    assert splits.train.images is splits.test.images  # held out of the same pool
    assert len(splits.train.images) == pool_size
    assert splits.train.images.dtype == np.uint8
    assert splits.train.images.max() == 255  # digits' 0..16 scaled to 0..255, mnist already 0..255
    for ds in (splits.train, splits.val, splits.test):
        check_images(ds, size)


def test_digits_stratified_against_pool():
    from sklearn.datasets import load_digits

    target = load_digits().target
    splits = load_dataset("digits", n_train=500, n_val=100, n_test=300)
    for ds in (splits.train, splits.val, splits.test):
        assert_stratified(ds.labels, target)
        np.testing.assert_array_equal(ds.labels, target[ds.indices])


def test_mnist_train_none_takes_rest_after_test():
    splits = load_dataset("mnist", n_train=None, n_val=200, n_test=1000)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3800, 200, 1000)


def test_named_deterministic_in_seed():
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, split).indices, getattr(b, split).indices)
        assert not np.array_equal(getattr(a, split).indices, getattr(c, split).indices)


def test_named_errors():
    with pytest.raises(ValueError, match=r"not one of \['digits', 'fashion-mnist', 'mnist'\]"):
        load_dataset("cifar-100")
    with pytest.raises(ValueError, match="does not fit"):
        load_dataset("digits", n_train=1700, n_val=200)
    with pytest.raises(ValueError, match="no test split"):
        load_dataset("digits", n_train=None, n_test=None)


# --- class mix (an imbalanced task from a balanced source) --------------------------------------------


def test_mixed_pool_follows_the_mix_and_keeps_as_much_as_the_scarcest_class_allows():
    labels = np.repeat(np.arange(5), [100, 80, 100, 100, 100])
    keep, remap = mixed_pool(labels, [57, 11, 4, 27], seed=0)  # class 4 (and any beyond the mix) dropped
    counts = np.bincount(labels[keep], minlength=5)
    np.testing.assert_array_equal(counts, [100, 19, 7, 47, 0])  # floor(w * 100/57): class 0 is the scarcest
    np.testing.assert_array_equal(remap, [0, 1, 2, 3, -1])
    assert np.all(np.diff(keep) > 0)  # sorted, no repeats
    keep0, _ = mixed_pool(labels, [0, 1, 1], seed=0)  # class 0 dropped: labels 1, 2 become 0, 1
    np.testing.assert_array_equal(np.bincount(labels[keep0], minlength=3), [0, 80, 80])
    np.testing.assert_array_equal(mixed_pool(labels, [0, 1, 1], seed=0)[1], [-1, 0, 1, -1, -1])
    with pytest.raises(ValueError, match="6 frequencies for 5 classes"):
        mixed_pool(labels, [1] * 6, seed=0)


def test_mnist_class_mix_shapes_train_val_and_the_held_out_test():
    d = load_dataset("mnist", seed=1, n_train=300, n_val=100, n_test=200, class_mix=(57, 11, 4, 27))
    assert d.classes == ["0", "1", "2", "3"]
    mix = np.array([57, 11, 4, 27]) / 99
    for split, n in ((d.train, 300), (d.val, 100), (d.test, 200)):
        assert len(split) == n
        assert np.all(np.abs(np.bincount(split.labels, minlength=4) - n * mix) <= 1.01)  # stratified: +-1
        assert split.labels.max() == 3
        image, label = split[0]
        assert (image.mode, label) == ("RGB", split.labels[0])
    joined = np.concatenate([d.train.indices, d.val.indices, d.test.indices])
    assert len(np.unique(joined)) == len(joined)  # still disjoint
    plain = load_dataset("mnist", seed=1, n_train=300, n_val=100, n_test=200)
    assert np.all(np.bincount(plain.train.labels) == 30)  # the source is balanced


@NEEDS_FASHION
def test_fashion_class_mix_keeps_its_own_test_split_balanced():
    d = load_dataset("fashion-mnist", seed=0, n_train=200, n_val=50, n_test=400, class_mix=(0, 6, 0, 2))
    assert d.classes == ["Trouser", "Dress"]  # classes 1 and 3, relabelled 0 and 1
    np.testing.assert_array_equal(np.bincount(d.train.labels), [150, 50])
    np.testing.assert_array_equal(np.bincount(d.test.labels), [200, 200])  # t10k's balance, kept classes only
    pool = load_dataset("fashion-mnist", seed=0, n_test=None).test
    assert set(pool.labels[d.test.indices]) == {1, 3}  # the original labels of the rows taken


def test_class_mix_errors(tree: Path):
    with pytest.raises(ValueError, match="11 frequencies for 10 classes"):
        load_dataset("digits", class_mix=[1.0] * 11)
    with pytest.raises(ValueError, match="embedded datasets only"):
        load_dataset(str(tree), class_mix=(1.0, 2.0))
    with pytest.raises(ValueError, match="does not fit"):  # 2 classes of ~180 digits: 100 + 90 + ... too many
        load_dataset("digits", n_train=300, n_val=100, class_mix=(1, 1))


# --- ImageFolder --------------------------------------------------------------------------------------


def write_images(folder: Path, n: int, size: tuple[int, int] = (12, 10)) -> None:
    """n RGB JPEGs, plus one grayscale and one RGBA PNG among them (n >= 3)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    w, h = size
    for i in range(n - 2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)).save(folder / "alpha.PNG")
    (folder / "notes.txt").write_text("not an image")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write_images(tmp_path / "train" / "dog", 20)
    write_images(tmp_path / "train" / "cat", 10)
    return tmp_path


def test_folder_without_val_carves_stratified_val(tree: Path):
    splits = load_dataset(str(tree))
    assert splits.classes == ["cat", "dog"]
    assert splits.test is None
    assert isinstance(splits.train, FolderDataset)
    assert (len(splits.train), len(splits.val)) == (24, 6)  # 20% of 30, since n_val=200 does not fit
    np.testing.assert_array_equal(np.bincount(splits.val.labels), [2, 4])
    assert not set(splits.train.paths) & set(splits.val.paths)
    assert all(p.suffix.lower() in {".jpg", ".png"} for p in splits.train.paths)
    modes = set()
    for ds in (splits.train, splits.val):
        for i in range(len(ds)):
            image, label = ds[i]
            assert (image.mode, image.size) == ("RGB", (12, 10))
            assert label == int(ds.paths[i].parent.name == "dog")
            with Image.open(ds.paths[i]) as raw:
                modes.add(raw.mode)
    assert modes == {"RGB", "L", "RGBA"}  # every file mode came out as RGB


def test_folder_caps_and_seeds(tree: Path):
    splits = load_dataset(str(tree), n_train=9, n_val=3, seed=5)
    assert (len(splits.train), len(splits.val)) == (9, 3)
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [3, 6])
    again = load_dataset(str(tree), n_train=9, n_val=3, seed=5)
    other = load_dataset(str(tree), n_train=9, n_val=3, seed=6)
    assert again.train.paths == splits.train.paths
    assert other.train.paths != splits.train.paths


def test_folder_with_val_and_test_dirs(tree: Path):
    write_images(tree / "val" / "cat", 3)
    write_images(tree / "val" / "dog", 4)
    write_images(tree / "test" / "cat", 5, size=(7, 9))
    write_images(tree / "test" / "dog", 5, size=(7, 9))
    splits = load_dataset(str(tree), n_train=None, n_test=4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 7, 4)  # val dir used whole
    np.testing.assert_array_equal(np.bincount(splits.test.labels), [2, 2])
    image, label = splits.test[0]
    assert (image.mode, image.size, label) == ("RGB", (7, 9), 0)


def test_folder_applies_exif_orientation(tmp_path: Path):
    for name in ("a", "b"):
        write_images(tmp_path / "train" / name, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.new("RGB", (30, 10), "red").save(tmp_path / "train" / "a" / "rotated.jpg", exif=exif)
    splits = load_dataset(str(tmp_path), n_val=0)
    index = [p.name for p in splits.train.paths].index("rotated.jpg")
    assert splits.train[index][0].size == (10, 30)


def test_folder_errors(tree: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="not one of"):
        load_dataset(str(tmp_path / "nowhere"))
    write_images(tree / "val" / "cat", 3)
    write_images(tree / "val" / "bird", 3)
    with pytest.raises(ValueError, match=r"only in train \['dog'\], only in val \['bird'\]"):
        load_dataset(str(tree))
    (tree / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        load_dataset(str(tree))
