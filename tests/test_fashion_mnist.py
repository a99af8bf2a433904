"""Fashion-MNIST (Debian's dataset-fashion-mnist) and its VTAB-1k-sized image-folder subset.

Needs `apt-get install dataset-fashion-mnist`; without it the tests fail saying so.
"""

import os

import numpy as np
import pytest

from vqt_jax import data
from vqt_jax.data import fashion_mnist
from vqt_jax.data import folder as folder_lib

COUNTS = {"train": 800, "val": 200, "test": 1000}


@pytest.fixture(scope="module")
def source():
    return {split: fashion_mnist.load_fashion_mnist(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fm") / "fashion_mnist_vtab")
    assert fashion_mnist.write_vtab_style_subset(root) == COUNTS
    return root


def _indices(root, folder):
    """{class name: sorted source indices} of one folder of the tree."""
    out = {}
    for name in sorted(os.listdir(os.path.join(root, folder))):
        files = os.listdir(os.path.join(root, folder, name))
        assert all(f.endswith(".png") for f in files)
        out[name] = sorted(int(f[: -len(".png")]) for f in files)
    return out


def test_loads_both_splits(source):
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = source[split]
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert np.array_equal(np.bincount(labels), np.full(10, n // 10))
        assert images.std() > 10  # real pictures, not a blank placeholder


def test_subset_is_class_balanced_with_exact_counts(subset, source):
    for folder, total in COUNTS.items():
        per_class = _indices(subset, folder)
        assert sorted(per_class) == sorted(fashion_mnist.CLASS_NAMES)
        assert {len(v) for v in per_class.values()} == {total // 10}
        # Every file is in its own class's folder.
        labels = source["test" if folder == "test" else "train"][1]
        for c, name in enumerate(fashion_mnist.CLASS_NAMES):
            assert set(labels[per_class[name]]) == {c}


def test_train_and_val_are_disjoint(subset):
    train = {i for v in _indices(subset, "train").values() for i in v}
    val = {i for v in _indices(subset, "val").values() for i in v}
    assert len(train) == 800 and len(val) == 200 and not train & val


def test_folder_pipeline_reads_the_subset(subset, source):
    assert data.get_num_classes("folder", subset) == 10
    assert data.get_num_examples("folder", subset, "val", "train") == 800
    assert data.get_num_examples("folder", subset, "val", "eval") == 200
    assert data.get_num_examples("folder", subset, "test", "train") == 1000
    assert data.get_num_examples("folder", subset, "test", "eval") == 1000
    data.validate("folder", subset, "val")
    data.validate("folder", subset, "test")
    # The pixels that come out are the source image's, in all three channels.
    files = folder_lib.listing(subset, "val", "eval")
    example = next(folder_lib.dataset(files))
    image = example["image"]
    index = int(os.path.basename(files.paths[0])[: -len(".png")])
    assert image.shape == (28, 28, 3)
    for channel in range(3):
        assert np.array_equal(image[..., channel], source["train"][0][index])
    classes = folder_lib.class_names(subset)
    assert classes[int(example["label"])] == fashion_mnist.CLASS_NAMES[source["train"][1][index]]


def test_existing_subset_is_left_alone(subset):
    png = os.path.join(subset, "train", "Bag", os.listdir(os.path.join(subset, "train", "Bag"))[0])
    before = os.stat(png).st_mtime_ns
    assert fashion_mnist.write_vtab_style_subset(subset) == COUNTS
    assert os.stat(png).st_mtime_ns == before
    with pytest.raises(FileExistsError, match="other settings"):
        fashion_mnist.write_vtab_style_subset(subset, seed=1)


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="not a Fashion-MNIST subset"):
        fashion_mnist.write_vtab_style_subset(str(tmp_path / "mine"))


def test_uneven_sizes_spread_over_classes(tmp_path):
    root = str(tmp_path / "small")
    counts = fashion_mnist.write_vtab_style_subset(root, num_train=15, num_val=10, num_test=3)
    assert counts == {"train": 15, "val": 10, "test": 3}
    # The first 15 % 10 = 5 Fashion-MNIST labels get one image more.
    expected = {name: 1 + (c < 5) for c, name in enumerate(fashion_mnist.CLASS_NAMES)}
    assert {k: len(v) for k, v in _indices(root, "train").items()} == expected
    assert {len(v) for v in _indices(root, "val").values()} == {1}
    assert sum(map(len, _indices(root, "test").values())) == 3


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real = fashion_mnist._write_split

    def fail_on_test(out_dir, *args):
        if out_dir.endswith("test"):
            raise OSError("disk full")
        real(out_dir, *args)

    monkeypatch.setattr(fashion_mnist, "_write_split", fail_on_test)
    with pytest.raises(OSError, match="disk full"):
        fashion_mnist.write_vtab_style_subset(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.find_fashion_mnist(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.write_vtab_style_subset(str(tmp_path / "out"), root=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_corrupt_idx_file_is_a_clear_error(tmp_path):
    for split_files in fashion_mnist._FILES.values():
        for name in split_files:
            src = os.path.join(fashion_mnist.DEFAULT_ROOT, name + ".gz")
            with open(src, "rb") as f:
                head = f.read(5000)
            (tmp_path / (name + ".gz")).write_bytes(head)
    with pytest.raises(ValueError, match="t10k-images"):
        fashion_mnist.load_fashion_mnist("test", str(tmp_path))
