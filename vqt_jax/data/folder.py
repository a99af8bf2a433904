"""Image-folder datasets: ``ROOT/{train,val,test}/CLASS/*.{jpg,jpeg,png,bmp,gif,webp}``.

Classes are the sorted subfolder names of ``ROOT/train``; a class folder in ``val/`` or ``test/``
must also exist in ``train/``. The config-level split chooses which folders are used:

* ``'val'``: train on ``train/``, evaluate on ``val/``.
* ``'test'``: train on ``train/`` + ``val/``, evaluate on ``test/``.

Every format `tf.io.decode_image` reads is used (GIFs: the first frame). Other files in a class
folder (``.txt``, ``.tiff``, ``.heic``, subfolders, ...) are skipped with one warning per side
(training or evaluation) that counts them by extension; a class folder that holds files but
none of them readable is an error, since its class would silently drop out of that side.
Hidden files (``.DS_Store``, macOS's ``._name``) are ignored.

`validate` decodes every image of both sides with the pipeline's own decoder before training,
so a truncated file fails the run at once with its path. Files are listed and read with
`tf.io.gfile`, so ``gs://`` roots work like local ones.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from vqt_jax.progress import Progress

# The extensions `tf.io.decode_image` reads. WebP came to TF together with `tf.io.decode_webp`;
# test for that function rather than decode a sample, since running an op at import would
# initialise TF before pipeline.py can hide the GPUs from it. (decode_image also detects JPEG XL,
# but nothing here can write one to test it, so .jxl files are reported as skipped.)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif") + (
    (".webp",) if hasattr(tf.io, "decode_webp") else ()
)

# Config-level split -> (training folders, evaluation folders).
FOLDER_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "val": (("train",), ("val",)),
    "test": (("train", "val"), ("test",)),
}

# How many bad or skipped paths a message names before it only counts.
_EXAMPLES = 3
_SUBFOLDER = "(subfolder)"
_NO_EXTENSION = "(no extension)"


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


def _kind(path: str) -> str:
    """What a skipped entry is, for the counts in messages: its extension, or a subfolder."""
    if tf.io.gfile.isdir(path):
        return _SUBFOLDER
    return os.path.splitext(path)[1].lower() or _NO_EXTENSION


def _entries(class_dir: str) -> tuple[list[str], list[str]]:
    """(sorted image paths, sorted skipped paths) of a class folder; hidden names are left out."""
    images, skipped = [], []
    for name in tf.io.gfile.listdir(class_dir):
        if name.startswith("."):
            continue
        path = os.path.join(class_dir, name.rstrip("/"))
        (images if name.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(path)
    return sorted(images), sorted(skipped)


def _count_kinds(paths: Sequence[str]) -> str:
    """'.tiff: 2, .txt: 1': skipped entries counted by kind, most frequent first."""
    counts = collections.Counter(_kind(path) for path in paths)
    return ", ".join(f"{kind}: {n}" for kind, n in counts.most_common())


def _readable() -> str:
    return "/".join(IMAGE_EXTENSIONS)


def _require_dir(root: str, name: str, why: str) -> str:
    path = os.path.join(root, name)
    if not tf.io.gfile.isdir(path):
        raise ValueError(
            f"Image folder {root!r} has no {name}/ subfolder ({path}), which {why}. Expected "
            f"ROOT/{{train,val,test}}/CLASS/*{{{','.join(IMAGE_EXTENSIONS)}}}."
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


# Skip warnings already given in this process: `listing` runs for every iterator and every
# evaluation, and one warning per side is enough.
_WARNED: set[tuple[str, ...]] = set()


def _warn_skipped(folder_dirs: Sequence[str], skipped: Sequence[str]) -> None:
    key = (*folder_dirs, "|", *skipped)
    if key in _WARNED:
        return
    _WARNED.add(key)
    examples = ", ".join(skipped[:_EXAMPLES]) + (", ..." if len(skipped) > _EXAMPLES else "")
    logging.warning(
        "Skipping %d file%s in %s, not %s images (%s; e.g. %s). Convert any that should be "
        "used.",
        len(skipped), "" if len(skipped) == 1 else "s", " and ".join(folder_dirs), _readable(),
        _count_kinds(skipped), examples,
    )


def list_images(root: str, folders: Sequence[str], classes: Sequence[str]) -> FolderListing:
    """Lists the images of `folders` (e.g. ``('train', 'val')``) under `root`.

    Files of other formats are skipped, with one warning for all of `folders` that counts them.

    Args:
        root: Dataset root holding ``train/`` and, as needed, ``val/`` and ``test/``.
        folders: Subfolders of `root` to read, in order.
        classes: Class names from `class_names`; their order defines the labels.

    Returns:
        The sorted image paths and their labels.

    Raises:
        ValueError: If a folder is missing, has a class folder that ``train/`` does not have, or
            the listed folders hold no images. A ``train/`` class folder without images is an error
            too, since its class could never be learned, and so is any class folder whose files
            are all of formats this pipeline skips: the user meant them as data, and its class
            would silently be missing from training or, worse, from the evaluation score.
    """
    label_of = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    all_skipped: list[str] = []
    folder_dirs = []
    for folder in folders:
        folder_dir = _require_dir(root, folder, f"the {'/'.join(folders)} data needs")
        folder_dirs.append(folder_dir)
        for name in _subdirs(folder_dir):
            class_dir = os.path.join(folder_dir, name)
            if name not in label_of:
                raise ValueError(
                    f"Class folder {class_dir} has no counterpart in "
                    f"{os.path.join(root, 'train')}; classes are the train/ subfolders: "
                    f"{', '.join(classes)}."
                )
            images, skipped = _entries(class_dir)
            if not images and skipped:
                raise ValueError(
                    f"Class folder {class_dir} holds {len(skipped)} "
                    f"file{'' if len(skipped) == 1 else 's'} but no {_readable()} images "
                    f"({_count_kinds(skipped)}; e.g. {skipped[0]}), so class {name!r} would be "
                    f"missing from the {folder}/ data; convert them to one of these formats."
                )
            if not images and folder == "train":
                raise ValueError(f"Class folder {class_dir} has no {_readable()} images.")
            paths.extend(images)
            labels.extend([label_of[name]] * len(images))
            all_skipped.extend(skipped)
    if not paths:
        where = ", ".join(os.path.join(root, f) for f in folders)
        raise ValueError(f"No {_readable()} images found in {where}.")
    if all_skipped:
        _warn_skipped(folder_dirs, all_skipped)
    return FolderListing(tuple(paths), tuple(labels))


def image_files(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image files, skipped entries) of files and folders to classify.

    A folder is searched recursively for files with an image extension (sorted, hidden names
    left out; other files are returned as skipped); a file given by name is kept whatever its
    extension (decoding decides). gs:// paths work as local ones.

    Raises:
      FileNotFoundError: an input that does not exist.
    """
    files, skipped = [], []
    for path in inputs:
        if tf.io.gfile.isdir(path):
            found = []
            for root, _, names in tf.io.gfile.walk(path):
                relative = os.path.relpath(root.rstrip("/"), path.rstrip("/"))
                if any(part.startswith(".") for part in relative.split(os.sep) if part != "."):
                    continue
                found += [os.path.join(root, n) for n in names if not n.startswith(".")]
            for full in sorted(found):
                (files if full.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(full)
        elif tf.io.gfile.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"No such image or folder: {path}")
    return files, skipped


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
    """Checks the folders `split` needs exist and hold images that all decode.

    Both sides are checked (training and evaluation), so a broken test image fails the run
    before training rather than after it.

    Raises:
        ValueError: Naming the problem: a missing folder, a class ``train/`` lacks, a class
            folder without readable images, or the files that do not decode.
    """
    train = listing(root, split, "train")
    evaluation = listing(root, split, "eval")
    check_decodable(root, train.paths + evaluation.paths)


