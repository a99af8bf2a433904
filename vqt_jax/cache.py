"""A one-time cache of the frozen backbone's outputs, to train VQT (and heads) without it.

VQT never changes the ordinary tokens, so without data augmentation (the VTAB-1k protocol)
each layer's keys and values of an image are constants. One pass of the frozen backbone over
the training set stores them per example, with the final CLS and Head2Toe's pooled tokens;
every epoch, seed and (lr, wd) grid point then runs only the query path and the head
(`ViT.from_cache`). Methods whose head reads fixed features (linear probing, Head2Toe) cache
the head's input itself. Methods that change the ordinary tokens (VPT, adapters, LoRA, full
fine-tuning) cannot use a cache.

Layout: ``CACHE_DIR/<fingerprint>/`` holds ``meta.json`` and one raw array file per field,
example i being example i of `data.load_train_examples` (the order `vqt_jax.sampling`
shuffles). The fingerprint hashes everything the contents depend on (checkpoint, backbone
options, task, split, the data's contents (`data.content.content_key`), preprocessing, dtype),
so runs that differ only in lr, wd, seed, epochs or the number of queries share one cache.

Safety:

* A cache is built in a temporary directory ``.<fingerprint>.tmp-<host>-<pid>-<random>`` and
  renamed into place when complete, so a killed build leaves nothing that could be read later.
  Temporary builds whose process is gone (on this host) are removed whenever a cache in the
  same directory is opened or built; those of live processes (a concurrent run) are left.
* Every file's full size is reserved (``posix_fallocate``) before the backbone runs: the
  memory-mapped files would otherwise be sparse, and a disk filling up during the pass kills
  the process with SIGBUS. Not enough space is one `DiskSpaceError` instead.
* ``meta.json`` records each file's size; a cache whose files are missing or of another size,
  or whose meta.json cannot be read, is removed and rebuilt with one warning.

Multi-host: the build is data-parallel over every device of every host, its outputs sharded
over the batch; each host gathers every batch's rows (`inference.fetch_rows`) and writes a
complete cache of its own (`<fingerprint>-host<i>`), to be memory-mapped from local disk. A
device-resident copy (`device_cache`) then takes from it only the rows of this host's devices.
A run that needs no more than that copy builds only those rows (`build_device_rows`: each
device computes its own rows, nothing is gathered; `<fingerprint>-host<i>-devices<a>-<b>of<D>`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import hosts, inference, methods, sampling
from vqt_jax.models import ViT
from vqt_jax.progress import Progress

# 2: meta.json records file sizes; the fingerprint covers the data's contents. 3: the CPU
# forward runs each device's rows in steps (`inference.in_steps`), which rounds differently,
# so a run's numbers do not depend on whether its cache was built before.
FORMAT_VERSION = 3
DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# The fields each cache kind keeps (see methods.Method.cache). `cls` and `pooled` are small
# and always kept, so linear-probe and Head2Toe heads can be fitted on any cache.
FIELDS: dict[str, tuple[str, ...]] = {"kv": ("k", "v", "cls", "pooled"),
                                      "features": ("pre_logits", "cls", "pooled")}
# Fields stored in the cache dtype (the others, small, stay float32).
NARROWABLE = ("k", "v")
# Per cache kind, the model options its contents do not depend on (they only shape what is
# computed from the cache), left out of the fingerprint so that runs differing in them share.
# Neither kind depends on dropout, initialisation, compilation or what the query path's
# backward keeps; a kv cache (what comes before the queries) neither on the number of queries,
# their normalisation or Head2Toe, which shape the head's input that a features cache holds.
_ALWAYS_IGNORED = ("query_dropout", "head_init", "head_bias_init", "kv_dtype", "prompt_dropout",
                   "adapter_dropout", "scan_blocks", "remat")
IGNORED_OPTIONS: dict[str, tuple[str, ...]] = {
    "kv": _ALWAYS_IGNORED + ("num_queries", "l2_normalize", "head2toe"),
    "features": _ALWAYS_IGNORED}
# A temporary build: .<name>.tmp-<host>-<pid>-<mkdtemp's random suffix, [a-z0-9_]>.
_TMP_RE = re.compile(r"^\.(?P<name>.+?)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[A-Za-z0-9_]+)$")
# Errors that mean the disk (or the user's quota) is full.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# posix_fallocate errors that mean "this filesystem cannot reserve": write zeros instead.
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_ZERO_CHUNK = 16 * 2**20


class DiskSpaceError(ValueError):
    """The disk cannot hold the cache (a ValueError: the message says what to change)."""


def format_size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: 512 B, 1.50 KiB, 2.25 GiB."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if round(abs(value), 2) < 1024:  # 1048575 B is "1.00 MiB", not "1024.00 KiB"
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a cache holds: per-example shapes and dtypes of its fields, and its size.

    Attributes:
      kind: 'kv' or 'features'.
      num_examples: N.
      fields: field name -> (per-example shape, numpy dtype name).
    """

    kind: str
    num_examples: int
    fields: dict[str, tuple[tuple[int, ...], str]]

    @property
    def row_bytes(self) -> dict[str, int]:
        """Bytes of one example of each field."""
        return {name: int(np.prod(shape)) * np.dtype(_np_dtype(dtype)).itemsize
                for name, (shape, dtype) in self.fields.items()}

    @property
    def file_sizes(self) -> dict[str, int]:
        """The cache's array files (<field>.bin, label.bin) and their sizes in bytes."""
        sizes = {name + ".bin": self.num_examples * b for name, b in self.row_bytes.items()}
        return sizes | {"label.bin": self.num_examples * 4}  # int32

    @property
    def nbytes(self) -> int:
        return sum(self.file_sizes.values())

    def describe(self) -> str:
        parts = [f"{name} {list(shape)} {dtype}" for name, (shape, dtype) in self.fields.items()]
        return f"{self.num_examples} examples x ({', '.join(parts)}) = {format_size(self.nbytes)}"


