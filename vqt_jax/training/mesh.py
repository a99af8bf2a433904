"""The device mesh of data-parallel training."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D data-parallel mesh ('data') over all devices (or the first `num_devices`), in
    `jax.devices()` order, so each host's devices hold one contiguous block of a batch."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"config.num_devices={num_devices} but only {len(devices)} "
                         f"{devices[0].platform.upper()} devices are available (0: use all)")
    if num_devices:
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))
