"""Heads trained after the main run on fixed features: compression and baselines.

Once the method is trained, everything before its head is fixed, and so are the backbone's
own features. Two things then cost one pass over the data plus seconds of head training:

* compression (`config.compression.enabled`): the release's feature-compression stage on the
  method's head input (VQT: [CLS ; query outputs]); see `vqt_jax/compression.py`;
* baselines (`config.baselines`, names from `BASELINES`): other heads on the same features,
  e.g. a linear probe on the final CLS and Head2Toe on every block's pooled tokens.

Training features come from the run's cache when there is one (for VQT: the query path over
the cached keys/values with the trained queries), else from a forward pass over the training
images; evaluation features from one forward pass over the evaluation split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import cache as cache_lib
from vqt_jax import compression, data
from vqt_jax.models import ViT
from vqt_jax.models.vit import l2_normalize
from vqt_jax.progress import Progress, format_duration

Features = dict[str, np.ndarray]  # pre_logits [N, F], cls [N, D], pooled [N, G, D], label [N]
FIELDS = ("pre_logits", "cls", "pooled")


def head2toe_features(pooled: np.ndarray) -> np.ndarray:
    """Head2Toe's input: each pooled token [N, G, D] L2-normalised, concatenated [N, G * D]."""
    return np.asarray(l2_normalize(jnp.asarray(pooled))).reshape(len(pooled), -1)


def _linear(train: Features, evals: Features, config: ml_collections.ConfigDict,
            num_classes: int) -> dict:
    # The CLS L2-normalised, as it enters VQT's head, so one lr/wd suits both heads.
    x_train, x_eval = (np.asarray(l2_normalize(jnp.asarray(f["cls"]))) for f in (train, evals))
    head = compression.fit_head(
        x_train, train["label"], num_classes, lr=config.lr, wd=config.wd,
        epochs=config.epochs, batch_size=config.batch_size,
        warmup_epochs=config.warmup_epochs, seed=config.seed)
    return {"top1": float(compression.accuracy(head, x_eval, evals["label"])),
            "num_features": int(x_train.shape[1])}


def _head2toe(train: Features, evals: Features, config: ml_collections.ConfigDict,
              num_classes: int) -> dict:
    return _compress(head2toe_features(train["pooled"]), train["label"],
                     head2toe_features(evals["pooled"]), evals["label"], config, num_classes)


# Baseline heads by name: (train features, eval features, config, classes) -> metrics.
BASELINES: dict[str, Callable[..., dict]] = {"linear": _linear, "head2toe": _head2toe}


