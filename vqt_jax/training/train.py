"""A run: the training of one method on VTAB-1k or an image folder, evaluated and written.

`train_and_evaluate(config, workdir)` first checks everything it can without compiling or
writing (`plan_run`: config, devices, every image, the checkpoint, the workdir's recorded
config), then locks the workdir, records the config (`workdir/config.json`), loads the
pretrained backbone and trains the method's trainable set as a stack of one on the training
engine (`engine.py`: data-parallel over a `jax.sharding.Mesh` of every device, from the device
cache, the host cache or the images). It logs through `metrics_io` (console, a JSON-lines
file, TensorBoard), checkpoints with orbax (a re-run with the same config resumes; a state is
checkpointed only once it proved finite and sound), evaluates at the end with padded, masked
batches, runs the compression stages and baselines the config asks for, and writes
`workdir/results.json` (with the whole config) and `workdir/model.vqt`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import cache as cache_lib
from vqt_jax import checkpoints, compilation_cache, data, export, hosts, methods, resolve, sampling
from vqt_jax import device_cache as device_cache_lib
from vqt_jax import trainable as trainable_lib
from vqt_jax import workdir as workdir_lib
from vqt_jax.models import create_model
from vqt_jax.protocol import batching, order_seed, reported
from vqt_jax.training import (
    batches,
    caching,
    checkpointing,
    compression_stage,
    config_checks,
    engine,
    evaluation,
    feature_heads,
    metrics_io,
    optim,
    train_step,
)
from vqt_jax.training.mesh import make_mesh

Callback = engine.Callback


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The ViT of `config.model` (variant name plus keyword overrides), adjusted for
    `config.method` (see `methods.model_kwargs`), with a task head.

    `config` must be resolved (`vqt_jax.resolve.resolve`, once, by the caller that turns a
    user config into the config that runs: `plan_run`, the sweep, an export's recorded config):
    this does not resolve it again.

    Raises:
      ValueError: `config.model` still holds options left 'auto' (named).
    """
    if auto := resolve.unresolved(config.model):
        fields = ", ".join(f"config.model.{k}" for k in auto)
        raise ValueError(f"{fields} {'is' if len(auto) == 1 else 'are'} {resolve.AUTO!r}: "
                         "resolve the config first (vqt_jax.resolve.resolve)")
    kwargs = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
    kwargs = methods.model_kwargs(config.method, kwargs)
    variant = kwargs.pop("variant", None)
    if isinstance(kwargs.get("kv_dtype"), str):
        kwargs["kv_dtype"] = jnp.dtype(kwargs["kv_dtype"])
    return create_model(variant, num_classes=num_classes, **kwargs)


