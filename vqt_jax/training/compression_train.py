"""The release's feature compression with the queries in train mode (query dropout on).

The VQT release runs both compression stages (`head2toe_sparsity_train.py`, modes `compress`
then `featselect`) through its ordinary trainer: the model is in train mode, so the frozen
query tokens pass through their dropout (`MODEL.H2T.DROPOUT 0.1`) at every step and the head
sees a fresh draw of the query outputs each time. This module does the same: every step runs
VQT's query path (from the key/value cache, or from the images without one) with dropout and
no gradient, then one optimiser step of the head. Stage 1 trains a fresh head on all features
with `lasso * sum_j ||W[j, :]||_2`; the top `keep_frac` features by group norm are kept; stage
2 trains a fresh head on them alone. Both stages run `compression.epochs` epochs at
`lr_scale * lr` with the run's wd, optimiser, batching, warm-up, schedule and head init (the
release builds a new head for each stage). Evaluation uses eval-mode features.

`vqt_jax/compression.py` is the fixed-feature version (`compression.train_mode=False`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import cache as cache_lib
from vqt_jax import checkpoints, compression, methods, protocol
from vqt_jax.models import ViT
from vqt_jax.models.vit import HEAD_INITS
from vqt_jax.progress import Progress
from vqt_jax.training import batches as batches_lib
from vqt_jax.training import optim, steppers, train_step

FeatureFn = Callable[[dict, jax.Array], jax.Array]


def train_mode_features(model: ViT, variables: dict) -> FeatureFn:
    """fn(batch, rng) -> the head's input [B, F] in train mode (query dropout drawn from rng),
    from a cached batch (k, v, cls) or an image batch. No gradient flows into the model."""
    body = model.clone(num_classes=0)
    frozen = jax.lax.stop_gradient(variables)

    def fn(batch: dict, rng: jax.Array) -> jax.Array:
        rngs = {"dropout": rng}
        if "image" in batch:
            return body.apply(frozen, batch["image"], train=True, rngs=rngs)
        inputs = {k: v for k, v in batch.items() if k in train_step.CACHE_INPUTS}
        return body.apply(frozen, inputs, train=True, rngs=rngs, method=ViT.from_cache)

    return fn


def _fresh_head(config: ml_collections.ConfigDict, num_features: int, num_classes: int,
                key: jax.Array) -> dict[str, jax.Array]:
    init = HEAD_INITS[config.model.get("head_init", "zeros")]
    return {"head/kernel": init(key, (num_features, num_classes), jnp.float32),
            "head/bias": jnp.full((num_classes,), config.model.get("head_bias_init", 0.0),
                                  jnp.float32)}


def train_head(
    config: ml_collections.ConfigDict,
    features_fn: FeatureFn,
    batches: Callable[[], Iterator[dict[str, np.ndarray]]],
    *,
    num_examples: int,
    num_classes: int,
    num_features: int,
    mesh: Mesh,
    kept: np.ndarray | None,
    lasso: float,
    what: str,
) -> dict[str, jax.Array]:
    """One compression stage: a fresh head trained on `features_fn`'s features.

    Args:
      config: the run's config (lr, wd, optimizer, batch_size, batching, warm-up, schedule,
        head init, seed, compression.{epochs, lr_scale}).
      features_fn: see `train_mode_features`.
      batches: makes the stage's training batches (this host's slices, with 'mask').
      num_examples: training examples per epoch.
      num_classes: C.
      num_features: F, the width of `features_fn`'s output.
      mesh: the data-parallel mesh.
      kept: indices of the features the head reads (None: all).
      lasso: group-lasso coefficient on the head's rows.
      what: names the stage in the progress lines.

    Returns:
      The head {'head/kernel': [F', C], 'head/bias': [C]}.
    """

    c = config.compression
    schedule, total_steps = optim.training_schedule(
        config.lr * c.lr_scale, num_examples=num_examples, batch_size=config.batch_size,
        epochs=c.epochs, warmup_epochs=min(config.warmup_epochs, c.epochs),
        batching=protocol.batching(config),
        per_epoch=config.get("schedule_per_epoch", True))
    width = num_features if kept is None else len(kept)
    key = jax.random.key(config.seed)
    head = _fresh_head(config, width, num_classes, jax.random.fold_in(key, 1))
    tx = optim.make_optimizer(schedule, config.wd, head, methods.optimizer_name(config))
    columns = None if kept is None else jnp.asarray(kept)

    def step(head, opt_state, batch, step_rng):
        x = features_fn(batch, step_rng)
        if columns is not None:
            x = x[:, columns]

        def loss_fn(h):
            logits = x @ h["head/kernel"] + h["head/bias"]
            ce = train_step.cross_entropy(logits, batch["label"], batch["mask"])
            return ce + lasso * compression.row_norms(h["head/kernel"]).sum()

        loss, grads = jax.value_and_grad(loss_fn)(head)
        updates, opt_state = tx.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    replicated = NamedSharding(mesh, P())
    sharding = NamedSharding(mesh, P("data"))
    jit_step = jax.jit(step, in_shardings=(replicated, replicated, sharding, replicated),
                       out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
    # Every host computed the same head from the same seed: place it without device_put's
    # cross-host equality check (an all-gather per leaf in a multi-host run).
    head = checkpoints.place(head, replicated)
    opt_state = checkpoints.place(tx.init(head), replicated)
    dropout_key = jax.random.fold_in(key, 2)
    progress = Progress(f"Compression ({what})", total_steps, "steps", every_s=30)
    it = batches()
    loss = None
    for i in range(total_steps):
        batch = steppers.global_batch(next(it), sharding)
        head, opt_state, loss = jit_step(head, opt_state, batch, jax.random.fold_in(dropout_key, i))
        progress.update()
    final = float(loss)  # waits for the queued steps, so the time logged next includes them
    progress.done()
    if not np.isfinite(final):
        raise FloatingPointError(f"Compression ({what}) diverged (final loss {final}); lower "
                                 f"config.compression.lr_scale or config.lr")
    return head


def compress(config: ml_collections.ConfigDict, model: ViT, variables: dict, mesh: Mesh,
             cache: cache_lib.Cache | None, num_train: int, eval_features: np.ndarray,
             eval_labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Both compression stages in train mode; metrics as `compression.compress` reports them.

    Args:
      config, model, variables, mesh: the trained run's.
      cache: the run's key/value cache, or None to run the backbone on the images.
      num_train: training examples.
      eval_features, eval_labels: eval-mode head inputs [M, F] and labels of the eval split.
      num_classes: C.
    """
    def batches() -> Iterator[dict[str, np.ndarray]]:
        return batches_lib.train_batches(config, cache)

    features_fn = train_mode_features(model, variables)
    num_features = int(eval_features.shape[1])
    common = dict(num_examples=num_train, num_classes=num_classes, num_features=num_features,
                  mesh=mesh)
    c = config.compression
    lasso_head = train_head(config, features_fn, batches, kept=None, lasso=c.lasso,
                            what="stage 1, group lasso", **common)
    # The heads come out of `train_head` replicated (its step's out_shardings), so every host
    # can read them whole, in a multi-host run too.
    lasso_head = jax.device_get(lasso_head)
    kept = compression.select_features(lasso_head["head/kernel"], c.keep_frac)
    head = jax.device_get(train_head(config, features_fn, batches, kept=kept, lasso=0.0,
                                     what="stage 2, kept features", **common))

    def as_head(h):
        return {"kernel": h["head/kernel"], "bias": h["head/bias"]}

    return {
        "top1": float(compression.accuracy(as_head(head), eval_features[:, kept], eval_labels)),
        "top1_all": float(compression.accuracy(as_head(lasso_head), eval_features,
                                               eval_labels)),
        "num_features": num_features,
        "num_kept": len(kept),
        "train_mode": True,
    }
