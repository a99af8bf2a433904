"""Image-folder datasets: ``ROOT/{train,val,test}/CLASS/*.{jpg,jpeg,png}``.

Classes are the sorted subfolder names of ``ROOT/train``; a class folder in ``val/`` or ``test/``
must also exist in ``train/``. The config-level split chooses which folders are used:

* ``'val'``: train on ``train/``, evaluate on ``val/``.
* ``'test'``: train on ``train/`` + ``val/``, evaluate on ``test/``.

Files are listed and read with `tf.io.gfile`, so ``gs://`` roots work like local ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Config-level split -> (training folders, evaluation folders).
FOLDER_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "val": (("train",), ("val",)),
    "test": (("train", "val"), ("test",)),
}


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The images of one side (train or eval) of a split, in a fixed order.

    Attributes:
        paths: Image file paths, sorted by folder, class and file name.
        labels: Class index of each path (index into the sorted class names of ``train/``).
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...]


def _subdirs(path: str) -> list[str]:
    # gs:// listings end directory names with '/'; hidden folders (.ipynb_checkpoints, ...) are
    # never classes.
    names = (name.rstrip("/") for name in tf.io.gfile.listdir(path))
    return sorted(
        name
        for name in names
        if not name.startswith(".") and tf.io.gfile.isdir(os.path.join(path, name))
    )


def _images_in(class_dir: str) -> list[str]:
    names = tf.io.gfile.listdir(class_dir)
    return sorted(
        os.path.join(class_dir, name)
        for name in names
        if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _require_dir(root: str, name: str, why: str) -> str:
    path = os.path.join(root, name)
    if not tf.io.gfile.isdir(path):
        raise ValueError(
            f"Image folder {root!r} has no {name}/ subfolder ({path}), which {why}. Expected "
            "ROOT/{train,val,test}/CLASS/*.{jpg,jpeg,png}."
        )
    return path


def class_names(root: str) -> list[str]:
    """Returns the sorted class folder names of ``ROOT/train``.

    Raises:
        ValueError: If ``ROOT/train`` is missing or holds no class folders.
    """
    train_dir = _require_dir(root, "train", "defines the classes")
    names = _subdirs(train_dir)
    if not names:
        raise ValueError(
            f"{train_dir} has no class subfolders; put the images of each class in "
            f"{train_dir}/CLASS_NAME/."
        )
    return names


def list_images(root: str, folders: Sequence[str], classes: Sequence[str]) -> FolderListing:
    """Lists the images of `folders` (e.g. ``('train', 'val')``) under `root`.

    Args:
        root: Dataset root holding ``train/`` and, as needed, ``val/`` and ``test/``.
        folders: Subfolders of `root` to read, in order.
        classes: Class names from `class_names`; their order defines the labels.

    Returns:
        The sorted image paths and their labels.

    Raises:
        ValueError: If a folder is missing, has a class folder that ``train/`` does not have, or
            the listed folders hold no images. A ``train/`` class folder without images is an error
            too, since its class could never be learned.
    """
    label_of = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for folder in folders:
        folder_dir = _require_dir(root, folder, f"the {'/'.join(folders)} data needs")
        for name in _subdirs(folder_dir):
            if name not in label_of:
                raise ValueError(
                    f"Class folder {os.path.join(folder_dir, name)} has no counterpart in "
                    f"{os.path.join(root, 'train')}; classes are the train/ subfolders: "
                    f"{', '.join(classes)}."
                )
            images = _images_in(os.path.join(folder_dir, name))
            if not images and folder == "train":
                raise ValueError(
                    f"Class folder {os.path.join(folder_dir, name)} has no "
                    f"{'/'.join(IMAGE_EXTENSIONS)} images."
                )
            paths.extend(images)
            labels.extend([label_of[name]] * len(images))
    if not paths:
        where = ", ".join(os.path.join(root, f) for f in folders)
        raise ValueError(f"No {'/'.join(IMAGE_EXTENSIONS)} images found in {where}.")
    return FolderListing(tuple(paths), tuple(labels))


def check_split(split: str) -> None:
    """Raises ValueError unless `split` is a config-level split (``'val'`` or ``'test'``)."""
    if split not in FOLDER_SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {tuple(FOLDER_SPLITS)}.")


def listing(root: str, split: str, subset: str) -> FolderListing:
    """Lists the training (`subset='train'`) or evaluation (`'eval'`) images of a split."""
    check_split(split)
    train_folders, eval_folders = FOLDER_SPLITS[split]
    return list_images(
        root, train_folders if subset == "train" else eval_folders, class_names(root)
    )


def validate(root: str, split: str) -> None:
    """Checks the folders `split` needs exist and hold images; raises ValueError otherwise."""
    listing(root, split, "train")
    listing(root, split, "eval")


def _read_image(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def dataset(files: FolderListing, shard_index: int = 0, shard_count: int = 1) -> tf.data.Dataset:
    """A dataset of ``{'image': uint8 [H, W, 3], 'label': int32}`` in listing order.

    Args:
        files: The images to read.
        shard_index: Keep only examples ``shard_index, shard_index + shard_count, ...``.
        shard_count: Number of shards.
    """
    ds = tf.data.Dataset.from_tensor_slices(
        {"path": list(files.paths), "label": tf.constant(files.labels, tf.int32)}
    )
    # Shard the file names, not the images, so a host never reads files it drops.
    ds = ds.shard(shard_count, shard_index)
    return ds.map(
        lambda ex: {"image": _read_image(ex["path"]), "label": ex["label"]},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
