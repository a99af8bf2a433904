"""A trained run's own part as one small file (`model.vqt`): all that predicting needs besides
the pretrained backbone.

Every run writes `WORKDIR/model.vqt` when it finishes (`train.train_and_evaluate`, and each run
of a protocol stage trained as one program). It holds:

* every variable the backbone checkpoint does not provide, and every trainable one: for VQT the
  query tokens and the head (kilobytes); prompts, adapters or LoRA factors for those methods;
  the whole model for full fine-tuning or a model without `config.init`;
* the class names, in label order;
* the run's whole config (model options, method, image size, normalisation, resize rule), from
  which the model is rebuilt;
* the backbone checkpoint's path and the SHA-256 of its file: loading refuses a backbone file
  whose content differs, since the exported part was trained on that backbone's features;
* the run's evaluation results (results.json's numbers).

The file is a zip archive in numpy's `.npz` layout: `meta.json` (as bytes) and one array per
variable, named `collection/path/to/leaf`; `numpy.load` reads it without vqt_jax. It is written
to a temporary name and renamed, so a killed write never leaves a partial file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vqt_jax import checkpoints
from vqt_jax import trainable as trainable_lib
from vqt_jax import workdir as workdir_lib

EXPORT_FILE = "model.vqt"
FORMAT = "vqt_jax.export"
VERSION = 1
META = "meta.json"
# meta.json's fields (dotted) that reading needs, and the JSON types each may hold.
META_FIELDS = (("method", str), ("task", str), ("class_names", list), ("config", dict),
               ("config.method", str), ("config.model", dict), ("config.image_size", int),
               ("config.normalization", (str, list)), ("backbone", dict),
               ("backbone.init", (str, type(None))), ("backbone.sha256", (str, type(None))),
               ("backbone.provided", list))


class ExportError(ValueError):
    """An export file that cannot be used (unreadable, another format, or a backbone that is
    not the one it was trained on); the message names the file and the problem."""


def checkpoint_sha256(path: str | None) -> str | None:
    """SHA-256 of a checkpoint file's bytes (local, gs:// or a downloaded http(s) file; a
    big_vision `:img` sub-tree suffix is ignored: the file is hashed); None without a path."""
    if not path:
        return None
    file_path = checkpoints.split_subtree(path)[0]
    if "://" in file_path:
        return _sha256(file_path)
    st = os.stat(file_path)
    return _sha256(file_path, st.st_size, st.st_mtime_ns)


@functools.cache
def _sha256(path: str, *stat: int) -> str:
    """The file's SHA-256, kept by (path, size, mtime): a protocol's runs share one backbone
    file, hashed once."""
    digest = hashlib.sha256()
    with checkpoints.files.open_file(path) as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def provided_keys(pretrained: Mapping[str, Any] | None) -> frozenset[str]:
    """The variables (flat `collection/path` names) a checkpoint provides: the leaves of
    `train.RunPlan.pretrained` that hold values rather than shapes."""
    return frozenset(k for k, v in trainable_lib.flatten(pretrained or {}).items()
                     if not isinstance(v, jax.ShapeDtypeStruct))


def _host(x: Any) -> np.ndarray:
    """A replicated value on this host, also when its array spans other hosts' devices (then
    `device_get` refuses it; a replicated array's local copy is the whole value)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            raise ValueError(f"cannot export a variable sharded over hosts ({x.sharding})")
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def write(path: str, *, config: ml_collections.ConfigDict, variables: Mapping[str, Any],
          provided: frozenset[str], class_names: Sequence[str],
          results: Mapping[str, Any] | None = None) -> str:
    """Writes a run's export to `path` (atomically) and returns `path`.

    Args:
      path: the file to write (conventionally `WORKDIR/model.vqt`).
      config: the run's config (as trained).
      variables: the model's final variables (nested, as `model.apply` takes them).
      provided: the variables the backbone checkpoint provides (`provided_keys`).
      class_names: one name per class, in label order.
      results: the run's results (only JSON-able scalars and lists are kept).
    """
    # The variables an export keeps: the trainable ones (the method's rule) and every one the
    # checkpoint does not provide.
    rule = trainable_lib.rule_for(config.method)
    arrays = {k: _host(v) for k, v in trainable_lib.flatten(variables).items()
              if k not in provided or any(re.fullmatch(p, k) for p in rule)}
    num_classes = len(arrays.get("params/head/bias", ()))
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a head of {num_classes} classes")
    meta = {"format": FORMAT, "version": VERSION, "method": config.method, "task": config.task,
            "class_names": list(class_names), "config": workdir_lib.as_dict(config),
            "backbone": {"init": config.init or None, "sha256": checkpoint_sha256(config.init),
                         "provided": sorted(provided)},
            "results": {k: v for k, v in (results or {}).items()
                        if isinstance(v, (int, float, str, bool, list)) or v is None}}
    buf = io.BytesIO()
    np.savez(buf, **{META: np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **arrays)
    workdir_lib.write_bytes(path, buf.getvalue())
    return path


@dataclasses.dataclass(frozen=True)
class Exported:
    """A read export: `meta` (see the module docstring) and its `arrays` by flat name."""

    path: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The run's config (sequences as tuples again, as the config files write them)."""
        return workdir_lib.from_json(self.meta["config"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def method(self) -> str:
        return self.meta["method"]


def read(path: str | os.PathLike) -> Exported:
    """Reads an export file, local or remote (gs://: every path `write` accepts).

    Raises:
      FileNotFoundError: no such file.
      ExportError: not an export of this format and version; the message names the file.
      ValueError: a gs:// path that lost a slash (gs:/b/x: `workdir.is_local`).
    """
    file = workdir_lib.as_path(path)  # through etils.epath, as `write` writes it
    path = os.fspath(path)
    if not file.is_file():
        raise FileNotFoundError(f"Export file not found: {path}")
    try:
        with file.open("rb") as f, np.load(f, allow_pickle=False) as z:
            if META not in z.files:
                raise ExportError(f"{path} is not a vqt_jax export (it has no {META})")
            meta = json.loads(z[META].tobytes().decode())
            arrays = {k: z[k] for k in z.files if k != META}
    except ExportError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ExportError(f"{path} is not a readable vqt_jax export: {e}") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: its {META} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not a vqt_jax export (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ExportError(f"{path} is an export of version {meta.get('version')!r}; this "
                          f"vqt_jax reads version {VERSION}")
    check_meta(path, meta)
    if bad := sorted(k for k, a in arrays.items()
                     if a.dtype.kind in "fc" and not np.isfinite(a).all()):
        raise ExportError(f"{path}: {len(bad)} array(s) hold NaN or inf values, e.g. {bad[0]}; "
                          "the run that wrote it diverged or the file was altered")
    return Exported(path, meta, arrays)


def check_meta(path: str, meta: Any) -> None:
    """Raises ExportError naming `path` and the first of `META_FIELDS` missing from `meta` or of
    another type (or a non-positive image size)."""
    for name, types in META_FIELDS:
        value = meta
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ExportError(f"{path}: its {META} has no field {name!r}")
            value = value[part]
        if not isinstance(value, types) or isinstance(value, bool):
            kinds = types if isinstance(types, tuple) else (types,)
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in kinds)
            raise ExportError(f"{path}: its {META} field {name!r} is {value!r}, not {wanted}")
    if meta["config"]["image_size"] <= 0:
        raise ExportError(f"{path}: its {META} field 'config.image_size' is "
                          f"{meta['config']['image_size']}, not > 0")
