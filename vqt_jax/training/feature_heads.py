"""Baseline heads fitted after the main run on the backbone's fixed features.

Once the method is trained, the backbone's own features are fixed, so the baselines
(`config.baselines`, names from `BASELINES`) cost one pass over the data plus seconds of
fitting: a linear probe on the final CLS and Head2Toe on every block's pooled tokens, each a convex
  problem solved to convergence with its regularisation (and Head2Toe's keep fraction) chosen
  on a validation part of the training rows, then refitted on all of them
  (`vqt_jax/linear_probe.py`). The validation part (`validation_rows`): with
  `config.split == 'test'` the training rows are train800 then val200 (TFDS splits concatenated
  in order; image folders train/ then val/), so it is the last rows, as many as the val split
  has; with `'val'` (train800 only) it is the last `HOLDOUT` of each class's rows (per class,
  since an image folder lists its rows class by class).

Training features come from the run's cache when it holds them, else from a forward pass
over the training images; evaluation features from one forward pass over the evaluation
split.
"""

from __future__ import annotations

import functools
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
from vqt_jax import data, inference, linear_probe, protocol
from vqt_jax.models import ViT
from vqt_jax.models.vit import l2_normalize
from vqt_jax.progress import Progress, format_duration
from vqt_jax.training import engine
from vqt_jax.training.batches import eval_batches

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


def _linear(train: Features, evals: Features, is_val: np.ndarray,
            progress: Progress | None = None) -> dict:
    # The CLS L2-normalised, as it enters VQT's head.
    x, x_eval = (np.asarray(l2_normalize(jnp.asarray(f["cls"]))) for f in (train, evals))
    y = train["label"]
    tuned = linear_probe.tune(x[~is_val], y[~is_val], x[is_val], y[is_val], progress=progress)
    return {"top1": tuned.probe.accuracy(x_eval, evals["label"]), "C": tuned.C,
            "val_top1": max(tuned.val_top1), "num_features": int(x.shape[1]),
            "num_val": int(is_val.sum()), "converged": tuned.probe.converged}


def _head2toe(train: Features, evals: Features, is_val: np.ndarray,
              progress: Progress | None = None) -> dict:
    x, x_eval = head2toe_features(train["pooled"]), head2toe_features(evals["pooled"])
    y = train["label"]
    r = linear_probe.head2toe(x[~is_val], y[~is_val], x[is_val], y[is_val], progress=progress)
    return {"top1": r.probe.accuracy(x_eval[:, r.kept], evals["label"]), "C": r.C,
            "keep_frac": r.keep_frac, "val_top1": max(max(v) for v in r.val_top1.values()),
            "num_features": int(x.shape[1]), "num_kept": len(r.kept), "num_val": int(is_val.sum()),
            "converged": r.probe.converged and r.lasso_converged}


