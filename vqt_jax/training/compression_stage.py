"""The release's feature compression after training, as two more runs of the engine.

The VQT release runs both compression stages (`head2toe_sparsity_train.py`, modes `compress`
then `featselect`) through its ordinary trainer on the trained model: stage 1 trains a fresh
head on the whole head input (VQT: [CLS ; query outputs]) with the group lasso
`lasso * sum_j ||W[j, :]||_2`; the top `keep_frac` features by group norm are kept
(`compression.select_features`); stage 2 trains a fresh head on them alone. Both run
`compression.epochs` epochs at `lr_scale * lr` with the run's wd, optimiser, batching, warm-up,
schedule and head init. With `compression.train_mode` (the release's) the model is in train
mode, so the query outputs pass through their dropout at every step; without, the features
are the eval-mode ones. Evaluation uses eval-mode features.

Here each stage is a run of `engine.Engine` whose trainable part is the head and whose loss
reads the trained model (each member's own trained leaves, per member) through the query path
from the same source as the training (the device cache, the host cache or the images), so a
stage of S runs compresses as one program too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqt_jax import compression, methods, protocol
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT
from vqt_jax.models.vit import HEAD_INITS
from vqt_jax.training import engine, optim, train_step

# source(orders) -> the members' training batches, from step 0.
SourceFn = Callable[[list[int]], Any]


def loss_fn(model: ViT, train_mode: bool, lasso: float) -> engine.LossFn:
    """A stage's loss: the head on the trained model's head input (member['trained'] merged
    with the shared frozen variables; columns member['kept'] where given), cross-entropy plus
    `lasso` times the group norms of the head's rows. No gradient reaches the model."""
    body = model.clone(num_classes=0)

    def fn(head, member, shared, batch, rng):
        variables = jax.lax.stop_gradient(trainable_lib.merge(member["trained"], shared))
        x = train_step.forward(body, variables, batch, rng, train=train_mode,
                               from_cache="image" not in batch)
        if "kept" in member:
            x = jnp.take(x, member["kept"], axis=1)
        logits = x @ head["head/kernel"] + head["head/bias"]
        ce = train_step.cross_entropy(logits, batch["label"], batch["mask"])
        return ce + lasso * compression.row_norms(head["head/kernel"]).sum(), logits

    return fn


def _fresh_head(config: ml_collections.ConfigDict, width: int, num_classes: int) -> dict:
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    init = HEAD_INITS[config.model.get("head_init", "zeros")]
    bias = config.model.get("head_bias_init", 0.0)
    return {"head/kernel": init(key, (width, num_classes), jnp.float32),
            "head/bias": jnp.full((num_classes,), bias, jnp.float32)}


def _stage(configs: Sequence[ml_collections.ConfigDict], model: ViT, trained: Any,
           shared: dict, source: Any, num_train: int, num_classes: int, width: int,
           kept: np.ndarray | None, lasso: float, what: str) -> dict:
    """One stage for every member: their heads, stacked [S, ...], fetched to the host."""
    config, c = configs[0], configs[0].compression
    unit, total = optim.training_schedule(
        1.0, num_examples=num_train, batch_size=config.batch_size, epochs=c.epochs,
        warmup_epochs=min(config.warmup_epochs, c.epochs), batching=protocol.batching(config),
        per_epoch=config.get("schedule_per_epoch", True))
    heads = [_fresh_head(m, width, num_classes) for m in configs]
    name = methods.optimizer_name(config)
    state = engine.init_state(name, heads[0], heads, source.mesh)
    members = {"lr": np.asarray([m.lr * c.lr_scale for m in configs], np.float32),
               "wd": np.asarray([m.wd for m in configs], np.float32), "trained": trained}
    if kept is not None:
        members["kept"] = np.asarray(kept, np.int32)
    rngs = jnp.stack([jax.random.fold_in(jax.random.key(m.seed), 2) for m in configs])
    step = engine.member_step(loss_fn(model, c.get("train_mode", False), lasso), name,
                              heads[0], unit)
    every = config.get("log_every_steps", 10)
    run = engine.Engine(step, source, shared, members, rngs, state,
                        max_steps=engine.max_chunk(total, every))

    def bad(j, why, step, lr_now, last_saved):
        return FloatingPointError(f"Compression ({what}): {why} at step {step} (lr {lr_now:.3g}) "
                                  f"of the run with seed {configs[j].seed}; lower "
                                  "config.compression.lr_scale or config.lr")

    out = engine.train(run, state, total=total, log_every=every, ckpt_every=0, bad=bad,
                       may_diverge=False, what=f"Compression ({what})")
    return jax.device_get(out.state.trainable)


@dataclasses.dataclass
class Heads:
    """Both stages' heads of S runs, on the host.

    Attributes:
      lasso: stage 1's {'head/kernel': [S, F, C], 'head/bias': [S, C]} on every feature.
      kept: [S, K] each run's kept features (`compression.select_features`).
      final: stage 2's heads [S, K, C], [S, C] on the kept features.
      train_mode: whether the features were the train-mode ones.
    """

    lasso: dict
    kept: np.ndarray
    final: dict
    train_mode: bool

    def scores(self, eval_features: Sequence[np.ndarray],
               eval_labels: np.ndarray) -> list[dict[str, Any]]:
        """Per run, from its eval-mode head inputs [M, F]: 'top1' (the compressed model's),
        'top1_all' (the stage-1 head on every feature), 'num_features', 'num_kept',
        'train_mode'."""
        def head(h, j):
            return {"kernel": h["head/kernel"][j], "bias": h["head/bias"][j]}

        return [{"top1": float(compression.accuracy(head(self.final, j), x[:, self.kept[j]],
                                                    eval_labels)),
                 "top1_all": float(compression.accuracy(head(self.lasso, j), x, eval_labels)),
                 "num_features": int(x.shape[1]), "num_kept": int(self.kept.shape[1]),
                 "train_mode": self.train_mode}
                for j, x in enumerate(eval_features)]


def train(configs: Sequence[ml_collections.ConfigDict], model: ViT, trained: Any, shared: dict,
          source: SourceFn, num_train: int, num_features: int, num_classes: int) -> Heads:
    """Both stages for S trained runs (a stage's members, or one run).

    Args:
      configs: the runs' configs (they differ at most in lr, wd and seed).
      model: the runs' ViT.
      trained: their trained leaves, stacked [S, ...] (the state's `trainable`).
      shared: the frozen variables they share.
      source: makes the training batches' source for the members' example orders.
      num_train: training examples.
      num_features: F, the head input's width.
      num_classes: C.
    """
    c = configs[0].compression
    orders = [protocol.order_seed(m) for m in configs]
    common = dict(configs=configs, model=model, trained=trained, shared=shared,
                  num_train=num_train, num_classes=num_classes)
    lasso = _stage(**common, source=source(orders), width=num_features, kept=None,
                   lasso=c.lasso, what="stage 1, group lasso")
    kept = np.stack([compression.select_features(k, c.keep_frac) for k in lasso["head/kernel"]])
    final = _stage(**common, source=source(orders), width=kept.shape[1], kept=kept, lasso=0.0,
                   what="stage 2, kept features")
    return Heads(lasso, kept, final, bool(c.get("train_mode", False)))
