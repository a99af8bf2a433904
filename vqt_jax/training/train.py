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

from vqt_jax import cache as cache_lib
from vqt_jax import checkpoints, data, methods, preparations
from vqt_jax.training import optim, train_step
from vqt_jax.training import trainable as trainable_lib
from vqt_jax.models import create_model
from vqt_jax.training import checkpointing, config_checks, feature_heads, metrics_io

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
    """The ViT of `config.model` (variant name plus keyword overrides), adjusted for
    `config.method` (see `methods.model_kwargs`), with a task head."""
    kwargs = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
    kwargs = methods.model_kwargs(config.method, kwargs)
    variant = kwargs.pop("variant", None)
    if isinstance(kwargs.get("kv_dtype"), str):
        kwargs["kv_dtype"] = jnp.dtype(kwargs["kv_dtype"])
    return create_model(variant, num_classes=num_classes, **kwargs)


def optimizer_name(config: ml_collections.ConfigDict) -> str:
    """config.optimizer, or by default the optimiser of the method's release."""
    return config.get("optimizer") or methods.get(config.method).optimizer


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
        image_size=config.image_size, normalization=data.as_normalization(config.normalization),
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


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """The cache a run will use: its contents and where it lives (None: host memory)."""

    spec: cache_lib.Spec
    path: str | None


def plan_cache(config: ml_collections.ConfigDict, model, num_train: int,
               workdir: str) -> CachePlan | None:
    """Decides, before anything compiles, whether this run trains from a cache.

    `config.cache`: 'off' never; 'auto' when the method allows it and the cache fits
    `config.cache_max_gb` (and the disk), otherwise it says why and trains uncached; 'on' as
    'auto' but a method or budget that does not allow it is an error. The cache's size is
    logged before it is built.

    Raises:
      ValueError: with `config.cache='on'`, naming why the run cannot be cached.
    """
    mode = config.get("cache", "off")
    if mode == "off":
        return None
    kind = cache_lib.kind_for(config.method)
    if kind is None:
        why = (f"method {config.method!r} changes the backbone's tokens, so nothing it reads "
               "is constant")
        if mode == "on":
            raise ValueError(f"config.cache='on' but {why}; use config.cache='auto' or 'off'")
        logging.info("Training without a cache: %s.", why)
        return None
    spec = cache_lib.spec_for(model, kind, num_train, config.image_size, config.cache_dtype)
    path = None
    if config.cache_storage == "disk":
        kwargs = methods.model_kwargs(config.method, dict(config.model))
        directory = config.get("cache_dir") or os.path.join(workdir, "cache")
        name = cache_lib.fingerprint(config, kwargs, kind)
        if jax.process_count() > 1:  # every host keeps a complete copy (see cache.py)
            name += f"-host{jax.process_index()}"
        path = os.path.join(directory, name)
    where = path or "host memory"
    logging.info("Cache of the frozen backbone (%s): %s, in %s.", kind, spec.describe(), where)
    exists = path is not None and os.path.exists(os.path.join(path, "meta.json"))
    why = None if exists else cache_lib.check_budget(spec, path, config.cache_max_gb)
    if why is not None:
        if mode == "on":
            raise ValueError(f"config.cache='on' but {why}")
        logging.warning("Training without a cache: %s.", why)
        return None
    return CachePlan(spec, path)


def get_cache(plan: CachePlan, config: ml_collections.ConfigDict, model, variables,
              mesh: Mesh) -> cache_lib.Cache:
    """Opens the planned cache if it is complete, else builds it (one backbone pass)."""
    if plan.path is not None:
        cache = cache_lib.open_cache(plan.path, plan.spec)
        if cache is not None:
            logging.info("Reusing the cache in %s.", plan.path)
            return cache
    images, labels = data.load_train_examples(config.task, config.data_dir, config.split,
                                              config.image_size)
    norm = data.as_normalization(config.normalization)
    return cache_lib.build(
        plan.spec, model, variables, images, labels, mesh=mesh,
        batch_size=config.eval_batch_size or config.batch_size,
        normalize=lambda x: data.normalize_array(x, norm), path=plan.path,
    )


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
    config = preparations.apply(config)
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
    cache_plan = plan_cache(config, model, num_train, workdir)
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
    tx = optim.make_optimizer(schedule, config.wd, trainable, optimizer_name(config))
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

    cache = None
    if cache_plan is not None and start < total_steps:
        cache = get_cache(cache_plan, config, model, variables, mesh)
    step_fn = train_step.make_train_step(model, tx, from_cache=cache is not None)

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
    if cache is not None:
        train_iter = cache_lib.train_batches(
            cache, global_batch_size=config.batch_size, seed=config.seed, start_step=start,
            fields=[k for k in train_step.CACHE_INPUTS if k in cache.arrays])
    else:
        train_iter = data.make_train_iterator(
            config.task, config.data_dir, config.split, global_batch_size=config.batch_size,
            image_size=config.image_size, normalization=data.as_normalization(config.normalization),
            seed=config.seed, start_step=start,
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
        "cached": cache is not None,
    }
    if feature_heads.wanted(config):
        if cache is None and cache_plan is not None:
            cache = get_cache(cache_plan, config, model, variables, mesh)
        results.update(feature_heads.run(config, model, variables, mesh, cache, num_classes))
    results_path = os.path.join(workdir, "results.json")
    if results["train_loss"] is None and os.path.exists(results_path):
        # Nothing left to train (a re-run of a finished run): keep the recorded train loss.
        with open(results_path) as f:
            previous = json.load(f)
        results["train_loss"] = previous.get("train_loss")
        results["cached"] = previous.get("cached", False)
    if is_chief:
        _write_json_atomically(results_path, results)
    manager.close()
    return results, variables


