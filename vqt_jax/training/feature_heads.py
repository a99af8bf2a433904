"""Heads trained after the main run on fixed features: compression and baselines.

Once the method is trained, everything before its head is fixed, and so are the backbone's
own features. Two things then cost one pass over the data plus seconds of head training:

* compression (`config.compression.enabled`): the release's feature-compression stage on the
  method's head input (VQT: [CLS ; query outputs]); see `vqt_jax/compression.py`;
* baselines (`config.baselines`, names from `BASELINES`): other heads on the same features, a
  linear probe on the final CLS and Head2Toe on every block's pooled tokens, each a convex
  problem solved to convergence with its regularisation (and Head2Toe's keep fraction) chosen
  on a validation part of the training rows, then refitted on all of them
  (`vqt_jax/linear_probe.py`). The validation part (`validation_rows`): with
  `config.split == 'test'` the training rows are train800 then val200 (TFDS splits concatenated
  in order; image folders train/ then val/), so it is the last rows, as many as the val split
  has; with `'val'` (train800 only) it is the last `HOLDOUT` of each class's rows (per class,
  since an image folder lists its rows class by class).

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
from vqt_jax import compression, data, linear_probe, protocol
from vqt_jax.models import ViT
from vqt_jax.models.vit import l2_normalize
from vqt_jax.progress import Progress, format_duration
from vqt_jax.training import compression_train

Features = dict[str, np.ndarray]  # pre_logits [N, F], cls [N, D], pooled [N, G, D], label [N]
FIELDS = ("pre_logits", "cls", "pooled")


def head2toe_features(pooled: np.ndarray) -> np.ndarray:
    """Head2Toe's input: each pooled token [N, G, D] L2-normalised, concatenated [N, G * D]."""
    return np.asarray(l2_normalize(jnp.asarray(pooled))).reshape(len(pooled), -1)


# The share of each class's training rows held out to choose the baselines' hyper-parameters
# when the run has no separate validation rows (config.split == 'val').
HOLDOUT = 0.2


