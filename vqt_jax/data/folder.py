"""Image-folder datasets: ``ROOT/{train,val,test}/CLASS/*.{jpg,jpeg,png,bmp,gif,webp}``.

Classes are the sorted subfolder names of ``ROOT/train``; a class folder in ``val/`` or ``test/``
must also exist in ``train/``. The config-level split chooses which folders are used:

* ``'val'``: train on ``train/``, evaluate on ``val/``.
* ``'test'``: train on ``train/`` + ``val/``, evaluate on ``test/``.

Every format of `imaging.IMAGE_EXTENSIONS` is used (GIFs: the first frame). Other files in a class
folder (``.txt``, ``.tiff``, ``.heic``, subfolders, ...) are skipped with one warning per side
(training or evaluation) that counts them by extension; a class folder that holds files but
none of them readable is an error, since its class would silently drop out of that side.
Hidden files (``.DS_Store``, macOS's ``._name``) are ignored.

`validate` decodes every image of both sides with the pipeline's own decoder before training,
so a truncated file fails the run at once with its path. Remote roots (``gs://``) are listed
and read through `etils.epath`, local ones with `os`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging
from etils import epath

from vqt_jax.data import imaging
from vqt_jax.progress import Progress

IMAGE_EXTENSIONS = imaging.IMAGE_EXTENSIONS
# Decoding threads: PIL and numpy release the GIL while they work.
THREADS = min(32, (os.cpu_count() or 1) + 4)

# Config-level split -> (training folders, evaluation folders).
FOLDER_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "val": (("train",), ("val",)), "test": (("train", "val"), ("test",))}

# How many bad or skipped paths a message names before it only counts.
_EXAMPLES = 3
_READABLE = "/".join(IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The images of one side (train or eval) of a split, in a fixed order.

    Attributes:
        paths: Image file paths, sorted by folder, class and file name.
        labels: Class index of each path (index into the sorted class names of ``train/``).
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...]


def _remote(path: str) -> bool:
    return "://" in path


def _isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if _remote(path) else os.path.isdir(path)


def _listdir(path: str) -> list[str]:
    return [p.name for p in epath.Path(path).iterdir()] if _remote(path) else os.listdir(path)


def stat(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a local or remote file."""
    if _remote(path):
        st = epath.Path(path).stat()
        return int(st.length), int(st.mtime * 1_000_000_000)
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def stats(paths: Sequence[str]) -> list[tuple[int, int]]:
    """`stat` of every path, in order, on threads: a gs:// stat is one request each (and
    os.stat releases the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        return list(pool.map(stat, paths))


def _subdirs(path: str) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, ...) are never classes.
    return sorted(name for name in _listdir(path)
                  if not name.startswith(".") and _isdir(os.path.join(path, name)))


def _kind(path: str) -> str:
    """What a skipped entry is, for the counts in messages: its extension, or a subfolder."""
    return "(subfolder)" if _isdir(path) else os.path.splitext(path)[1].lower() or "(no extension)"


def _entries(class_dir: str) -> tuple[list[str], list[str]]:
    """(sorted image paths, sorted skipped paths) of a class folder; hidden names are left out."""
    images, skipped = [], []
    for name in _listdir(class_dir):
        if name.startswith("."):
            continue
        path = os.path.join(class_dir, name.rstrip("/"))
        (images if name.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(path)
    return sorted(images), sorted(skipped)


def _count_kinds(paths: Sequence[str]) -> str:
    """'.tiff: 2, .txt: 1': skipped entries counted by kind, most frequent first."""
    counts = collections.Counter(_kind(path) for path in paths)
    return ", ".join(f"{kind}: {n}" for kind, n in counts.most_common())


def _require_dir(root: str, name: str, why: str) -> str:
    path = os.path.join(root, name)
    if not _isdir(path):
        raise ValueError(
            f"Image folder {root!r} has no {name}/ subfolder ({path}), which {why}. Expected "
            f"ROOT/{{train,val,test}}/CLASS/*{{{','.join(IMAGE_EXTENSIONS)}}}.")
    return path


def class_names(root: str) -> list[str]:
    """Returns the sorted class folder names of ``ROOT/train``.

    Raises:
        ValueError: If ``ROOT/train`` is missing or holds no class folders.
    """
    train_dir = _require_dir(root, "train", "defines the classes")
    names = _subdirs(train_dir)
    if not names:
        raise ValueError(f"{train_dir} has no class subfolders; put the images of each class in "
                         f"{train_dir}/CLASS_NAME/.")
    return names


# Skip warnings already given in this process: `listing` runs for every iterator and every
# evaluation, and one warning per side is enough.
_WARNED: set[tuple[str, ...]] = set()


def listing(root: str, split: str, subset: str) -> FolderListing:
    """Lists the training (`subset='train'`) or evaluation (`'eval'`) images of a split.

    The folders of that side (e.g. ``('train', 'val')``, see `FOLDER_SPLITS`) are read in
    order; labels index the sorted class names of ``train/`` (`class_names`). Files of other
    formats are skipped, with one warning for all of the side's folders that counts them.

    Args:
        root: Dataset root holding ``train/`` and, as needed, ``val/`` and ``test/``.
        split: The config-level split, ``'val'`` or ``'test'``.
        subset: ``'train'`` or ``'eval'``.

    Returns:
        The sorted image paths and their labels.

    Raises:
        ValueError: If the split is unknown, a folder is missing, has a class folder that
            ``train/`` does not have, or the side's folders hold no images. A ``train/`` class
            folder without images is an error too, since its class could never be learned, and
            so is any class folder whose files are all of formats this pipeline skips: the user
            meant them as data, and its class would silently be missing from training or, worse,
            from the evaluation score.
    """
    if split not in FOLDER_SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {tuple(FOLDER_SPLITS)}.")
    folders = FOLDER_SPLITS[split][0 if subset == "train" else 1]
    classes = class_names(root)
    label_of = {name: i for i, name in enumerate(classes)}
    paths, labels, skipped = [], [], []
    for folder in folders:
        folder_dir = _require_dir(root, folder, f"the {'/'.join(folders)} data needs")
        for name in _subdirs(folder_dir):
            class_dir = os.path.join(folder_dir, name)
            if name not in label_of:
                raise ValueError(f"Class folder {class_dir} has no counterpart in "
                                 f"{os.path.join(root, 'train')}; classes are the train/ "
                                 f"subfolders: {', '.join(classes)}.")
            images, others = _entries(class_dir)
            if not images and others:
                raise ValueError(
                    f"Class folder {class_dir} holds {len(others)} "
                    f"file{'' if len(others) == 1 else 's'} but no {_READABLE} images "
                    f"({_count_kinds(others)}; e.g. {others[0]}), so class {name!r} would be "
                    f"missing from the {folder}/ data; convert them to one of these formats.")
            if not images and folder == "train":
                raise ValueError(f"Class folder {class_dir} has no {_READABLE} images.")
            paths.extend(images)
            labels.extend([label_of[name]] * len(images))
            skipped.extend(others)
    folder_dirs = [os.path.join(root, folder) for folder in folders]
    if not paths:
        raise ValueError(f"No {_READABLE} images found in {', '.join(folder_dirs)}.")
    key = (*folder_dirs, "|", *skipped)
    if skipped and key not in _WARNED:
        _WARNED.add(key)
        more = ", ..." if len(skipped) > _EXAMPLES else ""
        logging.warning("Skipping %d file%s in %s, not %s images (%s; e.g. %s%s). Convert any "
                        "that should be used.", len(skipped), "" if len(skipped) == 1 else "s",
                        " and ".join(folder_dirs), _READABLE, _count_kinds(skipped),
                        ", ".join(skipped[:_EXAMPLES]), more)
    return FolderListing(tuple(paths), tuple(labels))


def _walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk` that follows symbolic links to folders, each real folder once (a link loop
    ends where it comes back)."""
    seen = set()
    for root, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield root, dirs, names