# --------------------------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------------------------


def _read_image(path: tf.Tensor) -> tf.Tensor:
    # The one decoder of this module: `dataset` reads with it and `check_decodable` tests with
    # it, so a file that passes the check is one the pipeline can read.
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _reason(error: tf.errors.OpError) -> str:
    """The decoder's own words, without TF's '{{function_node ...}}' and '[Op:...]' wrapping."""
    message = re.sub(r"\{\{[^}]*\}\}", "", error.message)
    message = re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.S)
    return message.strip().rstrip(".") or type(error).__name__


def find_undecodable(paths: Sequence[str], what: str = "images") -> list[tuple[str, str]]:
    """Decodes every file as `dataset` does; returns (path, reason) of those that fail.

    A parallel tf.data pass finds the failures (a failing element is dropped, so the indices
    that come out are the good files); only those are decoded again, eagerly, for the reason.

    Args:
        paths: Image files.
        what: Names the phase in the progress lines.
    """
    if not paths:
        return []
    indices = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths), dtype=tf.int64), tf.constant(list(paths)))
    )
    # The shape depends on the decoded pixels, so the decode cannot be pruned from the graph.
    decoded = indices.map(
        lambda i, path: (i, tf.shape(_read_image(path))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    progress = Progress(f"Checking that the {what} decode", len(paths), "images")
    ok = np.zeros(len(paths), bool)
    for batch, _ in decoded.ignore_errors().batch(256).as_numpy_iterator():
        ok[batch] = True
        progress.update(len(batch))
    bad = []
    for i in np.flatnonzero(~ok):
        try:
            _read_image(tf.constant(paths[i]))
        except tf.errors.OpError as e:
            bad.append((paths[i], _reason(e)))
        progress.update(1)
    progress.done()
    return bad


def undecodable_error(root: str, bad: Sequence[tuple[str, str]]) -> ValueError:
    """The error for files that do not decode: how many, the first few and why."""
    n = len(bad)
    named = "; ".join(f"{path}: {reason}" for path, reason in bad[:_EXAMPLES])
    more = f"; and {n - _EXAMPLES} more" if n > _EXAMPLES else ""
    return ValueError(
        f"Cannot decode {n} image{'s' if n > 1 else ''} in {root} ({'e.g. ' if n > 1 else ''}"
        f"{named}{more}); fix or remove {'them' if n > 1 else 'it'}."
    )


# Fingerprints of file sets that decoded in this process (paths, sizes, modification times):
# a sweep validates the same folder before every run, and checking again would only cost time.
_DECODED: set[str] = set()


def _fingerprint(paths: Sequence[str]) -> str | None:
    """A hash of the paths, sizes and modification times; None if a file cannot be stat'ed."""
    try:
        # Threads, since a gs:// stat is a request; os.stat-like calls release the GIL.
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            stats = list(pool.map(tf.io.gfile.stat, paths))
    except tf.errors.OpError:
        return None
    digest = hashlib.sha256()
    for path, stat in zip(paths, stats, strict=True):
        digest.update(f"{path}\0{stat.length}\0{stat.mtime_nsec}\n".encode())
    return digest.hexdigest()


def check_decodable(root: str, paths: Sequence[str], remember: bool = True) -> None:
    """Raises ValueError naming the files of `paths` that the pipeline cannot decode.

    Args:
        root: The folder named in the message.
        paths: The files to check.
        remember: Skip the check for a set of files (same paths, sizes and modification times)
            that already passed in this process, and remember this one if it passes.
    """
    key = _fingerprint(paths) if remember else None
    if key is not None and key in _DECODED:
        return
    bad = find_undecodable(paths, f"images in {root}")
    if bad:
        logging.error(
            "Cannot decode these %d files of %s:\n%s",
            len(bad), root, "\n".join(f"  {path}: {reason}" for path, reason in bad),
        )
        raise undecodable_error(root, bad)
    if key is not None:
        _DECODED.add(key)


@contextlib.contextmanager
def naming_undecodable(root: str, files: FolderListing) -> Iterator[None]:
    """Turns a read or decode failure inside a `dataset` of `files` into an error naming files.

    tf.data reports a failed decode as TF's bare "Invalid PNG data, size 536". On such an error
    (only then: the happy path pays nothing) every file is checked again and a ValueError names
    the bad ones; if all decode now, the original error stands. `validate` normally catches bad
    files first; this covers a file that changed after it.
    """
    try:
        yield
    except tf.errors.OpError as e:
        bad = find_undecodable(files.paths, f"images in {root} after a read error")
        if bad:
            raise undecodable_error(root, bad) from e
        raise


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
