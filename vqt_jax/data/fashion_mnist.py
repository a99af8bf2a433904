"""Fashion-MNIST from Debian's `dataset-fashion-mnist`, as a VTAB-1k-sized image-folder task.

The offline demo needs real images that a package registry provides:

    apt-get install dataset-fashion-mnist   # /usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz

`load_fashion_mnist` reads the IDX files (70k 28x28 grayscale images, 10 classes) with numpy.
`write_vtab_style_subset` draws class-balanced train800 / val200 / test1000 subsets and writes
them as the image-folder tree `folder.py` reads (`task='folder'`):

    OUT/{train,val,test}/{class name}/{source index}.png

train and val come from disjoint images of Fashion-MNIST's training split, test from its test
split. The images are written as 3-channel PNGs (the gray value in R, G and B) at 28x28; the
pipeline resizes them. Note that the folder pipeline numbers classes in sorted folder-name
order, which is not Fashion-MNIST's label order (see `CLASS_NAMES`).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from typing import Literal

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

# Fashion-MNIST label i is CLASS_NAMES[i]; names are folder-safe ('/' and ' ' replaced).
CLASS_NAMES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle_boot")

Split = Literal["train", "test"]
_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SIZES = {"train": 60000, "test": 10000}
# Written into a finished tree: its presence means the tree is complete, and it records what
# the tree holds. A hidden name, so the folder reader never takes it for a class or image.
_MARKER = ".fashion_mnist_subset.json"


def find_fashion_mnist(root: str = DEFAULT_ROOT) -> dict[str, tuple[str, str]]:
    """Locates the IDX files (gzipped as Debian ships them, or uncompressed).

    Args:
      root: folder holding the four files.

    Returns:
      {'train' | 'test': (images path, labels path)}.

    Raises:
      FileNotFoundError: a file is missing; says how to install the dataset.
    """
    candidates = {name: (os.path.join(root, name + ".gz"), os.path.join(root, name))
                  for names in _FILES.values() for name in names}
    found = {name: next((p for p in paths if os.path.isfile(p)), None)
             for name, paths in candidates.items()}
    missing = [candidates[name][0] for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {root} (missing "
                                f"{', '.join(missing)}); install it with: {INSTALL_HINT}")
    return {split: (found[images], found[labels]) for split, (images, labels) in _FILES.items()}


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes with `ndim` dimensions."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read the IDX file ({e})") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: too short for an IDX header")
    if data[:4] != bytes([0, 0, 0x08, ndim]):  # IDX magic: 0x08 = unsigned bytes, then ndim.
        raise ValueError(f"{path}: not an unsigned-byte IDX file with {ndim} dimensions "
                         f"(header {data[:4].hex()})")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(
            f"{path}: {len(data) - header} bytes of data for shape {shape} (truncated?)")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: Split, root: str = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Reads one Fashion-MNIST split.

    Args:
      split: 'train' (60000 images) or 'test' (10000).
      root: where the IDX files are.

    Returns:
      (images uint8 [N, 28, 28], labels int64 [N] in 0..9, indexing `CLASS_NAMES`).

    Raises:
      FileNotFoundError: the dataset is not installed.
      ValueError: unknown split, or a file that is not the expected IDX data.
    """
    if split not in _FILES:
        raise ValueError(f"Unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'.")
    images_path, labels_path = find_fashion_mnist(root)[split]
    images = _read_idx(images_path, 3)
    labels = _read_idx(labels_path, 1).astype(np.int64)
    if images.shape != (_SIZES[split], 28, 28) or labels.shape != (_SIZES[split],):
        raise ValueError(
            f"Fashion-MNIST {split} in {root}: images {images.shape} and labels {labels.shape}, "
            f"expected ({_SIZES[split]}, 28, 28) and ({_SIZES[split]},)")
    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{labels_path}: label {labels.max()} is out of range 0..9")
    return images, labels


