"""Classifying images with exported runs (`model.vqt`, see `vqt_jax.export`): the backbone is
loaded once, and one backbone pass per batch serves every VQT task.

    from vqt_jax import serving
    predictor = serving.Predictor(["dtd=runs/dtd/model.vqt", "runs/cifar/model.vqt"])
    for p in predictor.predict_files(["photos/"], top_k=3):
        print(p.path, p.task, p.top)   # [(class name, probability), ...]

VQT's backbone never changes, so the keys/values of one backbone pass (`ViT.cache_features`)
serve any number of VQT tasks, each adding only its query path and head
(`ViT.features_from_cache`). Linear probing and Head2Toe exports (whose head reads features
that their own model options shape) and the methods that change the backbone's tokens (VPT,
adapters, LoRA, full fine-tuning) run one whole forward per task, and the predictor says so.
Every task given together must share the backbone (the same checkpoint file by content hash)
and its input (image size, normalisation, resize rule, backbone options); otherwise the
predictor refuses them, naming the option that differs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import checkpoints, export, inference, methods, protocol
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT
from vqt_jax.training.mesh import make_mesh

# config.model fields that only size or regularise a method's own part, its head, or how it
# is compiled: tasks may differ in them and still share a backbone pass. Every other model
# field shapes the backbone's tokens and must be equal.
TASK_MODEL_FIELDS = frozenset().union(*methods.PARTS.values(), (
    "query_dropout", "prompt_dropout", "adapter_dropout", "adapter_scale", "lora_alpha",
    "head_init", "head_bias_init", "remat", "scan_blocks", "kv_dtype"))
# Run config fields that define the input every task reads (and the backbone's position
# embedding at that input size).
INPUT_FIELDS = ("image_size", "normalization", "resize", "posemb_resample")


@dataclasses.dataclass
class Task:
    """One loaded export: its `name`, the export, the rebuilt model and its variables."""

    name: str
    exported: export.Exported
    model: ViT
    variables: dict[str, Any]

    @property
    def shares_backbone_pass(self) -> bool:
        """True when the task reads only the backbone's keys/values (VQT and its
        combinations with a frozen backbone): one pass serves all such tasks."""
        return methods.get(self.exported.method).cache == "kv"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's top classes for one task."""

    path: str
    task: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first


def parse_model_arg(arg: str) -> tuple[str | None, str]:
    """'NAME=PATH' -> (NAME, PATH); 'PATH' -> (None, PATH)."""
    name, sep, path = arg.partition("=")
    if sep and name and os.sep not in name and not os.path.exists(arg):
        return name, path
    return None, arg


def _default_name(exported: export.Exported) -> str:
    """The task's name, or for an image folder the file's name (its parent folder's for the
    conventional `model.vqt`)."""
    if exported.meta["task"] != "folder":
        return exported.meta["task"]
    stem = os.path.splitext(os.path.basename(exported.path))[0]
    if stem == os.path.splitext(export.EXPORT_FILE)[0]:
        stem = os.path.basename(os.path.dirname(os.path.abspath(exported.path))) or stem
    return stem


def backbone_options(exported: export.Exported) -> dict[str, Any]:
    """What must be equal for tasks to share a backbone and its input: the checkpoint's hash,
    the input fields and the backbone's model options."""
    config = exported.meta["config"]
    return {"backbone checkpoint (sha256)": exported.meta["backbone"]["sha256"],
            **{f: config.get(f) for f in INPUT_FIELDS},
            **{f"model.{k}": v for k, v in sorted(config["model"].items())
               if k not in TASK_MODEL_FIELDS}}


def check_compatible(exports: Sequence[tuple[str, export.Exported]]) -> None:
    """Raises ValueError naming the first option in which two tasks' backbones differ."""
    first_name, first = exports[0]
    reference = backbone_options(first)
    for name, e in exports[1:]:
        for field, value in backbone_options(e).items():
            if value != reference.get(field):
                raise ValueError(
                    f"Tasks {first_name!r} ({first.path}) and {name!r} ({e.path}) cannot be "
                    f"served together: their {field} differs ({reference.get(field)!r} vs "
                    f"{value!r}); serve them in separate calls")


