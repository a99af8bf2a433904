"""Which variables train: one rule per method, and splitting variables by that rule.

A rule is a list of regular expressions over `collection/param/path` strings (e.g.
`queries/tokens`, `params/head/kernel`). Matching leaves are trainable and get optimiser
state; everything else is frozen and is passed to the model as a constant, so autodiff never
differentiates it (for VQT that is what keeps the backward pass out of the backbone).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax

from vqt_jax import methods

Flat = dict[str, Any]


def rule_for(method: str) -> tuple[str, ...]:
    """The trainable rule of a method name (see `methods.METHODS`)."""
    return methods.get(method).trainable


def flatten(variables: Mapping[str, Any]) -> Flat:
    """{'params': {'a': {'b': x}}} -> {'params/a/b': x}."""
    return flax.traverse_util.flatten_dict(dict(variables), sep="/")


def unflatten(flat: Flat) -> dict[str, Any]:
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def partition(variables: Mapping[str, Any], rule: Sequence[str]) -> tuple[Flat, Flat]:
    """Splits variables into (trainable, frozen) flat dicts according to a rule."""
    flat = flatten(variables)
    trainable = {k: v for k, v in flat.items() if any(re.fullmatch(p, k) for p in rule)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return trainable, frozen


def merge(trainable: Flat, frozen: Flat) -> dict[str, Any]:
    """Inverse of `partition`: the model's nested variables."""
    return unflatten({**frozen, **trainable})
