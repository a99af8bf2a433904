"""How the training loop advances a run by a number of steps without waiting on the devices.

The loop (`train.py`) asks a stepper for `advance(state, count)`: the state after `count` more
steps and their metrics, still on the devices; it fetches them once per chunk (at a logging,
checkpoint or final step), so the host never waits for a step before dispatching the next.

* `HostStepper`: one jitted step per batch, batches from a host iterator (the image pipeline
  or the host cache, which read ahead in a background thread while the devices compute).
* `DeviceStepper`: a whole chunk as one compiled loop (`lax.fori_loop`) over the
  device-resident cache: each step draws its batch's indices on the device
  (`sampling.batch_indices`) and gathers its rows there (`device_cache.gather`); metrics
  accumulate in a device buffer of `max_steps` entries. The count is an argument, so every
  chunk length shares one compilation.
* `StackedStepper`: the same loop for S runs (*members*: a protocol stage's grid points or
  seeds, `stacked.py`) at once: their states stacked on a leading axis, their peak learning
  rates and weight decays traced inputs (`member_step`), each step `vmap`ped over them. Members
  that share an example order share one gather per step.

All compute step s from the state's own step counter, the run's seed and its batching, so
they train on the same batches in the same order, and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import device_cache as device_cache_lib
from vqt_jax import sampling
from vqt_jax.training import optim, train_step

# step(state, frozen, batch, rng) -> (state, metrics of scalars); the state has a `.step`.
StepFn = Callable[[Any, Any, dict, jax.Array], tuple[Any, dict]]
Metrics = dict[str, jax.Array]


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Turns this host's slice of a batch into global arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def fetch(metrics: list[Metrics] | Metrics, count: int) -> list[dict[str, float]]:
    """The metrics of a chunk's `count` steps on the host, one dict per step (one transfer)."""
    host = jax.device_get(metrics)
    if isinstance(host, dict):  # DeviceStepper: {name: [max_steps]}
        return [{k: float(v[i]) for k, v in host.items()} for i in range(count)]
    return [{k: float(v) for k, v in m.items()} for m in host]


class HostStepper:
    """One dispatch per step; batches from a host iterator of this host's slices."""

    def __init__(self, step: StepFn, mesh: Mesh, frozen: Any, rng: jax.Array,
                 batches: Iterator[dict[str, np.ndarray]]):
        replicated, self._sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self._step = jax.jit(step, in_shardings=(replicated, replicated, self._sharding,
                                                 replicated),
                             out_shardings=(replicated, replicated), donate_argnums=(0,))
        self._frozen, self._rng, self._batches = frozen, rng, batches

    def advance(self, state: Any, count: int) -> tuple[Any, list[Metrics]]:
        out = []
        for _ in range(count):
            batch = global_batch(next(self._batches), self._sharding)
            state, metrics = self._step(state, self._frozen, batch, self._rng)
            out.append(metrics)
        return state, out


class DeviceStepper:
    """Chunks of steps as one compiled loop over a device-resident cache."""

    def __init__(self, step: StepFn, cache: device_cache_lib.DeviceCache, frozen: Any,
                 rng: jax.Array, *, fields: list[str], batch_size: int, seed: int,
                 batching: str, max_steps: int):
        mesh, n = cache.mesh, cache.num_examples
        batch_sharding = NamedSharding(mesh, P("data"))
        names = [*fields, "label"]

        def one(state, frozen, arrays, rng):
            index, mask = sampling.batch_indices(state.step, seed, num_examples=n,
                                                 batch_size=batch_size, batching=batching)
            batch = cache.gather({k: arrays[k] for k in names}, index)
            batch["mask"] = jax.lax.with_sharding_constraint(mask, batch_sharding)
            return step(state, frozen, batch, rng)

        self._chunk = compiled_chunks(one, max_steps, mesh)
        self._frozen, self._rng, self._max = frozen, rng, max_steps
        self._arrays = {k: cache.arrays[k] for k in names}

    def advance(self, state: Any, count: int) -> tuple[Any, Metrics]:
        if not 0 < count <= self._max:
            raise ValueError(f"A chunk runs 1..{self._max} steps, not {count}")
        return self._chunk(state, self._frozen, self._arrays, self._rng,
                           jnp.asarray(count, jnp.int32))


def member_optimizer(name: str, template: dict, unit_schedule: Callable[[jax.Array], jax.Array],
                     lr: Any, wd: Any):
    """The optimiser `name` with peak learning rate `lr` and weight decay `wd`, which may be
    traced values: a run's optimiser with its schedule's shape `unit_schedule` (peak 1)."""
    return optim.make_optimizer(lambda step: lr * unit_schedule(step), wd, template, name)


def member_step(model: Any, optimizer: str, template: dict,
                unit_schedule: Callable[[jax.Array], jax.Array]) -> Callable:
    """step(hp, state, frozen, batch, rng) of one stacked member: the cached train step
    (`train_step.make_train_step(from_cache=True)`) with the optimiser `member_optimizer`
    builds from hp['lr'] and hp['wd'], so one compilation serves every member."""

    def step(hp, state, frozen, batch, rng):
        def schedule(s):
            return hp["lr"] * unit_schedule(s)

        tx = member_optimizer(optimizer, template, unit_schedule, hp["lr"], hp["wd"])
        inner = train_step.make_train_step(model, tx, from_cache=True)
        return train_step.make_state_step(inner, schedule)(state, frozen, batch, rng)

    return step


