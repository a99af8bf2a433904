"""Evaluation: a compiled step's per-example outcomes over the padded, masked evaluation
batches (`run_eval_batches`), summed on the host in float64 (`eval_totals`), with per-class
top-1, the confusion matrix and optionally every prediction (`evaluation_report`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import inference
from vqt_jax.progress import Progress
from vqt_jax.training import batches as batches_lib
from vqt_jax.training import engine


def example_outcomes(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per example of an evaluation batch: `correct` (0/1) and the cross-entropy `loss`, both 0
    where `mask` is 0. They are summed on the host in float64 (`eval_totals`)."""
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    pred = logits.argmax(-1).astype(jnp.int32)
    correct = (pred == batch["label"]).astype(jnp.float32)
    return {"correct": correct * batch["mask"], "loss": losses * batch["mask"], "pred": pred}


def run_eval_batches(fn: Callable[[dict], Any], config: ml_collections.ConfigDict, mesh: Mesh,
                     progress: Progress, batches: Iterable[dict] | None = None) -> list[Any]:
    """`fn` (a compiled eval step) on every evaluation batch (`batches`, default
    `eval_batches`); its outputs, fetched to the host.

    One batch is computed while the host reads the next one, and `progress` counts a batch
    only once the devices have finished it: JAX dispatches asynchronously, so counting at
    dispatch would report the time to queue the work, not to do it.
    """
    sharding = NamedSharding(mesh, P("data"))
    outs: list[Any] = []
    uncounted = 0  # examples in outs[-1], which may still be computing
    for batch in batches_lib.eval_batches(config, mesh) if batches is None else batches:
        out = fn(engine.global_batch(batch, sharding))
        if outs:  # the previous batch: wait for it only now that this one is queued
            jax.block_until_ready(outs[-1])
            progress.update(uncounted)
        outs.append(out)
        uncounted = int(batch["mask"].sum()) * jax.process_count()
    jax.block_until_ready(outs)
    progress.update(uncounted)
    progress.done()
    return inference.fetch_rows(outs)


def eval_totals(outs: Sequence[dict[str, Any]], members: int | None = None) -> Any:
    """Top-1, loss and count from per-batch, per-example `correct`/`loss`/`count` on the host.

    The sums are taken in float64 (`math.fsum`), so they do not depend on the batch size (a
    float32 sum per batch would, in its last bits). With `members`, `correct` and `loss` are
    [members, B] per batch and one result per member is returned.
    """
    count = math.fsum(x for o in outs for x in np.asarray(o["count"], np.float64).ravel())

    def totals(pick: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
        sums = {k: math.fsum(x for o in outs for x in pick(np.asarray(o[k], np.float64)).ravel())
                for k in ("correct", "loss")}
        return {"top1": sums["correct"] / max(count, 1.0), "loss": sums["loss"] / max(count, 1.0),
                "num_examples": int(count)}

    if members is None:
        return totals(lambda x: x)
    return [totals(lambda x, j=j: x[j]) for j in range(members)]


def evaluation_report(outs: Sequence[dict[str, Any]], class_names: Sequence[str],
                      member: int | None = None, predictions: bool = False) -> dict[str, Any]:
    """Per-class top-1 and the confusion matrix (rows: true class, columns: predicted) from
    host per-example outputs (`count`, `label`, `pred`; `pred` [members, B] with `member`),
    and with `predictions` every example's label and prediction in the split's order."""
    count = np.concatenate([np.asarray(o["count"]) for o in outs]) > 0
    labels = np.concatenate([np.asarray(o["label"]) for o in outs])
    preds = np.concatenate([np.asarray(o["pred"] if member is None else o["pred"][member])
                            for o in outs])
    n = len(class_names)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (labels[count], preds[count]), 1)
    totals = confusion.sum(1)
    per_class = [{"class": c, "count": int(t), "top1": float(confusion[i, i] / t) if t else None}
                 for i, (c, t) in enumerate(zip(class_names, totals, strict=True))]
    report: dict[str, Any] = {"class_names": list(class_names), "per_class": per_class,
                              "confusion": confusion.tolist()}
    if predictions:
        order = _split_order(outs)
        report["predictions"] = [
            {"index": int(i), "label": int(y), "prediction": int(p)}
            for i, y, p in sorted(zip(order[count], labels[count], preds[count], strict=True))]
    return report


def _split_order(outs: Sequence[dict[str, Any]]) -> np.ndarray:
    """Each fetched row's index in the evaluation split. Host h of P evaluates examples
    h, h + P, ... (`data.eval_dataset`), and a global batch holds each host's rows in turn."""
    p = jax.process_count()
    sizes = [len(np.asarray(o["count"])) // p for o in outs]  # each host's rows per batch
    return np.asarray([h + p * (i * n + r) for i, n in enumerate(sizes)
                       for h in range(p) for r in range(n)], np.int64)


def evaluate(model, variables, config, mesh: Mesh, num_examples: int | None = None,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Top-1 and loss over the evaluation split; each example counted exactly once.

    `num_examples` (the split's size, if known) gives the progress lines an ETA. With
    `class_names`, the result also has `report` (`evaluation_report`; with every prediction
    when `config.save_predictions`).
    """
    @jax.jit
    def step(variables, batch):
        logits = inference.in_steps(functools.partial(model.apply, variables), batch["image"],
                                    mesh)
        return {**example_outcomes(logits, batch), "count": batch["mask"],
                "label": batch["label"]}

    progress = Progress(f"Evaluating on {split_name(config)}", num_examples, "images")
    host = run_eval_batches(lambda batch: step(variables, batch), config, mesh, progress)
    metrics = eval_totals(host)
    if class_names is not None:
        metrics["report"] = evaluation_report(host, class_names,
                                              predictions=config.get("save_predictions", False))
    return metrics


def split_name(config: ml_collections.ConfigDict) -> str:
    """The evaluation split's name: 'val' (val200) or 'test'."""
    return "val" if config.split == "val" else "test"
