"""Input pipelines: the 19 VTAB-1k tasks (TFDS) and image folders.

See `pipeline.py` for the usage pattern and `tasks.py` for the task table.
"""

from vqt_jax.data.pipeline import (
    BATCHINGS,
    FOLDER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    DatasetNotPreparedError,
    as_normalization,
    eval_dataset,
    eval_image,
    file_batches,
    get_class_names,
    get_num_classes,
    get_num_examples,
    load_train_examples,
    make_eval_iterator,
    make_train_iterator,
    normalize,
    normalize_array,
    resize,
    steps_per_epoch,
    train_dataset,
    train_indices,
    validate,
)
from vqt_jax.data.tasks import TASKS, Task, get_task, task_names

__all__ = [
    "BATCHINGS", "FOLDER", "IMAGENET_MEAN", "IMAGENET_STD", "SPLITS", "TASKS",
    "DatasetNotPreparedError", "as_normalization", "Task", "eval_dataset", "eval_image",
    "file_batches", "get_class_names", "get_num_classes", "get_num_examples", "get_task",
    "load_train_examples", "make_eval_iterator", "make_train_iterator", "normalize",
    "normalize_array", "resize", "steps_per_epoch", "task_names", "train_dataset",
    "train_indices", "validate",
]  # fmt: skip
