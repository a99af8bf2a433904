"""The device mesh of data-parallel training."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D data-parallel mesh ('data') over all devices, or `num_devices` of them.

    The devices keep `jax.devices()` order, so each host's devices hold one contiguous block
    of a batch. `num_devices` takes the same number from every host (its first N / P local
    devices, P hosts): the first N global devices would all be one host's on a pod, leaving
    the other hosts with no device of the mesh, so nothing they could feed or read.

    Args:
      num_devices: how many devices (0: all of them); a multiple of the number of hosts.

    Raises:
      ValueError: more devices than there are, or a count that does not split evenly over
        the hosts.
    """
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"config.num_devices={num_devices} but only {len(devices)} "
                         f"{devices[0].platform.upper()} devices are available (0: use all)")
    if num_devices:
        hosts = jax.process_count()
        if num_devices % hosts:
            raise ValueError(f"config.num_devices={num_devices} must be a multiple of the "
                             f"{hosts} hosts (each host takes the same number of its devices; "
                             f"0: use all)")
        per_host = num_devices // hosts
        by_host = {p: [d for d in devices if d.process_index == p] for p in range(hosts)}
        if any(len(own) < per_host for own in by_host.values()):
            counts = {p: len(own) for p, own in by_host.items()}
            raise ValueError(f"config.num_devices={num_devices} takes {per_host} devices of "
                             f"each of the {hosts} hosts, but they have {counts}")
        picked = {id(d) for own in by_host.values() for d in own[:per_host]}
        devices = [d for d in devices if id(d) in picked]  # in jax.devices() order
    return Mesh(np.asarray(devices), ("data",))
