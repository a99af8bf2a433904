"""The one step that turns a config and its overrides into the config a run trains and records.

`get_config` cannot know everything a run needs: the command line's `--config.FIELD=VALUE`, the
sweep's split/lr/wd/seed, the paths a preparation (`config.prepare`, e.g. the demo's) creates,
and the release recipe of a method chosen after the config was written. `resolve` applies them
in one recorded order:

  1. the overrides (dotted keys, existing fields only) on a deep copy;
  2. the preparation (`vqt_jax.preparations`), which may only fill fields left unset (None);
  3. the method's release recipe (`methods.RECIPE_FIELDS`), again only into unset fields.

So a value the config file or the user set is never changed after step 1, and the result is
what `workdir/config.json` records (`train.plan_run` resolves the config it is given; resolving
a resolved config changes nothing).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

from vqt_jax import methods, preparations


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A deep copy of `config` with the dotted-key `overrides` set.

    Only existing fields can be set, so a typo fails instead of being silently ignored;
    ConfigDict itself rejects a value of the wrong type.

    Raises:
      KeyError: a key (or one of its parents) is not a field of the config; names the key.
      TypeError: ConfigDict refuses the value's type.
    """
    # Deep copy: ConfigDict(config) would share the nested ConfigDicts (e.g. `model`).
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for depth, name in enumerate(parents):
            child = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise KeyError(f"config override {key!r}: {'.'.join(parents[:depth + 1])!r} "
                               "is not a nested config.")
            node = child
        if leaf not in node:
            raise KeyError(f"config override {key!r}: no such config field; fields here: "
                           f"{', '.join(sorted(node.keys()))}.")
        node[leaf] = value
    return config


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{'model.num_queries': 1, ...}: every leaf of the config under its dotted name."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(config.to_dict(), "")
    return out


def _prepare(config: ml_collections.ConfigDict) -> None:
    """Runs `config.prepare` (if set) on `config`, letting it fill unset fields only.

    Raises:
      ValueError: an unknown preparation, or one that changed a field that was set (a bug of
        the preparation: its fields are the user's to set).
    """
    name = config.get("prepare")
    if not name:
        return
    prepare = preparations.get(name)
    before = _flat(config)
    with config.unlocked():
        prepare(config)
    after = _flat(config)
    changed = [f"{k} ({v!r} -> {after.get(k, '<removed>')!r})" for k, v in before.items()
               if v is not None and (k not in after or after[k] != v)]
    if changed:
        raise ValueError(f"config.prepare={name!r} changed {', '.join(changed)}: a preparation "
                         "may only fill fields left unset (None).")


def _fill_recipe(config: ml_collections.ConfigDict) -> None:
    """Fills the unset (None or absent) `methods.RECIPE_FIELDS` from the method's recipe."""
    method = methods.get(config.method)
    with config.unlocked():
        for field in methods.RECIPE_FIELDS:
            if config.get(field) is None:
                config[field] = getattr(method, field)


def resolve(config: ml_collections.ConfigDict,
            overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The config that runs: `config` with `overrides`, its preparation and its method's recipe.

    `config` is not modified. Fields the config or `overrides` set are kept as they are; only
    unset (None) fields are filled, by the preparation (`config.prepare`) and then from the
    method's release recipe (optimizer, batch_size, warmup_epochs). Idempotent:
    `resolve(resolve(c)) == resolve(c)`.

    Args:
      config: A run config (e.g. `configs/vtab.py`'s `get_config(arg)`).
      overrides: Dotted field names to values (`{'model.num_queries': 10, 'lr': 0.3}`),
        applied first; existing fields only.

    Returns:
      A new ConfigDict, FieldReferences resolved: what `workdir/config.json` records.

    Raises:
      KeyError, TypeError: an override the config does not accept (`apply_overrides`).
      ValueError: an unknown method or preparation, or a preparation that changed a set field.
      FileNotFoundError: a preparation's inputs are not installed.
    """
    out = apply_overrides(config, overrides or {}).copy_and_resolve_references()
    _prepare(out)
    _fill_recipe(out)
    return out
