"""The training loop: VQT (and the other methods) on VTAB-1k or an image folder.

`train_and_evaluate(config, workdir)` validates the config and data (before any compilation),
builds the model, loads the pretrained backbone, and trains the method's trainable set with one
jitted, data-parallel step over a `jax.sharding.Mesh` of every device (batch sharded, parameters
replicated, buffers donated). It logs through clu (TensorBoard, console, a JSON-lines file),
checkpoints with orbax (re-running on the same workdir resumes), evaluates at the end with
padded, masked batches, and writes `workdir/results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview, periodic_actions
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import checkpoints, data, optim, train_step
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import create_model
from vqt_jax.training import checkpointing, config_checks, metrics_io

Callback = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds: the step, the trainable leaves and their optimiser state."""

    step: jax.Array
    trainable: dict
    opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "trainable", "opt_state"],
                                 meta_fields=[])


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The ViT of `config.model` (variant name plus keyword overrides) with a task head."""
    kwargs = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
    variant = kwargs.pop("variant", None)
    if isinstance(kwargs.get("kv_dtype"), str):
        kwargs["kv_dtype"] = jnp.dtype(kwargs["kv_dtype"])
    return create_model(variant, num_classes=num_classes, **kwargs)


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D data-parallel mesh over all devices (or the first `num_devices`)."""
    devices = jax.devices()
    if num_devices:
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def _global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Turns this host's slice of a batch into global arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _eval_step(model):
    def step(variables, batch):
        logits = model.apply(variables, batch["image"])
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["label"]
        )
        correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
        m = batch["mask"]
        return {"correct": (correct * m).sum(), "loss": (losses * m).sum(), "count": m.sum()}

    return step


def evaluate(model, variables, config, mesh: Mesh, eval_fn=None) -> dict[str, float]:
    """Top-1 and loss over the evaluation split; each example counted exactly once."""
    batch_sharding = NamedSharding(mesh, P("data"))
    eval_fn = eval_fn or jax.jit(_eval_step(model))
    it = data.make_eval_iterator(
        config.task, config.data_dir, config.split,
        global_batch_size=config.eval_batch_size or config.batch_size,
        image_size=config.image_size, normalization=_normalization(config),
        local_device_count=len(mesh.local_devices),
    )
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in it:
        out = eval_fn(variables, _global_batch(batch, batch_sharding))
        for k in totals:
            totals[k] += float(out[k])
    count = max(totals["count"], 1.0)
    return {"top1": totals["correct"] / count, "loss": totals["loss"] / count,
            "num_examples": int(totals["count"])}


def _normalization(config) -> Any:
    n = config.normalization
    if isinstance(n, str):
        return n
    mean, std = n
    return (tuple(mean), tuple(std))