def image_files(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image files, skipped entries) of files and folders to classify.

    A folder is searched recursively for files with an image extension (sorted, hidden names
    left out; other files are returned as skipped), following links to folders, each real
    folder once; a file given by name is kept whatever its
    extension (decoding decides). gs:// paths work as local ones.

    Raises:
      FileNotFoundError: an input that does not exist.
    """
    files, skipped = [], []
    for path in inputs:
        if _isdir(path):
            found = []
            for root, _, names in (epath.Path(path).walk() if _remote(path) else _walk(path)):
                root = str(root)
                relative = os.path.relpath(root.rstrip("/"), path.rstrip("/"))
                if any(part.startswith(".") for part in relative.split(os.sep) if part != "."):
                    continue
                found += [os.path.join(root, n) for n in names if not n.startswith(".")]
            for full in sorted(found):
                (files if full.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(full)
        elif epath.Path(path).exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"No such image or folder: {path}")
    return files, skipped


# --------------------------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------------------------


def read_image(path: str) -> np.ndarray:
    """Reads and decodes one image file to uint8 ``[H, W, 3]`` (`imaging.decode`).

    The one decoder of this module: `dataset` reads with it and `validate` tests with it,
    so a file that passes the check is one the pipeline can read.

    Raises:
        imaging.DecodeError: The file does not decode (or cannot be read).
    """
    file = epath.Path(path) if _remote(path) else pathlib.Path(path)
    try:
        return imaging.decode(file.read_bytes())
    except OSError as e:
        raise imaging.DecodeError(f"cannot read it: {e.strerror or e}") from e


def _failure(path: str) -> str | None:
    """Why `path` does not decode, or None if it does."""
    try:
        read_image(path)
    except imaging.DecodeError as e:
        return str(e)
    return None


def find_undecodable(paths: Sequence[str], what: str = "images") -> list[tuple[str, str]]:
    """Decodes every file as `dataset` does; returns (path, reason) of those that fail.

    Args:
        paths: Image files.
        what: Names the phase in the progress lines.
    """
    if not paths:
        return []
    progress = Progress(f"Checking that the {what} decode", len(paths), "images")
    bad = []
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for path, reason in zip(paths, pool.map(_failure, paths), strict=True):
            if reason is not None:
                bad.append((path, reason))
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
        f"{named}{more}); fix or remove {'them' if n > 1 else 'it'}.")


# Fingerprints of file sets that decoded in this process (paths, sizes, modification times):
# a sweep validates the same folder before every run, and checking again would only cost time.
_DECODED: set[str] = set()


def _fingerprint(paths: Sequence[str]) -> str | None:
    """A hash of the paths, sizes and modification times; None if a file cannot be stat'ed."""
    try:
        sized = zip(paths, stats(paths), strict=True)
    except OSError:
        return None
    lines = "".join(f"{path}\0{size}\0{mtime_ns}\n" for path, (size, mtime_ns) in sized)
    return hashlib.sha256(lines.encode()).hexdigest()