def _compress(train_x, train_y, eval_x, eval_y, config, num_classes) -> dict:
    c = config.compression
    r = compression.compress(
        train_x, train_y, eval_x, eval_y, num_classes, lr=config.lr, wd=config.wd,
        keep_frac=c.keep_frac, lasso=c.lasso, epochs=c.epochs, lr_scale=c.lr_scale,
        batch_size=config.batch_size, warmup_epochs=config.warmup_epochs, seed=config.seed)
    return {k: (float(v) if k.startswith("top1") else int(v))
            for k, v in r.items() if k in ("top1", "top1_all", "num_features", "num_kept")}


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for an unknown baseline name (before anything runs)."""
    for name in config.get("baselines", ()) or ():
        if name not in BASELINES:
            raise ValueError(f"config.baselines: unknown {name!r}; choose from "
                             f"{', '.join(BASELINES)}")


def wanted(config: ml_collections.ConfigDict) -> bool:
    c = config.get("compression")
    return bool((c is not None and c.enabled) or config.get("baselines"))


def _collect(batches: Iterable[dict], fn, sharding: NamedSharding,
             progress: Progress | None = None) -> Features:
    """Runs `fn` over global batches; keeps the rows whose mask is 1, in order."""
    out: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        mask = batch.pop("mask", None)
        arrays = {k: jax.make_array_from_process_local_data(sharding, v)
                  for k, v in batch.items()}
        feats = jax.device_get(fn(arrays))
        keep = slice(None) if mask is None else np.asarray(
            jax.device_get(jax.make_array_from_process_local_data(sharding, mask))) > 0
        for k, v in feats.items():
            out.setdefault(k, []).append(np.asarray(v)[keep])
        if progress is not None:
            progress.update(len(out[next(iter(out))][-1]))
    if progress is not None:
        progress.done()
    return {k: np.concatenate(v) for k, v in out.items()}


def compute(config: ml_collections.ConfigDict, model: ViT, variables, mesh: Mesh,
            cache: cache_lib.Cache | None) -> tuple[Features, Features]:
    """(training features, evaluation features) of the trained model."""
    replicated = NamedSharding(mesh, P())
    sharding = NamedSharding(mesh, P("data"))
    batch_size = config.eval_batch_size or config.batch_size
    norm = data.as_normalization(config.normalization)

    def from_images(v, batch):
        f = model.apply(v, batch["image"], method=ViT.features, keep_blocks=False)
        return {k: f[k] for k in FIELDS} | {"label": batch["label"]}

    images_fn = jax.jit(from_images, out_shardings=replicated)
    num_eval = data.get_num_examples(config.task, config.data_dir, config.split, "eval")
    evals = _collect(data.make_eval_iterator(
        config.task, config.data_dir, config.split, global_batch_size=batch_size,
        image_size=config.image_size, normalization=norm,
        local_device_count=len(mesh.local_devices)),
        lambda b: images_fn(variables, b), sharding,
        Progress("Feature heads: evaluation features", num_eval, "images"))

    if cache is None:
        images, labels = data.load_train_examples(config.task, config.data_dir, config.split,
                                                  config.image_size)
        batches = _host_batches(len(labels), batch_size, lambda sl: {
            "image": data.normalize_array(images[sl], norm), "label": labels[sl]})
        return _collect(batches, lambda b: images_fn(variables, b), sharding,
                        Progress("Feature heads: training features", len(labels),
                                 "images")), evals

    # From the cache: the fixed fields as stored; VQT's head input through the query path.
    def from_cache(v, batch):
        return {"pre_logits": model.apply(v, batch, method=ViT.features_from_cache)[
            "pre_logits"]}

    cache_fn = jax.jit(from_cache, out_shardings=replicated)
    n = cache.spec.num_examples
    train = {k: np.asarray(cache.arrays[k]) for k in ("cls", "pooled", "pre_logits")
             if k in cache.arrays}
    train["label"] = np.asarray(cache.labels)
    if "pre_logits" not in train:
        inputs = ("k", "v", "cls")
        batches = _host_batches(n, batch_size, lambda sl: {
            k: np.asarray(cache.arrays[k][sl]) for k in inputs})
        train["pre_logits"] = _collect(
            batches, lambda b: cache_fn(variables, b), sharding,
            Progress("Feature heads: training features from the cache", n, "images"),
        )["pre_logits"]
    return train, evals


def _host_batches(n: int, batch_size: int, get: Callable[[slice], dict]) -> Iterable[dict]:
    """This host's slices of the padded, masked global batches (see `cache.host_batches`)."""
    return (local for _, local in cache_lib.host_batches(n, batch_size, get))


def run(config: ml_collections.ConfigDict, model: ViT, variables, mesh: Mesh,
        cache: cache_lib.Cache | None, num_classes: int) -> dict:
    """Trains the compression and baseline heads the config asks for; returns their metrics.

    Returns:
      {'compression': {...}} and/or {'baselines': {name: {...}}}, each with the evaluation
      top-1; empty if nothing is asked for.
    """
    if not wanted(config):
        return {}
    train, evals = compute(config, model, variables, mesh, cache)
    out: dict = {}
    if config.compression.enabled:
        out["compression"] = _timed("compression", lambda: _compress(
            train["pre_logits"], train["label"], evals["pre_logits"], evals["label"], config,
            num_classes))
    names = config.get("baselines") or ()
    if names:
        out["baselines"] = {name: _timed(name, lambda name=name: BASELINES[name](
            train, evals, config, num_classes)) for name in names}
    return out


def _timed(name: str, fit: Callable[[], dict]) -> dict:
    """Runs one head's fit (a single compiled loop, so no finer progress) between two lines."""
    logging.info("Feature heads: fitting %s ...", name)
    start = time.monotonic()
    result = fit()
    logging.info("Feature heads: %s fitted in %s, top-1 %.4f", name,
                 format_duration(time.monotonic() - start), result["top1"])
    return result