@dataclasses.dataclass
class Float32Rows:
    """Rows [start, stop) of a cache as the pass that built it computed them: every field in
    float32 (before narrowing to the cache dtype) and the rows' images, kept in host memory.

    The VTAB-1k protocol's training cache of train800val200 holds val200 in its last rows, so
    the grid's evaluation on val200 can read the backbone's float32 outputs from here instead
    of running the backbone over val200 again (`training.stacked`); the images let it check
    that the evaluation split is exactly these rows.
    """

    start: int
    arrays: dict[str, np.ndarray]
    images: np.ndarray

    @property
    def stop(self) -> int:
        return self.start + len(self.images)


@dataclasses.dataclass
class Cache:
    """A built cache: per-example arrays (memory-mapped or in memory) and labels; `float32`,
    rows kept in float32 by the pass that built it in this process (`build(keep_float32=)`)."""

    spec: Spec
    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    path: str | None = None
    float32: Float32Rows | None = None

    def gather(self, indices: np.ndarray,
               fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The cached fields (default: all) and labels of some examples, as a batch.

        Each field is copied row by row into a fresh 64-byte-aligned buffer: XLA's CPU client
        then adopts the buffer without copying it (an unaligned numpy array costs another
        copy of every batch), and a fresh buffer is never overwritten while JAX holds it.
        """
        batch = {}
        for name in self.arrays if fields is None else fields:
            src = self.arrays[name]
            out = batch[name] = _aligned_empty((len(indices), *src.shape[1:]), src.dtype)
            for i, j in enumerate(indices):
                out[i] = src[j]
        batch["label"] = self.labels[indices]
        return batch


def first_rows(cache: Cache, n: int) -> Cache:
    """The cache of the first `n` examples of `cache` (views of its arrays, nothing copied).

    A train800val200 cache holds train800 in its first 800 rows (both splits list train800
    first), so this is train800's cache too.
    """
    if not 0 < n <= cache.spec.num_examples:
        raise ValueError(f"first_rows: {n} rows of a cache of {cache.spec.num_examples}")
    spec = dataclasses.replace(cache.spec, num_examples=n)
    return Cache(spec, {k: v[:n] for k, v in cache.arrays.items()}, cache.labels[:n], cache.path)


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """np.empty whose data starts on an `align`-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def available_memory() -> int | None:
    """The host memory available to new allocations (Linux's MemAvailable), or None where
    the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def float32_bytes(spec: Spec, num_rows: int, image_shape: tuple[int, ...]) -> int:
    """What `build(keep_float32=)` holds for `num_rows` rows: every field in float32 and the
    rows' images (at most float32 too)."""
    row = sum(int(np.prod(shape)) for shape, _ in spec.fields.values())
    return num_rows * 4 * (row + int(np.prod(image_shape)))


def _np_dtype(name: str) -> Any:
    return DTYPES.get(name, name)


def kind_for(method: str) -> str | None:
    """What a method can cache ('kv', 'features') or None."""
    return methods.get(method).cache


def spec_for(model: ViT, kind: str, num_examples: int, image_size: int,
             dtype: str = "float32") -> Spec:
    """The cache of `kind` for `model`, computed from shapes only (nothing runs)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    out = jax.eval_shape(functools.partial(model.apply, method=ViT.cache_features), variables,
                         images)
    # Per field: its per-example shape (k, v: [M, H, N, Dh]) and dtype.
    return Spec(kind, num_examples, {
        name: (tuple(out[name].shape[1:]), dtype if name in NARROWABLE else "float32")
        for name in FIELDS[kind]})


def fingerprint(config: Any, model_kwargs: Mapping[str, Any], kind: str, *,
                data_key: Mapping[str, Any] | None = None) -> str:
    """A hash of everything a cache's contents depend on (see the module docstring).

    Args:
      config: the run's config (init, seed, task, data_dir, split, image_size, normalization,
        resize, fc_norm_init, posemb_resample, cache_dtype are read).
      model_kwargs: the model's options; those in `IGNORED_OPTIONS[kind]` are left out.
      kind: 'kv' or 'features'.
      data_key: `content.content_key` of the training data, if the caller has it already
        (default: computed here, which stats every file of an image folder).
    """
    init = config.init or f"random init, seed {config.seed}"
    init_stat = None
    if config.init and "://" not in config.init:
        path = config.init.split(":")[0]
        if os.path.exists(path):
            st = os.stat(path)
            init_stat = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    backbone = {k: v for k, v in sorted(model_kwargs.items()) if k not in IGNORED_OPTIONS[kind]}
    if data_key is None:
        from vqt_jax.data import content  # the data's key needs the input pipeline (TF)

        data_key = content.content_key(config.task, config.data_dir, config.split)
    key = dict(version=FORMAT_VERSION, kind=kind, init=init, init_stat=init_stat, model=backbone,
               task=config.task, data_dir=config.data_dir, split=config.split,
               content=dict(data_key), image_size=config.image_size, dtype=config.cache_dtype,
               normalization=config.normalization, resize=config.get("resize", "uint8"),
               fc_norm_init=config.get("fc_norm_init", "checkpoint"),
               posemb_resample=config.get("posemb_resample", "auto"))
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path) or "."
    return path


def check_budget(spec: Spec, directory: str | None, max_gb: float) -> str | None:
    """Why a cache cannot be held (over the budget, an unwritable directory, or not enough free
    disk), or None."""
    size = spec.nbytes
    if size > max_gb * 2**30:
        # The budget is in GiB, so the size is given in GiB too, next to its readable form.
        return (f"the cache would take {format_size(size)} = {size / 2**30:.3g} GiB, over "
                f"config.cache_max_gb={max_gb:g}")
    if directory is not None:
        probe = _existing_ancestor(directory)
        if not os.access(probe, os.W_OK | os.X_OK):
            return (f"the cache directory {os.path.dirname(directory)} cannot be written "
                    f"({probe} is read-only or not writable): set config.cache_dir or "
                    "$VQT_JAX_CACHE to a writable directory")
        free = shutil.disk_usage(probe).free
        if size * 1.02 > free:
            return (f"the cache would take {format_size(size)} but {probe} has "
                    f"{format_size(free)} free")
    return None


def _meta(spec: Spec) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "kind": spec.kind, "num_examples": spec.num_examples,
            "fields": {k: [list(s), d] for k, (s, d) in spec.fields.items()},
            "files": spec.file_sizes}


def _mapped(path: str, spec: Spec, mode: str) -> dict[str, np.ndarray]:
    """The array files of the cache directory `path`, memory-mapped: every field and 'label'
    (raw arrays; bfloat16 is mapped as uint16: .npy cannot name it)."""
    files = spec.fields | {"label": ((), "int32")}
    return {name: np.memmap(os.path.join(path, name + ".bin"), mode=mode,
                            dtype=np.uint16 if dtype == "bfloat16" else _np_dtype(dtype),
                            shape=(spec.num_examples, *shape)).view(_np_dtype(dtype))
            for name, (shape, dtype) in files.items()}


# --------------------------------------------------------------------------------------------
# Checking, cleaning up.
# --------------------------------------------------------------------------------------------


def _problem(path: str, spec: Spec) -> str | None:
    """What makes the cache directory `path` unusable for `spec`, or None if it is complete."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        return f"{meta_path} is missing"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    except (OSError, ValueError) as e:
        return f"{meta_path} is unreadable ({e})"
    if differences := [f"{k} {meta.get(k)!r} instead of {v!r}" for k, v in _meta(spec).items()
                       if meta.get(k) != v]:
        return f"{meta_path} describes other contents: {'; '.join(differences)}"
    for name, size in spec.file_sizes.items():
        file = os.path.join(path, name)
        try:
            actual = os.path.getsize(file)
        except FileNotFoundError:
            return f"{file} is missing"
        except OSError as e:
            return f"{file} cannot be read ({e})"
        if actual != size:
            return f"{file} has {actual} bytes instead of the {size} meta.json records"
    return None