def validate(root: str, split: str) -> None:
    """Checks the folders `split` needs exist and hold images that all decode.

    Both sides are checked (training and evaluation), so a broken test image fails the run
    before training rather than after it. A set of files (same paths, sizes and modification
    times) that already passed in this process is not decoded again.

    Raises:
        ValueError: Naming the problem: a missing folder, a class ``train/`` lacks, a class
            folder without readable images, or the files that do not decode.
    """
    paths = listing(root, split, "train").paths + listing(root, split, "eval").paths
    key = _fingerprint(paths)
    if key in _DECODED:  # None (a file that cannot be stat'ed) is never remembered.
        return
    bad = find_undecodable(paths, f"images in {root}")
    if bad:
        logging.error("Cannot decode these %d files of %s:\n%s", len(bad), root,
                      "\n".join(f"  {path}: {reason}" for path, reason in bad))
        raise undecodable_error(root, bad)
    if key is not None:
        _DECODED.add(key)


def load(root: str, path: str) -> np.ndarray:
    """`read_image`, with a failure raised as `undecodable_error` naming the file.

    `validate` normally catches bad files first; this covers a file that changed after it.
    """
    try:
        return read_image(path)
    except imaging.DecodeError as e:
        raise undecodable_error(root, [(path, str(e))]) from e


def dataset(files: FolderListing) -> Iterator[dict[str, np.ndarray]]:
    """Examples ``{'image': uint8 [H, W, 3], 'label': int32}`` of `files`, in listing order."""
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for image, label in zip(pool.map(read_image, files.paths), files.labels, strict=True):
            yield {"image": image, "label": np.int32(label)}
