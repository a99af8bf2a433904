"""The training engine: S runs (*members*) advanced together, whatever feeds them.

Every training in vqt_jax runs here: a single run is a stack of one, a protocol stage's grid
points or seeds a stack of many (`stacked.py`), and the compression stages after them are two
more runs of the engine with a head as the trainable part (`compression_stage.py`).

The members' states are stacked on a leading axis and advanced by one step function `vmap`ped
over them. What differs between members (`members`: at least the peak 'lr' and 'wd', plus
whatever a loss reads per member) is an input of the program, so one compilation serves every
member. Its data come from one of two sources:

* `DeviceSource`: a device-resident cache; each step draws its batch's indices on the device
  (`sampling.batch_indices`) and gathers the rows there, and a chunk of steps is one compiled
  `lax.fori_loop` (the step count is traced, so every chunk length shares one compilation).
  Members that share an example order share one gather.
* `HostSource`: a host iterator of this host's slices of the batches (images, or the host
  cache), read ahead while the devices compute; one jitted step per batch, shared by the
  members.

`train` is the loop around it: chunks that end at every logging and checkpoint step (the host
fetches metrics once per chunk and never waits inside one), health checks per member, a
checkpoint saved only once the next step proved it sound, per-member metric writers, progress.
Every source computes step s from the state's own step counter, the member's seed and its
batching, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import checkpoints, sampling
from vqt_jax import device_cache as device_cache_lib
from vqt_jax.progress import Progress
from vqt_jax.training import optim, train_step

# loss(trainable, member, shared, batch, rng) -> (scalar loss, logits [B, C]) of one member.
LossFn = Callable[[dict, dict, Any, dict, jax.Array], tuple[jax.Array, jax.Array]]


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Turns this host's slice of a batch into global arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def member_step(loss_fn: LossFn, optimizer: str, template: dict,
                unit_schedule: Callable[[jax.Array], jax.Array]) -> Callable:
    """step(member, state, shared, batch, rng) of one member: `loss_fn`'s gradient step with
    the optimiser `optimizer` at peak learning rate member['lr'] and weight decay member['wd']
    (traced values) on the schedule's shape `unit_schedule` (peak 1)."""

    def step(member, state, shared, batch, rng):
        schedule = lambda s: member["lr"] * unit_schedule(s)
        tx = optim.make_optimizer(schedule, member["wd"], template, optimizer)
        inner = train_step.make_train_step(lambda t, f, b, r: loss_fn(t, member, f, b, r), tx)
        return train_step.make_state_step(inner, schedule)(state, shared, batch, rng)

    return step


def init_state(optimizer: str, template: dict, trainables: Sequence[dict],
               mesh: Mesh) -> train_step.TrainState:
    """The members' initial states (step 0, their trainable leaves, fresh optimiser state)
    stacked on a leading axis and replicated over `mesh`."""
    tx = optim.make_optimizer(lambda s: 1.0, 0.0, template, optimizer)
    states = [train_step.TrainState(jnp.zeros((), jnp.int32), t, tx.init(t)) for t in trainables]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    # Every host computed the same values: placed without device_put's cross-host check.
    return checkpoints.place(jax.device_get(stacked), NamedSharding(mesh, P()))


@dataclasses.dataclass
class DeviceSource:
    """Batches gathered on the devices from a device-resident cache.

    Attributes:
      cache: the training rows, on the devices.
      fields: the cache's fields a step reads (besides 'label').
      batch_size, batching: each member's batches (`sampling.batch_indices`).
      orders: each member's example-order seed.
      num_examples: the examples trained on: the cache's first ones (default: all). The
        device layout places example r alike whatever the count, so the first rows of a
        cache are the cache of the first examples.
    """

    cache: device_cache_lib.DeviceCache
    fields: list[str]
    batch_size: int
    batching: str
    orders: list[int]
    num_examples: int | None = None

    @property
    def mesh(self) -> Mesh:
        return self.cache.mesh


@dataclasses.dataclass
class HostSource:
    """This host's slices of global batches from a host iterator, the same for every member."""

    batches: Iterator[dict[str, np.ndarray]]
    mesh: Mesh


