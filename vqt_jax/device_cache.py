"""The cache held in the devices' memory: rows sharded over the data axis, batches gathered
on the device, so a compiled loop trains from it without the host (`training/engine.py`).

A host cache (`cache.py`, memory or disk) gathers every batch's rows in Python and copies
them to the device each step: on an accelerator that traffic, not the query path, sets the
pace (886 MiB per batch of 128 at ViT-B/16 in bfloat16). Held on the devices, the cache
costs each device 1/D of it (D devices on the data axis), and a step moves only what it
gathers.

Layout: each field is a global array ``[ceil(N / D), D, ...]`` sharded over its second axis,
so example r is row ``r div D`` of device ``r mod D``'s shard (round-robin; the last row of
some devices is zero padding that no index reaches). Each host builds only its devices'
shards (`jax.make_array_from_callback`), reading those rows from its complete host cache, or
from `cache.DeviceRows`, which holds no other rows (`cache.build_device_rows`). With one
device the layout is the host cache's own, and on a CPU the device array is the host cache's
memory itself (no copy).

Floats of 16 bits (the bfloat16 cache) are held as their bit patterns (uint16) and turned back
after each gather (`DeviceCache.gather`): XLA:CPU gathers and slices bfloat16 in float32, and
inside a compiled loop it hoists that conversion of the whole cache out of the loop, making a
float32 copy of all of it, twice the cache's bytes (see tests/test_device_cache.py). Integers
are moved as they are, on any device.

Gathering (`DeviceCache.gather`, inside jit): a batch's B slots split into D blocks of B / D,
device j's block being the slots it ends up with. Each block travels once around a ring of the
devices (D - 1 `ppermute`s), and every device it visits writes into it the rows it holds, so
each device holds blocks of B / D rows, never the whole batch (a gather in which each device
built all B slots, its rows and zeros elsewhere, and reduce-scattered them held B rows per
device: B x S for S members with their own orders). A fixed-shape exchange keyed by owner
would not do: a random batch's rows are not spread evenly over their owners. Rows are copied,
never summed, so a batch is exact in any dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import cache as cache_lib

AXIS = "data"
# The share of a device's memory the cache and one batch's gather may take; the rest is for
# the model, its activations and the optimiser.
DEVICE_FRACTION = 0.5
# Field dtypes held on the devices as their bit patterns (see the module docstring).
BIT_PATTERNS = {np.dtype(ml_dtypes.bfloat16): np.dtype(np.uint16),
                np.dtype(np.float16): np.dtype(np.uint16)}


@dataclasses.dataclass(frozen=True)
class DeviceCache:
    """A cache on the devices.

    Attributes:
      arrays: field name (and 'label') -> global array ``[ceil(N / D), D, ...]`` sharded
        ``P(None, 'data')``; 16-bit floats as their bit patterns (`BIT_PATTERNS`).
      num_examples: N.
      mesh: the mesh the arrays live on.
      dtypes: field name -> the dtype its rows have once gathered (the host cache's).
    """

    arrays: dict[str, jax.Array]
    num_examples: int
    mesh: Mesh
    dtypes: dict[str, np.dtype]

    def gather(self, arrays: dict[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
        """The rows `index` (int [B], replicated) of `arrays` (this cache's `arrays`, or some
        of them, as a jitted function sees them) in their own dtypes, as a batch sharded over
        the data axis; for use inside jit (see the module docstring)."""
        rows = _gather(arrays, index, self.mesh)
        return {k: v if v.dtype == self.dtypes[k] else
                jax.lax.bitcast_convert_type(v, self.dtypes[k]) for k, v in rows.items()}


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a field of `dtype` is held in on the devices (`BIT_PATTERNS`, else its own)."""
    return BIT_PATTERNS.get(np.dtype(dtype), np.dtype(dtype))


def local_memory_limit(mesh: Mesh) -> int | None:
    """The least memory (`bytes_limit`) among this host's devices in `mesh`, or None where
    none reports it (a CPU).

    Only this host's devices are asked: another host's cannot be (its `memory_stats` raises).
    Each host thus answers for its own devices; a decision taken from the answer must be
    combined across hosts (`hosts.all_agree`, as every caller does), so that every host
    decides as the one with the least memory does.
    """
    def bytes_limit(device: jax.Device) -> int:
        try:
            return int((device.memory_stats() or {}).get("bytes_limit") or 0)
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            return 0

    return min(filter(None, map(bytes_limit, mesh.local_devices)), default=None)


def why_not(spec: cache_lib.Spec, fields: list[str], mesh: Mesh, batch_size: int) -> str | None:
    """Why the cache cannot live on this host's devices of `mesh`, or None if it fits.

    A device that reports its memory (GPU, TPU) must keep `DEVICE_FRACTION` of it for the
    cache; a CPU device is the host's memory, which the host cache's own budget
    (`config.cache_max_gb`) already bounds. The answer is this host's
    (`local_memory_limit`): combine it across hosts with `hosts.all_agree`.
    """
    d = mesh.shape[AXIS]
    # A device holds its share of the rows plus a batch's gather, which at any time holds
    # three blocks of B / D rows (the rows a pass reads, the partial batch it fills and the
    # one it receives; see `_gather`); + 4 bytes for the int32 label.
    rows = math.ceil(spec.num_examples / d) + 3 * math.ceil(batch_size / d)
    need = rows * (sum(spec.row_bytes[f] for f in fields) + 4)
    limit = local_memory_limit(mesh)
    if limit and need > DEVICE_FRACTION * limit:
        return (f"each device would hold {cache_lib.format_size(need)} of the cache, over "
                f"{DEVICE_FRACTION:g} of its {cache_lib.format_size(limit)} "
                f"({mesh.local_devices[0].device_kind})")
    return None


def upload(cache: cache_lib.Cache | cache_lib.DeviceRows, mesh: Mesh,
           fields: list[str]) -> DeviceCache:
    """The device copy of `fields` (and the labels) of a host cache, in the layout above.

    Each host reads only the rows of its own devices: from a complete host cache
    (`cache_lib.Cache`), or from `cache_lib.DeviceRows`, which holds no others.
    """
    n, d = cache.spec.num_examples, mesh.shape[AXIS]
    blocks = math.ceil(n / d)
    sharding = NamedSharding(mesh, P(None, AXIS))
    rows_only = isinstance(cache, cache_lib.DeviceRows)
    host = cache.rows if rows_only else cache
    sources = {name: host.arrays[name] for name in fields} | {"label": host.labels}
    dtypes = {name: src.dtype for name, src in sources.items()}
    if rows_only and (cache.num_devices, cache.columns) != (d, cache_lib.local_columns(mesh)):
        raise ValueError(f"Rows of columns {cache.columns} of {cache.num_devices} devices cannot "
                         f"be placed on this host's columns {cache_lib.local_columns(mesh)} of {d}")
    if not rows_only and d == 1:
        # One device holds every row in order: the layout is the host array's own. On a
        # CPU the device array then aliases the host cache's memory (a disk cache's memory
        # map is page-aligned, which XLA accepts), so the "device" copy costs no memory at
        # all (a copy is staged through a second one: twice the cache). Elsewhere it is
        # one copy to the device.
        return DeviceCache({name: jax.device_put(
            src.view(stored_dtype(src.dtype)).reshape(n, 1, *src.shape[1:]), sharding,
            may_alias=True) for name, src in sources.items()}, n, mesh, dtypes)

    def shard(name: str, index: tuple[slice, ...]) -> np.ndarray:
        cols = range(*index[1].indices(d))
        src = sources[name]
        out = np.zeros((blocks, len(cols), *src.shape[1:]), stored_dtype(src.dtype))
        for j, c in enumerate(cols):
            # Device column c holds examples c, c + D, ...: a strided view, copied once
            # (fancy indexing would stage a second copy of the whole column first).
            rows = cache.column(name, c) if rows_only else src[c::d]
            out[:len(rows), j] = rows.view(out.dtype)
        return out

    arrays = {name: jax.make_array_from_callback(
        (blocks, d, *src.shape[1:]), sharding, lambda idx, name=name: shard(name, idx))
        for name, src in sources.items()}
    return DeviceCache(arrays, n, mesh, dtypes)


def _gather(arrays: dict[str, jax.Array], index: jax.Array, mesh: Mesh) -> dict[str, jax.Array]:
    """`DeviceCache.gather` before the bit patterns are turned back into floats."""
    d = mesh.shape[AXIS]
    if d == 1:
        # One device holds every row: a plain gather. The ring below would copy the batch
        # more times for nothing (on a CPU that copying was most of the demo's step).
        return {name: a[index, 0] for name, a in arrays.items()}
    if index.shape[0] % d:
        raise ValueError(f"a batch of {index.shape[0]} rows does not split over {d} devices")
    m = index.shape[0] // d
    # Device i passes what it has filled to device i - 1 (a ring): after D - 1 passes each
    # partial batch has visited every device and reached its own.
    ring = [(i, (i - 1) % d) for i in range(d)]

    def local(shards: dict[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
        me = jax.lax.axis_index(AXIS)

        def fill(t: jax.Array, partial: dict[str, jax.Array]) -> dict[str, jax.Array]:
            # At pass t this device holds device (me + 1 + t) mod D's slots; it writes the
            # rows it owns into them.
            owner_of = (me + 1 + t) % d
            slots = jax.lax.dynamic_slice_in_dim(index, owner_of * m, m)
            mine = slots % d == me
            row = jnp.where(mine, slots // d, 0)
            # Slots this device owns take its rows; the others keep what they hold.
            return {name: jnp.where(mine.reshape(-1, *[1] * (s.ndim - 2)), s[row, 0], partial[name])
                    for name, s in shards.items()}

        # A loop, not D unrolled passes: unrolled, the passes' gathers depend only on the
        # index, so XLA may run them all first and hold B rows again.
        # (The carry varies over the data axis, as the passes' outputs do.)
        empty = {name: jax.lax.pcast(jnp.zeros((m, *s.shape[2:]), s.dtype), AXIS,
                                     to="varying") for name, s in shards.items()}
        partial = jax.lax.fori_loop(
            0, d - 1, lambda t, p: jax.lax.ppermute(fill(t, p), AXIS, ring), empty)
        return fill(jnp.asarray(d - 1), partial)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, AXIS), P()),
                         out_specs=P(AXIS))(arrays, index)
