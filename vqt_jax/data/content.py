"""What a run's training data is, as a small JSON-able key that changes when the data does.

The cache of the frozen backbone's outputs (`vqt_jax.cache`) is named by a hash of everything
its contents depend on. Hashing only the data's *location* would keep serving a stale cache
after the data changed in place (images moved between classes, files replaced), so the key
covers the contents as cheaply as can be done without reading the images:

* an image folder: every training file's path (relative to the root), size, modification
  time (ns) and label, hashed;
* a TFDS task: the prepared dataset's full name, version (read from its ``dataset_info.json``,
  never downloaded) and the training split string;

and, for both, the image decoder and resize (`imaging.IMPLEMENTATION`), so a cache made by the
earlier TensorFlow pipeline (whose keys lack it) or by another implementation is not reused.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vqt_jax.data import folder as folder_lib
from vqt_jax.data import imaging
from vqt_jax.data import pipeline as pipeline_lib
from vqt_jax.data import tasks as tasks_lib


def _folder_key(data_dir: str, split: str) -> dict[str, Any]:
    files = folder_lib.listing(data_dir, split, "train")
    # Paths relative to the root: the key must not change when only the root is spelled
    # differently (trailing slash); the root itself is part of the cache fingerprint already.
    prefix = data_dir.rstrip("/") + "/"
    digest = hashlib.sha256()
    stats = folder_lib.stats(files.paths)
    for path, (size, mtime_ns), label in zip(files.paths, stats, files.labels, strict=True):
        # One JSON line per file: unambiguous whatever characters the names hold.
        line = json.dumps([path.removeprefix(prefix), size, mtime_ns, label])
        digest.update(line.encode() + b"\n")
    return {"task": pipeline_lib.FOLDER, "split": split, "num_files": len(files.paths),
            "files_sha256": digest.hexdigest(), "pipeline": imaging.IMPLEMENTATION}


def content_key(task: str, data_dir: str | None, split: str) -> dict[str, Any]:
    """A key of the training data of a run that changes whenever its contents do.

    Args:
      task: a VTAB-1k task name, or 'folder'.
      data_dir: the TFDS data dir (None: TFDS's default), or the image-folder root.
      split: the config-level split, 'val' or 'test'.

    Returns:
      A JSON-serialisable dict. For 'folder': the task, split, number of training files and a
      SHA-256 over each file's relative path, size, mtime_ns and label. For a TFDS task: the
      task, the prepared dataset's full name and version, and the TFDS training split. Both
      name the decoder and resize (``'pipeline'``).

    Raises:
      ValueError: for an unknown task or split, a missing folder, or a TFDS dataset that is
        not prepared (`DatasetNotPreparedError`).
    """
    pipeline_lib._check_split(split)  # noqa: SLF001 - same package.
    if task == pipeline_lib.FOLDER:
        return _folder_key(pipeline_lib._folder_root(data_dir), split)  # noqa: SLF001
    spec = tasks_lib.get_task(task)
    tfds_split = spec.tfds_split(pipeline_lib.SPLITS[split][0])
    info = pipeline_lib._builder(spec, data_dir).info  # noqa: SLF001 - same package.
    return {"task": task, "dataset": info.full_name, "version": str(info.version),
            "split": tfds_split, "pipeline": imaging.IMPLEMENTATION}