class Engine:
    """Chunks of steps of S members; a member's metrics come back with a trailing [S] axis.

    Attributes:
      compiled: the compiled chunk of a device source (for `memory_analysis`), else None.
    """

    def __init__(self, step: Callable, source: DeviceSource | HostSource, shared: Any,
                 members: dict[str, Any], rngs: jax.Array, state: Any, *, max_steps: int):
        """Builds (and for a device source compiles) the loop.

        Args:
          step: `member_step(...)`.
          source: where the batches come from.
          shared: what every member reads alike (the frozen variables), replicated.
          members: per member values, each with a leading [S] axis ('lr', 'wd', ...).
          rngs: [S] the members' training keys.
          state: the stacked state (or its shapes): what the loop is compiled for.
          max_steps: the longest chunk.
        """
        mesh = source.mesh
        replicated = NamedSharding(mesh, P())
        self._constants = (shared, checkpoints.place(members, replicated))
        self._rngs, self._max, self.source = rngs, max_steps, source
        if isinstance(source, HostSource):
            member = jax.vmap(step, in_axes=(0, 0, None, None, 0))
            self._sharding = NamedSharding(mesh, P("data"))
            self._step = jax.jit(
                lambda state, consts, batch, rngs: member(consts[1], state, consts[0], batch, rngs),
                in_shardings=(replicated, replicated, self._sharding, replicated),
                out_shardings=(replicated, replicated), donate_argnums=(0,))
            self.compiled = None
            return
        self.compiled = _device_chunks(step, source, max_steps).lower(
            state, self._constants, source.cache.arrays, rngs, jnp.asarray(1, jnp.int32)).compile()

    def advance(self, state: Any, count: int) -> tuple[Any, Any]:
        """(the state `count` steps on, their metrics still on the devices)."""
        if not 0 < count <= self._max:
            raise ValueError(f"A chunk runs 1..{self._max} steps, not {count}")
        if self.compiled is not None:
            return self.compiled(state, self._constants, self.source.cache.arrays, self._rngs,
                                 jnp.asarray(count, jnp.int32))
        out = []
        for _ in range(count):
            batch = global_batch(next(self.source.batches), self._sharding)
            state, metrics = self._step(state, self._constants, batch, self._rngs)
            out.append(metrics)
        return state, out


def fetch(metrics: Any, count: int) -> list[dict[str, np.ndarray]]:
    """A chunk's metrics on the host (one transfer): per step, {name: [S]}."""
    host = jax.device_get(metrics)
    if isinstance(host, dict):  # a compiled chunk's buffer: {name: [max_steps, S]}
        return [{k: np.asarray(v[i]) for k, v in host.items()} for i in range(count)]
    return [{k: np.asarray(v) for k, v in m.items()} for m in host]


def _device_chunks(step: Callable, source: DeviceSource, max_steps: int) -> Callable:
    """The jitted chunk(state, constants, arrays, rngs, count) of a device source."""
    mesh, cache, b, s = source.mesh, source.cache, source.batch_size, len(source.orders)
    shared_order = len(set(source.orders)) == 1  # one gather serves every member
    member = jax.vmap(step, in_axes=(0, 0, None, None if shared_order else 1, 0))
    batch_sharding = NamedSharding(mesh, P("data"))
    kwargs = dict(num_examples=source.num_examples or cache.num_examples, batch_size=b,
                  batching=source.batching)
    orders = np.asarray(source.orders, np.int32)

    def one(state, constants, arrays, rngs):
        shared, members = constants
        at = state.step[0]  # every member is at the same step
        arrays = {k: arrays[k] for k in [*source.fields, "label"]}
        if shared_order:
            index, mask = sampling.batch_indices(at, orders[0], **kwargs)
            batch = cache.gather(arrays, index)
        else:
            # One gather of every member's rows, batch slot major, so each device's share is
            # whole slots of every member: [B * S] -> [B, S, ...].
            index, mask = jax.vmap(lambda o: sampling.batch_indices(at, o, **kwargs))(orders)
            rows = cache.gather(arrays, index.T.reshape(-1))
            batch = {k: v.reshape(b, s, *v.shape[1:]) for k, v in rows.items()}
            mask = mask.T
        batch["mask"] = jax.lax.with_sharding_constraint(mask, batch_sharding)
        return member(members, state, shared, batch, rngs)

    def chunk(state, constants, arrays, rngs, count):
        shapes = jax.eval_shape(one, state, constants, arrays, rngs)[1]
        buffer = {k: jnp.zeros((max_steps, *v.shape), v.dtype) for k, v in shapes.items()}

        def body(i, carry):
            state, buffer = carry
            state, metrics = one(state, constants, arrays, rngs)
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


def problem(metrics: dict[str, float], max_loss: float) -> str | None:
    """What is wrong with a step's loss or state, or None."""
    loss = metrics["loss"]
    if not math.isfinite(loss):
        return f"Training loss is {loss}"
    if loss > max_loss:
        return f"Training loss is {loss:.4g}, over config.max_loss={max_loss:g} (diverged)"
    if not metrics["state_finite"]:
        return "The trained parameters or optimiser state became non-finite"
    return None