class StackedStepper:
    """Chunks of steps of S members as one compiled loop over a device-resident cache.

    Compiled when built (`compiled`: its memory can be checked before anything runs); every
    member is at the same step; a member's metrics come back with a trailing [S] axis.
    """

    def __init__(self, step: Callable, cache: device_cache_lib.DeviceCache, frozen: Any,
                 rngs: jax.Array, state: Any, *, hp: dict[str, np.ndarray], orders: list[int],
                 fields: list[str], batch_size: int, batching: str, max_steps: int):
        """Builds and compiles the loop.

        Args:
          step: `member_step(...)`, step(hp, state, frozen, batch, rng) of one member.
          cache: the training rows, on the devices.
          frozen: the frozen variables every member shares.
          rngs: [S] the members' training keys.
          state: the stacked state (or its shapes): what the loop is compiled for.
          hp: {'lr': [S], 'wd': [S]} the members' peak learning rates and weight decays.
          orders: [S] each member's example-order seed.
          fields: the cache's fields a step reads (besides the label).
          batch_size, batching: each member's batches (`sampling.batch_indices`).
          max_steps: the longest chunk.
        """
        mesh, n, b, s = cache.mesh, cache.num_examples, batch_size, len(orders)
        names = [*fields, "label"]
        shared = len(set(orders)) == 1  # one example order: one gather serves every member
        member = jax.vmap(step, in_axes=(0, 0, None, None if shared else 1, 0))
        batch_sharding = NamedSharding(mesh, P("data"))
        kwargs = dict(num_examples=n, batch_size=b, batching=batching)

        def one(state, constants, arrays, rng):
            frozen, hp, seed = constants
            step = state.step[0]  # every member is at the same step
            arrays = {k: arrays[k] for k in names}
            if shared:
                index, mask = sampling.batch_indices(step, seed[0], **kwargs)
                batch = cache.gather(arrays, index)
            else:
                # One gather of every member's rows, batch slot major, so each device's
                # share is whole slots of every member: [B * S] -> [B, S, ...].
                index, mask = jax.vmap(lambda sd: sampling.batch_indices(step, sd, **kwargs))(
                    seed)
                rows = cache.gather(arrays, index.T.reshape(-1))
                batch = {k: v.reshape(b, s, *v.shape[1:]) for k, v in rows.items()}
                mask = mask.T
            batch["mask"] = jax.lax.with_sharding_constraint(mask, batch_sharding)
            return member(hp, state, frozen, batch, rng)

        hp = {k: np.asarray(hp[k], np.float32) for k in ("lr", "wd")}
        self._constants = jax.device_put((frozen, hp, np.asarray(orders, np.int32)),
                                         NamedSharding(mesh, P()))
        self._arrays, self._rngs, self._max = cache.arrays, rngs, max_steps
        self._chunk = compiled_chunks(one, max_steps, mesh).lower(
            state, self._constants, self._arrays, self._rngs,
            jnp.asarray(1, jnp.int32)).compile()

    @property
    def compiled(self) -> Any:
        """The compiled loop (for `memory_analysis`)."""
        return self._chunk

    def advance(self, state: Any, count: int) -> tuple[Any, Metrics]:
        if not 0 < count <= self._max:
            raise ValueError(f"A chunk runs 1..{self._max} steps, not {count}")
        return self._chunk(state, self._constants, self._arrays, self._rngs,
                           jnp.asarray(count, jnp.int32))


def compiled_chunks(one: Callable, max_steps: int, mesh: Mesh) -> Callable:
    """A jitted chunk(state, frozen, arrays, rng, count) -> (state, {metric: [max_steps, ...]}):
    `one(state, frozen, arrays, rng) -> (state, metrics)` run `count` times in a
    `lax.fori_loop` (the count is traced: one compilation serves every chunk length), its
    metrics stored per step in a device buffer. `arrays` is a device cache's (sharded as
    `device_cache.upload` places it), everything else replicated; the state is donated.
    """

    def chunk(state, frozen, arrays, rng, count):
        shapes = jax.eval_shape(one, state, frozen, arrays, rng)[1]
        buffer = {k: jnp.zeros((max_steps, *v.shape), v.dtype) for k, v in shapes.items()}

        def body(i, carry):
            state, buffer = carry
            state, metrics = one(state, frozen, arrays, rng)
            return state, {k: buffer[k].at[i].set(metrics[k]) for k in buffer}

        return jax.lax.fori_loop(0, count, body, (state, buffer))

    replicated = NamedSharding(mesh, P())
    cache_sharding = NamedSharding(mesh, P(None, device_cache_lib.AXIS))
    return jax.jit(chunk, in_shardings=(replicated, replicated, cache_sharding, replicated,
                                        replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def chunk_ends(start: int, total: int, *every: int) -> Iterator[int]:
    """The steps after `start` up to `total` where a chunk ends: every multiple of each of
    `every` (logging, checkpointing) and `total`."""
    step = start
    while step < total:
        step = min([total, *((step // e + 1) * e for e in every if e > 0)])
        yield step


def max_chunk(total: int, *every: int) -> int:
    """The longest chunk `chunk_ends` can give (from any start)."""
    return max(1, min([total, *(e for e in every if e > 0)]))