def _load_backbone(exported: export.Exported, abstract: dict[str, Any],
                   path: str | None) -> dict[str, Any]:
    """The checkpoint's variables for a model of variables `abstract` (flat), after checking
    that the file is the one the export was trained on."""
    sha256 = exported.meta["backbone"]["sha256"]
    if sha256 is None:
        return {}
    if not path:
        raise ValueError(f"{exported.path} was trained on {exported.meta['backbone']['init']}: "
                         "pass its checkpoint (backbone=...)")
    found = export.checkpoint_sha256(path)
    if found != sha256:
        raise export.ExportError(
            f"The backbone {path} (sha256 {found[:12]}...) is not the checkpoint "
            f"{exported.path} was trained on ({exported.meta['backbone']['init']}, sha256 "
            f"{sha256[:12]}...): its queries and head read that backbone's features")
    from vqt_jax.training import train  # noqa: PLC0415 (imports the data pipeline)

    loaded = train.load_pretrained(exported.config, abstract, path)
    provided = export.provided_keys(loaded)
    return {k: v for k, v in trainable_lib.flatten(loaded).items() if k in provided}


def load_tasks(models: Sequence[str | tuple[str | None, str]], backbone: str | None = None,
               log: Callable[[str], None] = logging.info) -> list[Task]:
    """Reads exports and rebuilds their models on one shared backbone.

    Args:
      models: export paths, 'NAME=PATH' strings or (name or None, path) pairs; a name defaults
        to the export's task (for image folders: the file's name).
      backbone: the checkpoint to load (default: the path recorded in the exports); its
        content must be the one they were trained on.
      log: where notes go (which tasks share the backbone pass).

    Raises:
      FileNotFoundError, export.ExportError, ValueError: a missing or foreign file, another
        backbone, or tasks that cannot share a backbone (named).
    """
    from vqt_jax.training import train  # noqa: PLC0415

    if not models:
        raise ValueError("No model given: pass at least one exported model.vqt")
    exports = [(name, export.read(path))
               for name, path in (parse_model_arg(m) if isinstance(m, str) else m for m in models)]
    exports = [(name or _default_name(e), e) for name, e in exports]
    names = [n for n, _ in exports]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"Two models are named {duplicates[0]!r}: name them, as NAME=PATH")
    check_compatible(exports)
    first = exports[0][1]
    models_, abstracts = [], []
    for _, e in exports:
        try:
            models_.append(train.build_model(e.config, len(e.class_names)))
            abstracts.append(train.abstract_variables(models_[-1], e.config))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise export.ExportError(f"{e.path}: the config in its {export.META} cannot rebuild "
                                     f"the model ({type(err).__name__}: {err})") from None
    shared = _load_backbone(first, abstracts[0], backbone or first.meta["backbone"]["init"])
    tasks = []
    for (name, e), model, abstract in zip(exports, models_, abstracts, strict=True):
        flat = {}
        for k, a in trainable_lib.flatten(abstract).items():
            if (value := e.arrays.get(k, shared.get(k))) is None:
                raise export.ExportError(f"{e.path}: variable {k} is neither in the export nor "
                                         "in the backbone checkpoint")
            if tuple(value.shape) != tuple(a.shape):
                raise export.ExportError(f"{e.path}: variable {k} has shape "
                                         f"{tuple(value.shape)}, the model {tuple(a.shape)}")
            flat[k] = value
        tasks.append(Task(name, e, model, trainable_lib.unflatten(flat)))
    if together := [t.name for t in tasks if t.shares_backbone_pass]:
        log(f"One backbone pass per batch serves {len(together)} VQT task(s): "
            f"{', '.join(together)}")
    for t in [t for t in tasks if not t.shares_backbone_pass]:
        log(f"Task {t.name!r} ({t.exported.method}) needs a whole forward of its own: its "
            "method " + ("changes the backbone's tokens" if methods.get(t.exported.method).cache
                         is None else "reads features its own model options shape"))
    return tasks


