"""Metric writers without TensorFlow: console lines, a JSON-lines file, TensorBoard event files.

On the chief, `create_writer` writes ``metrics.jsonl`` (one JSON object per call) and a TensorBoard
event file (``events.out.tfevents.*``: TFRecord-framed `Event` protos, built with tensorboard's
pure-Python protos and summary helpers; without tensorboard installed, metrics.jsonl only) into
the workdir; every host logs its lines through absl.
The workdir may be local or remote (gs://): both files go through `etils.epath` (`_Appended`).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import textwrap
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

try:  # optional: a machine without it (a bare accelerator host) still trains and logs
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import summary_v2 as hparams_summary
    from tensorboard.plugins.scalar import summary_v2 as scalar_summary
    from tensorboard.summary.writer.record_writer import RecordWriter
except ImportError:
    event_pb2 = None

from vqt_jax import workdir as workdir_lib

_FILE_IDS = itertools.count()


class _Appended:
    """A file written in appends through `etils.epath` (`write`, then `flush` to store).

    Locally, each flush appends what was written since the last one. A remote file (gs://) is
    rewritten whole at each flush, since an object store's objects cannot be appended to; it
    starts from the file's content, if any (a resumed run's metrics.jsonl).
    """

    def __init__(self, path: str | os.PathLike):
        self._path = epath.Path(path)
        self._local = workdir_lib.is_local(path)
        with workdir_lib.remote_errors(self._path, "read"):
            self._data = (b"" if self._local or not self._path.exists()
                          else self._path.read_bytes())
        self._pending = b""

    def write(self, data: bytes) -> None:
        self._pending += data

    def flush(self) -> None:
        if not self._pending:
            return
        if self._local:
            with self._path.open("ab") as f:
                f.write(self._pending)
        else:
            self._data += self._pending
            with workdir_lib.remote_errors(self._path, "write"):
                self._path.write_bytes(self._data)
        self._pending = b""

    def close(self) -> None:
        self.flush()


def _hparam_values(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat {dotted name: bool/int/float/str}, as TensorBoard's hparams plugin takes them.

    Nested mappings and sequences are flattened by key and index; None becomes ''; any other
    value its str.
    """
    out: dict[str, Any] = {}
    for k, v in hparams.items():
        if isinstance(v, (list, tuple)):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, Mapping):
            out.update(_hparam_values(v, f"{prefix}{k}."))
        else:
            v = v.item() if isinstance(v, np.generic) else v
            out[f"{prefix}{k}"] = ("" if v is None else v if isinstance(v, (bool, int, float, str))
                                   else str(v))
    return out


class Writer:
    """Writes scalars and hparams to the log and, on the chief, to the workdir's files.

    Args:
      workdir: the run's directory, local or remote (gs://); it must exist.
      is_chief: whether this process writes files (the others only log).
    """

    def __init__(self, workdir: str | os.PathLike, is_chief: bool):
        self._jsonl = self._events = None
        if is_chief:
            directory = epath.Path(workdir)
            self._jsonl = _Appended(directory / "metrics.jsonl")
            if event_pb2 is None:
                logging.log_first_n(logging.WARNING, "tensorboard is not installed: no "
                                    "TensorBoard event files (metrics.jsonl holds the same "
                                    "values).", 1)
                return
            name = (f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}."
                    f"{os.getpid()}.{next(_FILE_IDS)}")
            self._events = RecordWriter(_Appended(directory / name))
            self._event(event_pb2.Event(file_version="brain.Event:2"))
            self.flush()

    def _event(self, event: Any) -> None:
        event.wall_time = event.wall_time or time.time()
        self._events.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs `scalars` (name: number) at `step`; the chief also stores them."""
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
        self._store({"step": int(step), **values}, lambda: [event_pb2.Event(
            step=int(step), summary=scalar_summary.scalar_pb(k, v)) for k, v in values.items()])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Logs the run's hyperparameters; the chief also stores them (TensorBoard's HPARAMS)."""
        # Wrapped: the flattened config is a few thousand characters on one line otherwise.
        text = ", ".join(f"{k}={v}" for k, v in sorted(hparams.items()))
        logging.info("Hyperparameters:\n  %s", "\n  ".join(textwrap.wrap(
            text, 100, break_long_words=False, break_on_hyphens=False)))
        self._store({"hparams": dict(hparams)}, lambda: [event_pb2.Event(
            summary=hparams_summary.hparams_pb(_hparam_values(hparams)))])

    def _store(self, record: dict[str, Any], events: Callable[[], list[Any]]) -> None:
        """On the chief: `record` as a line of metrics.jsonl and `events()` into the event
        file (made only where there is one), then both flushed."""
        if self._jsonl is None:
            return
        self._jsonl.write((json.dumps(record, default=str) + "\n").encode())
        if self._events is not None:
            for event in events():
                self._event(event)
        self.flush()

    def flush(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.flush()

    def close(self) -> None:
        self.flush()


def create_writer(workdir: str | os.PathLike, is_chief: bool) -> Writer:
    """Logging (+ workdir/metrics.jsonl and a TensorBoard event file on the chief)."""
    return Writer(workdir, is_chief)


def log_parameter_overview(params: Any) -> None:
    """Logs a table of the parameters in `params` (a pytree): name, shape, size, and the total."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    rows = [("Name", "Shape", "Size")] + [
        (jax.tree_util.keystr(path, simple=True, separator="/"), str(tuple(np.shape(x))),
         f"{np.size(x):,}") for path, x in leaves]
    total = sum(int(np.size(x)) for _, x in leaves)
    nbytes = sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for _, x in leaves)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append(f"Total: {total:,} parameters, {nbytes:,} bytes")
    logging.info("Trainable parameters:\n%s", "\n".join(lines))