# Baseline heads by name: (train features, eval features, validation-row mask, progress=None)
# -> metrics; the progress counts the head's fits.
BASELINES: dict[str, Callable[..., dict]] = {"linear": _linear, "head2toe": _head2toe}


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for an unknown baseline name (before anything runs)."""
    for name in config.get("baselines", ()) or ():
        if name not in BASELINES:
            raise ValueError(f"config.baselines: unknown {name!r}; choose from "
                             f"{', '.join(BASELINES)}")


def wanted(config: ml_collections.ConfigDict) -> bool:
    return bool(config.get("baselines"))


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
        feats = inference.fetch_rows(fn(engine.global_batch(batch, sharding)))
        keep = slice(None) if mask is None else inference.fetch_rows(
            jax.make_array_from_process_local_data(sharding, mask)) > 0
        for k, v in feats.items():
            out.setdefault(k, []).append(v[keep])
        if progress is not None:
            progress.update(len(out[next(iter(out))][-1]))
    if progress is not None:
        progress.done()
    return {k: np.concatenate(v) for k, v in out.items()}


def _images_fn(model: ViT, variables, mesh: Mesh) -> Callable[[dict], dict]:
    """batch -> `FIELDS` and 'label' of its images (`variables` in eval mode)."""
    def from_images(v, batch):
        f = model.apply(v, batch["image"], method=ViT.features_without_blocks)
        return {k: f[k] for k in FIELDS} | {"label": batch["label"]}

    # Outputs stay sharded over the batch (each device holds its own rows; `_collect` gathers
    # them), so the per-device output does not grow with the device count.
    return functools.partial(inference.forward_fn(from_images, mesh), variables)


def eval_features(config: ml_collections.ConfigDict, model: ViT, variables,
                  mesh: Mesh) -> Features:
    """`FIELDS` and 'label' of the evaluation split, from one forward pass (eval mode)."""
    num_eval = data.get_num_examples(config.task, config.data_dir, config.split, "eval")
    return _collect(eval_batches(config, mesh), _images_fn(model, variables, mesh),
                    NamedSharding(mesh, P("data")),
                    Progress("Evaluation features", num_eval, "images"))


def train_features(config: ml_collections.ConfigDict, model: ViT, variables, mesh: Mesh,
                   cache: cache_lib.Cache | None) -> Features:
    """The backbone's features of the training rows ('cls', 'pooled', 'label'): from the
    run's cache where it holds them, else from a forward pass over the images."""
    if cache is not None and {"cls", "pooled"} <= set(cache.arrays):
        return {"cls": np.asarray(cache.arrays["cls"]),
                "pooled": np.asarray(cache.arrays["pooled"]), "label": np.asarray(cache.labels)}
    sharding = NamedSharding(mesh, P("data"))
    norm = data.as_normalization(config.normalization)
    images, labels = data.load_train_examples(config.task, config.data_dir, config.split,
                                              config.image_size, protocol.round_resized(config))
    batches = _host_batches(len(labels), config.eval_batch_size or config.batch_size, sharding,
                            lambda sl: {"image": data.normalize_array(images[sl], norm),
                                        "label": labels[sl]})
    return _collect(batches, _images_fn(model, variables, mesh), sharding,
                    Progress("Baselines: training features", len(labels), "images"))


def _host_batches(n: int, batch_size: int, sharding: NamedSharding,
                  get: Callable[[slice], dict]) -> Iterable[dict]:
    """This host's slices of the padded, masked global batches (see `cache.host_batches`)."""
    return (local for _, local in cache_lib.host_batches(n, batch_size, get, sharding=sharding))


def run(config: ml_collections.ConfigDict, model: ViT, variables, mesh: Mesh,
        cache: cache_lib.Cache | None, evals: Features | None = None) -> dict:
    """Fits the baseline heads the config asks for; returns their metrics.

    `evals`: the evaluation features (`FIELDS` and 'label'), if computed already; default: one
    forward pass over the evaluation split here.

    Returns:
      {'baselines': {name: {...}}}, each with the evaluation 'top1', its chosen 'C', its best
      'val_top1' on the validation part, 'num_features', 'num_val' (validation rows),
      'converged' (the final fits reached their tolerances: L-BFGS, and Head2Toe's group
      lasso) and, for Head2Toe, the chosen 'keep_frac' and 'num_kept'; empty if none is asked.
    """
    if not wanted(config):
        return {}
    evals = evals if evals is not None else eval_features(config, model, variables, mesh)
    train = train_features(config, model, variables, mesh, cache)
    is_val = validation_rows(config, train["label"])
    return {"baselines": {name: _timed(name, lambda p, name=name: BASELINES[name](
        train, evals, is_val, progress=p)) for name in config.baselines}}


def _timed(name: str, fit: Callable[[Progress], dict]) -> dict:
    """Runs one head's fit, its progress counted in fits (the head sets their number), then
    logs its time and top-1."""
    start = time.monotonic()
    result = fit(Progress(f"Feature heads: fitting {name}", None, "fits"))
    logging.info("Feature heads: %s fitted in %s, top-1 %.4f", name,
                 format_duration(time.monotonic() - start), result["top1"])
    if result.get("converged") is False:
        logging.warning("Feature heads: %s stopped at an iteration cap before its "
                        "tolerance; its top-1 may be below the optimum's", name)
    return result
