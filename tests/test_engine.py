"""The training engine against an oracle: a run (a stack of one) equals a plain optax loop.

The oracle below uses no engine code: the model, the run's initial variables, its batch order
(`sampling.host_batch_indices`) and its schedule's values, and then optax's own SGD with
momentum (torch's, as the 'sgd' optimiser documents it) step by step on the host. A run of the
engine from the device cache and one from the host cache must both equal it.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax
import pytest

from tests import train_utils
from vqt_jax import protocol, resolve, sampling
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT
from vqt_jax.training import caching, optim, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"),
                                         counts=(("train", 7), ("val", 3), ("test", 4)))


def _config(folder, **overrides):
    c = train_utils.tiny_config(data_dir=folder, epochs=3, cache="on", cache_storage="memory",
                                optimizer="sgd", lr=0.3, wd=1e-3, batching="epoch",
                                checkpoint_every_steps=0, **overrides)
    c.model.query_dropout = 0.2  # the dropout stream is part of what must match
    return resolve.resolve(c)


def _oracle(config) -> tuple[dict, list[float]]:
    """(trained leaves, per-step losses) of a plain loop."""
    plan = train.plan_run(config, None)
    variables, rng = train.init_variables(plan, config.seed)
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for(config.method))
    cache_plan = caching.plan_cache(config, plan.model, plan.num_train, "unused")
    cache = caching.get_cache(cache_plan, config, plan.model, variables, plan.mesh)
    n = cache.spec.num_examples
    schedule, total = optim.training_schedule(
        config.lr, num_examples=n, batch_size=config.batch_size, epochs=config.epochs,
        warmup_epochs=config.warmup_epochs, batching=config.batching,
        per_epoch=config.schedule_per_epoch)
    params = jax.device_get(trainable)
    frozen = jax.device_get(frozen)
    # torch SGD(momentum 0.9) with coupled L2 on all but the head's bias.
    mask = {k: k != "params/head/bias" for k in params}
    tx = optax.chain(optax.add_decayed_weights(config.wd, mask=mask), optax.trace(decay=0.9),
                     optax.scale_by_learning_rate(schedule))
    opt_state = tx.init(params)
    fields = [k for k in ("k", "v", "cls") if k in cache.arrays]

    def loss_fn(p, batch, mask, step):
        logits = plan.model.apply(trainable_lib.merge(p, frozen),
                                  {k: batch[k] for k in fields}, train=True,
                                  rngs={"dropout": jax.random.fold_in(rng, step)},
                                  method=ViT.from_cache)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return (losses * mask).sum() / mask.sum()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for step in range(total):
        index, mask = sampling.host_batch_indices(
            step, n, global_batch_size=config.batch_size, seed=protocol.order_seed(config),
            batching=config.batching)
        batch = {k: np.asarray(cache.arrays[k])[index] for k in fields}
        batch["label"] = np.asarray(cache.labels)[index]
        loss, grads = grad_fn(params, batch, mask, step)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return params, losses


def _losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


@pytest.mark.parametrize("on_device", ["on", "off"])
def test_a_run_equals_a_plain_optax_loop(folder, tmp_path, on_device):
    config = _config(folder, cache_on_device=on_device, log_every_steps=1)
    params, losses = _oracle(config)
    results, variables = train.run(config, str(tmp_path))
    assert results["cache_on_device"] == (on_device == "on")
    assert results["steps"] == len(losses) > 4
    np.testing.assert_allclose(_losses(tmp_path), losses, rtol=1e-5, atol=1e-6)
    trained, _ = trainable_lib.partition(variables, trainable_lib.rule_for(config.method))
    assert trained.keys() == params.keys()
    for k, v in params.items():
        np.testing.assert_allclose(np.asarray(trained[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