def _write_json_atomically(path: str, obj: dict) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the configured method and evaluates it; resumes from `workdir` if it can.

    Args:
      config: see configs/vtab.py for the fields.
      workdir: where checkpoints, logs and results.json go.

    Returns:
      The final metrics, also written to `workdir/results.json`.
    """
    return run(config, workdir)[0]


def run(
    config: ml_collections.ConfigDict, workdir: str, callbacks: Sequence[Callback] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`train_and_evaluate`, also returning the final variables.

    Args:
      config: see configs/vtab.py.
      workdir: where checkpoints, logs and results.json go.
      callbacks: called as cb(step, metrics) after every train step (and after that step's
        checkpoint, if any); an exception from one stops the run like a kill would.

    Returns:
      (results, the model's final variables).
    """
    mesh = make_mesh(config.get("num_devices", 0))
    config_checks.check(config, num_devices=mesh.size, process_count=jax.process_count())
    data.validate(config.task, config.data_dir, config.split)
    num_classes = data.get_num_classes(config.task, config.data_dir)
    num_train = data.get_num_examples(config.task, config.data_dir, config.split, "train")

    is_chief = jax.process_index() == 0
    workdir = os.fspath(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    writer = metrics_io.create_writer(workdir, is_chief)

    model = build_model(config, num_classes)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    variables = jax.jit(model.init, out_shardings=replicated)(init_rng, dummy)
    if config.init:
        variables = checkpoints.load(config.init, variables, image_size=config.image_size)
        variables = jax.device_put(variables, replicated)

    rule = trainable_lib.rule_for(config.method)
    trainable, frozen = trainable_lib.partition(variables, rule)
    steps_per_epoch = num_train / config.batch_size
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    schedule = optim.warmup_cosine(
        config.lr, total_steps, config.warmup_epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch if config.get("schedule_per_epoch", True) else None,
    )
    tx = optim.make_optimizer(schedule, config.wd, trainable)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
    state = jax.device_put(state, replicated)

    manager = checkpointing.manager(workdir, config.get("keep_checkpoints", 2))
    state = checkpointing.restore_latest(manager, state)
    start = int(state.step)
    if start:
        logging.info("Resuming from step %d in %s", start, workdir)
    if is_chief and start == 0:
        parameter_overview.log_parameter_overview(state.trainable)
        writer.write_hparams({k: v for k, v in config.to_dict().items()
                              if isinstance(v, (int, float, str, bool))})

    step_fn = train_step.make_train_step(model, tx)

    def sharded_step(state: TrainState, frozen: dict, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        trainable, opt_state, metrics = step_fn(state.trainable, state.opt_state, frozen, batch,
                                                rng)
        metrics["lr"] = schedule(state.step)
        return TrainState(state.step + 1, trainable, opt_state), metrics

    jit_step = jax.jit(
        sharded_step,
        in_shardings=(replicated, replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    train_iter = data.make_train_iterator(
        config.task, config.data_dir, config.split, global_batch_size=config.batch_size,
        image_size=config.image_size, normalization=_normalization(config), seed=config.seed,
        start_step=start,
    )
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    log_every = config.get("log_every_steps", 10)
    ckpt_every = config.get("checkpoint_every_steps", 100)
    history: list[dict[str, float]] = []
    train_metrics: dict[str, float] = {}

    try:
        for step in range(start, total_steps):
            batch = _global_batch(next(train_iter), batch_sharding)
            state, metrics = jit_step(state, frozen, batch, train_rng)
            train_metrics = {k: float(v) for k, v in metrics.items()}
            if not math.isfinite(train_metrics["loss"]):
                raise FloatingPointError(
                    f"Training loss is {train_metrics['loss']} at step {step + 1} (lr "
                    f"{train_metrics['lr']:.3g}); stopped. The last good checkpoint in "
                    f"{workdir}/checkpoints is intact: lower config.lr and re-run to resume."
                )
            history.append(train_metrics)
            done = step + 1
            report(done)
            if done % log_every == 0 or done == total_steps:
                avg = {f"train/{k}": float(np.mean([h[k] for h in history])) for k in history[0]}
                writer.write_scalars(done, avg)
                history = []
            if done % ckpt_every == 0 or done == total_steps:
                checkpointing.save(manager, done, state)
            for cb in callbacks:
                cb(done, train_metrics)
    finally:
        # Whatever stops the loop, a save in flight completes (orbax commits atomically).
        manager.wait_until_finished()

    variables = trainable_lib.merge(state.trainable, frozen)
    eval_metrics = evaluate(model, variables, config, mesh)
    split_name = "val" if config.split == "val" else "test"
    writer.write_scalars(total_steps, {f"{split_name}/{k}": v for k, v in eval_metrics.items()})
    writer.flush()
    results = {
        "task": config.task, "split": config.split, "method": config.method,
        "seed": config.seed, "lr": config.lr, "wd": config.wd, "steps": total_steps,
        "top1": eval_metrics["top1"], "eval_loss": eval_metrics["loss"],
        "num_eval_examples": eval_metrics["num_examples"],
        "train_loss": train_metrics.get("loss"),
        "num_trainable": int(sum(np.size(v) for v in state.trainable.values())),
    }
    results_path = os.path.join(workdir, "results.json")
    if results["train_loss"] is None and os.path.exists(results_path):
        # Nothing left to train (a re-run of a finished run): keep the recorded train loss.
        with open(results_path) as f:
            results["train_loss"] = json.load(f).get("train_loss")
    if is_chief:
        _write_json_atomically(results_path, results)
    manager.close()
    return results, variables