def saved(state: Any, failed: np.ndarray, loss: np.ndarray, mesh: Mesh, config: np.ndarray) -> dict:
    """What a checkpoint holds: the stacked state, per member the step it went bad at (0:
    never) and its last loss, and `config` (the digest of the configs that wrote it), as global
    arrays (orbax writes no host-local array from several hosts)."""
    extras = {"failed": np.asarray(failed, np.int32), "loss": np.asarray(loss, np.float32),
              "config": np.asarray(config, np.uint32)}
    return {"state": state, **checkpoints.place(extras, NamedSharding(mesh, P()))}


@dataclasses.dataclass
class Outcome:
    """Where `train` left the members.

    Attributes:
      state: the stacked final state.
      failed: [S] the step each member went bad at (0: never).
      loss: [S] each member's last training loss.
      errors: per failed member, its error.
    """

    state: Any
    failed: np.ndarray
    loss: np.ndarray
    errors: dict[int, Exception]


# bad(member, why, step, lr_now, last_saved) -> the exception that reports it.
BadFn = Callable[[int, str, int, float, int], Exception]
# cb(step, metrics): called with every step's metrics (a run's, or the first member's).
Callback = Callable[[int, dict[str, float]], None]


def train(engine: Engine, state: Any, *, total: int, log_every: int, ckpt_every: int,
          save: Callable[[int, Any, np.ndarray, np.ndarray], None] | None = None,
          last_saved: int = 0, failed: np.ndarray | None = None, loss: np.ndarray | None = None,
          writers: Sequence[Any] = (), callbacks: Sequence[Callback] = (),
          max_loss: float = math.inf, bad: BadFn, may_diverge: bool, what: str = "Training"
          ) -> Outcome:
    """Advances every member from the state's step to `total`.

    Args:
      engine: the members' engine.
      state: the stacked state to start from (a resumed one at its step).
      total: the last step.
      log_every, ckpt_every: where chunks end; metrics are logged (`writers`, one per member)
        and a checkpoint is taken (`save`) there.
      save: save(step, state, failed, loss) writes a checkpoint; None: no checkpoints. A
        checkpoint-step state is saved only once the next step, computed from it, proved it
        sound: a state that merely looks finite (weights of 1e30) must not become the last
        good checkpoint a re-run resumes from.
      last_saved: the step of the last checkpoint (0: none), reported to `bad`.
      failed, loss: per member, as a resumed checkpoint recorded them (default: zeros).
      writers: per member metric writers (`metrics_io`), or none.
      callbacks: cb(step, the first member's metrics) for every step.
      max_loss: a loss above it counts as diverged.
      bad: makes the error of a member that went bad.
      may_diverge: a bad member is excluded and the others go on (its error in
        `Outcome.errors`); False: the loop stops with its error.
      what: names the progress lines.
    """
    s = len(np.asarray(state.step))
    failed = np.zeros(s, np.int32) if failed is None else np.array(failed, np.int32)
    loss = np.zeros(s, np.float32) if loss is None else np.array(loss, np.float32)
    start = int(np.asarray(jax.device_get(state.step))[0])
    errors: dict[int, Exception] = {}
    history: list[dict[str, np.ndarray]] = []
    pending = None
    progress = Progress(what, total - start, "steps", every_s=30)
    done = start
    for end in chunk_ends(start, total, log_every, ckpt_every):
        count = end - done
        state, chunk = engine.advance(state, count)
        for last in fetch(chunk, count):
            done += 1
            for j in np.flatnonzero(failed == 0):
                if why := problem({k: float(v[j]) for k, v in last.items()}, max_loss):
                    failed[j] = done
                    errors[j] = bad(j, why, done, float(last["lr"][j]), last_saved)
                    if not may_diverge:
                        raise errors[j]
            if pending is not None:  # its next step proved it sound
                save(*pending)
                last_saved, pending = pending[0], None
            loss = np.asarray(last["loss"], np.float32)
            history.append(last)
            if (log_every > 0 and done % log_every == 0) or done == total:
                for j, w in enumerate(writers):
                    w.write_scalars(done, {f"train/{k}": float(np.mean([h[k][j] for h in history]))
                                           for k in history[0] if k != "state_finite"})
                history = []
            for cb in callbacks:
                cb(done, {k: float(v[0]) for k, v in last.items()})
        progress.update(count)  # a chunk's steps arrive together: one update, one rate
        if save is not None and done == total:
            save(done, state, failed.copy(), loss)  # its own loss was checked
        elif save is not None and ckpt_every > 0 and done % ckpt_every == 0:
            pending = (done, jax.tree.map(jnp.copy, state), failed.copy(), loss)
    progress.done()
    return Outcome(state, failed, loss, errors)
