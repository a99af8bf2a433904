"""Input pipelines for the VTAB-1k tasks and for image folders: numpy and PIL, no TensorFlow.

Typical use in a training script::

    data.validate(task, data_dir, split)              # before compiling anything
    num_classes = data.get_num_classes(task, data_dir)
    train_iter = data.make_train_iterator(
        task, data_dir, split, global_batch_size=64, seed=0, start_step=step)
    for step, batch in zip(range(step, total_steps), train_iter): ...
    for batch in data.make_eval_iterator(task, data_dir, split, global_batch_size=64): ...

`split` is the config-level split: ``'val'`` trains on train800 and evaluates on val200,
``'test'`` trains on train800val200 and evaluates on test. `task` is a VTAB-1k task name (see
`tasks.py`) read from a TFDS dataset prepared as ArrayRecord files in `data_dir`
(`tfds.data_source`, random access without TensorFlow), or ``'folder'`` for an image-folder tree
rooted at `data_dir` (see `folder.py`). Both decode their images with `imaging.decode`.

Images are resized to ``image_size x image_size`` (`imaging.resize`: TF2's bilinear
`tf.image.resize`, no crop, no augmentation), kept as its float result (``round_resized=False``,
the VQT release) or rounded to uint8, and normalized to float32 NHWC. Batches are dicts of
numpy arrays; examples are read and preprocessed on a pool of threads, a little ahead, in order.

Training batches come in one of two `Batching` modes: ``'epoch'`` (the release's
``drop_last=False`` loader: every epoch is a fresh permutation cut into ``ceil(N / B)`` batches,
the last one partial, padded to B and masked) or ``'stream'`` (every batch full, read across
epoch boundaries). Every training batch carries a ``'mask'`` (1 real, 0 padding).

Multi-host: every host calls the same functions with its own `process_index`. The training
stream gives each host its slice of every global batch; the evaluation stream gives each host
examples ``h, h + P, ...`` of the split, padded so that all hosts run the same number of steps.

TFDS datasets are never downloaded here: a dataset that is not prepared in `data_dir` (or only
in the TFRecord format, which has no random access) raises `DatasetNotPreparedError` at once,
saying what to run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import math
import shlex
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import jax
import numpy as np

from vqt_jax import sampling
from vqt_jax.data import folder as folder_lib
from vqt_jax.data import imaging
from vqt_jax.data import tasks as tasks_lib
from vqt_jax.progress import Progress

FOLDER = "folder"
# Config-level split -> (VTAB split to train on, VTAB split to evaluate on).
SPLITS: dict[str, tuple[str, str]] = {"val": ("train800", "val200"),
                                      "test": ("train800val200", "test")}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Named normalizations: (mean, std) in [0, 1] units; 'inception' maps [0, 255] to [-1, 1].
_NORMALIZATIONS = {"inception": ((0.5,) * 3, (0.5,) * 3), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
# Installs what preparing a TFDS dataset needs (TensorFlow included): the `prepare` extra, from
# the vqt_jax checkout (the package is not on PyPI).
PREPARE_INSTALL = "pip install -e '.[prepare]' in the vqt_jax checkout"

Subset = Literal["train", "eval"]
Batching = Literal["epoch", "stream"]
BATCHINGS = sampling.BATCHINGS
Normalization = str | tuple[Sequence[float], Sequence[float]]
Batch = dict[str, np.ndarray]
Example = tuple[np.ndarray, int]  # uint8 [H, W, 3] image, label


class DatasetNotPreparedError(ValueError):
    """A TFDS dataset is not prepared (as ArrayRecord) in the data dir (this code never
    downloads)."""


# --------------------------------------------------------------------------------------------
# Sources: `(N, read)` where read(i) is example i, in a fixed order.
# --------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {tuple(SPLITS)}.")


def _folder_root(data_dir: str | None) -> str:
    if not data_dir:
        raise ValueError("task='folder' needs data_dir: the root of the image folders.")
    return data_dir


def prepare_command(tfds_name: str, data_dir: str | None) -> str:
    """A shell command that downloads and prepares a TFDS dataset as ArrayRecord files.

    It needs tensorflow-datasets and TensorFlow: ``pip install -e '.[prepare]'``.

    Args:
        tfds_name: TFDS name with config and version pattern, e.g. ``'dtd:3.*.*'``.
        data_dir: Where to prepare it (None: TFDS's default data dir).
    """
    dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
    code = (f"import tensorflow_datasets as tfds; tfds.builder({tfds_name!r}{dir_arg}, "
            "file_format='array_record').download_and_prepare()")
    # Double quotes read best around Python's single-quoted strings; fall back to full shell
    # quoting when a path holds a character the shell would expand inside them.
    quoted = shlex.quote(code) if any(c in code for c in '"$`\\!') else f'"{code}"'
    return f"python -c {quoted}"


def _not_prepared(task: tasks_lib.Task, data_dir: str | None, cause: str = "",
                  tfrecord_dir: str = "") -> str:
    import tensorflow_datasets as tfds  # noqa: PLC0415 - TFDS tasks only; no TensorFlow.

    dataset = f"TFDS dataset {task.tfds_name!r} (VTAB-1k task {task.name!r})"
    prepare = f"  {prepare_command(task.tfds_name, data_dir)}"
    where = data_dir or "the default TFDS data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    head = f"{dataset} is not prepared in {where}; this code never downloads."
    if cause:
        # The builder itself could not be made, e.g. this TFDS only has other versions.
        return (
            f"{head} The installed tensorflow-datasets {tfds.__version__} cannot build it "
            f"either: {cause}\nPrepare it with a tensorflow-datasets release that can, as "
            "ArrayRecord (file_format='array_record'), or copy an already prepared copy "
            "(NAME[/CONFIG]/VERSION folder) into the data dir.")
    if tfrecord_dir:
        return "\n".join([
            f"{dataset} is prepared in {tfrecord_dir} as TFRecord files only, which cannot be read"
            " without TensorFlow; this code reads ArrayRecord files (tfds.data_source). Convert it"
            f" once, with tensorflow-datasets and TensorFlow installed ({PREPARE_INSTALL}):",
            "  python -c \"from tensorflow_datasets.scripts.cli import convert_format_utils as c;"
            f" c.convert_dataset(out_dir=None, out_file_format='array_record', "
            f"dataset_version_dir=[{tfrecord_dir!r}])\"",
            f"(or `tfds convert_format --dataset_version_dir={shlex.quote(tfrecord_dir)} "
            "--out_file_format=array_record`), or delete that folder and prepare it again:",
            prepare])
    dir_flag = f" --data_dir={shlex.quote(data_dir)}" if data_dir else ""
    return "\n".join(filter(None, [  # filter: no line for a task without a prepare_note.
        f"{head} Prepare it once, as ArrayRecord files, on a machine with internet access and "
        f"tensorflow-datasets with TensorFlow ({PREPARE_INSTALL}):",
        prepare,
        # The CLI is the usual advice, but its tensorflow-datasets entry point imports
        # apache_beam at startup ("No module named 'apache_beam'"), which nothing here needs.
        f"(The CLI `tfds build '{task.tfds_name}'{dir_flag} --file_format=array_record` does "
        f"the same, but needs apache-beam installed in tensorflow-datasets {tfds.__version__}.)",
        task.prepare_note]))


def _builder(task: tasks_lib.Task, data_dir: str | None) -> Any:
    """Opens a prepared TFDS dataset, or raises DatasetNotPreparedError without waiting."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 - TFDS tasks only; no TensorFlow.

    # TFDS makes a temporary directory (`tmp*tfds`) when it looks for an unprepared dataset's
    # metadata and leaves it: point `tempfile` at a directory of its own, removed afterwards.
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="vqt_jax_tfds_") as own:
        tempfile.tempdir = own
        try:
            # try_gcs=False: never look for the data on GCS (hangs for minutes offline).
            builder = tfds.builder(task.tfds_name, data_dir=data_dir, try_gcs=False)
            prepared = builder.is_prepared()
        except (AssertionError, ValueError, tfds.core.registered.DatasetNotFoundError) as e:
            # E.g. the version pattern matches nothing prepared, nothing this TFDS can build.
            raise DatasetNotPreparedError(_not_prepared(task, data_dir, cause=str(e))) from e
        finally:
            tempfile.tempdir = saved
    if not prepared:
        raise DatasetNotPreparedError(_not_prepared(task, data_dir))
    return builder


