"""A run's batches: training ones from its cache when it has one, else from the images, and
the evaluation split's."""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np
from jax.sharding import Mesh

from vqt_jax import cache as cache_lib
from vqt_jax import data, protocol, sampling
from vqt_jax.training import train_step


def train_batches(config: ml_collections.ConfigDict, cache: cache_lib.Cache | None, *,
                  start_step: int = 0, rows: slice | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """This host's slices of the run's endless training batches, from global step
    `start_step`: the same examples in the same order either way (config's seed, batch size
    and batching), with 'label' and 'mask'; cached fields (`train_step.CACHE_INPUTS`) from a
    cache, normalised 'image' otherwise.

    Args:
      config: the run's config.
      cache: the host cache, or None to read the images.
      start_step: the first global step.
      rows: the slots of each global batch this host feeds (`sampling.host_rows` of the
        batch sharding); default: this process's equal share, in process order.
    """
    rows = rows or sampling.process_rows(config.batch_size)
    if cache is not None:
        return cache_lib.train_batches(
            cache, global_batch_size=config.batch_size, seed=protocol.order_seed(config),
            start_step=start_step, fields=[k for k in train_step.CACHE_INPUTS if k in cache.arrays],
            batching=protocol.batching(config), rows=rows)
    local = rows.stop - rows.start
    if rows.start % local or config.batch_size % local:
        raise ValueError(f"This host's slots {rows.start}..{rows.stop - 1} of the global batch "
                         "are not one of equal per-host slices")
    return data.make_train_iterator(
        config.task, config.data_dir, config.split, global_batch_size=config.batch_size,
        image_size=config.image_size, normalization=data.as_normalization(config.normalization),
        seed=protocol.order_seed(config), start_step=start_step, batching=protocol.batching(config),
        round_resized=protocol.round_resized(config), process_index=rows.start // local,
        process_count=config.batch_size // local)


def eval_batches(config: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[dict]:
    """This host's slices of the padded, masked evaluation batches of `config.split`."""
    return data.make_eval_iterator(
        config.task, config.data_dir, config.split, image_size=config.image_size,
        global_batch_size=config.eval_batch_size or config.batch_size,
        normalization=data.as_normalization(config.normalization),
        local_device_count=len(mesh.local_devices), round_resized=protocol.round_resized(config))
