"""tf.data input pipelines for the VTAB-1k tasks and for image folders.

Typical use in a training script::

    data.validate(task, data_dir, split)              # before compiling anything
    num_classes = data.get_num_classes(task, data_dir)
    train_iter = data.make_train_iterator(
        task, data_dir, split, global_batch_size=64, seed=0, start_step=step)
    for step, batch in zip(range(step, total_steps), train_iter): ...
    for batch in data.make_eval_iterator(task, data_dir, split, global_batch_size=64): ...

`split` is the config-level split: ``'val'`` trains on train800 and evaluates on val200,
``'test'`` trains on train800val200 and evaluates on test. `task` is a VTAB-1k task name (see
`tasks.py`) read from TFDS in `data_dir`, or ``'folder'`` for an image-folder tree rooted at
`data_dir` (see `folder.py`).

Images are resized to ``image_size x image_size`` (bilinear, no crop, no augmentation), kept as
`tf.image.resize`'s float result (``round_resized=False``, the VQT release) or rounded to uint8,
and normalized to float32 NHWC. Batches are dicts of numpy arrays.

Training batches come in one of two `Batching` modes: ``'epoch'`` (the release's
``drop_last=False`` loader: every epoch is a fresh permutation cut into ``ceil(N / B)`` batches,
the last one partial, padded to B and masked) or ``'stream'`` (every batch full, read across
epoch boundaries). Every training batch carries a ``'mask'`` (1 real, 0 padding).

Multi-host: every host calls the same functions with its own `process_index`. The training
stream gives each host its slice of every global batch; the evaluation stream gives each host a
disjoint part of the split, padded so that all hosts run the same number of steps.

TFDS datasets are never downloaded here: a dataset that is not prepared in `data_dir` raises
`DatasetNotPreparedError` at once, saying what to run.
"""

from __future__ import annotations

import contextlib
import math
import shlex
from collections.abc import Iterator, Sequence
from typing import Literal

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vqt_jax import sampling
from vqt_jax.data import folder as folder_lib
from vqt_jax.data import tasks as tasks_lib

# The input pipeline runs on the host CPU; keep TensorFlow away from accelerator memory that
# JAX needs. (A no-op with tensorflow-cpu; too late if TF already initialised its devices.)
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:
    pass