def _data_source(builder: Any, task: tasks_lib.Task, data_dir: str | None,
                 tfds_split: str) -> Sequence[dict[str, Any]]:
    """Random access to a split's examples, images still encoded."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    try:
        return builder.as_data_source(tfds_split, decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as e:  # Prepared as TFRecord only: no random access.
        raise DatasetNotPreparedError(
            _not_prepared(task, data_dir, tfrecord_dir=str(builder.data_dir))) from e


def _source(task: str, data_dir: str | None, split: str,
            subset: Subset) -> tuple[int, Callable[[int], Example]]:
    """(number of examples, read) of one side of a split: read(i) is example i, decoded."""
    _check_split(split)
    if task == FOLDER:
        root = _folder_root(data_dir)
        files = folder_lib.listing(root, split, subset)
        return len(files.paths), lambda i: (folder_lib.load(root, files.paths[i]), files.labels[i])
    spec = tasks_lib.get_task(task)
    tfds_split = spec.tfds_split(SPLITS[split][0 if subset == "train" else 1])
    builder = _builder(spec, data_dir)
    source = _data_source(builder, spec, data_dir, tfds_split)
    channels = builder.info.features["image"].shape[-1]

    def read(i: int) -> Example:
        example = source[i]
        out = spec.convert({**example, "image": imaging.decode(example["image"], channels)})
        return out["image"], int(out["label"])

    return len(source), read


def _ordered(fn: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """fn(item) for each item, in order, computed on threads up to `ahead` items in advance."""
    with concurrent.futures.ThreadPoolExecutor(folder_lib.THREADS) as pool:
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --------------------------------------------------------------------------------------------
# Preprocessing.
# --------------------------------------------------------------------------------------------
def _mean_std(normalization: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in uint8 pixel units (0..255)."""
    if isinstance(normalization, str):
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"Unknown normalization {normalization!r}; use 'inception', "
                             "'imagenet' or a (mean, std) pair of 3-tuples in [0, 1] units.")
        normalization = _NORMALIZATIONS[normalization]
    try:
        mean, std = (np.asarray(x, np.float32).reshape(3) for x in normalization)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"normalization={normalization!r} is not a (mean, std) pair of 3-tuples.") from e
    if np.any(std <= 0):
        raise ValueError(f"normalization std must be positive, got {tuple(std)}.")
    return mean * 255, std * 255