def _host() -> str:
    # The host name goes into a file name, and must not contain the separators parsed back.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def remove_orphaned_builds(directory: str) -> list[str]:
    """Removes the temporary builds in `directory` left by processes gone from this host.

    A build in progress lives in ``.<fingerprint>.tmp-<host>-<pid>-<random>``. Those of live
    processes (another run building concurrently) and of other hosts (a shared filesystem;
    their processes cannot be checked from here) are left alone.

    Returns:
      The paths removed (each one is logged).
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    host, removed = _host(), []
    for name in sorted(names):
        match = _TMP_RE.match(name)
        path = os.path.join(directory, name)
        if (match is None or match["host"] != host or hosts.process_alive(int(match["pid"]))
                or not os.path.isdir(path)):
            continue
        shutil.rmtree(path, ignore_errors=True)  # another run may be removing it too
        logging.info("Removed %s: an interrupted cache build (process %s on this host is "
                     "gone).", path, match["pid"])
        removed.append(path)
    return removed


# Every process that uses an entry holds a shared lock on its directory until it exits, and
# sets the directory's modification time when it starts using it (the entry's last use).
_HELD: dict[str, int] = {}  # entry path -> the descriptor holding its shared lock


def claim(path: str) -> None:
    """Marks the entry at `path` as in use by this process until it exits (`make_room` never
    removes it) and as used now; where the file system cannot lock, only the time is kept."""
    try:
        if path not in _HELD:
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                _HELD[path] = fd
            except OSError:
                os.close(fd)
        os.utime(path)
    except OSError as e:  # a read-only cache directory: the entry is used all the same
        logging.info("Could not mark the cache %s as in use: %s", path, e)


def make_room(directory: str, need: int, max_gb: float) -> list[str]:
    """Removes the least recently used entries of the cache directory until they and `need`
    more bytes take at most `max_gb`; an entry in use (locked by any process, this one
    included) is never removed. Returns the paths removed (each one is logged)."""
    if not max_gb or not os.path.isdir(directory):
        return []
    entries = []
    for entry in os.scandir(directory):
        files = [f for f in os.scandir(entry.path) if f.is_file()] if (
            entry.is_dir() and not entry.name.startswith(".")) else []
        if any(f.name == "meta.json" for f in files):  # a complete entry
            entries.append((entry.stat().st_mtime, sum(f.stat().st_size for f in files),
                            entry.path))
    total, removed = sum(size for _, size, _ in entries) + need, []
    for _, size, path in sorted(entries):
        if total <= max_gb * 2**30:
            break
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # in use
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        total -= size
        removed.append(path)
        logging.info("Removed the cache %s (%s, the least recently used) to keep %s under "
                     "config.cache_dir_max_gb=%g.", path, format_size(size), directory, max_gb)
    return removed


def open_cache(path: str, spec: Spec) -> Cache | None:
    """The complete cache at `path` if it is there and matches `spec`, else None.

    A cache directory that is there but unusable (a file missing or of another size than
    meta.json records, meta.json unreadable or describing other contents) is removed with
    one warning saying why, so that it is built again. Temporary builds of dead processes
    beside it are removed too (`remove_orphaned_builds`).
    """
    remove_orphaned_builds(os.path.dirname(os.path.abspath(path)))
    if not os.path.exists(path):
        return None
    if (problem := _problem(path, spec)) is None:
        try:
            arrays = _mapped(path, spec, "r")
            labels = np.asarray(arrays.pop("label"))
            return Cache(spec, arrays, labels, path)
        except (OSError, ValueError) as e:  # e.g. unreadable files (permissions)
            problem = f"its files cannot be memory-mapped ({e})"
    logging.warning("Cache in %s is unusable: %s; removing it and building it again.",
                    path, problem)
    shutil.rmtree(path, ignore_errors=True)
    return None


# --------------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------------


def _write_zeros(fd: int, size: int) -> None:
    chunk = bytes(min(size, _ZERO_CHUNK))
    written = 0
    while written < size:
        written += os.write(fd, chunk[:size - written])


def _reserve(path: str, size: int) -> None:
    """Creates `path` with `size` bytes allocated on disk (not sparse), or raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS
        try:
            if fallocate is None:
                raise OSError(errno.EOPNOTSUPP, "posix_fallocate is not available")
            fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in _NO_FALLOCATE:
                raise
            # The filesystem cannot reserve blocks: writing them reserves them just as well.
            os.ftruncate(fd, 0)
            _write_zeros(fd, size)
    finally:
        os.close(fd)


