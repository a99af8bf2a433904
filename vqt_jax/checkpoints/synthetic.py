"""Randomly initialised backbones written as real checkpoint files, for benchmarks whose time
does not depend on the weights' values (nothing can be downloaded on an offline machine)."""

from __future__ import annotations

import io
import os

import jax
import jax.numpy as jnp
import numpy as np

from vqt_jax import trainable, workdir
from vqt_jax.models import create_model


def write_random_npz(path: str, image_size: int, **model) -> str:
    """Writes a big_vision-layout `.npz` of a randomly initialised ViT backbone (no head), built
    by `create_model(**model)` (e.g. `variant="B/16"`), unless `path` exists; returns `path`."""
    if os.path.exists(path):
        return path
    init = jax.jit(create_model(num_classes=0, **model).init)
    params = init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))["params"]
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in trainable.flatten(params).items()})
    workdir.write_bytes(path, buf.getvalue())  # atomically: a killed write leaves no `path`
    return path