def normalize(images: np.ndarray, normalization: Normalization = "inception") -> np.ndarray:
    """Maps images in pixel units to float32: ``(x / 255 - mean) / std`` per channel.

    Args:
        images: uint8 (or float, in [0, 255]) array ``[..., 3]``.
        normalization: ``'inception'`` (to [-1, 1]), ``'imagenet'`` (ImageNet mean/std), or
            a ``(mean, std)`` pair of 3-tuples in [0, 1] units.

    Returns:
        float32 array of the same shape.
    """
    mean, std = _mean_std(normalization)
    return (np.asarray(images, np.float32) - mean) / std


def as_normalization(value: str | Sequence[Sequence[float]]) -> Normalization:
    """A config's `normalization` field (a name, or a [mean, std] pair of any sequences) as
    the pipeline takes it: the name, or a pair of tuples."""
    if isinstance(value, str):
        return value
    mean, std = value
    return (tuple(mean), tuple(std))


normalize_array = normalize  # The name its callers know: `normalize` takes numpy arrays.
# Bilinear resize of one image to ``[image_size, image_size, 3]``, no crop (see `imaging.resize`).
resize = imaging.resize


def eval_image(image: np.ndarray, image_size: int, normalization: Normalization,
               round_resized: bool) -> np.ndarray:
    """One decoded uint8 image as evaluation (and prediction) feeds it: resized, normalised."""
    return normalize(resize(image, image_size, round_resized), normalization)


