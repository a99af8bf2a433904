"""FLOP counts of the programs a run compiles, from XLA's cost analysis (nothing runs).

The counts are of programs compiled for the CPU whatever the machine: a GPU's own cost analysis
leaves out the matmuls it hands to cuBLAS (and cuDNN's fused attention) as custom calls, so it
misses most of a ViT's arithmetic (docs/performance.md). A program's FLOPs are its arithmetic,
the same on any device, so they turn a measured time into a rate and a rate into a floor
(`experiments/accelerator_bench.py`, `experiments/sweep_speed.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import SingleDeviceSharding

from vqt_jax import cache as cache_lib
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT
from vqt_jax.training import optim, train_step


def cpu_flops(fn: Callable, *args: Any) -> float:
    """XLA's FLOP count of `fn(*args)` (arrays or shapes) compiled for one CPU device."""
    cpu = SingleDeviceSharding(jax.devices("cpu")[0])
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), args)
    return float(jax.jit(fn).lower(*specs).compile().cost_analysis()["flops"])


def forward_flops(model: ViT, variables: Any, image_size: int) -> float:
    """The inference forward's FLOPs per image (images -> logits, float32)."""
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return cpu_flops(lambda v, x: model.apply(v, x), variables, image)


def cached_step_flops(model: ViT, variables: Any, spec: cache_lib.Spec, batch: int, *,
                      method: str, optimizer: str) -> float:
    """FLOPs of one training step of `method` from a cache of `spec` at `batch` rows: loss,
    gradients of the trainable part, and the optimiser's update. A protocol stage's program
    does this arithmetic once per member and step (`training.engine.Engine`)."""
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for(method))
    schedule = optax.constant_schedule(1e-3)
    tx = optim.make_optimizer(schedule, 1e-4, trainable, optimizer)
    step = train_step.make_state_step(
        train_step.make_train_step(train_step.make_loss_fn(model, True), tx), schedule)
    state = jax.eval_shape(lambda t: train_step.TrainState(jnp.zeros((), jnp.int32), t,
                                                           tx.init(t)), trainable)
    rows = {k: jax.ShapeDtypeStruct((batch, *shape), cache_lib._np_dtype(dtype))
            for k, (shape, dtype) in spec.fields.items() if k in train_step.CACHE_INPUTS}
    rows |= {"label": jax.ShapeDtypeStruct((batch,), jnp.int32),
             "mask": jax.ShapeDtypeStruct((batch,), jnp.float32)}
    return cpu_flops(step, state, frozen, rows, jax.random.key(0))
