"""Metric writers: clu's TensorBoard + console writers, plus a JSON-lines file.

The workdir may be local or remote (gs://): TensorBoard's writer handles both, and the JSON-lines
file is opened through `etils.epath`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers
from etils import epath


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call to a file: {"step": s, name: value}.

    The file is opened through `etils.epath`, so `path` may be remote (gs://). There, appending
    is the backend's: tf.io.gfile keeps the file's content and uploads all of it again at each
    flush (GCS objects cannot be appended to), which is fine at one row per logging interval.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = epath.Path(path)
        self._file = self._path.open("a")  # noqa: SIM115  (kept open for the run's lifetime)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"hparams": dict(hparams)}, default=str) + "\n")

    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata

    def write_images(self, step, images) -> None:
        del step, images

    def write_videos(self, step, videos) -> None:
        del step, videos

    def write_audios(self, step, audios, *, sample_rate) -> None:
        del step, audios, sample_rate

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        del step, arrays, num_buckets

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def create_writer(workdir: str | os.PathLike, is_chief: bool) -> metric_writers.MetricWriter:
    """TensorBoard + logging (+ workdir/metrics.jsonl) on the chief, logging only elsewhere."""
    default = metric_writers.create_default_writer(
        os.fspath(workdir), just_logging=not is_chief, asynchronous=False
    )
    if not is_chief:
        return default
    jsonl = JsonlWriter(epath.Path(workdir) / "metrics.jsonl")
    return metric_writers.MultiWriter([default, jsonl])
