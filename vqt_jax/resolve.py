"""The one step that turns a config and its overrides into the config a run trains and records.

`get_config` cannot know everything a run needs: the command line's `--config.FIELD=VALUE`, the
sweep's split/lr/wd/seed, the paths a preparation (`config.prepare`, e.g. the demo's) creates,
and the release recipe of a method chosen after the config was written. `resolve` applies them
in one recorded order:

  1. the overrides (dotted keys, existing fields only) on a deep copy;
  2. the preparation (`vqt_jax.preparations`), which may only fill fields left unset (None);
  3. the model options left 'auto' (`introspect.DEFAULTS`' fields): `mlp_act` from the
     protocol where it sets one, then from `init`'s file (`checkpoints.introspect`, read
     before any model is built), else their documented defaults; one INFO line says which. A
     set option the file contradicts is an error naming the flag (`mlp_act`: a warning);
  4. the method's release recipe (`methods.RECIPE_FIELDS`), again only into unset fields.

So a value the config file or the user set is never changed after step 1, and the result (no
'auto' left) is what `workdir/config.json` records (`train.plan_run` resolves the config it is
given; resolving a resolved config changes nothing).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from vqt_jax import methods, preparations, protocol, workdir
from vqt_jax.checkpoints import CheckpointError, introspect, split_subtree
from vqt_jax.models.vit import POOL_TYPES

AUTO = "auto"


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


def _prepare(config: ml_collections.ConfigDict) -> None:
    """Runs `config.prepare` (if set) on `config`, letting it fill unset fields only.

    Raises:
      ValueError: an unknown preparation, or one that changed a field that was set (a bug of
        the preparation: its fields are the user's to set).
    """
    name = config.get("prepare")
    if not name:
        return
    before = workdir.flatten(config.to_dict())
    with config.unlocked():
        preparations.get(name)(config)
    after = workdir.flatten(config.to_dict())
    if changed := [f"{k} ({v!r} -> {after.get(k, '<removed>')!r})" for k, v in before.items()
                   if v is not None and (k not in after or after[k] != v)]:
        raise ValueError(f"config.prepare={name!r} changed {', '.join(changed)}: a preparation "
                         "may only fill fields left unset (None).")


def _set(node: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets a field to a value of another type than its 'auto' (a type-safe ConfigDict refuses)."""
    with node.unlocked():
        del node[key]
        node[key] = value


def _conflicts(model: ml_collections.ConfigDict, field: str, value: Any, told: Any) -> bool:
    """Whether a set option cannot load (or, mlp_act, cannot run) a file that tells `told`."""
    if field == "variant":  # custom sizes (variant None, a patch_size) are the loader's to check
        return isinstance(value, str) and model.get("patch_size") is None and value != told
    if field == "pool_type":  # without a MAP head, an explicit class_token decides the loading
        return value in POOL_TYPES and value != told and (
            "map" in (value, told) or model.get("class_token") is None)
    return value != told


def unresolved(model: Mapping[str, Any]) -> list[str]:
    """The fields of `model` (a config.model) that `resolve` fills and that are still 'auto'.

    Other fields may be 'auto' too (`attention`: the model chooses it itself)."""
    return [f for f in introspect.DEFAULTS if model.get(f) == AUTO]


def _from_checkpoint(config: ml_collections.ConfigDict, download: bool) -> None:
    """Resolves the `config.model` options left 'auto' (see the module docstring).

    Raises:
      FileNotFoundError, CheckpointError: `init` is missing or unreadable while options are
        'auto'. ValueError: a set option contradicts the file, or no named variant fits it.
    """
    model, init = config.get("model"), config.get("init") or ""
    if model is None:  # a config without a model (a stand-in of the sweep's tests)
        return
    for field, parse in (("layerscale", {"true": True, "false": False}.get),
                         ("num_registers", lambda v: int(v) if v.isdigit() else None)):
        value = model.get(field)  # the command line sets a field typed 'auto' as a string
        if isinstance(value, str) and parse(value.lower()) is not None:
            _set(model, field, parse(value.lower()))
    if not (auto := unresolved(model)):
        return
    fixed = protocol.settings(config.protocol) if config.get("protocol") else {}
    if "mlp_act" in auto and "model.mlp_act" in fixed:  # the protocol's before the file's
        _set(model, "mlp_act", fixed["model.mlp_act"])
        auto.remove("mlp_act")
    try:
        told = (introspect.model_options(init, download) if init else None) or {}
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--config.init: checkpoint file not found: {split_subtree(init)[0]} (the model "
            f"options left 'auto', {', '.join(auto)}, are read from it)") from None
    except CheckpointError as e:
        raise CheckpointError(f"--config.init: {e}") from None
    for field in introspect.DEFAULTS:
        value, have = told.get(field), model.get(field)
        if field in auto or value is None or not _conflicts(model, field, have, value):
            continue
        what = f"is a {told['described']}" if field == "variant" else f"has {field}={value!r}"
        message = (f"checkpoint {init} {what} but config.model.{field}={have!r}; set "
                   f"--config.model.{field}={value}")
        if field != "mlp_act":
            raise ValueError(f"{message} (or 'auto')")
        # A protocol may run a file with another activation on purpose (the release's exact
        # GELU on tanh-GELU files), so this is said, not refused.
        logging.warning("%s to run it as it was trained", message)
    if "variant" in auto and told and told["variant"] is None:
        raise ValueError(f"checkpoint {init} is {told['described']}, which no named variant "
                         "has: set config.model.variant=None and its sizes (width, depth, "
                         "mlp_dim, num_heads, patch_size) in a config file")
    inferred = {f: told[f] for f in auto if told.get(f) is not None}
    for field in auto:
        _set(model, field, inferred.get(field, introspect.DEFAULTS[field]))
    defaults = ", ".join(f"{f}={model[f]!r}" for f in auto if f not in inferred)
    why = "no init" if not init else "not downloaded yet" if not told else "the file does not tell"
    logging.info("model options 'auto' read from %s: %s%s", init or "no init",
                 ", ".join(f"{f}={v!r}" for f, v in inferred.items()) or "none",
                 f"; defaults ({why}): {defaults}" if defaults else "")


def _fill_recipe(config: ml_collections.ConfigDict) -> None:
    """Fills the unset (None or absent) `methods.RECIPE_FIELDS` from the method's recipe."""
    method = methods.get(config.method)
    with config.unlocked():
        for field in methods.RECIPE_FIELDS:
            if config.get(field) is None:
                config[field] = getattr(method, field)


def resolve(config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None = None, *,
            download: bool = False) -> ml_collections.ConfigDict:
    """The config that runs: `config` with `overrides`, its preparation and its method's recipe.

    `config` is not modified. Fields the config or `overrides` set are kept as they are; only
    unset (None) fields are filled, by the preparation (`config.prepare`) and then from the
    method's release recipe (optimizer, batch_size, warmup_epochs), and model options left
    'auto' are read from `init`'s file (see the module docstring). Idempotent:
    `resolve(resolve(c)) == resolve(c)`.

    Args:
      config: A run config (e.g. `configs/vtab.py`'s `get_config(arg)`).
      overrides: Dotted field names to values (`{'model.num_queries': 10, 'lr': 0.3}`),
        applied first; existing fields only.
      download: fetch an http(s) `init` not downloaded yet to read its 'auto' options (a run
        downloads it anyway); otherwise they take their defaults until it is downloaded.

    Returns:
      A new ConfigDict, FieldReferences resolved: what `workdir/config.json` records.

    Raises:
      KeyError, TypeError: an override the config does not accept (`apply_overrides`).
      ValueError: an unknown method or preparation, a preparation that changed a set field, a
        model option that contradicts `init`'s file, or `init` unreadable (CheckpointError)
        while model options are 'auto'.
      FileNotFoundError: a preparation's inputs are not installed, or `init` is missing while
        model options are 'auto'.
    """
    out = apply_overrides(config, overrides or {}).copy_and_resolve_references()
    _prepare(out)
    _from_checkpoint(out, download)
    _fill_recipe(out)
    return out