def _balanced_picks(labels: np.ndarray, totals: list[int],
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint random index sets of the sizes `totals`, sorted; each set is spread over the
    classes as evenly as possible (earlier classes get the rest)."""
    picks: list[list[np.ndarray]] = [[] for _ in totals]
    k = len(CLASS_NAMES)
    for c in range(k):
        pool = rng.permutation(np.flatnonzero(labels == c))
        sizes = [total // k + (c < total % k) for total in totals]
        if sum(sizes) > len(pool):
            raise ValueError(
                f"class {CLASS_NAMES[c]} has {len(pool)} images, {sum(sizes)} were asked for")
        # Consecutive slices of the pool: sizes[0] for the first set, sizes[1] for the next, ...
        for pick, part in zip(picks, np.split(pool, np.cumsum(sizes)), strict=False):
            pick.append(part)
    return [np.sort(np.concatenate(p)) for p in picks]


def _write_split(out_dir: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    from PIL import Image  # noqa: PLC0415 - lazy: reading the dataset needs numpy only.

    for name in CLASS_NAMES:
        os.makedirs(os.path.join(out_dir, name))
    for i in indices:
        rgb = np.repeat(images[i][:, :, None], 3, axis=2)
        Image.fromarray(rgb).save(os.path.join(out_dir, CLASS_NAMES[labels[i]], f"{i}.png"))


def _existing(out_root: str, settings: dict) -> dict[str, int] | None:
    """The counts of a finished tree at `out_root` made with `settings`, or None if absent."""
    if not os.path.exists(out_root):
        return None
    marker = os.path.join(out_root, _MARKER)
    if not os.path.isfile(marker):
        raise FileExistsError(f"{out_root} exists but is not a Fashion-MNIST subset written by "
                              f"this module (no {_MARKER}); remove it or choose another folder")
    with open(marker) as f:
        recorded = json.load(f)
    if recorded.get("settings") != settings:
        raise FileExistsError(f"{out_root} holds a Fashion-MNIST subset with other settings "
                              f"({recorded.get('settings')}, asked for {settings}); remove it or "
                              "choose another folder")
    return dict(recorded["counts"])


def write_vtab_style_subset(out_root: str, *, num_train: int = 800, num_val: int = 200,
                            num_test: int = 1000, seed: int = 0,
                            root: str = DEFAULT_ROOT) -> dict[str, int]:
    """Writes class-balanced train/val/test subsets of Fashion-MNIST as an image-folder tree.

    Each class gets `num_x // 10` images of a subset (the first `num_x % 10` classes one more).
    train and val are disjoint draws from Fashion-MNIST's training split, test is drawn from its
    test split; the draws are deterministic in `seed`. Files are
    `out_root/{train,val,test}/{class name}/{index in the source split}.png`.

    The tree is built in a temporary folder beside `out_root` and renamed into place when
    complete, so `out_root` is either absent or whole. If it already holds a subset written
    with the same settings, it is left as it is.

    Args:
      out_root: the folder to create (the `data_dir` of `task='folder'`).
      num_train, num_val, num_test: subset sizes.
      seed: seed of the random draws.
      root: where the Fashion-MNIST IDX files are.

    Returns:
      {'train': num_train, 'val': num_val, 'test': num_test}: images in each folder.

    Raises:
      FileNotFoundError: the dataset is not installed.
      FileExistsError: `out_root` exists but is not a subset written with these settings.
      ValueError: negative sizes, or more images asked for than a class has.
    """
    if min(num_train, num_val, num_test) < 0:
        raise ValueError("subset sizes must be >= 0")
    out_root = os.path.abspath(out_root)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    settings = {**counts, "seed": seed}
    if (done := _existing(out_root, settings)) is not None:
        return done

    rng = np.random.default_rng(seed)
    train_images, train_labels = load_fashion_mnist("train", root)
    test_images, test_labels = load_fashion_mnist("test", root)
    train_idx, val_idx = _balanced_picks(train_labels, [num_train, num_val], rng)
    (test_idx,) = _balanced_picks(test_labels, [num_test], rng)

    parent = os.path.dirname(out_root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_root)}.tmp-")
    try:
        # mkdtemp makes a private (0700) folder; the finished tree is an ordinary one.
        os.chmod(tmp, 0o755)
        _write_split(os.path.join(tmp, "train"), train_images, train_labels, train_idx)
        _write_split(os.path.join(tmp, "val"), train_images, train_labels, val_idx)
        _write_split(os.path.join(tmp, "test"), test_images, test_labels, test_idx)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump({"settings": settings, "counts": counts, "classes": list(CLASS_NAMES)}, f,
                      indent=1)
        try:
            os.rename(tmp, out_root)
        except OSError:
            # Another process finished the same tree first: use it if it is the same subset.
            done = _existing(out_root, settings)
            if done is None:
                raise
            shutil.rmtree(tmp)
            return done
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