def dont_load(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Parameters kept at their fresh initialisation when `config.init` is loaded: the head,
    and, for a model that normalises its pooled feature (`model.fc_norm`, MAE) with
    `config.fc_norm_init='fresh'`, that LayerNorm: the release builds MAE with a new `fc_norm`
    and deletes the pretrained `norm` (`h2t_vit_mae.py`), so it starts at scale 1, bias 0."""
    keep = tuple(checkpoints.DEFAULT_DONT_LOAD)
    if config.model.get("fc_norm") and config.get("fc_norm_init", "checkpoint") == "fresh":
        keep += ("Transformer/encoder_norm/.*",)
    return keep


def load_pretrained(config: ml_collections.ConfigDict, variables: Any,
                    path: str | None = None) -> dict[str, Any]:
    """The checkpoint `path` (default: `config.init`) loaded into `variables` (real or
    abstract) as a run loads it: its dont_load patterns and its position-embedding rule
    (`config.posemb_resample`)."""
    return checkpoints.load(path or config.init, variables, image_size=config.image_size,
                            dont_load=dont_load(config),
                            resample_rule=config.get("posemb_resample", "auto"))


@dataclasses.dataclass
class RunPlan:
    """Everything a run needs that can be known before anything compiles or is written.

    Attributes:
      config: the config, after its preparation step (`config.prepare`).
      mesh: the data-parallel mesh.
      model: the ViT of the config.
      num_classes, num_train, num_eval: sizes of the task.
      pretrained: the backbone read from `config.init` into abstract variables (numpy leaves
        where the checkpoint provides them, shapes elsewhere), or None without `init`.
      change: the config change the workdir allows (`workdir.check`), or None.
      notes: what a dry run could not check (e.g. a checkpoint that is not downloaded yet).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: Any
    num_classes: int
    num_train: int
    num_eval: int
    pretrained: dict | None
    change: dict | None
    notes: list[str] = dataclasses.field(default_factory=list)


def plan_run(config: ml_collections.ConfigDict, workdir: str | None, *,
             dry_run: bool = False) -> RunPlan:
    """Checks a run completely without compiling or writing anything (`main.py --dry_run`).

    Config fields, devices, the data (every image decodes), the checkpoint (readable, finite,
    matching the model) and the workdir (its recorded config) are checked in that order; the
    first problem raises one error that names it. With `dry_run`, an http(s) checkpoint that
    is not in the download cache yet is not downloaded (a note says so; model options left
    'auto' then take their defaults, and the log says so).

    Raises:
      ValueError (incl. CheckpointError, WorkdirError), FileNotFoundError: bad input.
    """
    config = resolve.resolve(config, download=not dry_run)
    compilation_cache.enable(config.get("compilation_cache_dir"))
    mesh = make_mesh(config.get("num_devices", 0))
    config_checks.check(config, num_devices=mesh.size, process_count=jax.process_count())
    data.validate(config.task, config.data_dir, config.split)
    num_classes = data.get_num_classes(config.task, config.data_dir)
    num_train = data.get_num_examples(config.task, config.data_dir, config.split, "train")
    num_eval = data.get_num_examples(config.task, config.data_dir, config.split, "eval")
    model = build_model(config, num_classes)
    pretrained, notes = None, []
    url = checkpoints.split_subtree(config.init or "")[0]
    if dry_run and url.startswith(("http://", "https://")) and not os.path.exists(
            checkpoints.files.cache_path(url)):
        notes.append(f"config.init {url} is not downloaded yet: a run downloads it once to "
                     f"{checkpoints.files.cache_path(url)} and checks it then")
    elif config.init:
        # Shapes only (nothing compiles); the checkpoint's arrays stay on the host.
        pretrained = load_pretrained(config, abstract_variables(model, config))
    change = None if workdir is None else workdir_lib.check(workdir, config)
    if dry_run and config.get("cache", "off") != "off" and caching.plan_cache(
            config, model, num_train, workdir) is None:
        notes.append("the run would train without a cache (see the line above)")
    return RunPlan(config, mesh, model, num_classes, num_train, num_eval, pretrained, change,
                   notes)


def abstract_variables(model, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model's variables as shapes and dtypes only (nothing is computed)."""
    return jax.eval_shape(model.init, jax.random.key(0), _dummy_images(config))


def _dummy_images(config: ml_collections.ConfigDict) -> jax.Array:
    return jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)


def run_schedule(config: ml_collections.ConfigDict, num_train: int,
                 peak_lr: float) -> tuple[Callable[[jax.Array], jax.Array], int]:
    """(the run's learning-rate schedule peaking at `peak_lr`, its number of steps) for
    `num_train` training examples, from the config's batch, epochs, warm-up and batching."""
    return optim.training_schedule(
        peak_lr, num_examples=num_train, batch_size=config.batch_size, epochs=config.epochs,
        warmup_epochs=config.warmup_epochs, batching=batching(config),
        per_epoch=config.get("schedule_per_epoch", True))


def init_variables(plan: RunPlan, seed: int) -> tuple[dict, jax.Array]:
    """(the run's initial variables, replicated over the mesh; its training key) for `seed`:
    the model initialised from the seed's key, then the checkpoint's leaves put in."""
    replicated = NamedSharding(plan.mesh, P())
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    images = _dummy_images(plan.config)
    if plan.pretrained is None:
        variables = jax.jit(plan.model.init, out_shardings=replicated)(init_rng, images)
    else:
        loaded, treedef = jax.tree.flatten(plan.pretrained)
        fresh = [i for i, leaf in enumerate(loaded) if isinstance(leaf, jax.ShapeDtypeStruct)]

        def init_fresh(rng: jax.Array, images: jax.Array) -> list[jax.Array]:
            # Only the leaves the checkpoint does not provide: XLA drops the rest of the init,
            # so no time goes to drawing weights the checkpoint replaces. The kept leaves are
            # the whole init's.
            leaves = jax.tree.leaves(plan.model.init(rng, images))
            return [leaves[i] for i in fresh]

        values = jax.jit(init_fresh, out_shardings=replicated)(init_rng, images)
        for i, value in zip(fresh, values, strict=True):
            loaded[i] = value
        variables = jax.tree.unflatten(treedef, loaded)
    # Built from each host's own copy: device_put would all-gather every parameter to check
    # that the hosts agree.
    return checkpoints.place(variables, replicated), train_rng


class NonFiniteError(FloatingPointError):
    """Training stopped on a non-finite or diverged loss (or state).

    Attributes:
      step: the step whose loss was bad.
      lr: the run's config.lr.
      resume_step: the step a re-run with a lower lr resumes from (the last good checkpoint;
        0 if none), or None when a lower lr cannot help (the loss was bad at lr 0).
    """

    def __init__(self, message: str, step: int, lr: float, resume_step: int | None):
        super().__init__(message)
        self.step, self.lr, self.resume_step = step, lr, resume_step


def source_fn(config: ml_collections.ConfigDict,
              cache: cache_lib.Cache | cache_lib.DeviceRows | None,
              mesh: Mesh) -> Callable[..., engine.DeviceSource | engine.HostSource]:
    """source(orders, start=0): the run's data source for members of the given example
    orders, from step `start`: the cache on the devices when the run has one that fits them
    (`config.cache_on_device`: 'auto' when it fits, 'on' an error when it does not, 'off'
    never), else host batches (the host cache's rows, or the images; a new iterator per
    call). The cache is uploaded once, here."""
    if cache is not None:
        fields = caching.cache_fields(cache.spec)
        # Rows built for the devices alone were built once the devices were found to hold
        # them (`_run_locked`).
        why = None if isinstance(cache, cache_lib.DeviceRows) else caching.why_not_on_device(
            config, cache.spec, mesh)
        if why is None:
            logging.info("Training from the cache on the devices (a compiled loop per chunk).")
            dcache = device_cache_lib.upload(cache, mesh, fields)
            return lambda orders, start=0: engine.DeviceSource(dcache, fields, config.batch_size,
                                                      batching(config), orders)
        if config.get("cache_on_device", "auto") == "on":
            raise ValueError(f"config.cache_on_device='on' but {why}")
        logging.info("Training from the host cache: %s.", why)
    rows = sampling.host_rows(NamedSharding(mesh, P("data")), config.batch_size)
    return lambda orders, start=0: engine.HostSource(
        batches.train_batches(config, cache, start_step=start, rows=rows), mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the configured method and evaluates it; resumes from `workdir` if it can.

    Args:
      config: see configs/vtab.py for the fields.
      workdir: where checkpoints, logs and results.json go.

    Returns:
      The final metrics, also written to `workdir/results.json`.
    """
    return run(config, workdir)[0]


def run(config: ml_collections.ConfigDict, workdir: str,
        callbacks: Sequence[Callback] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """`train_and_evaluate`, also returning the final variables.

    Args:
      config: see configs/vtab.py.
      workdir: where checkpoints, logs and results.json go.
      callbacks: called as cb(step, metrics) for every train step, in order, when its chunk's
        metrics reach the host (at every logging and checkpoint step); an exception from one
        stops the run like a kill would. (A checkpoint of step s is written once step s + 1
        has shown it sound, so a kill at step s loses it.)

    Returns:
      (results, the model's final variables).
    """
    workdir = os.fspath(workdir)
    plan = plan_run(config, workdir)
    try:
        with workdir_lib.remote_errors(workdir, "create"):
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, workdir) from None  # name the workdir, not a parent
    # Only the chief locks: with a shared file system the other hosts use the same workdir.
    with workdir_lib.lock(workdir) if hosts.is_chief() else contextlib.nullcontext():
        # Checked again under the lock: another run may have recorded its config meanwhile.
        plan.change = workdir_lib.check(workdir, plan.config)
        return _run_locked(plan, workdir, callbacks)


def _run_locked(plan: RunPlan, workdir: str,
                callbacks: Sequence[Callback]) -> tuple[dict[str, Any], dict[str, Any]]:
    config, mesh, model, num_train = plan.config, plan.mesh, plan.model, plan.num_train
    is_chief = hosts.is_chief()

    cache_plan = caching.plan_cache(config, model, num_train, workdir)
    variables, train_rng = init_variables(plan, config.seed)
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for(config.method))
    unit, total_steps = run_schedule(config, num_train, 1.0)
    state = engine.init_state(methods.optimizer_name(config), trainable, [trainable], mesh)
    manager, digest, restored = restore(
        workdir, [config], state, mesh, os.path.join(workdir, workdir_lib.CONFIG_FILE), plan.change)
    state = restored["state"]
    start = int(np.asarray(jax.device_get(state.step))[0])
    if start:
        logging.info("Resuming from step %d in %s", start, workdir)
    if is_chief:
        # Written before training: the workdir says what it holds even if the run dies.
        workdir_lib.record(workdir, config, plan.change, start)
    writer = metrics_io.create_writer(workdir, is_chief)
    if is_chief and start == 0:
        metrics_io.log_parameter_overview(trainable)
        writer.write_hparams(workdir_lib.flatten(workdir_lib.as_dict(config)))

    cache = None
    needs_data = start < total_steps or compression_wanted(config)
    if cache_plan is not None and needs_data:
        # On several hosts, only this host's devices' rows when the cache goes on the devices
        # and nothing after training reads the host cache (the feature heads read every row).
        cache = caching.get_cache(cache_plan, config, model, variables, mesh, device_rows=(
            jax.process_count() > 1 and not feature_heads.wanted(config)
            and caching.why_not_on_device(config, cache_plan.spec, mesh) is None))
    source = source_fn(config, cache, mesh) if needs_data else None
    outcome = None
    if start < total_steps:
        run = make_engine([config], model, source([order_seed(config)], start), trainable, unit,
                          frozen, train_rng[None], state, total_steps, from_cache=cache is not None)
        outcome = train_members(
            run, state, config, manager, digest, total_steps, writers=[writer],
            callbacks=callbacks, may_diverge=False,
            bad=lambda j, why, step, lr_now, saved: _nonfinite(why, step, lr_now, start, config,
                                                               workdir, saved))
        state = outcome.state

    trained = state.trainable
    variables = trainable_lib.merge(jax.tree.map(lambda x: x[0], trained), frozen)
    eval_metrics = evaluation.evaluate(model, variables, config, mesh, num_examples=plan.num_eval,
                            class_names=data.get_class_names(config.task, config.data_dir))
    # A run trained earlier (no outcome): how it trained, as the plan says; its loss, as saved.
    on_device = isinstance(run.source, engine.DeviceSource) if outcome is not None else (
        cache_plan is not None and caching.why_not_on_device(config, cache_plan.spec, mesh) is None)
    results = run_results(
        config, steps=total_steps, eval_metrics=eval_metrics, trainable=trainable,
        train_loss=float((restored["loss"] if outcome is None else outcome.loss)[0]),
        cached=cache is not None if outcome is not None else cache_plan is not None,
        cache_on_device=on_device)
    evals = (feature_heads.eval_features(config, model, variables, mesh)
             if feature_heads.wanted(config) or compression_wanted(config) else None)
    if feature_heads.wanted(config):
        if cache is None and cache_plan is not None:
            cache = caching.get_cache(cache_plan, config, model, variables, mesh)
        results.update(feature_heads.run(config, model, variables, mesh, cache, evals))
    if compression_wanted(config):
        heads = compression_stage.train([config], model, trained, frozen, source, num_train,
                                        evals["pre_logits"].shape[1], plan.num_classes)
        results["compression"] = heads.scores([evals["pre_logits"]], evals["label"])[0]
    if history := workdir_lib.changes(workdir):
        results["config_changes"] = history
    finish(plan, config, workdir, writer, variables, eval_metrics, results)
    manager.close()
    return results, variables


def make_engine(configs: Sequence[ml_collections.ConfigDict], model, source: Any,
                template: dict, unit: Callable[[jax.Array], jax.Array], frozen: dict,
                rngs: jax.Array, state: Any, total: int, *, from_cache: bool) -> engine.Engine:
    """The engine of runs (`configs`: a run's one, or a stage's members') of the method's loss
    (`train_step.make_loss_fn`) at their lr and wd, in chunks that end at the first config's
    logging and checkpoint steps."""
    config = configs[0]
    loss = train_step.make_loss_fn(model, from_cache=from_cache)
    step = engine.member_step(lambda t, member, f, b, r: loss(t, f, b, r),
                              methods.optimizer_name(config), template, unit)
    every = (config.get("log_every_steps", 10), config.get("checkpoint_every_steps", 100))
    members = {k: np.float32([c[k] for c in configs]) for k in ("lr", "wd")}
    return engine.Engine(step, source, frozen, members, rngs, state,
                         max_steps=engine.max_chunk(total, *every))


def restore(directory: str, configs: Sequence[ml_collections.ConfigDict], state: Any,
            mesh: Mesh, recorded: str, change: dict | None = None) -> tuple[Any, np.ndarray, dict]:
    """(the checkpoint manager of `directory`, the configs' `config_digest`, its latest
    checkpoint of the members' `state`: `state` itself, none failed and losses 0, where it has
    none).

    Raises:
      WorkdirError: the checkpoint was written under another config than the one `recorded`
        names (config.json edited, replaced or deleted by hand), unless the workdir allowed
        the change (`change`, from `workdir.check`); it names the checkpoints and config.json.
    """
    manager = checkpointing.manager(directory, configs[0].get("keep_checkpoints", 2))
    digest = config_digest(configs)
    zeros = np.zeros(len(configs))
    restored = checkpointing.restore_latest(manager, engine.saved(state, zeros, zeros, mesh,
                                                                  digest))
    if (not change and np.asarray(restored["state"].step).any()
            and not np.array_equal(np.asarray(restored["config"]), digest)):
        raise workdir_lib.WorkdirError(
            f"the checkpoints in {checkpointing.checkpoint_dir(directory)} were written under "
            f"another config than {recorded} now says (edited, replaced or deleted by hand?): "
            "re-run with the config they were trained with, or use a new --workdir")
    return manager, digest, restored


def train_members(run: engine.Engine, state: Any, config: ml_collections.ConfigDict,
                  manager: Any, digest: np.ndarray, total: int, **kwargs) -> engine.Outcome:
    """`engine.train` to step `total` at `config`'s logging and checkpoint steps and max_loss,
    saving to `manager` (checkpoints of `digest`'s configs); `kwargs` go on to it."""
    def save(step: int, *saved: Any) -> None:
        checkpointing.save(manager, step, engine.saved(*saved, run.source.mesh, digest))

    try:
        return engine.train(
            run, state, total=total, max_loss=config.get("max_loss", math.inf), save=save,
            log_every=config.get("log_every_steps", 10), last_saved=manager.latest_step() or 0,
            ckpt_every=config.get("checkpoint_every_steps", 100), **kwargs)
    finally:
        # Whatever stops the loop, a save in flight completes (orbax commits atomically).
        manager.wait_until_finished()


def finish(plan: RunPlan, config: ml_collections.ConfigDict, run_dir: str, writer: Any,
           variables: dict, metrics: dict[str, Any], results: dict[str, Any]) -> None:
    """Completes a trained and evaluated run's `results` (`record_run`) and writes its
    directory: the evaluation's scalars (`metrics`, whose 'report' it takes out), and on the
    chief `WORKDIR/evaluation.json` (the split, top-1 and `evaluation_report`), the trained part
    as `WORKDIR/model.vqt` (`vqt_jax.export`) and results.json, last, naming the other two (so
    a results.json always has them)."""
    report = metrics.pop("report")
    writer.write_scalars(results["steps"], {f"{evaluation.split_name(config)}/{k}": v
                                            for k, v in metrics.items()})
    writer.flush()
    record_run(config, results)
    if hosts.is_chief():
        workdir_lib.write_json(os.path.join(run_dir, workdir_lib.EVALUATION_FILE), {
            "split": evaluation.split_name(config), "top1": metrics["top1"],
            "num_examples": metrics["num_examples"], **report})
        export.write(os.path.join(run_dir, export.EXPORT_FILE), config=config,
                     variables=variables, provided=export.provided_keys(plan.pretrained),
                     class_names=report["class_names"],
                     results={k: v for k, v in results.items() if k != "config"})
        results.update(export=export.EXPORT_FILE, evaluation=workdir_lib.EVALUATION_FILE)
        workdir_lib.write_results(run_dir, results)


def config_digest(configs: Sequence[ml_collections.ConfigDict]) -> np.ndarray:
    """[8] uint32: the SHA-256 of the configs' fields that matter to a run's results (not
    `workdir.NEUTRAL`, which may change between resumes and differ between hosts), which each
    checkpoint holds."""
    text = json.dumps([{k: v for k, v in workdir_lib.flatten(workdir_lib.as_dict(c)).items()
                        if k.split(".")[0] not in workdir_lib.NEUTRAL} for c in configs],
                      sort_keys=True, default=str)
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32).copy()


def compression_wanted(config: ml_collections.ConfigDict) -> bool:
    """Whether the run ends with the compression stages (`compression_stage`)."""
    c = config.get("compression")
    return bool(c is not None and c.enabled)


def record_run(config: ml_collections.ConfigDict, results: dict[str, Any]) -> None:
    """Adds to a run's `results` (its heads' results included) the number its protocol
    reports (`vqt_jax.protocol.reported`) and the config it trained with, in full (the
    workdir's guard makes it the config of every step)."""
    results["reported"] = reported(config, results)
    results["config"] = workdir_lib.as_dict(config)


def run_results(config: ml_collections.ConfigDict, *, steps: int, eval_metrics: dict,
                train_loss: float | None, trainable: dict, cached: bool,
                cache_on_device: bool) -> dict[str, Any]:
    """What results.json reports of a run (before its feature heads and config are added);
    `trainable`: one run's trainable leaves (unstacked), counted."""
    return {**{k: config[k] for k in ("task", "split", "method", "seed", "lr", "wd")},
            "steps": steps, "top1": eval_metrics["top1"], "eval_loss": eval_metrics["loss"],
            "num_eval_examples": eval_metrics["num_examples"], "train_loss": train_loss,
            "num_trainable": int(sum(np.size(v) for v in trainable.values())),
            "cached": cached, "cache_on_device": cache_on_device}


def _nonfinite(what: str, step: int, lr_now: float, start: int, config: ml_collections.ConfigDict,
               workdir: str, last_saved: int) -> NonFiniteError:
    """The error for a bad step, recorded in the workdir so that a lower lr may resume."""
    if lr_zero := (step == 1 and start == 0 and lr_now == 0):
        # The lr was 0: the update cannot be the cause; the weights or the inputs are.
        message = (f"{what} at step 1 with lr 0: the pretrained weights or the input data hold "
                   f"non-finite values (config.init={config.init!r}); stopped, nothing saved.")
    else:
        where = (f"The last good checkpoint (step {last_saved}) in {workdir}/checkpoints is "
                 f"intact" if last_saved else "No checkpoint was saved before it")
        message = (f"{what} at step {step} (lr {lr_now:.3g}); stopped. {where}: re-run with a "
                   f"lower config.lr to resume from step {last_saved}.")
    if hosts.is_chief():
        workdir_lib.record_nonfinite_stop(workdir, step, config.lr, message)
    return NonFiniteError(message, step, config.lr, None if lr_zero else last_saved)
