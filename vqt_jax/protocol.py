"""Training protocols by name: the config values that make a run the release's, or big_vision's.

A *protocol* is a set of config values that together reproduce one way of training, looked up
by name in `PROTOCOLS`; `settings` gives them for a task, and configs/vtab.py:TASK,PROTOCOL sets
each field from it once (every field stays overridable on the command line):

* `release` (the default): the official VQT release (github andytu28/VQT), which the paper's
  numbers need, setting for setting as its code does them: per-epoch batches with the last
  one partial (`drop_last=False`), the schedule stepped once per epoch, the head initialised
  as its `MLP(special_bias=True)`, `tf.image.resize` in float then ImageNet mean/std, exact
  GELU in the MLPs (its `h2t_vit.py`: `ACT2FN["gelu"]`), MAE's fresh `fc_norm`, the per-task
  query count T and compression stage of its `run_demo_exp.sh` (`data/tasks.py:
  RELEASE_SETTINGS`), both compression stages trained with the queries in train mode (query
  dropout on) and keeping `int(F * keep_frac)` features, compression on the final runs only,
  and as the reported number the compressed model's test top-1 where it compresses (its
  `collect_demo_exp_results.py` reads `keep_frac_0.7/runN`). Deliberate differences, each
  for the paper's intent: the backbone runs in eval mode throughout (the release leaves the
  supervised ViT's embedding dropout on, so its frozen backbone is not deterministic; eval
  mode is also what makes the key/value cache exact), and random numbers come from JAX, so
  seeds give other draws than torch's. The backbone file is the user's choice (`init`): the
  release's VTAB-1k numbers use its ImageNet-1k ViT-B/16 (see configs/vtab.py).
* `big_vision`: this project's earlier defaults, with the conventions of the Google
  checkpoints: inputs in [-1, 1] (big_vision's `value_range(-1, 1)`), resized images rounded
  to uint8, full batches that run across epoch boundaries, a zero-initialised head, tanh GELU
  (as the Google checkpoints were trained), MAE's pretrained final norm reused as `fc_norm`,
  compression on cached (eval-mode) features, T = 1 everywhere, the plain top-1 reported.

The VTAB-1k sweep that runs a protocol on many tasks is `vqt_jax.sweep`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from vqt_jax.protocol_tables import COMPRESSED_TOP1, PLAIN_TOP1


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One named way of training.

    Attributes:
      fields: config field ('a.b' paths) -> value.
      per_task: whether the release's per-task T and compression (`RELEASE_SETTINGS`) apply.
    """

    fields: Mapping[str, Any]
    per_task: bool = False


# The release's head bias: torch.nn.init.constant_(bias, -log((1 - 0.01) / 0.01)).
RELEASE_HEAD_BIAS = -math.log((1 - 0.01) / 0.01)

PROTOCOLS: Mapping[str, Protocol] = {
    # VQT release: per-epoch batches (last partial), epoch-stepped schedule, kaiming fan_out
    # head with bias -log(99), float resize + ImageNet mean/std, exact GELU, compressed top-1
    # reported where it compresses.
    "release": Protocol({
        "batching": "epoch",
        "schedule_per_epoch": True,
        "resize": "float",
        "normalization": "imagenet",
        "model.head_init": "kaiming_fan_out",
        "model.head_bias_init": RELEASE_HEAD_BIAS,
        "fc_norm_init": "fresh",
        "model.mlp_act": "gelu",
        "compression.train_mode": True,
        "report_metric": COMPRESSED_TOP1,
    }, per_task=True),
    # big_vision conventions: full batches across epochs, zero-init head, uint8 resize, inputs
    # in [-1, 1].
    "big_vision": Protocol({
        "batching": "stream",
        "schedule_per_epoch": True,
        "resize": "uint8",
        "normalization": "inception",
        "model.head_init": "zeros",
        "model.head_bias_init": 0.0,
        "fc_norm_init": "checkpoint",
        "model.mlp_act": "gelu_tanh",
        "compression.train_mode": False,
        "report_metric": PLAIN_TOP1,
    }),
}


def get(name: str) -> Protocol:
    """The protocol of a name; ValueError listing the known ones otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def settings(name: str, task: str | None = None) -> dict[str, Any]:
    """Every config value protocol `name` decides for `task`: config field ('a.b' path) ->
    value, `protocol` (its name), the protocol's `fields` and the query count T and
    compression stage (the release's per task, `data/tasks.py: RELEASE_SETTINGS`; T = 1
    without compression for other tasks and protocols). configs/vtab.py sets each once."""
    protocol = get(name)
    setting = None
    if protocol.per_task:
        # Imported here, and only here: the task table loads TensorFlow.
        from vqt_jax.data import tasks as tasks_lib  # noqa: PLC0415

        setting = tasks_lib.RELEASE_SETTINGS.get(task)
    return {"protocol": name, **protocol.fields,
            "model.num_queries": setting.num_queries if setting else 1,
            "compression.enabled": setting.compression if setting else False}


def reported(config: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """The number a run reports, as its protocol names it (`config.report_metric`).

    Args:
      config: The run's config (a ConfigDict or its recorded dict); without the field, the
        plain top-1.
      results: The run's results: 'top1' and, where the compression stage ran,
        'compression': {'top1': ...}.

    Returns:
      {'metric': the results key reported ('top1' or 'compression.top1'), 'top1': its value}.
    """
    wanted = config.get("report_metric", PLAIN_TOP1)
    if wanted not in (PLAIN_TOP1, COMPRESSED_TOP1):
        raise ValueError(f"config.report_metric={wanted!r}: choose {PLAIN_TOP1!r} or "
                         f"{COMPRESSED_TOP1!r}")
    compressed = results.get("compression")
    if wanted == COMPRESSED_TOP1 and isinstance(compressed, Mapping) and "top1" in compressed:
        return {"metric": COMPRESSED_TOP1, "top1": float(compressed["top1"])}
    return {"metric": PLAIN_TOP1, "top1": float(results["top1"])}


def batching(config: Mapping[str, Any]) -> str:
    """config.batching ('epoch' or 'stream'); configs without the field: 'stream'."""
    return config.get("batching", "stream")


def order_seed(config: Mapping[str, Any]) -> int:
    """The seed of the training examples' order: config.order_seed, or config.seed when it is
    unset (or the config has no such field)."""
    seed = config.get("order_seed")
    return config.seed if seed is None else seed


def round_resized(config: Mapping[str, Any]) -> bool:
    """Whether resized images are rounded to uint8 (config.resize 'uint8', also for configs
    without the field) rather than kept as float (the release's 'float')."""
    return config.get("resize", "uint8") == "uint8"


def describe(config: Mapping[str, Any]) -> str:
    """One line naming a config's protocol and preprocessing (for tables and logs)."""
    norm = config.get("normalization")
    norm = {"imagenet": "ImageNet mean/std", "inception": "[-1, 1]"}.get(norm, f"mean/std {norm}")
    resize = "uint8-rounded" if round_resized(config) else "float"
    return (f"protocol {config.get('protocol', '?')}: {config.get('image_size')} px bilinear "
            f"resize ({resize}), {norm}, {batching(config)} batching")