def build(spec: Spec, model: ViT, variables: Any, images: np.ndarray, labels: np.ndarray, *,
          mesh: Mesh, batch_size: int, normalize: Callable[[np.ndarray], np.ndarray],
          path: str | None = None, progress_every_s: float = 10.0,
          keep_float32: slice | None = None) -> Cache:
    """Runs the frozen backbone once over `images` and stores what `spec` names.

    On disk, every file is first reserved at its full size, so a disk that cannot hold the
    cache fails here at once, before the backbone runs, rather than as a crash mid-pass.

    Args:
      spec: from `spec_for`.
      model: the model (in eval mode; its queries are not used).
      variables: its variables (replicated over `mesh`).
      images: uint8 [N, S, S, 3], the training set in order (all of it, on every host).
      labels: int [N].
      mesh: the data-parallel mesh; each global batch is split over all its devices.
      batch_size: global batch size of the pass (divisible by the number of devices).
      normalize: uint8 batch -> float32 model input (the training pipeline's own).
      path: the cache directory to create (complete or not at all); None keeps the cache in
        host memory.
      progress_every_s: seconds between two progress lines of the pass.
      keep_float32: rows to keep in host memory as the pass computed them, in float32
        (`Cache.float32`); the stored cache is the same, bit for bit.

    Returns:
      The cache.

    Raises:
      DiskSpaceError: the disk under `path` cannot hold the cache (nothing is left behind).
    """
    n = spec.num_examples
    _check_examples(spec, images, labels)
    kept = None
    if keep_float32 is not None:
        start, stop, _ = keep_float32.indices(n)
        kept = Float32Rows(start, {
            name: np.empty((stop - start, *shape), np.float32)
            for name, (shape, _) in spec.fields.items()}, np.array(images[start:stop]))
    batch_sharding = NamedSharding(mesh, P("data"))

    def forward(v: Any, x: jax.Array) -> dict[str, jax.Array]:
        out = model.apply(v, x, method=ViT.cache_features)
        return {k: out[k] for k in spec.fields}

    def fill(arrays: dict[str, np.ndarray]) -> None:
        # The pass: fills `arrays` (N rows each), and `kept`'s rows in float32.
        fn = inference.forward_fn(lambda v, x: _narrow(spec, forward(v, x)), mesh)
        if kept:
            # A batch that holds kept rows gets the float32 outputs, and its narrowing is a
            # program of its own (the same XLA convert on the same values), so both widths
            # come from one backbone pass. Every other batch takes the narrow program: its
            # float32 outputs (twice the bytes) would only be written to be cast.
            wide_fn = inference.forward_fn(forward, mesh)
            cast = jax.jit(functools.partial(_narrow, spec), in_shardings=batch_sharding,
                           out_shardings=batch_sharding)
        progress = Progress("Caching the frozen backbone's outputs", n, "examples",
                            progress_every_s)
        for rows, local in host_batches(n, batch_size, lambda sl: {"image": images[sl]},
                                        sharding=batch_sharding, last_multiple=mesh.shape["data"]):
            x = jax.make_array_from_process_local_data(batch_sharding, normalize(local["image"]))
            count = rows.stop - rows.start  # the padding is not stored
            lo, hi = (max(rows.start, kept.start), min(rows.stop, kept.stop)) if kept else (0, 0)
            if lo < hi:
                wide = wide_fn(variables, x)
                out = inference.fetch_rows(cast(wide))
                wide = inference.fetch_rows(wide)
                for name in spec.fields:
                    kept.arrays[name][lo - kept.start:hi - kept.start] = \
                        wide[name][lo - rows.start:hi - rows.start]
            else:
                out = inference.fetch_rows(fn(variables, x))
            for name in spec.fields:
                arrays[name][rows] = out[name][:count]
            progress.update(count)
        progress.done()

    return dataclasses.replace(_store(spec, path, fill, np.asarray(labels, np.int32)), float32=kept)


