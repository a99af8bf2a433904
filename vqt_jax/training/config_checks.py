"""Fail-fast checks of a training config: one clear error, before any data or compilation."""

from __future__ import annotations

import math
import os

import ml_collections

from vqt_jax import data, methods, protocol
from vqt_jax.checkpoints import resample, split_subtree
from vqt_jax.models import decode_variant
from vqt_jax.models.vit import HEAD_INITS, POOL_TYPES
from vqt_jax.training import feature_heads, optim

SPLITS = ("val", "test")
KV_DTYPES = ("float32", "bfloat16", "float16")
NORMALIZATIONS = ("inception", "imagenet")
# Config fields with a fixed set of values.
CHOICES: dict[str, tuple[str, ...]] = {
    "cache": ("auto", "on", "off"), "cache_dtype": ("float32", "bfloat16"),
    "cache_storage": ("disk", "memory"), "cache_on_device": ("auto", "on", "off"),
    "batching": data.BATCHINGS, "resize": ("float", "uint8"),
    "fc_norm_init": ("fresh", "checkpoint"), "posemb_resample": (resample.AUTO, *resample.RULES)}
# config.model fields with a fixed set of values: (default, the values).
MODEL_CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pool_type": ("tok", POOL_TYPES), "head_init": ("zeros", tuple(HEAD_INITS))}


def check(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int) -> None:
    """Raises ValueError (or FileNotFoundError for a missing local checkpoint) naming the field.

    Args:
      config: the run's config.
      num_devices: devices in the mesh (the global batch must split evenly over them).
      process_count: hosts (each reads an equal slice of every batch).
    """
    if config.task != data.FOLDER and config.task not in data.TASKS:
        raise ValueError(f"config.task={config.task!r} is not a VTAB-1k task or 'folder'; "
                         f"tasks: {', '.join(data.task_names())}")
    if config.split not in SPLITS:
        raise ValueError(f"config.split={config.split!r}: must be one of {SPLITS}")
    methods.get(config.method)
    if config.get("protocol"):
        protocol.get(config.protocol)
    for field, (default, allowed) in MODEL_CHOICES.items():
        if (value := config.model.get(field, default)) not in allowed:
            raise ValueError(f"config.model.{field}={value!r}: choose from "
                             f"{', '.join(allowed)}")
    if (name := config.get("optimizer")) is not None and name not in optim.OPTIMIZERS:
        raise ValueError(f"config.optimizer={name!r}: choose from {', '.join(optim.OPTIMIZERS)}")
    for field, allowed in CHOICES.items():
        if field in config and config[field] not in allowed:
            raise ValueError(f"config.{field}={config[field]!r}: choose from {allowed}")
    for name in ("lr", "wd", "epochs", "warmup_epochs", "max_loss"):
        value = config.get(name, 0)
        if not isinstance(value, (int, float)) or math.isnan(value) or (
                math.isinf(value) and name != "max_loss"):
            raise ValueError(f"config.{name} must be a finite number, got {value}")
    for name in ("lr", "batch_size", "epochs", "image_size", "max_loss"):
        if not config.get(name, math.inf) > 0:
            raise ValueError(f"config.{name} must be > 0, got {config[name]}")
    if config.wd < 0:
        raise ValueError(f"config.wd must be >= 0, got {config.wd}")
    if config.get("num_devices", 0) < 0:
        raise ValueError(f"config.num_devices must be >= 0 (0: every device), got "
                         f"{config.num_devices}")
    if not 0 <= config.warmup_epochs <= config.epochs:
        raise ValueError(
            f"config.warmup_epochs={config.warmup_epochs} must be in [0, epochs={config.epochs}]")
    for name in ("batch_size", "eval_batch_size"):
        size = config.get(name) or config.batch_size
        if size % num_devices or size % process_count:
            raise ValueError(f"config.{name}={size} is not divisible by the {num_devices} "
                             f"devices ({process_count} hosts) it is split over")
    n = config.normalization
    if isinstance(n, str):
        if n not in NORMALIZATIONS:
            raise ValueError(
                f"config.normalization={n!r}: use {NORMALIZATIONS} or a (mean, std) pair")
    elif len(n) != 2 or any(len(x) != 3 for x in n):
        raise ValueError(f"config.normalization={n!r}: a (mean, std) pair of 3-tuples")
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    if (dtype := model.get("dtype", "float32")) not in KV_DTYPES:
        raise ValueError(f"config.model.dtype={dtype!r}: an unknown compute dtype; choose from "
                         f"{KV_DTYPES}")
    if (kv_dtype := model.get("kv_dtype")) is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"config.model.kv_dtype={kv_dtype!r}: an unknown dtype; choose from "
                         f"{KV_DTYPES} (or leave it unset for the compute dtype)")
    patch = model.get("patch_size") or decode_variant(
        model.get("variant") or "B/16").get("patch_size", (16, 16))
    if (not isinstance(patch, (tuple, list)) or len(patch) != 2
            or not all(isinstance(p, int) and p > 0 for p in patch)):
        raise ValueError(f"config.model.patch_size={patch!r}: a (height, width) pair of "
                         "positive integers, e.g. --config.model.patch_size='(16, 16)'")
    if config.image_size % patch[0] or config.image_size % patch[1]:
        raise ValueError(f"config.image_size={config.image_size} is not a multiple of the "
                         f"patch size {patch[0]}x{patch[1]}")
    # The command line sets these as strings (their default is 'auto'); resolve parses the
    # ones it can, and a model must not build LayerScale from a truthy 'yes'.
    for name, kind, values in (("layerscale", bool, "True or False"),
                               ("num_registers", int, "an integer >= 0")):
        if not isinstance(model.get(name, kind()), kind):
            raise ValueError(f"config.model.{name}={model[name]!r}: {values}, or 'auto' (read "
                             "from config.init's file)")
    for name in ("num_queries", "num_prompts", "adapter_dim", "lora_rank", "num_registers"):
        if model.get(name, 0) < 0:
            raise ValueError(f"config.model.{name} must be >= 0, got {model[name]}")
    methods.model_kwargs(config.method, model)  # the sizes of the parts it needs are > 0
    feature_heads.check(config)
    if "compression" in config and (c := config.compression).enabled:
        if not 0 < c.keep_frac <= 1:
            raise ValueError(f"config.compression.keep_frac={c.keep_frac} must be in (0, 1]")
        if c.lasso < 0 or c.epochs <= 0 or c.lr_scale <= 0:
            raise ValueError("config.compression: lasso must be >= 0, epochs and lr_scale > 0")
    if config.init:
        path, _ = split_subtree(config.init)
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"config.init: checkpoint file not found: {path}")