def file_batches(paths: Sequence[str], *, batch_size: int, image_size: int,
                 normalization: Normalization = "inception",
                 round_resized: bool = True) -> Iterator[tuple[list[str], np.ndarray]]:
    """(paths, float32 images [n <= batch_size, S, S, 3]) of image files, in order, decoded as
    an image folder's are and preprocessed as evaluation does (`eval_image`). Every file must
    decode (`folder.find_undecodable` names those that do not)."""
    _mean_std(normalization)  # Fail here, not in a worker.
    paths = list(paths)

    def prepare(path: str) -> np.ndarray:
        image = folder_lib.load(path.rpartition("/")[0] or ".", path)
        return eval_image(image, image_size, normalization, round_resized)

    images = _ordered(prepare, paths, 2 * batch_size)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        yield chunk, np.stack(list(itertools.islice(images, len(chunk))))


# --------------------------------------------------------------------------------------------
# Streams.
# --------------------------------------------------------------------------------------------


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Checks the host arguments; returns the per-host batch size."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count}).")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}.")
    return global_batch_size // process_count


def _host_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Checks the host arguments; returns this host's rows of every global batch."""
    local_batch = _local_batch_size(global_batch_size, process_index, process_count)
    return slice(process_index * local_batch, (process_index + 1) * local_batch)


# Optimiser steps per epoch: ceil(N / B) with 'epoch' batching, N / B with 'stream'.
steps_per_epoch = sampling.steps_per_epoch


def train_indices(step: int, num_examples: int, *, global_batch_size: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  batching: Batching = "stream") -> tuple[np.ndarray, np.ndarray]:
    """The example indices of this host's slice of global training batch `step`, and its mask.

    The same stream as `train_dataset` yields (`sampling.batch_indices` computes both), for
    training from per-example arrays such as a cache of the backbone's outputs.

    Returns:
        (int64 [B / P] example indices, float32 [B / P] mask: 1 real, 0 padding).
    """
    sampling.check_batching(batching)
    return sampling.host_batch_indices(
        step, num_examples, global_batch_size=global_batch_size, seed=seed,
        rows=_host_rows(global_batch_size, process_index, process_count), batching=batching)