def _check_examples(spec: Spec, images: np.ndarray, labels: np.ndarray) -> None:
    n = spec.num_examples
    if len(images) != n or len(labels) != n:
        raise ValueError(f"Expected {n} examples to cache, got {len(images)} images and "
                         f"{len(labels)} labels")


def _store(spec: Spec, path: str | None, fill: Callable[[dict[str, np.ndarray]], None],
           labels: np.ndarray) -> Cache:
    """The cache of `spec` whose rows `fill(arrays)` computes into `arrays` (empty, N rows
    each), in host memory (`path` None) or at `path`, complete or not at all (see `build`).

    Raises:
      DiskSpaceError: the disk under `path` cannot hold the cache (nothing is left behind).
    """
    n = spec.num_examples
    if path is None:
        arrays = {name: np.empty((n, *shape), _np_dtype(dtype))
                  for name, (shape, dtype) in spec.fields.items()}
        fill(arrays)
        return Cache(spec, arrays, labels, None)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_orphaned_builds(parent)
    tmp = tempfile.mkdtemp(dir=parent,
                           prefix=f".{os.path.basename(path)}.tmp-{_host()}-{os.getpid()}-")
    no_space: OSError | None = None
    start_time = time.time()
    try:
        try:
            for file, size in spec.file_sizes.items():
                _reserve(os.path.join(tmp, file), size)
        except OSError as e:
            if e.errno not in _NO_SPACE:
                raise
            no_space = e
        # The pass is collective: every host must have its files, or none runs it.
        if not hosts.all_agree(no_space is None):
            raise no_space or OSError(errno.ENOSPC, "another host's disk cannot hold its "
                                      "copy of the cache (see that host's log)")
        # r+: "w+" would truncate the file and give back the reserved blocks.
        arrays = _mapped(tmp, spec, "r+")
        arrays["label"][:] = labels
        fill(arrays)
        for a in arrays.values():
            a.flush()
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(_meta(spec), f)
        del arrays
        if os.path.exists(path) and _problem(path, spec) is not None:
            shutil.rmtree(path)  # unusable (damaged, other shapes): replace it
        try:
            os.replace(tmp, path)
            tmp = None
        except OSError:
            # Another run finished the same cache first (renaming onto a non-empty directory
            # fails): use theirs, which has the same contents.
            logging.info("Cache %s was built concurrently by another run; using it.", path)
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        no_space = e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if no_space is not None:
        # Measured with the partial reservation gone: what the user has to work with.
        free = shutil.disk_usage(_existing_ancestor(parent)).free
        raise DiskSpaceError(f"not enough disk space for the cache in {parent}: it needs "
                             f"{format_size(spec.nbytes)}, {format_size(free)} free; free space, "
                             "set config.cache_dir elsewhere, or config.cache='off'") from no_space
    logging.info("Cached %d examples (%s) in %s (%.1f s).", n, format_size(spec.nbytes), path,
                 time.time() - start_time)
    if (cache := open_cache(path, spec)) is None:
        raise RuntimeError(f"The cache just built in {path} cannot be read back")
    return cache