def validation_rows(config: ml_collections.ConfigDict, labels: np.ndarray) -> np.ndarray:
    """Boolean mask [N] of the training rows that choose the baselines' hyper-parameters.

    Rows are in `data.load_train_examples` order (as the cache keeps them). For
    `config.split == 'test'`: the last rows, as many as the val split has (val200 after
    train800). For `'val'`: per class, the last `floor(HOLDOUT * n_c)` of its `n_c` rows, so
    every class keeps training rows.

    Raises:
      ValueError: the validation part would be empty or the whole training set.
    """
    n = len(labels)
    if config.split == "test":
        num_val = data.get_num_examples(config.task, config.data_dir, "val", "eval")
        if not 0 < num_val < n:
            raise ValueError(f"Baselines: the val split has {num_val} examples, which cannot be "
                             f"the validation part of {n} training rows (train + val)")
        return np.arange(n) >= n - num_val
    mask = np.zeros(n, bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        mask[rows[len(rows) - int(HOLDOUT * len(rows)):]] = True
    if not mask.any():
        raise ValueError(f"Baselines: {n} training rows are too few to hold out "
                         f"{HOLDOUT:.0%} of a class for choosing the regularisation")
    return mask


def _linear(train: Features, evals: Features, is_val: np.ndarray) -> dict:
    # The CLS L2-normalised, as it enters VQT's head.
    x, x_eval = (np.asarray(l2_normalize(jnp.asarray(f["cls"]))) for f in (train, evals))
    y = train["label"]
    tuned = linear_probe.tune(x[~is_val], y[~is_val], x[is_val], y[is_val])
    return {"top1": tuned.probe.accuracy(x_eval, evals["label"]), "C": tuned.C,
            "val_top1": max(tuned.val_top1), "num_features": int(x.shape[1]),
            "num_val": int(is_val.sum()), "converged": tuned.probe.converged}


def _head2toe(train: Features, evals: Features, is_val: np.ndarray) -> dict:
    x, x_eval = head2toe_features(train["pooled"]), head2toe_features(evals["pooled"])
    y = train["label"]
    r = linear_probe.head2toe(x[~is_val], y[~is_val], x[is_val], y[is_val])
    return {"top1": r.probe.accuracy(x_eval[:, r.kept], evals["label"]), "C": r.C,
            "keep_frac": r.keep_frac, "val_top1": max(max(v) for v in r.val_top1.values()),
            "num_features": int(x.shape[1]), "num_kept": len(r.kept),
            "num_val": int(is_val.sum()),
            "converged": r.probe.converged and r.lasso_converged}


# Baseline heads by name: (train features, eval features, validation-row mask) -> metrics.
BASELINES: dict[str, Callable[[Features, Features, np.ndarray], dict]] = {
    "linear": _linear, "head2toe": _head2toe}


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
    """Runs `fn` over global batches; keeps the rows whose mask is 1, in order.

    Each process passes its own slices of the global batches (`sharding` places them) and gets
    back every row of every batch: multi-host runs train the heads on each host from the same
    features.
    """
    out: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        mask = batch.pop("mask", None)
        arrays = {k: jax.make_array_from_process_local_data(sharding, v)
                  for k, v in batch.items()}
        feats = cache_lib.fetch_rows(fn(arrays))
        keep = slice(None) if mask is None else cache_lib.fetch_rows(
            jax.make_array_from_process_local_data(sharding, mask)) > 0
        for k, v in feats.items():
            out.setdefault(k, []).append(v[keep])
        if progress is not None:
            progress.update(len(out[next(iter(out))][-1]))
    if progress is not None:
        progress.done()
    return {k: np.concatenate(v) for k, v in out.items()}


def compute(config: ml_collections.ConfigDict, model: ViT, variables, mesh: Mesh,
            cache: cache_lib.Cache | None,
            evals: Features | None = None) -> tuple[Features, Features]:
    """(training features, evaluation features) of the trained model; `evals`, if given, are
    the evaluation features already computed (by a pass that served several runs)."""
    sharding = NamedSharding(mesh, P("data"))
    batch_size = config.eval_batch_size or config.batch_size
    norm = data.as_normalization(config.normalization)

    def from_images(v, batch):
        f = model.apply(v, batch["image"], method=ViT.features, keep_blocks=False)
        return {k: f[k] for k in FIELDS} | {"label": batch["label"]}

    # Outputs stay sharded over the batch (each device holds its own rows; `_collect` gathers
    # them), so the per-device output does not grow with the device count.
    images_fn = cache_lib.forward_fn(from_images, mesh)
    num_eval = data.get_num_examples(config.task, config.data_dir, config.split, "eval")
    evals = evals if evals is not None else _collect(data.make_eval_iterator(
        config.task, config.data_dir, config.split, global_batch_size=batch_size,
        image_size=config.image_size, normalization=norm,
        local_device_count=len(mesh.local_devices), round_resized=protocol.round_resized(config)),
        lambda b: images_fn(variables, b), sharding,
        Progress("Feature heads: evaluation features", num_eval, "images"))

    if cache is None:
        images, labels = data.load_train_examples(config.task, config.data_dir, config.split,
                                                  config.image_size, protocol.round_resized(config))
        batches = _host_batches(len(labels), batch_size, sharding, lambda sl: {
            "image": data.normalize_array(images[sl], norm), "label": labels[sl]})
        return _collect(batches, lambda b: images_fn(variables, b), sharding,
                        Progress("Feature heads: training features", len(labels),
                                 "images")), evals

    # From the cache: the fixed fields as stored; VQT's head input through the query path.
    def from_cache(v, batch):
        return {"pre_logits": model.apply(v, batch, method=ViT.features_from_cache)[
            "pre_logits"]}

    cache_fn = cache_lib.forward_fn(from_cache, mesh)
    n = cache.spec.num_examples
    train = {k: np.asarray(cache.arrays[k]) for k in ("cls", "pooled", "pre_logits")
             if k in cache.arrays}
    train["label"] = np.asarray(cache.labels)
    if "pre_logits" not in train:
        inputs = ("k", "v", "cls")
        batches = _host_batches(n, batch_size, sharding, lambda sl: {
            k: np.asarray(cache.arrays[k][sl]) for k in inputs})
        train["pre_logits"] = _collect(
            batches, lambda b: cache_fn(variables, b), sharding,
            Progress("Feature heads: training features from the cache", n, "images"),
        )["pre_logits"]
    return train, evals


def _host_batches(n: int, batch_size: int, sharding: NamedSharding,
                  get: Callable[[slice], dict]) -> Iterable[dict]:
    """This host's slices of the padded, masked global batches (see `cache.host_batches`)."""
    return (local for _, local in cache_lib.host_batches(n, batch_size, get, sharding=sharding))


def run(config: ml_collections.ConfigDict, model: ViT, variables, mesh: Mesh,
        cache: cache_lib.Cache | None, num_classes: int, evals: Features | None = None) -> dict:
    """Trains the compression and baseline heads the config asks for; returns their metrics.

    `evals`: the evaluation features (`FIELDS` and 'label'), if computed already; default: one
    forward pass over the evaluation split here.

    Returns:
      {'compression': {...}} and/or {'baselines': {name: {...}}}, each with the evaluation
      'top1'; empty if nothing is asked for. A baseline's entry also holds its chosen 'C', its
      best 'val_top1' on the validation part, 'num_features', 'num_val' (validation rows),
      'converged' (the final fits reached their tolerances: L-BFGS, and Head2Toe's group
      lasso) and, for Head2Toe, the chosen 'keep_frac' and 'num_kept'.
    """
    if not wanted(config):
        return {}
    train, evals = compute(config, model, variables, mesh, cache, evals)
    out: dict = {}
    if config.compression.enabled and config.compression.get("train_mode", False):
        # The release's: both stages see the queries through their dropout (see
        # compression_train.py); progress lines come from its loop.
        out["compression"] = compression_train.compress(
            config, model, variables, mesh, cache, len(train["label"]), evals["pre_logits"],
            evals["label"], num_classes)
    elif config.compression.enabled:
        out["compression"] = _timed("compression", lambda: _compress(
            train["pre_logits"], train["label"], evals["pre_logits"], evals["label"], config,
            num_classes))
    names = config.get("baselines") or ()
    if names:
        is_val = validation_rows(config, train["label"])
        out["baselines"] = {name: _timed(name, lambda name=name: BASELINES[name](
            train, evals, is_val)) for name in names}
    return out


def _timed(name: str, fit: Callable[[], dict]) -> dict:
    """Runs one head's fit (a single compiled loop, so no finer progress) between two lines."""
    logging.info("Feature heads: fitting %s ...", name)
    start = time.monotonic()
    result = fit()
    logging.info("Feature heads: %s fitted in %s, top-1 %.4f", name,
                 format_duration(time.monotonic() - start), result["top1"])
    if result.get("converged") is False:
        logging.warning("Feature heads: %s stopped at an iteration cap before its "
                        "tolerance; its top-1 may be below the optimum's", name)
    return result