FOLDER = "folder"
# Config-level split -> (VTAB split to train on, VTAB split to evaluate on).
SPLITS: dict[str, tuple[str, str]] = {
    "val": ("train800", "val200"),
    "test": ("train800val200", "test"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Subset = Literal["train", "eval"]
Batching = Literal["epoch", "stream"]
BATCHINGS = sampling.BATCHINGS
Normalization = str | tuple[Sequence[float], Sequence[float]]
Batch = dict[str, np.ndarray]


class DatasetNotPreparedError(ValueError):
    """A TFDS dataset is not prepared in the data dir (this code never downloads)."""


# --------------------------------------------------------------------------------------------
# Sources: raw examples {'image': uint8 [H, W, 3], 'label': int32} in a fixed order.
# --------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {tuple(SPLITS)}.")


def _not_prepared(task: tasks_lib.Task, data_dir: str | None, cause: str = "") -> str:
    where = data_dir or "the default TFDS data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    head = (
        f"TFDS dataset {task.tfds_name!r} (VTAB-1k task {task.name!r}) is not prepared in "
        f"{where}; this code never downloads."
    )
    if cause:
        # The builder itself could not be made, e.g. this TFDS only has other versions.
        return (
            f"{head} The installed tensorflow-datasets {tfds.__version__} cannot build it "
            f"either: {cause}\nPrepare it with a tensorflow-datasets release that can, or copy "
            "an already prepared copy (NAME[/CONFIG]/VERSION folder) into the data dir."
        )
    dir_flag = f" --data_dir={shlex.quote(data_dir)}" if data_dir else ""
    lines = [
        f"{head} Prepare it once, on a machine with internet access:",
        f"  {prepare_command(task.tfds_name, data_dir)}",
        # The CLI is the usual advice, but its tensorflow-datasets entry point imports
        # apache_beam at startup ("No module named 'apache_beam'"), which nothing here needs.
        f"(The CLI `tfds build '{task.tfds_name}'{dir_flag}` does the same, but needs "
        f"apache-beam installed in tensorflow-datasets {tfds.__version__}.)",
    ]
    if task.prepare_note:
        lines.append(task.prepare_note)
    return "\n".join(lines)


def prepare_command(tfds_name: str, data_dir: str | None) -> str:
    """A shell command that downloads and prepares a TFDS dataset with only tensorflow-datasets.

    Args:
        tfds_name: TFDS name with config and version pattern, e.g. ``'dtd:3.*.*'``.
        data_dir: Where to prepare it (None: TFDS's default data dir).
    """
    dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
    code = (
        "import tensorflow_datasets as tfds; "
        f"tfds.builder({tfds_name!r}{dir_arg}).download_and_prepare()"
    )
    # Double quotes read best around Python's single-quoted strings; fall back to full shell
    # quoting when a path holds a character the shell would expand inside them.
    if not any(c in code for c in '"$`\\!'):
        return f'python -c "{code}"'
    return f"python -c {shlex.quote(code)}"


def _builder(task: tasks_lib.Task, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Opens a prepared TFDS dataset, or raises DatasetNotPreparedError without waiting."""
    try:
        # try_gcs=False: never look for the data on GCS (hangs for minutes without network).
        builder = tfds.builder(task.tfds_name, data_dir=data_dir, try_gcs=False)
    except (AssertionError, ValueError, tfds.core.registered.DatasetNotFoundError) as e:
        # E.g. the version pattern matches nothing prepared and nothing this TFDS can build.
        raise DatasetNotPreparedError(_not_prepared(task, data_dir, cause=str(e))) from e
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_not_prepared(task, data_dir))
    return builder


def _tfds_split(task: tasks_lib.Task, split: str, subset: Subset) -> str:
    _check_split(split)
    train_split, eval_split = SPLITS[split]
    return task.tfds_split(train_split if subset == "train" else eval_split)


def _source(
    task: str,
    data_dir: str | None,
    split: str,
    subset: Subset,
    shard_index: int = 0,
    shard_count: int = 1,
) -> tuple[tf.data.Dataset, int, folder_lib.FolderListing | None]:
    """Returns (examples of this shard, number of examples in all shards, the image files of a
    folder task or None)."""
    _check_split(split)
    if task == FOLDER:
        if not data_dir:
            raise ValueError("task='folder' needs data_dir: the root of the image folders.")
        files = folder_lib.listing(data_dir, split, subset)
        return folder_lib.dataset(files, shard_index, shard_count), len(files.paths), files

    spec = tasks_lib.get_task(task)
    tfds_split = _tfds_split(spec, split, subset)
    builder = _builder(spec, data_dir)
    ds = builder.as_dataset(
        split=tfds_split,
        shuffle_files=False,
        # Read the files one after the other, so examples come in split order (train800 then
        # val200) whatever TFDS's default interleaving is.
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
    )
    num_examples = _count(ds)
    # Sharding after TFDS decodes means every host decodes the whole split; VTAB evaluation
    # sets are small enough that this simplicity is worth it.
    ds = ds.shard(shard_count, shard_index)
    ds = ds.map(spec.convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds, num_examples, None


def _naming_bad_files(
    data_dir: str | None, files: folder_lib.FolderListing | None
) -> contextlib.AbstractContextManager[None]:
    """For a folder task, turns a decode failure while reading into an error naming the file."""
    if files is None or data_dir is None:
        return contextlib.nullcontext()
    return folder_lib.naming_undecodable(data_dir, files)


def _named_errors(
    batches: Iterator[Batch], data_dir: str | None, files: folder_lib.FolderListing | None
) -> Iterator[Batch]:
    """`batches`, with a folder file that fails to decode named in the error (see above)."""
    with _naming_bad_files(data_dir, files):
        yield from batches


def _count(ds: tf.data.Dataset) -> int:
    cardinality = int(ds.cardinality())
    if cardinality >= 0:
        return cardinality
    # TFDS normally knows the size of a split; count by reading only if it does not.
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


# --------------------------------------------------------------------------------------------
# Preprocessing.
# --------------------------------------------------------------------------------------------


def _mean_std(normalization: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in uint8 pixel units (0..255)."""
    if isinstance(normalization, str):
        if normalization == "inception":  # [0, 255] -> [-1, 1]
            return np.full(3, 127.5, np.float32), np.full(3, 127.5, np.float32)
        if normalization == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            raise ValueError(
                f"Unknown normalization {normalization!r}; use 'inception', 'imagenet' or a "
                "(mean, std) pair of 3-tuples in [0, 1] units."
            )
    else:
        try:
            mean, std = normalization
            mean = np.asarray(mean, np.float32).reshape(3)
            std = np.asarray(std, np.float32).reshape(3)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"normalization={normalization!r} is not a (mean, std) pair of 3-tuples."
            ) from e
        if np.any(std <= 0):
            raise ValueError(f"normalization std must be positive, got {tuple(std)}.")
    return np.asarray(mean, np.float32) * 255, np.asarray(std, np.float32) * 255


def normalize(images: tf.Tensor, normalization: Normalization = "inception") -> tf.Tensor:
    """Maps images in pixel units to float32: ``(x / 255 - mean) / std`` per channel.

    Args:
        images: uint8 (or float, in [0, 255]) tensor ``[..., 3]``.
        normalization: ``'inception'`` (to [-1, 1]), ``'imagenet'`` (ImageNet mean/std), or
            a ``(mean, std)`` pair of 3-tuples in [0, 1] units.

    Returns:
        float32 tensor of the same shape.
    """
    mean, std = _mean_std(normalization)
    return (tf.cast(images, tf.float32) - mean) / std


def as_normalization(value: str | Sequence[Sequence[float]]) -> Normalization:
    """A config's `normalization` field (a name, or a [mean, std] pair of any sequences) as
    the pipeline takes it: the name, or a pair of tuples."""
    if isinstance(value, str):
        return value
    mean, std = value
    return (tuple(mean), tuple(std))


def normalize_array(images: np.ndarray, normalization: Normalization = "inception") -> np.ndarray:
    """`normalize` on a numpy batch (the same computation, for the same floats)."""
    return normalize(tf.convert_to_tensor(images), normalization).numpy()


def resize(image: tf.Tensor, image_size: int, round_resized: bool = True) -> tf.Tensor:
    """Bilinear resize of one uint8 image to ``[image_size, image_size, 3]``, no crop.

    With `round_resized` the result is rounded back to uint8 (a quarter of the memory for
    the in-memory training set); otherwise it is `tf.image.resize`'s float32 result as is, as
    the VQT release feeds it (`src/data/datasets/tf_dataset.py`). Training, caching and
    evaluation all go through the same function, so they see identical pixels.
    """
    resized = tf.image.resize(image, [image_size, image_size], method="bilinear")
    if not round_resized:
        return resized
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def eval_image(image: tf.Tensor, image_size: int, normalization: Normalization,
               round_resized: bool) -> tf.Tensor:
    """One decoded uint8 image as evaluation (and prediction) feeds it: resized, normalised."""
    return normalize(resize(image, image_size, round_resized), normalization)


def file_batches(paths: Sequence[str], *, batch_size: int, image_size: int,
                 normalization: Normalization = "inception",
                 round_resized: bool = True) -> Iterator[tuple[list[str], np.ndarray]]:
    """(paths, float32 images [n <= batch_size, S, S, 3]) of image files, in order, decoded as
    an image folder's are and preprocessed as evaluation does (`eval_image`). Every file must
    decode (`folder.find_undecodable` names those that do not)."""
    _mean_std(normalization)  # Fail here, not inside tf.data.
    listing = folder_lib.FolderListing(tuple(paths), (0,) * len(paths))
    ds = folder_lib.dataset(listing).map(
        lambda ex: eval_image(ex["image"], image_size, normalization, round_resized),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    start = 0
    for images in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
        yield list(paths[start:start + len(images)]), images
        start += len(images)


# --------------------------------------------------------------------------------------------
# Streams.
# --------------------------------------------------------------------------------------------


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return index, count


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Checks the host arguments; returns the per-host batch size."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})."
        )
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    return global_batch_size // process_count


def _resized(ds: tf.data.Dataset, image_size: int, round_resized: bool) -> tf.data.Dataset:
    return ds.map(
        lambda ex: {"image": resize(ex["image"], image_size, round_resized),
                    "label": ex["label"]},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def _load_arrays(ds: tf.data.Dataset, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads a (resized) dataset into memory as images (uint8 or float32) and int32 labels."""
    images, labels = [], []
    for batch in ds.batch(256).as_numpy_iterator():
        images.append(batch["image"])
        labels.append(batch["label"])
    images = np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
    labels = np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)
    if len(labels) != num_examples:
        raise ValueError(f"Expected {num_examples} training examples, read {len(labels)}.")
    return images, labels


def _check_batching(batching: str) -> None:
    sampling.check_batching(batching)


def steps_per_epoch(num_examples: int, global_batch_size: int, batching: Batching) -> float:
    """Optimiser steps per epoch: ceil(N / B) with 'epoch' batching, N / B with 'stream'."""
    return sampling.steps_per_epoch(num_examples, global_batch_size, batching)


def train_indices(
    step: int,
    num_examples: int,
    *,
    global_batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    batching: Batching = "stream",
) -> tuple[np.ndarray, np.ndarray]:
    """The example indices of this host's slice of global training batch `step`, and its mask.

    The same stream as `train_dataset` yields (`sampling.batch_indices` computes both), for
    training from per-example arrays such as a cache of the backbone's outputs.

    Returns:
        (int64 [B / P] example indices, float32 [B / P] mask: 1 real, 0 padding).
    """
    _check_batching(batching)
    local_batch = _local_batch_size(global_batch_size, process_index, process_count)
    rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
    return sampling.host_batch_indices(step, num_examples, global_batch_size=global_batch_size,
                                       seed=seed, rows=rows, batching=batching)


def train_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    normalization: Normalization = "inception",
    batching: Batching = "stream",
) -> tf.data.Dataset:
    """The infinite, shuffled training stream over in-memory examples, for one host.

    Every epoch is a fresh permutation of all examples chosen by ``(seed, epoch)``, as
    `vqt_jax.sampling` defines it for every training path (images, host cache, device cache).
    Host ``h`` takes slots ``[h * B / P, (h + 1) * B / P)`` of every global batch, so the hosts'
    slices make up exactly the single-host batch. With 'stream' batching every batch is full
    and may straddle an epoch boundary; with 'epoch' batching each epoch is ``ceil(N / B)``
    batches, its last one padded (``mask`` 0). Starting at `start_step` costs one permutation.

    Args:
        images: uint8 (or float32 pixel values) ``[N, H, W, 3]``, already resized.
        labels: int ``[N]``.
        global_batch_size: Batch size over all hosts (B); divisible by `process_count` (P).
        seed: Shuffling seed; the same seed gives the same stream.
        start_step: First global step to produce (for resuming).
        process_index: This host's index.
        process_count: Number of hosts.
        normalization: See `normalize`.
        batching: 'epoch' or 'stream' (see above).

    Returns:
        A dataset of ``{'image': float32 [B / P, H, W, 3], 'label': int32 [B / P],
        'mask': float32 [B / P]}``.
    """
    _check_batching(batching)
    num_examples = len(labels)
    if num_examples == 0:
        raise ValueError("The training set is empty.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    local_batch = _local_batch_size(global_batch_size, process_index, process_count)
    rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
    # Captured eager tensors are handed to the tf.data function by reference (a numpy array
    # would be embedded in the graph as a constant).
    images_t = tf.convert_to_tensor(images)
    labels_t = tf.convert_to_tensor(labels, tf.int32)
    _mean_std(normalization)  # Fail here, not inside tf.data.

    def indices() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = start_step
        while True:
            yield sampling.host_batch_indices(step, num_examples,
                                              global_batch_size=global_batch_size, seed=seed,
                                              rows=rows, batching=batching)
            step += 1

    ds = tf.data.Dataset.from_generator(indices, output_signature=(
        tf.TensorSpec([local_batch], tf.int64), tf.TensorSpec([local_batch], tf.float32)))
    ds = ds.map(
        lambda index, mask: {"image": normalize(tf.gather(images_t, index), normalization),
                             "label": tf.gather(labels_t, index), "mask": mask},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.prefetch(2)


def eval_dataset(
    examples: tf.data.Dataset,
    num_examples: int,
    *,
    global_batch_size: int,
    image_size: int = 224,
    process_index: int = 0,
    process_count: int = 1,
    local_device_count: int | None = None,
    normalization: Normalization = "inception",
    round_resized: bool = True,
) -> tf.data.Dataset:
    """The finite, padded evaluation stream of one host.

    Host ``h`` gets examples ``h, h + P, h + 2P, ...`` of `examples` (pass the unsharded
    dataset), then padding, so that every host yields the same number of full batches:
    ``ceil(ceil(N / P) / (B / P))``. Padding examples have ``mask == 0``, real ones 1, so the
    masked sum over all batches of all hosts counts every example exactly once.

    Args:
        examples: All examples ``{'image': uint8 [H, W, 3], 'label': int}`` in a fixed order.
        num_examples: Number of examples in `examples` (N).
        global_batch_size: Batch size over all hosts (B); divisible by `process_count` (P).
        image_size: Output height and width.
        process_index: This host's index.
        process_count: Number of hosts.
        local_device_count: If given, B / P must be divisible by it (for sharding a batch
            over the local devices).
        normalization: See `normalize`.
        round_resized: See `resize`.

    Returns:
        A dataset of ``{'image': float32 [B / P, S, S, 3], 'label': int32 [B / P],
        'mask': float32 [B / P]}``.
    """
    _local_batch_size(global_batch_size, process_index, process_count)  # Before shard().
    return _eval_batches(
        examples.shard(process_count, process_index),
        num_examples,
        global_batch_size=global_batch_size,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
        local_device_count=local_device_count,
        normalization=normalization,
        round_resized=round_resized,
    )


def _eval_batches(
    local_examples: tf.data.Dataset,
    num_examples: int,
    *,
    global_batch_size: int,
    image_size: int,
    process_index: int,
    process_count: int,
    local_device_count: int | None,
    normalization: Normalization,
    round_resized: bool,
) -> tf.data.Dataset:
    """`eval_dataset` for examples already sharded to this host (strided, as `Dataset.shard`)."""
    local_batch = _local_batch_size(global_batch_size, process_index, process_count)
    if local_device_count is not None and local_batch % local_device_count:
        raise ValueError(
            f"The local eval batch size {local_batch} (global_batch_size={global_batch_size} / "
            f"process_count={process_count}) is not divisible by "
            f"local_device_count={local_device_count}."
        )
    # Host h holds examples h, h + P, ...: one more than N // P for the first N % P hosts.
    local_count = num_examples // process_count + int(process_index < num_examples % process_count)
    num_steps = math.ceil(math.ceil(num_examples / process_count) / local_batch)
    _mean_std(normalization)  # Fail here, not inside tf.data.

    def prepare(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = eval_image(ex["image"], image_size, normalization, round_resized)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": 1.0}

    ds = local_examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, 3], tf.float32),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0, tf.float32),
        }
    ).repeat(num_steps * local_batch - local_count)
    ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
    return ds.prefetch(2)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def validate(task: str, data_dir: str | None = None, split: str = "val") -> None:
    """Checks, before any compilation, that the data of a run can be read.

    Checks that the task is known and the split is ``'val'`` or ``'test'``; for a VTAB task,
    that its TFDS dataset is prepared in `data_dir` and has the VTAB-1k splits (reads no
    images); for ``task='folder'``, that the folders the split needs exist, hold images, and
    have no class that ``train/`` lacks, and that every image of both the training and the
    evaluation side decodes (so a broken test image fails now, not after training; a set of
    files that passed is not checked again in the same process).

    Args:
        task: VTAB-1k task name, or ``'folder'``.
        data_dir: TFDS data dir (None: TFDS's default), or the image-folder root.
        split: ``'val'`` or ``'test'``.

    Raises:
        ValueError: Naming what is wrong (for images that do not decode: how many, the first
            few paths and the decoder's reason); `DatasetNotPreparedError` (a ValueError) if the
            TFDS dataset needs preparing, with the command to run.
    """
    _check_split(split)
    if task == FOLDER:
        if not data_dir:
            raise ValueError("task='folder' needs data_dir: the root of the image folders.")
        folder_lib.validate(data_dir, split)
        return
    spec = tasks_lib.get_task(task)
    builder = _builder(spec, data_dir)
    for subset in ("train", "eval"):
        tfds_split = _tfds_split(spec, split, subset)
        try:
            builder.info.splits[tfds_split]
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"TFDS dataset {spec.tfds_name!r} in {builder.data_dir} cannot provide split "
                f"{tfds_split!r} of VTAB-1k task {task!r}: {e}"
            ) from e


def get_num_classes(task: str, data_dir: str | None = None) -> int:
    """Number of classes of a VTAB-1k task (from the table) or of an image folder.

    Args:
        task: VTAB-1k task name, or ``'folder'``.
        data_dir: The image-folder root for ``task='folder'``; unused otherwise.
    """
    if task == FOLDER:
        if not data_dir:
            raise ValueError("task='folder' needs data_dir: the root of the image folders.")
        return len(folder_lib.class_names(data_dir))
    return tasks_lib.get_task(task).num_classes


def get_class_names(task: str, data_dir: str | None = None) -> list[str]:
    """One name per class, in label order: an image folder's class folders; a VTAB-1k task's
    TFDS label names when its labels are TFDS's own, else the converted label's number (e.g.
    clevr_count's '0'..'7' stand for 3..10 objects)."""
    if task == FOLDER:
        return folder_lib.class_names(data_dir or "")
    spec = tasks_lib.get_task(task)
    names = None
    if spec.convert is tasks_lib.image_and_label:
        try:
            feature = _builder(spec, data_dir).info.features["label"]
            names = list(getattr(feature, "names", None) or [])
        except (DatasetNotPreparedError, KeyError):
            names = None  # the names are for people; the numbers say the same
    if not names or len(names) != spec.num_classes:
        names = [str(i) for i in range(spec.num_classes)]
    return names


def get_num_examples(
    task: str, data_dir: str | None = None, split: str = "val", subset: Subset = "train"
) -> int:
    """Number of training (`subset='train'`) or evaluation (`'eval'`) examples of a split."""
    if subset not in ("train", "eval"):
        raise ValueError(f"subset must be 'train' or 'eval', got {subset!r}.")
    return _source(task, data_dir, split, subset)[1]


def load_train_examples(
    task: str, data_dir: str | None = None, split: str = "val", image_size: int = 224,
    round_resized: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole training set of a split, resized: [N, S, S, 3] images (uint8, or float32 if
    not `round_resized`; see `resize`), int32 labels.

    Example i here is example i of `make_train_iterator`'s shuffle (see `train_indices`).
    """
    examples, num_examples, files = _source(task, data_dir, split, "train")
    with _naming_bad_files(data_dir, files):
        return _load_arrays(_resized(examples, image_size, round_resized), num_examples)


def make_train_iterator(
    task: str,
    data_dir: str | None = None,
    split: str = "val",
    *,
    global_batch_size: int,
    image_size: int = 224,
    normalization: Normalization = "inception",
    seed: int = 0,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    batching: Batching = "stream",
    round_resized: bool = True,
) -> Iterator[Batch]:
    """Endless training batches: this host's slice of each global batch.

    Reads and resizes the whole training set into memory first (uint8, ``image_size**2 * 3``
    bytes per example: 150 KB at 224, so 150 MB for VTAB-1k's 1000 examples; four times that
    in float32 without `round_resized`), then streams
    shuffled batches as described in `train_dataset`. Deterministic in `seed`; reshuffled every
    epoch; `start_step` resumes exactly where a run with the same arguments was at that step.

    Args:
        task: VTAB-1k task name, or ``'folder'``.
        data_dir: TFDS data dir (None: TFDS's default), or the image-folder root.
        split: ``'val'`` (train800) or ``'test'`` (train800val200; folder: train/ + val/).
        global_batch_size: Batch size summed over all hosts.
        image_size: Output height and width.
        normalization: ``'inception'``, ``'imagenet'`` or ``(mean, std)``; see `normalize`.
        seed: Shuffling seed.
        start_step: Global step of the first batch.
        process_index: This host's index (default: `jax.process_index()`).
        process_count: Number of hosts (default: `jax.process_count()`).
        batching: 'epoch' or 'stream' (see `train_dataset`).
        round_resized: See `resize`.

    Yields:
        ``{'image': float32 [B / P, S, S, 3], 'label': int32 [B / P], 'mask': float32 [B / P]}``
        numpy batches.
    """
    process_index, process_count = _processes(process_index, process_count)
    _check_batching(batching)
    _local_batch_size(
        global_batch_size, process_index, process_count
    )  # Fail before reading any data.
    images, labels = load_train_examples(task, data_dir, split, image_size, round_resized)
    ds = train_dataset(
        images,
        labels,
        global_batch_size=global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        normalization=normalization,
        batching=batching,
    )
    return ds.as_numpy_iterator()


def make_eval_iterator(
    task: str,
    data_dir: str | None = None,
    split: str = "val",
    *,
    global_batch_size: int,
    image_size: int = 224,
    normalization: Normalization = "inception",
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    round_resized: bool = True,
) -> Iterator[Batch]:
    """One pass over the evaluation set, padded so every host runs the same number of steps.

    Call it again for every evaluation. Sum metrics weighted by ``batch['mask']`` (1 for real
    examples, 0 for padding) over all batches and hosts: each example counts exactly once.

    Args:
        task: VTAB-1k task name, or ``'folder'``.
        data_dir: TFDS data dir (None: TFDS's default), or the image-folder root.
        split: ``'val'`` (val200; folder: val/) or ``'test'`` (test; folder: test/).
        global_batch_size: Batch size summed over all hosts.
        image_size: Output height and width.
        normalization: ``'inception'``, ``'imagenet'`` or ``(mean, std)``; see `normalize`.
        process_index: This host's index (default: `jax.process_index()`).
        process_count: Number of hosts (default: `jax.process_count()`).
        local_device_count: If given, checked to divide the local batch size.
        round_resized: See `resize`.

    Yields:
        ``{'image': float32 [B / P, S, S, 3], 'label': int32 [B / P], 'mask': float32 [B / P]}``
        numpy batches.
    """
    process_index, process_count = _processes(process_index, process_count)
    _local_batch_size(global_batch_size, process_index, process_count)
    local_examples, num_examples, files = _source(
        task, data_dir, split, "eval", shard_index=process_index, shard_count=process_count
    )
    ds = _eval_batches(
        local_examples,
        num_examples,
        global_batch_size=global_batch_size,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
        local_device_count=local_device_count,
        normalization=normalization,
        round_resized=round_resized,
    )
    return _named_errors(ds.as_numpy_iterator(), data_dir, files)