class Predictor:
    """Logits and top-k classes of every task for batches of images (data-parallel over the
    local devices)."""

    def __init__(self, models: Sequence[str | tuple[str | None, str]], *,
                 backbone: str | None = None, batch_size: int = 64, num_devices: int = 0,
                 log: Callable[[str], None] = logging.info):
        self.tasks = load_tasks(models, backbone, log)
        self.mesh = make_mesh(num_devices)
        n = self.mesh.size
        self.batch_size = max(n, -(-batch_size // n) * n)  # a multiple of the device count
        self.config = self.tasks[0].exported.config  # the input every task reads
        replicated = NamedSharding(self.mesh, P())
        self._rows = NamedSharding(self.mesh, P("data"))
        # The backbone's arrays are one set on the devices, whatever the number of tasks.
        arrays = {id(a): a for t in self.tasks for a in jax.tree.leaves(t.variables)}
        placed = {i: checkpoints.place(a, replicated) for i, a in arrays.items()}
        self._variables = [jax.tree.map(lambda a: placed[id(a)], t.variables) for t in self.tasks]
        first = next((i for i, t in enumerate(self.tasks) if t.shares_backbone_pass), None)

        def fn(variables: list[dict[str, Any]], images: jax.Array) -> list[jax.Array]:
            if first is not None:
                feats = self.tasks[first].model.apply(variables[first], images,
                                                      method=ViT.cache_features)
                inputs = {k: feats[k] for k in ("k", "v", "cls")}
            return [(t.model.apply(v, inputs, method=ViT.features_from_cache)["logits"]
                     if t.shares_backbone_pass else t.model.apply(v, images)).astype(jnp.float32)
                    for t, v in zip(self.tasks, variables, strict=True)]

        self._fn = inference.forward_fn(fn, self.mesh, out_sharding=replicated)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def logits(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every task's float32 logits [N, classes] for normalised images [N, S, S, 3] (as the
        evaluation pipeline makes them); N is padded to the batch internally."""
        chunks: list[list[np.ndarray]] = [[] for _ in self.tasks]  # per task, per batch
        for start in range(0, len(images), self.batch_size):
            part = images[start:start + self.batch_size]
            batch = np.zeros((self.batch_size, *np.shape(images)[1:]), np.float32)
            batch[:len(part)] = part
            outs = jax.device_get(self._fn(self._variables, jax.device_put(batch, self._rows)))
            for c, o in zip(chunks, outs, strict=True):
                c.append(np.asarray(o)[:len(part)])
        return {t.name: (np.concatenate(c) if c else np.zeros((0, len(t.exported.class_names)),
                                                              np.float32))
                for t, c in zip(self.tasks, chunks, strict=True)}

    def predict_files(self, paths: Sequence[str], top_k: int = 5,
                      on_batch: Callable[[int], None] | None = None) -> Iterator[Prediction]:
        """Top-k predictions of every task for `paths` (images, read and preprocessed as the
        evaluation reads a folder's images), in order, task by task per image. `paths` must
        decode (`data.folder.find_undecodable` names those that do not); `on_batch(n)` is
        called after each batch of n images."""
        from vqt_jax import data  # noqa: PLC0415 (TensorFlow)

        for batch_paths, images in data.file_batches(
                paths, batch_size=self.batch_size, image_size=self.config.image_size,
                normalization=data.as_normalization(self.config.normalization),
                round_resized=protocol.round_resized(self.config)):
            logits = self.logits(images)
            for i, path in enumerate(batch_paths):
                for t in self.tasks:
                    yield Prediction(path, t.name, top_classes(logits[t.name][i],
                                                               t.exported.class_names, top_k))
            if on_batch:
                on_batch(len(batch_paths))


def top_classes(logits: np.ndarray, class_names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The k most probable classes (softmax of `logits`) as (name, probability)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    return [(class_names[j], float(p[j])) for j in order]
