"""Where a run's cache of the frozen backbone comes from: whether the run trains from one
(`plan_cache`, before anything compiles), where it lives (`default_cache_dir`: this host's
disk, never the workdir), opening or building it (`get_cache`), and whether it goes on the
devices (`why_not_on_device`). Every decision is the same on every host.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from vqt_jax import cache as cache_lib
from vqt_jax import checkpoints, data, hosts, methods
from vqt_jax import device_cache as device_cache_lib
from vqt_jax.protocol import round_resized
from vqt_jax.training import train_step

# The subdirectory of the vqt_jax cache directory ($VQT_JAX_CACHE, ~/.cache/vqt_jax) that holds
# the caches of the frozen backbone when a config leaves `cache_dir` unset.
FEATURES_SUBDIR = "features"


def default_cache_dir() -> str:
    """Where caches of the frozen backbone go unless `config.cache_dir` says otherwise:
    $VQT_JAX_CACHE/features (default ~/.cache/vqt_jax/features), on this host's own disk.

    Never under the workdir, which is often shared (NFS, gs://): a cache is memory-mapped and
    read a few shuffled rows at a time, which over a network file system is a network read
    each, and every host of a multi-host run keeps a copy of its own (see `plan_cache`).
    Entries are named by the cache's content fingerprint (`cache.fingerprint`), so every run
    and sweep of the same data and backbone shares one entry, whatever its workdir; concurrent
    builds of one entry are safe (`cache.build`). Every default entry lives in this one
    directory.

    Where the home directory is itself on a network file system, point $VQT_JAX_CACHE (or
    `config.cache_dir`) at a local disk: `plan_cache` warns of a cache directory on one
    (`network_file_system`).
    """
    return os.path.join(checkpoints.files.cache_dir(), FEATURES_SUBDIR)


# The mount table: where each file system is mounted, and its type.
MOUNTS = "/proc/self/mounts"
# File system types whose files are on another machine, so that reading them is a network
# round trip (FUSE ones are typed "fuse.<name>").
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "fuse.sshfs", "fuse.gcsfuse", "fuse.s3fs", "fuse.glusterfs", "fuse.cephfs",
    "fuse.juicefs", "fuse.rclone"})


def network_file_system(path: str) -> str | None:
    """The type of the network file system that holds `path` (or would, once created), e.g.
    'nfs4'; None for a local one, or where the mount table cannot be read (not Linux)."""
    path = os.path.realpath(path)  # judged by its path alone, so it need not exist yet
    try:
        with open(MOUNTS) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    point, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # The table writes a space, tab, newline or backslash in a path as an octal escape.
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(point):  # the innermost mount; a later one hides
            point, kind = mount, fields[2]
    return kind if kind in NETWORK_FILE_SYSTEMS else None


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """The cache a run will use: its contents and where it lives (None: host memory)."""

    spec: cache_lib.Spec
    path: str | None


def plan_cache(config: ml_collections.ConfigDict, model, num_train: int,
               workdir: str) -> CachePlan | None:
    """Decides, before anything compiles, whether this run trains from a cache.

    `config.cache`: 'off' never; 'auto' when the method allows it and the cache fits
    `config.cache_max_gb` (and the disk), otherwise it says why and trains uncached; 'on' as
    'auto' but a method or budget that does not allow it is an error. The cache's size and
    location are logged before it is built. A disk cache goes to `config.cache_dir`, else to
    `default_cache_dir()`; `workdir` (the run's) does not place it and is only named in the
    log line.

    Raises:
      ValueError: with `config.cache='on'`, naming why the run cannot be cached.
    """
    mode = config.get("cache", "off")
    if mode == "off":
        return None
    kind = cache_lib.kind_for(config.method)
    why = None
    if kind is None:
        why = (f"method {config.method!r} changes the backbone's tokens, so nothing it reads "
               "is constant")
    elif kind == "kv" and jax.default_backend() == "cpu" and model.compute_dtype == jnp.bfloat16:
        # XLA says so only when the first training steps run, after the workdir is written.
        why = (f"config.model.dtype='bfloat16' on CPU: XLA's CPU backend (jax {jax.__version__}) "
               "has no bfloat16 x bfloat16 -> float32 matmul, which training the query path "
               "over a cache needs (config.model.dtype='float32' trains from a cache)")
    if why is not None:
        if mode == "on":
            raise ValueError(f"config.cache='on' but {why}; use config.cache='auto' or 'off'")
        logging.info("Training without a cache: %s.", why)
        return None
    spec = cache_lib.spec_for(model, kind, num_train, config.image_size, config.cache_dtype)
    path = None
    if config.cache_storage == "disk":
        kwargs = methods.model_kwargs(config.method, dict(config.model))
        directory = config.get("cache_dir") or default_cache_dir()
        if (remote := network_file_system(directory)) is not None:
            logging.warning(
                "The cache directory %s is on a network file system (%s): the memory-mapped "
                "cache will be read over the network; set config.cache_dir or $VQT_JAX_CACHE "
                "to a local disk.", directory, remote)
        name = cache_lib.fingerprint(config, kwargs, kind)
        if jax.process_count() > 1:
            # Every host keeps its own copy on its own disk (see cache.py): a complete one
            # where the run reads the host cache, which reads rows in any order, else only its
            # devices' rows (`train._run_locked`). The suffix keeps the hosts' copies apart
            # where cache_dir is shared by the hosts.
            name += f"-host{jax.process_index()}"
            logging.info("Every host keeps its own copy of the cache on its own disk: a "
                         "complete one where the host cache serves what does not fit the "
                         "devices (it reads rows in any order), else only its devices' rows.")
        path = os.path.join(directory, name)
    where = path or "host memory"
    if path is not None and not config.get("cache_dir"):
        where += (f" (this host's disk, not the workdir {workdir}: set config.cache_dir or "
                  "$VQT_JAX_CACHE to choose)")
    logging.info("Cache of the frozen backbone (%s): %s, in %s.", kind, spec.describe(), where)
    exists = path is not None and os.path.exists(os.path.join(path, "meta.json"))
    why = None if exists else cache_lib.check_budget(spec, path, config.cache_max_gb)
    # One decision for all hosts (they compile the same program): cached only if every one
    # can hold its copy.
    if not hosts.all_agree(why is None):
        why = why or "another host cannot hold its copy of the cache (see that host's log)"
    if why is not None:
        if mode == "on":
            raise ValueError(f"config.cache='on' but {why}")
        logging.warning("Training without a cache: %s.", why)
        return None
    return CachePlan(spec, path)


def get_cache(plan: CachePlan, config: ml_collections.ConfigDict, model, variables,
              mesh: Mesh, keep_float32: slice | None = None, *, device_rows: bool = False
              ) -> cache_lib.Cache | cache_lib.DeviceRows | None:
    """Opens the planned cache if it is complete, else builds it (one backbone pass).

    A disk too full for the cache (on any host) is an error with `config.cache='on'`; with
    'auto' the run says so and trains without the cache (None). Every host decides alike.
    A cache built here keeps the rows `keep_float32` in float32 too (`Cache.float32`); one
    opened from disk has none. With `device_rows` (every host alike), only the rows of this
    host's devices in `mesh` (`cache.DeviceRows`, for the device-resident cache alone).
    """
    if device_rows:
        # Beside the complete copy's place, named by the mesh columns the rows are.
        columns, d = cache_lib.local_columns(mesh), mesh.shape["data"]
        path = None if plan.path is None else (
            f"{plan.path}-devices{columns[0]}-{columns[-1]}of{d}")
        found = None if path is None else cache_lib.open_device_rows(path, plan.spec, mesh)
        what = "this host's devices' rows of the cache"
        build = functools.partial(cache_lib.build_device_rows, path=path)
    else:
        path = plan.path
        found = None if path is None else cache_lib.open_cache(path, plan.spec)
        what = "the cache"
        build = functools.partial(cache_lib.build, path=path, keep_float32=keep_float32)
    if found is not None:
        cache_lib.claim(path)
    elif path is not None:
        cache_lib.make_room(os.path.dirname(path), plan.spec.nbytes,
                            config.get("cache_dir_max_gb", 0))
    # The build is collective: if any host lacks its copy, every host runs the pass (a host
    # that has a complete copy keeps it).
    if hosts.all_agree(found is not None):
        logging.info("Reusing %s in %s.", what, path)
        return found
    images, labels = data.load_train_examples(config.task, config.data_dir, config.split,
                                              config.image_size, round_resized(config))
    norm = data.as_normalization(config.normalization)
    try:
        built = build(plan.spec, model, variables, images, labels, mesh=mesh,
                      batch_size=config.eval_batch_size or config.batch_size,
                      normalize=lambda x: data.normalize_array(x, norm))
        if path is not None:
            cache_lib.claim(path)
        return built
    except cache_lib.DiskSpaceError as e:
        if config.get("cache", "off") == "on":
            raise
        logging.warning("Training without a cache: %s.", e)
        return None


def why_not_on_device(config: ml_collections.ConfigDict, spec: cache_lib.Spec,
                      mesh: Mesh) -> str | None:
    """Why the run's cache does not go on the devices (`config.cache_on_device`, or the
    devices' memory on any host), or None: the same on every host (a collective)."""
    mode = config.get("cache_on_device", "auto")
    why = "config.cache_on_device='off'" if mode == "off" else device_cache_lib.why_not(
        spec, cache_fields(spec), mesh, config.batch_size)
    if not hosts.all_agree(why is None):  # every host compiles the same loop
        why = why or "another host's devices cannot hold it"
    return why


def cache_fields(spec: cache_lib.Spec) -> list[str]:
    """The fields of a cache that a training step reads (`train_step.CACHE_INPUTS`)."""
    return [k for k in train_step.CACHE_INPUTS if k in spec.fields]
