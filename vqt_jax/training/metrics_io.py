"""Metric writers: clu's TensorBoard + console writers, plus a JSON-lines file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per `write_scalars` call to a file: {"step": s, name: value}."""

    def __init__(self, path: str):
        self._path = path
        self._file = open(path, "a")  # noqa: SIM115  (kept open for the run's lifetime)

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


def create_writer(workdir: str, is_chief: bool) -> metric_writers.MetricWriter:
    """TensorBoard + logging (+ workdir/metrics.jsonl) on the chief, logging only elsewhere."""
    default = metric_writers.create_default_writer(
        workdir, just_logging=not is_chief, asynchronous=False
    )
    if not is_chief:
        return default
    jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
    return metric_writers.MultiWriter([default, jsonl])