def _narrow(spec: Spec, out: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The fields of `spec` in `out`, each in its cache dtype."""
    return {k: out[k].astype(_np_dtype(dtype)) for k, (_, dtype) in spec.fields.items()}


@dataclasses.dataclass
class DeviceRows:
    """The rows of a cache that this host's devices hold in the device-resident layout
    (`device_cache`: example r on column r mod D of the mesh's data axis, as its row r div D),
    and no other rows.

    Attributes:
      spec: the whole cache's (N examples).
      num_devices: D, the data axis's size.
      columns: this host's columns of the data axis, ascending (L of them).
      rows: the rows as a cache of ceil(N / D) x L rows, block major: its row k L + j is example
        k D + columns[j] (rows past N, the layout's padding, are zeros, label 0).
    """

    spec: Spec
    num_devices: int
    columns: tuple[int, ...]
    rows: Cache

    def column(self, name: str, c: int) -> np.ndarray:
        """Column `c`'s rows of field `name` (or 'label'): [ceil(N / D), ...], a view."""
        src = self.rows.labels if name == "label" else self.rows.arrays[name]
        return src.reshape(-1, len(self.columns), *src.shape[1:])[:, self.columns.index(c)]


def local_columns(mesh: Mesh) -> tuple[int, ...]:
    """The columns of `mesh`'s data axis that this host's devices are."""
    me = jax.process_index()
    return tuple(c for c, d in enumerate(mesh.devices.flat) if d.process_index == me)


def device_rows_spec(spec: Spec, num_devices: int, num_columns: int) -> Spec:
    """The spec of `DeviceRows.rows`: ceil(N / D) rows for each of a host's L columns."""
    blocks = -(-spec.num_examples // num_devices)
    return dataclasses.replace(spec, num_examples=blocks * num_columns)


def open_device_rows(path: str, spec: Spec, mesh: Mesh) -> DeviceRows | None:
    """The complete `build_device_rows` output at `path`, if it is there (`open_cache`)."""
    columns, d = local_columns(mesh), mesh.shape["data"]
    rows = open_cache(path, device_rows_spec(spec, d, len(columns)))
    return None if rows is None else DeviceRows(spec, d, columns, rows)


def build_device_rows(spec: Spec, model: ViT, variables: Any, images: np.ndarray,
                      labels: np.ndarray, *, mesh: Mesh, batch_size: int,
                      normalize: Callable[[np.ndarray], np.ndarray], path: str | None = None,
                      progress_every_s: float = 10.0) -> DeviceRows:
    """`build`, keeping only the rows of this host's devices (`DeviceRows`).

    The pass gives each device its own rows: device column c of a global batch computes
    examples k D + c of the batch's blocks k, so each host fetches its devices' outputs alone
    and nothing is gathered from other hosts (`build` all-gathers every batch, so that each
    host can write every row). The rows are those `build` computes, in another order.

    Args:
      spec, model, variables, images, labels, normalize, path, progress_every_s: as `build`
        (`path` holds this host's rows only, so it names the host's columns of the mesh).
      mesh: the data-parallel mesh the device cache will live on.
      batch_size: global batch size of the pass (divisible by the number of devices).

    Raises:
      DiskSpaceError: as `build`.
    """
    n, d = spec.num_examples, mesh.shape["data"]
    _check_examples(spec, images, labels)
    columns = local_columns(mesh)
    rows_spec = device_rows_spec(spec, d, len(columns))
    blocks, width = -(-n // d), len(columns)
    # Row k L + j of this host's rows is example k D + columns[j] (from N on: padding).
    example = (np.arange(blocks)[:, None] * d + columns).ravel()
    row_labels = np.where(example < n, np.asarray(labels, np.int32)[example % n], 0)

    def fill(arrays: dict[str, np.ndarray]) -> None:
        # The pass: fills `arrays` (this host's rows, block major).
        if batch_size % d:
            raise ValueError(f"A pass of batch {batch_size} does not split over {d} devices")
        batch_sharding = NamedSharding(mesh, P("data"))
        fn = inference.forward_fn(
            lambda v, x: _narrow(spec, model.apply(v, x, method=ViT.cache_features)), mesh)
        progress = Progress("Caching the frozen backbone's outputs (this host's devices' rows)",
                            n, "examples", progress_every_s)
        for first in range(0, blocks, batch_size // d):
            # Blocks [first, first + m): device column c computes examples k D + c of them, in
            # slots [c m, (c + 1) m) of the global batch (P('data') gives each device one such
            # run of slots). The last pass is shorter: it compiles once more rather than
            # compute a full batch of padding.
            m = min(batch_size // d, blocks - first)
            mine = sampling.host_rows(batch_sharding, m * d)
            slot = np.arange(mine.start, mine.stop)
            example = (first + slot % m) * d + slot // m
            local = np.zeros((len(slot), *images.shape[1:]), images.dtype)
            local[example < n] = images[example[example < n]]
            x = jax.make_array_from_process_local_data(batch_sharding, normalize(local))
            out = fn(variables, x)
            k = np.arange(first, first + m)
            for name in spec.fields:
                for shard in out[name].addressable_shards:
                    c = (shard.index[0].start or 0) // m
                    values = np.array(shard.data)
                    values[k * d + c >= n] = 0  # the layout's padding holds zeros
                    j = first * width + columns.index(c)
                    arrays[name][j:(first + m) * width:width] = values
            progress.update(min(n, (first + m) * d) - first * d)
        progress.done()

    return DeviceRows(spec, d, columns, _store(rows_spec, path, fill, row_labels.astype(np.int32)))


def host_batches(num_rows: int, batch_size: int, get: Callable[[slice], dict[str, np.ndarray]], *,
                 sharding: jax.sharding.Sharding, last_multiple: int | None = None
                 ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
    """One pass over rows [0, num_rows) in global batches, for every host alike.

    Args:
      num_rows: rows to cover.
      batch_size: global batch size (divisible by the number of hosts).
      get: rows -> {name: array whose first axis is those rows}.
      sharding: the batches' sharding: this host's slice is the slots its devices hold
        (`sampling.host_rows`).
      last_multiple: pad the last batch only to a multiple of this (a divisor of
        `batch_size` that the batch's devices divide), not to `batch_size`: a pass whose
        program may compile once more for that shape, rather than compute up to
        `batch_size - 1` rows of padding (a tenth of a 1200-row pass at batch 128).

    Yields:
      (the rows of the global batch, this host's slice of it). The last batch is padded with
      zeros to `batch_size` (or to `last_multiple`'s next multiple); the slice also holds
      'mask' (1 for real rows, 0 for padding).
    """
    for start in range(0, num_rows, batch_size):
        rows = slice(start, min(start + batch_size, num_rows))
        count = rows.stop - rows.start
        size = batch_size if not last_multiple else min(
            batch_size, -(-count // last_multiple) * last_multiple)
        mine = sampling.host_rows(sharding, size)
        batch = {k: np.concatenate([v, np.zeros((size - count, *v.shape[1:]), v.dtype)])
                 for k, v in get(rows).items()}
        batch["mask"] = (np.arange(size) < count).astype(np.float32)
        yield rows, {k: v[mine] for k, v in batch.items()}


def train_batches(cache: Cache, *, global_batch_size: int, seed: int, start_step: int = 0,
                  rows: slice | None = None, prefetch: int = 2,
                  fields: Sequence[str] | None = None,
                  batching: str = "stream") -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches from a cache: the same examples, in the same order, as the
    image pipeline (`data.make_train_iterator`) gives for the same seed, step and batching
    (`vqt_jax.sampling`).

    Batches hold this host's `rows` of each global batch (default: all) of `fields` (default:
    all), 'label' and 'mask' (0 for the padding of an epoch's partial last batch with 'epoch'
    batching). A background thread reads ahead `prefetch` batches (the copies release the
    GIL), so the next batch is gathered while the current step runs.
    """
    n = cache.spec.num_examples

    def produce(step: int) -> dict[str, np.ndarray]:
        idx, mask = sampling.host_batch_indices(step, n, global_batch_size=global_batch_size,
                                                seed=seed, rows=rows, batching=batching)
        return {**cache.gather(idx, fields), "mask": mask}

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        ahead = collections.deque(pool.submit(produce, start_step + i)
                                  for i in range(max(1, prefetch)))
        for step in itertools.count(start_step + len(ahead)):
            batch = ahead.popleft().result()  # raises what `produce` raised
            ahead.append(pool.submit(produce, step))
            yield batch
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
