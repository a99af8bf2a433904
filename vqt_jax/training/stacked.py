"""Many runs of one frozen backbone trained and evaluated as one program (a protocol *stage*).

The VTAB-1k protocol (`vqt_jax.sweep`) trains one method on one task 25 times: 20 (lr, wd)
grid points on train800 -> val200, then 5 seeds of the selected point on train800val200 ->
test. When the method leaves the backbone frozen (`methods.Method.cache`: VQT, linear probing,
Head2Toe) all of them read the same backbone outputs, so each stage's runs (its *members*)
run here together:

* Training: the members' trainable states are stacked on a leading axis, and their learning
  rates and weight decays are inputs of the program (traced, not constants), so one
  compilation serves every member and every chunk length. Each step `vmap`s the method's own
  step (`train_step`, the same optimiser and schedule) over the members, in compiled chunks
  over the device-resident cache (`device_cache`, `engine.Engine`). The batch is
  gathered once for all members when they share an example order (the grid; the seeds too when
  `config.order_seed` is set), else once per member (the seeds: each keeps its own init,
  dropout stream and example order, as its own run would).
* Evaluation: each batch of the evaluation split goes through the backbone once; every
  member's query path and head read that pass's keys/values (or features).
* One cache for both stages: train800val200's. Its first rows are train800 (TFDS and image
  folders list train800 first), so the grid trains on them (the device source's first rows)
  and no train800 cache is built. Its last rows are val200: while the grid's stage builds the
  cache it keeps their backbone outputs in float32 (`_val_rows`), and evaluates the grid on
  val200 from them (`_exact_batches`, after checking that val200's images are those rows).
  The backbone then runs once over train800val200 and once over test per task (and once
  more over val200 when the cache was built earlier, by another process, or does not fit
  in memory twice).

Each member's directory gets what `train.train_and_evaluate` would have written there
(config.json, metrics, results.json with the same fields, plus `program`), with the same
numbers up to float rounding (tests/test_stacked.py compares them with sequential runs). The
stage checkpoints its stacked state under its own directory (named by its members) and resumes
from there. Stages that cannot run this way say why (`Unstackable`) before anything is written,
and the protocol trains their runs one by one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import cache as cache_lib
from vqt_jax import data, hosts, inference, methods
from vqt_jax import device_cache as device_cache_lib
from vqt_jax import trainable as trainable_lib
from vqt_jax import workdir as workdir_lib
from vqt_jax.models import ViT
from vqt_jax.progress import Progress
from vqt_jax.protocol import batching, order_seed
from vqt_jax.training import batches as batches_lib
from vqt_jax.training import (
    caching,
    compression_stage,
    engine,
    evaluation,
    feature_heads,
    metrics_io,
    train,
    train_step,
)

# What may differ between the members of a stage.
MEMBER_FIELDS = ("lr", "wd", "seed")
# The split whose training cache serves both stages (train800val200).
CACHE_SPLIT = "test"
# The stage's own directory under its members' parent: checkpoints of the stacked state.
STAGE_PREFIX = "program-"
# The most of the host's available memory val200's float32 backbone outputs may take.
KEEP_FRACTION = 0.25


NO_INIT = ("without config.init every seed's backbone is its own random initialisation, so the "
           "seeds share no backbone pass")


class Unstackable(ValueError):
    """A stage cannot run as one program (the reason is the message); nothing was written."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of a stage: its config (the stage's, with its own lr, wd and seed) and its
    directory."""

    config: ml_collections.ConfigDict
    run_dir: str


def why_not(configs: Sequence[ml_collections.ConfigDict]) -> str | None:
    """Why these runs cannot be one program (from their configs alone), or None.

    Raises:
      ValueError: if the configs differ in more than `MEMBER_FIELDS` (a caller's mistake).
    """
    base = configs[0]
    for c in configs[1:]:
        if diff := workdir_lib.differences(_shared(base), _shared(c)):
            raise ValueError(f"Runs of one program may differ only in {MEMBER_FIELDS}; these "
                             f"also differ in {sorted(diff)}")
    if methods.get(base.method).cache is None:
        return (f"method {base.method!r} adapts the backbone, so every run needs its own "
                "backbone passes")
    if base.get("cache", "off") == "off":
        return "config.cache='off' (one program trains from the cache)"
    if base.get("cache_on_device", "auto") == "off":
        return "config.cache_on_device='off' (one program trains from the device cache)"
    if base.split not in ("val", "test"):
        return f"config.split={base.split!r}"
    # A preparation step may set `init` (the demo's does): checked again once it has run.
    if not base.init and not base.get("prepare") and len({c.seed for c in configs}) > 1:
        return NO_INIT
    return None


def _shared(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: v for k, v in workdir_lib.as_dict(config).items() if k not in MEMBER_FIELDS}


def stage_dir(members: Sequence[Member]) -> str:
    """The stage's directory: beside its members' directories, named by what they are."""
    key = json.dumps([[m.config.lr, m.config.wd, m.config.seed, epath.Path(m.run_dir).name]
                      for m in members])
    # epath, not os.path: normpath would make a gs:// run directory the local 'gs:/...'.
    parent = epath.Path(members[0].run_dir).parent
    return str(parent / (STAGE_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]))


@dataclasses.dataclass
class _Setup:
    """What a stage holds once planned (before training)."""

    plan: train.RunPlan
    configs: list[ml_collections.ConfigDict]  # each member's, as its run would record it
    # train800val200's cache (on several hosts only this host's devices' rows); the stage
    # trains on its first `plan.num_train` rows.
    cache: cache_lib.Cache | cache_lib.DeviceRows
    variables0: dict  # the first member's full variables (the backbone pass's)
    frozen: dict
    state: train_step.TrainState  # stacked
    rngs: jax.Array  # [S] training keys
    template: dict
    # val200's rows of the cache in float32, when this stage built the cache (`_val_rows`).
    float32: cache_lib.Float32Rows | None = None

    @property
    def train_rows(self) -> cache_lib.Cache | None:
        """The training rows on the host (what the baselines read), or None (device rows)."""
        return None if isinstance(self.cache, cache_lib.DeviceRows) else cache_lib.first_rows(
            self.cache, self.plan.num_train)


def _plan(members: Sequence[Member]) -> _Setup:
    """Checks, opens (or builds) the cache and initialises every member; raises Unstackable."""
    configs = [m.config for m in members]
    if why := why_not(configs):
        raise Unstackable(why)
    plan = train.plan_run(configs[0], None)
    if not plan.config.init and len({c.seed for c in configs}) > 1:
        raise Unstackable(NO_INIT)
    for m in members:  # each member's directory must accept its config (like its own run)
        workdir_lib.check(m.run_dir, _member_config(plan.config, m.config))
    config = plan.config
    cache_config = copy.deepcopy(config)
    cache_config.split = CACHE_SPLIT
    num_rows = data.get_num_examples(config.task, config.data_dir, CACHE_SPLIT, "train")
    if config.split == "val":
        val200 = data.get_num_examples(config.task, config.data_dir, "val", "eval")
        if num_rows != plan.num_train + val200:
            raise Unstackable(f"train800val200 has {num_rows} examples, not train800's "
                              f"{plan.num_train} + val200's {val200}")
    cache_plan = caching.plan_cache(cache_config, plan.model, num_rows,
                                  os.path.dirname(stage_dir(members)))
    if cache_plan is None:
        raise Unstackable("the run would train without a cache (see the line above)")

    seeds = [m.config.seed for m in members]
    inits = {s: train.init_variables(plan, s) for s in dict.fromkeys(seeds)}
    rule = trainable_lib.rule_for(config.method)
    parts = {s: trainable_lib.partition(v, rule) for s, (v, _) in inits.items()}
    variables0 = inits[seeds[0]][0]
    orders = {order_seed(m.config) for m in members}
    rows = plan.config.batch_size * (1 if len(orders) == 1 else len(members))
    why = device_cache_lib.why_not(cache_plan.spec, caching.cache_fields(cache_plan.spec),
                                   plan.mesh, rows)
    if not hosts.all_agree(why is None):
        raise Unstackable(f"the cache does not fit the devices: "
                          f"{why or 'another host cannot hold it'}")
    keep = _val_rows(cache_plan.spec, plan, num_rows) if config.split == "val" else None
    # On several hosts each builds only its devices' rows, unless a baseline reads them all.
    cache = caching.get_cache(cache_plan, cache_config, plan.model, variables0, plan.mesh,
                            keep_float32=keep, device_rows=jax.process_count() > 1
                            and not feature_heads.wanted(config))
    if cache is None:
        raise Unstackable("the cache could not be built (see the line above)")

    template, frozen = parts[seeds[0]]
    state = engine.init_state(methods.optimizer_name(config), template,
                              [parts[s][0] for s in seeds], plan.mesh)
    # Local, as `train` keeps its key: the compiled loop takes it replicated (a device_put
    # onto the global mesh would be refused on several hosts).
    rngs = jnp.stack([inits[s][1] for s in seeds])
    return _Setup(plan, [_member_config(config, m.config) for m in members], cache, variables0,
                  frozen, state, rngs, template, getattr(cache, "float32", None))


def _val_rows(spec: cache_lib.Spec, plan: train.RunPlan, num_rows: int) -> slice | None:
    """val200's rows of the train800val200 cache (its last ones), to keep in float32 while
    the cache is built, so that the grid's evaluation on val200 reads the backbone's outputs
    from there instead of running the backbone over val200 again (`_exact_batches`); None
    (a second pass) on several hosts, whose evaluation batches are not the cache's rows in
    order, or when they would take over `KEEP_FRACTION` of the host's available memory."""
    if jax.process_count() > 1:
        return None
    image = (plan.config.image_size, plan.config.image_size, 3)
    need = cache_lib.float32_bytes(spec, num_rows - plan.num_train, image)
    available = cache_lib.available_memory()
    if available is None or need > KEEP_FRACTION * available:
        logging.info("val200's backbone outputs in float32 (%s) are not kept while caching: "
                     "%s available; its evaluation runs the backbone again.",
                     cache_lib.format_size(need),
                     "unknown memory" if available is None else cache_lib.format_size(available))
        return None
    return slice(plan.num_train, num_rows)


def _member_config(config: ml_collections.ConfigDict,
                   member: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    out = copy.deepcopy(config)
    out.update({k: member[k] for k in MEMBER_FIELDS})
    return out


def fits(compiled: Any, mesh) -> str | None:
    """Why a compiled program does not fit the devices' memory, or None (it fits, or the
    device does not report its memory, as a CPU does): its arguments (the device cache
    included), outputs and temporaries per device (`memory_analysis`), against 0.9 of the
    least memory of this host's devices (`device_cache.local_memory_limit`); the caller
    combines the hosts' answers (`hosts.all_agree`)."""
    limit = device_cache_lib.local_memory_limit(mesh)
    if not limit:
        return None
    m = compiled.memory_analysis()
    need = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    if need > 0.9 * limit:
        return (f"the program needs {cache_lib.format_size(need)} per device, over 0.9 of its "
                f"{cache_lib.format_size(limit)}")
    return None


# A member whose trainable leaves are these (VQT's) differs from the others only in its query
# tokens and head, so the members' query sets can run as one (`_eval_fn`).
_QUERY_SET = frozenset({"queries/tokens", "params/head/kernel", "params/head/bias"})


def _eval_fn(setup: _Setup, fields: list[str], keep_features: bool, from_cache: bool):
    """fn(variables0, trainables, frozen, batch) -> per-example outputs of every member: one
    backbone pass over the batch's images, or its outputs given in the batch (`from_cache`),
    and each member's query path and head.

    VQT's members (`_QUERY_SET`) run their query sets as one: a query token attends to the
    ordinary tokens' keys and values, never to another query token, and every other step of
    the query path acts on each token alone, so S members' T tokens are one model's S x T
    tokens. Their query path then runs inside the backbone pass, layer by layer, reading each
    layer's keys and values once for all members, while they are fresh (a vmap of each
    member's query path over the pass's outputs had the pass keep every layer's keys and
    values, and read them S times). Each member's head then reads its own tokens' outputs.
    Other methods' members each run their head on the pass's outputs (`ViT.cache_features`).
    """
    model, mesh = setup.plan.model, setup.plan.mesh

    def heads(trainables, frozen, inputs, per_member=None):
        """Each member's `features_from_cache` on `inputs`, with its [B, M, T, D] slice of
        `per_member` as the query outputs."""
        def member(trainable, queries):
            extra = {} if queries is None else {"queries": queries}
            return model.apply(trainable_lib.merge(trainable, frozen), {**inputs, **extra},
                               method=ViT.features_from_cache)

        return jax.vmap(member)(trainables, per_member)

    def fn(variables0, trainables, frozen, batch):
        if set(trainables) == _QUERY_SET:
            tokens = trainables["queries/tokens"]  # [S, M, T, D]
            s, m, t, d = tokens.shape
            joint = model.clone(num_queries=s * t, num_classes=0)
            variables = trainable_lib.merge(
                {"queries/tokens": jnp.moveaxis(tokens, 0, 1).reshape(m, s * t, d)}, frozen)
            if from_cache:
                feats = batch
                out = joint.apply(variables, {k: batch[k] for k in ("k", "v", "cls")},
                                  method=ViT.features_from_cache)
            else:
                feats = out = inference.in_steps(
                    lambda x: joint.apply(variables, x, method=ViT.features_without_blocks),
                    batch["image"], mesh)
            q = out["queries"]  # [B, M, S*T, D], member-major
            per_member = jnp.moveaxis(q.reshape(q.shape[0], m, s, t, d), 2, 0)
            outs = heads(trainables, frozen, {"cls": feats["cls"]}, per_member)
        else:
            feats = batch if from_cache else inference.in_steps(
                lambda x: model.apply(variables0, x, method=ViT.cache_features), batch["image"],
                mesh)
            outs = heads(trainables, frozen, {k: feats[k] for k in fields})
        out = jax.vmap(lambda o: evaluation.example_outcomes(o, batch))(outs["logits"])
        out.update(count=batch["mask"], label=batch["label"])
        if keep_features:
            out.update(pre_logits=outs["pre_logits"], cls=feats["cls"], pooled=feats["pooled"])
        return out

    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    per_member = NamedSharding(mesh, P(None, "data"))
    shardings = {"correct": per_member, "loss": per_member, "pred": per_member, "count": rows,
                 "label": rows}
    if keep_features:
        shardings.update(pre_logits=per_member, cls=rows, pooled=rows)
    return jax.jit(fn, in_shardings=(replicated, replicated, replicated, rows),
                   out_shardings=shardings)


def _evaluate(setup: _Setup, trainables: dict, keep_features: bool):
    """Every member's eval metrics (and features for the feature heads) in one pass."""
    config, mesh = setup.plan.config, setup.plan.mesh
    batches = _exact_batches(setup)
    fn = _eval_fn(setup, caching.cache_fields(setup.cache.spec), keep_features, batches is not None)
    what = f"Evaluating {len(setup.configs)} runs on {evaluation.split_name(config)}"
    logging.info("%s: %s.", what, "one backbone pass" if batches is None else
                 "the backbone's float32 outputs kept by the cache build, no backbone pass")
    host = evaluation.run_eval_batches(
        lambda batch: fn(setup.variables0, trainables, setup.frozen, batch), config, mesh,
        Progress(what, setup.plan.num_eval, "images"), batches)
    metrics = evaluation.eval_totals(host, members=len(setup.configs))
    class_names = data.get_class_names(config.task, config.data_dir)
    for j, m in enumerate(metrics):
        m["report"] = evaluation.evaluation_report(host, class_names, member=j,
                                              predictions=config.get("save_predictions", False))
    if not keep_features:
        return metrics, None
    keep = np.concatenate([o["count"] for o in host]) > 0
    shared = {k: np.concatenate([o[k] for o in host])[keep] for k in ("cls", "pooled", "label")}
    pre = np.concatenate([o["pre_logits"] for o in host], axis=1)[:, keep]
    return metrics, [{**shared, "pre_logits": p} for p in pre]


def _exact_batches(setup: _Setup) -> Iterator[dict] | None:
    """The evaluation batches with the backbone's float32 outputs (`setup.float32`) in place
    of their images, or None (the evaluation runs the backbone).

    Only when the evaluation split is exactly the kept rows: every batch's images, normalised
    as evaluation feeds them, equal the kept rows' in order (the outputs are then those a
    backbone pass over the batch computes, to float rounding). Checked over the whole split
    before any batch is made.
    """
    kept, config = setup.float32, setup.plan.config
    if kept is None:
        return None
    norm = data.as_normalization(config.normalization)
    masks, pos = [], 0
    for batch in batches_lib.eval_batches(config, setup.plan.mesh):
        mask = np.asarray(batch["mask"])
        n = int(mask.sum())
        if (not mask[:n].all() or pos + n > len(kept.images) or not np.array_equal(
                batch["image"][:n], data.normalize_array(kept.images[pos:pos + n], norm))):
            break
        masks.append((batch["label"], mask))
        pos += n
    else:
        if pos == len(kept.images):
            return _float32_batches(kept, masks)
    logging.warning("The evaluation split is not the cache's last %d rows; its evaluation "
                    "runs the backbone.", len(kept.images))
    return None


def _float32_batches(kept: cache_lib.Float32Rows,
                     masks: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[dict]:
    """Batches of `kept`'s arrays shaped as the evaluation batches (`masks`: their labels and
    masks), padding rows zero, made one at a time."""
    pos = 0
    for label, mask in masks:
        n, size = int(mask.sum()), len(mask)
        batch = {"label": label, "mask": mask}
        for name, a in kept.arrays.items():
            batch[name] = np.zeros((size, *a.shape[1:]), a.dtype)
            batch[name][:n] = a[pos:pos + n]
        pos += n
        yield batch


def run_stage(members: Sequence[Member], *, may_diverge: bool = True,
              log: Callable[[str], None] = logging.info) -> list[dict | FloatingPointError]:
    """Trains and evaluates `members` as one program; writes each member's run directory.

    A stage larger than `config.program_max_runs` (0: no limit), or whose program does not fit
    the devices' memory (`fits`), runs as several programs of consecutive members, halved
    until each fits.

    Args:
      members: the stage's runs: configs that differ only in lr, wd and seed, split 'val'
        (trained on train800, evaluated on val200) or 'test' (train800val200 -> test).
      may_diverge: a member whose loss or state goes bad is reported as a FloatingPointError in
        its place (the grid); False: the stage stops with that error (the seeds), as the
        protocol's sequential runs do.
      log: where the stage's progress lines go.

    Returns:
      Per member, its results (as `train.train_and_evaluate` returns them) or the error that
      excluded it.

    Raises:
      Unstackable: before anything is written, when the stage cannot be one program.
    """
    limit = members[0].config.get("program_max_runs", 0) or len(members)
    groups = [list(members[i:i + limit]) for i in range(0, len(members), limit)]
    out: list[dict | FloatingPointError] = []
    while groups:
        group = groups.pop(0)
        try:
            out += _run_group(group, may_diverge, log)
        except _TooBig as e:
            if len(group) == 1:
                raise Unstackable(f"one run alone: {e}") from None
            half = len(group) // 2
            log(f"{len(group)} runs as one program: {e}; splitting them in two")
            groups[:0] = [group[:half], group[half:]]
    return out


class _TooBig(Exception):
    """A group's program does not fit the devices (raised before anything is written)."""


def _run_group(members: list[Member], may_diverge: bool,
               log: Callable[[str], None]) -> list[dict | FloatingPointError]:
    """`run_stage` for one group of members, as one program."""
    setup = _plan(members)
    config, mesh, model = setup.plan.config, setup.plan.mesh, setup.plan.model
    s = len(members)
    directory = stage_dir(members)
    is_chief = hosts.is_chief()
    fields = caching.cache_fields(setup.cache.spec)
    dcache = device_cache_lib.upload(setup.cache, mesh, fields)

    # source(orders): the members' batches, gathered on the devices.
    source = functools.partial(engine.DeviceSource, dcache, fields, config.batch_size,
                               batching(config), num_examples=setup.plan.num_train)
    unit, total = train.run_schedule(config, setup.plan.num_train, 1.0)
    orders = [order_seed(m.config) for m in members]
    run = train.make_engine(setup.configs, model, source(orders), setup.template, unit,
                            setup.frozen, setup.rngs, setup.state, total, from_cache=True)
    why = fits(run.compiled, mesh)
    if not hosts.all_agree(why is None):
        raise _TooBig(why or "another host's devices cannot hold it")

    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    with workdir_lib.lock(directory) if is_chief else contextlib.nullcontext():
        if is_chief:
            workdir_lib.write_json(epath.Path(directory) / "members.json", [
                {"lr": c.lr, "wd": c.wd, "seed": c.seed, "run_dir": m.run_dir}
                for c, m in zip(setup.configs, members, strict=True)])
            for c, m in zip(setup.configs, members, strict=True):
                epath.Path(m.run_dir).mkdir(parents=True, exist_ok=True)
                workdir_lib.record(m.run_dir, c, None, 0)
        manager, digest, restored = train.restore(
            directory, setup.configs, setup.state, mesh,
            f"the config.json of the runs in {epath.Path(directory) / 'members.json'}")
        start = int(np.asarray(jax.device_get(restored["state"].step))[0])
        log(f"{s} runs of {config.task} ({evaluation.split_name(config)}) as one program: "
            f"{total} steps each, {len(set(orders))} example order(s)"
            + (f", resuming from step {start}" if start else ""))
        errors: dict[int, FloatingPointError] = {}
        failed = np.array(restored["failed"])
        for j in np.flatnonzero(failed):  # members a resumed stage had already excluded
            errors[j] = _failure("It went bad earlier", int(failed[j]), float("nan"), members[j], s)
            if not may_diverge:
                raise errors[j]
        writers = [metrics_io.create_writer(m.run_dir, is_chief) for m in members]
        outcome = train.train_members(
            run, restored["state"], config, manager, digest, total, failed=restored["failed"],
            loss=restored["loss"], writers=writers, may_diverge=may_diverge,
            bad=lambda j, why, step, lr, _: _failure(why, step, lr, members[j], s))
        manager.close()
        errors.update(outcome.errors)
        trained = outcome.state.trainable
        heads = None
        if train.compression_wanted(config):
            width = setup.variables0["params"]["head"]["kernel"].shape[0]
            heads = compression_stage.train(setup.configs, model, trained, setup.frozen, source,
                                            setup.plan.num_train, width, setup.plan.num_classes)

        # The device-resident cache (host memory on a CPU) is not read again: freed before the
        # evaluation's backbone pass needs the memory.
        del run, source, dcache
        metrics, evals = _evaluate(setup, trained,
                                   feature_heads.wanted(config) or heads is not None)
        compressed = None if heads is None else heads.scores(
            [e["pre_logits"] for e in evals], evals[0]["label"])
        out: list[dict | FloatingPointError] = []
        for j, (c, m) in enumerate(zip(setup.configs, members, strict=True)):
            if j in errors:
                out.append(errors[j])
                continue
            results = train.run_results(c, steps=total, eval_metrics=metrics[j],
                                        train_loss=float(outcome.loss[j]), cached=True,
                                        trainable=setup.template, cache_on_device=True)
            variables = trainable_lib.merge(jax.tree.map(lambda x, j=j: x[j], trained),
                                            setup.frozen)
            results.update(feature_heads.run(c, model, variables, mesh, setup.train_rows,
                                             evals=evals[j] if evals else None))
            if compressed is not None:
                results["compression"] = compressed[j]
            results["program"] = {"runs": s, "directory": directory}
            train.finish(setup.plan, c, m.run_dir, writers[j], variables, metrics[j], results)
            out.append(results)
    return out


def _failure(why: str, step: int, lr_now: float, member: Member, s: int) -> FloatingPointError:
    return FloatingPointError(
        f"{why} at step {step} (lr {lr_now:.3g}) of {member.run_dir} (lr={member.config.lr!r}, "
        f"wd={member.config.wd!r}, seed={member.config.seed}), trained in one program with "
        f"{s - 1} other run{'s' if s != 2 else ''}.")