def train_dataset(images: np.ndarray, labels: np.ndarray, *, global_batch_size: int,
                  seed: int = 0, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, normalization: Normalization = "inception",
                  batching: Batching = "stream") -> Iterator[Batch]:
    """The infinite, shuffled training stream over in-memory examples, for one host.

    Every epoch is a fresh permutation of all examples chosen by ``(seed, epoch)``, as
    `vqt_jax.sampling` defines it for every training path (images, host cache, device cache).
    Host ``h`` takes slots ``[h * B / P, (h + 1) * B / P)`` of every global batch, so the hosts'
    slices make up exactly the single-host batch. With 'stream' batching every batch is full
    and may straddle an epoch boundary; with 'epoch' batching each epoch is ``ceil(N / B)``
    batches, its last one padded (``mask`` 0). Starting at `start_step` costs one permutation.
    Arguments are checked at the call; batches are made on threads, two ahead.

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
        An endless iterator of ``{'image': float32 [B / P, H, W, 3], 'label': int32 [B / P],
        'mask': float32 [B / P]}``.
    """
    sampling.check_batching(batching)
    num_examples = len(labels)
    if num_examples == 0:
        raise ValueError("The training set is empty.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    rows = _host_rows(global_batch_size, process_index, process_count)
    labels = np.asarray(labels, np.int32)
    _mean_std(normalization)  # Fail here, not in a worker.

    def batch(step: int) -> Batch:
        index, mask = sampling.host_batch_indices(
            step, num_examples, global_batch_size=global_batch_size, seed=seed, rows=rows,
            batching=batching)
        return {"image": normalize(images[index], normalization), "label": labels[index],
                "mask": np.asarray(mask, np.float32)}

    return _ordered(batch, itertools.count(start_step), 2)


def eval_dataset(examples: Iterable[dict[str, Any]], num_examples: int, *,
                 global_batch_size: int, image_size: int = 224, process_index: int = 0,
                 process_count: int = 1, local_device_count: int | None = None,
                 normalization: Normalization = "inception",
                 round_resized: bool = True) -> Iterator[Batch]:
    """The finite, padded evaluation stream of one host.

    Host ``h`` gets examples ``h, h + P, h + 2P, ...`` of `examples` (pass them all), then
    padding, so that every host yields the same number of full batches:
    ``ceil(ceil(N / P) / (B / P))``. Padding examples have ``mask == 0``, real ones 1, so the
    masked sum over all batches of all hosts counts every example exactly once.

    Args:
        examples: All examples ``{'image': uint8 [H, W, 3], 'label': int}`` in a fixed order
            (a sequence, e.g. a data source, or any iterable).
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
        An iterator of ``{'image': float32 [B / P, S, S, 3], 'label': int32 [B / P],
        'mask': float32 [B / P]}``.
    """
    local = itertools.islice(examples, process_index, None, process_count)
    return _eval_batches(local, lambda ex: (ex["image"], ex["label"]), num_examples,
                         global_batch_size=global_batch_size, image_size=image_size,
                         process_index=process_index, process_count=process_count,
                         local_device_count=local_device_count, normalization=normalization,
                         round_resized=round_resized)


def _eval_batches(local_items: Iterable[Any], read: Callable[[Any], Example], num_examples: int,
                  *, global_batch_size: int, image_size: int, process_index: int,
                  process_count: int, local_device_count: int | None,
                  normalization: Normalization, round_resized: bool) -> Iterator[Batch]:
    """`eval_dataset` over this host's items (examples h, h + P, ...), each read by `read`."""
    local_batch = _local_batch_size(global_batch_size, process_index, process_count)
    if local_device_count is not None and local_batch % local_device_count:
        raise ValueError(f"The local eval batch size {local_batch} "
                         f"(global_batch_size={global_batch_size} / process_count={process_count}) "
                         f"is not divisible by local_device_count={local_device_count}.")
    # Host h holds examples h, h + P, ...: one more than N // P for the first N % P hosts.
    local_count = num_examples // process_count + int(process_index < num_examples % process_count)
    num_steps = math.ceil(math.ceil(num_examples / process_count) / local_batch)
    _mean_std(normalization)  # Fail here, not in a worker.

    def prepare(item: Any) -> Example:
        image, label = read(item)
        return eval_image(image, image_size, normalization, round_resized), label

    def batches() -> Iterator[Batch]:
        examples = _ordered(prepare, itertools.islice(local_items, local_count), 2 * local_batch)
        zero = np.zeros((image_size, image_size, 3), np.float32)
        for _ in range(num_steps):
            real = list(itertools.islice(examples, local_batch))
            pad = local_batch - len(real)
            yield {"image": np.stack([x for x, _ in real] + [zero] * pad),  # All float32.
                   "label": np.asarray([y for _, y in real] + [0] * pad, np.int32),
                   "mask": np.asarray([1.0] * len(real) + [0.0] * pad, np.float32)}

    return batches()


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def validate(task: str, data_dir: str | None = None, split: str = "val") -> None:
    """Checks, before any compilation, that the data of a run can be read.

    Checks that the task is known and the split is ``'val'`` or ``'test'``; for a VTAB task,
    that its TFDS dataset is prepared in `data_dir` as ArrayRecord files and has the VTAB-1k
    splits (reads no images); for ``task='folder'``, that the folders the split needs exist,
    hold images, and have no class that ``train/`` lacks, and that every image of both the
    training and the evaluation side decodes (so a broken test image fails now, not after
    training; a set of files that passed is not checked again in the same process).

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
        return folder_lib.validate(_folder_root(data_dir), split)
    spec = tasks_lib.get_task(task)
    builder = _builder(spec, data_dir)
    tfds_splits = [spec.tfds_split(name) for name in SPLITS[split]]  # Training, evaluation.
    for tfds_split in tfds_splits:
        try:
            builder.info.splits[tfds_split]
        except (KeyError, ValueError) as e:
            raise ValueError(f"TFDS dataset {spec.tfds_name!r} in {builder.data_dir} cannot "
                             f"provide split {tfds_split!r} of VTAB-1k task {task!r}: {e}") from e
    for tfds_split in tfds_splits:
        _data_source(builder, spec, data_dir, tfds_split)  # ArrayRecord files, not TFRecord.


def get_num_classes(task: str, data_dir: str | None = None) -> int:
    """Number of classes of a VTAB-1k task (from the table) or of an image folder.

    Args:
        task: VTAB-1k task name, or ``'folder'``.
        data_dir: The image-folder root for ``task='folder'``; unused otherwise.
    """
    if task == FOLDER:
        return len(folder_lib.class_names(_folder_root(data_dir)))
    return tasks_lib.get_task(task).num_classes


def get_class_names(task: str, data_dir: str | None = None) -> list[str]:
    """One name per class, in label order: an image folder's class folders; a VTAB-1k task's
    TFDS label names when its labels are TFDS's own, else the converted label's number (e.g.
    clevr_count's '0'..'7' stand for 3..10 objects)."""
    if task == FOLDER:
        return folder_lib.class_names(data_dir or "")
    spec = tasks_lib.get_task(task)
    names: list[str] = []
    if spec.convert is tasks_lib.image_and_label:
        # The names are for people; the numbers say the same.
        with contextlib.suppress(DatasetNotPreparedError, KeyError):
            feature = _builder(spec, data_dir).info.features["label"]
            names = list(getattr(feature, "names", None) or [])
    return names if len(names) == spec.num_classes else [str(i) for i in range(spec.num_classes)]


def get_num_examples(task: str, data_dir: str | None = None, split: str = "val",
                     subset: Subset = "train") -> int:
    """Number of training (`subset='train'`) or evaluation (`'eval'`) examples of a split."""
    if subset not in ("train", "eval"):
        raise ValueError(f"subset must be 'train' or 'eval', got {subset!r}.")
    return _source(task, data_dir, split, subset)[0]


def load_train_examples(task: str, data_dir: str | None = None, split: str = "val",
                        image_size: int = 224,
                        round_resized: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The whole training set of a split, resized: [N, S, S, 3] images (uint8, or float32 if
    not `round_resized`; see `resize`), int32 labels.

    Example i here is example i of `make_train_iterator`'s shuffle (see `train_indices`).
    """
    num_examples, read = _source(task, data_dir, split, "train")

    def prepare(i: int) -> Example:
        image, label = read(i)
        return resize(image, image_size, round_resized), label

    progress = Progress("Reading the training images", num_examples, "images")
    examples = []
    for example in _ordered(prepare, range(num_examples), 4 * folder_lib.THREADS):
        examples.append(example)
        progress.update()
    progress.done()
    images = (np.stack([x for x, _ in examples]) if examples else
              np.zeros((0, image_size, image_size, 3), np.uint8 if round_resized else np.float32))
    return images, np.asarray([y for _, y in examples], np.int32)


def make_train_iterator(task: str, data_dir: str | None = None, split: str = "val", *,
                        global_batch_size: int, image_size: int = 224,
                        normalization: Normalization = "inception", seed: int = 0,
                        start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None, batching: Batching = "stream",
                        round_resized: bool = True) -> Iterator[Batch]:
    """Endless training batches: this host's slice of each global batch.

    Reads and resizes the whole training set into memory first (uint8, ``image_size**2 * 3``
    bytes per example: 150 KB at 224, so 150 MB for VTAB-1k's 1000 examples; four times that
    in float32 without `round_resized`), then streams shuffled batches as `train_dataset`.
    Deterministic in `seed`; reshuffled every epoch; `start_step` resumes exactly where a run
    with the same arguments was at that step.

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
    sampling.check_batching(batching)
    _local_batch_size(global_batch_size, process_index, process_count)  # Before any reads.
    images, labels = load_train_examples(task, data_dir, split, image_size, round_resized)
    return train_dataset(images, labels, global_batch_size=global_batch_size, seed=seed,
                         start_step=start_step, process_index=process_index,
                         process_count=process_count, normalization=normalization,
                         batching=batching)


def make_eval_iterator(task: str, data_dir: str | None = None, split: str = "val", *,
                       global_batch_size: int, image_size: int = 224,
                       normalization: Normalization = "inception",
                       process_index: int | None = None, process_count: int | None = None,
                       local_device_count: int | None = None,
                       round_resized: bool = True) -> Iterator[Batch]:
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
    num_examples, read = _source(task, data_dir, split, "eval")
    return _eval_batches(range(process_index, num_examples, process_count), read, num_examples,
                         global_batch_size=global_batch_size, image_size=image_size,
                         process_index=process_index, process_count=process_count,
                         local_device_count=local_device_count, normalization=normalization,
                         round_resized=round_resized)
