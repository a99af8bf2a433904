"""A one-time cache of the frozen backbone's outputs, to train VQT (and heads) without it.

VQT never changes the ordinary tokens, so without data augmentation (the VTAB-1k protocol)
each layer's keys and values of an image are constants. One pass of the frozen backbone over
the training set stores them per example, with the final CLS and Head2Toe's pooled tokens;
every epoch, seed and (lr, wd) grid point then runs only the query path and the head
(`ViT.from_cache`). Methods whose head reads fixed features (linear probing, Head2Toe) cache
the head's input itself. Methods that change the ordinary tokens (VPT, adapters, LoRA, full
fine-tuning) cannot use a cache.

Layout: ``CACHE_DIR/<fingerprint>/`` holds ``meta.json`` and one raw array file per field,
example i being example i of `data.load_train_examples` (the order `data.train_indices`
shuffles). The fingerprint hashes everything the contents depend on (checkpoint, backbone
options, task, split, preprocessing, dtype), so runs that differ only in lr, wd, seed, epochs
or the number of queries share one cache. A cache is built in a temporary directory and
renamed into place when complete: a killed build leaves nothing that could be read later.

Multi-host: the build is data-parallel over every device of every host and its outputs are
replicated, so each host writes a complete cache of its own (`<fingerprint>-host<i>`), to be
memory-mapped from local disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqt_jax import data, methods
from vqt_jax.models import ViT

FORMAT_VERSION = 1
DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# The fields each cache kind keeps (see methods.Method.cache). `cls` and `pooled` are small
# and always kept, so linear-probe and Head2Toe heads can be fitted on any cache.
FIELDS: dict[str, tuple[str, ...]] = {
    "kv": ("k", "v", "cls", "pooled"),
    "features": ("pre_logits", "cls", "pooled"),
}
# Fields stored in the cache dtype (the others, small, stay float32).
NARROWABLE = ("k", "v")
# Per cache kind, the model options its contents do not depend on (they only shape what is
# computed from the cache), left out of the fingerprint so that runs differing in them share.
IGNORED_OPTIONS: dict[str, tuple[str, ...]] = {
    "kv": ("num_queries", "query_dropout", "l2_normalize", "head_bias_init", "kv_dtype",
           "prompt_dropout", "head2toe"),
    "features": ("query_dropout", "head_bias_init", "kv_dtype", "prompt_dropout"),
}


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
    def nbytes(self) -> int:
        total = self.num_examples * 4  # labels, int32
        for shape, dtype in self.fields.values():
            total += self.num_examples * int(np.prod(shape)) * np.dtype(_np_dtype(dtype)).itemsize
        return total

    def describe(self) -> str:
        parts = [f"{name} {list(shape)} {dtype}" for name, (shape, dtype) in self.fields.items()]
        return (f"{self.num_examples} examples x ({', '.join(parts)}) = "
                f"{self.nbytes / 2**30:.2f} GiB")


@dataclasses.dataclass
class Cache:
    """A built cache: per-example arrays (memory-mapped or in memory) and labels."""

    spec: Spec
    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    path: str | None = None

    def gather(self, indices: np.ndarray,
               fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The cached fields (default: all) and labels of some examples, as a batch.

        Each field is copied row by row into a fresh 64-byte-aligned buffer: XLA's CPU client
        then adopts the buffer without copying it (an unaligned numpy array costs another
        copy of every batch), and a fresh buffer is never overwritten while JAX holds it.
        """
        names = self.arrays if fields is None else fields
        batch = {}
        for name in names:
            src = self.arrays[name]
            out = _aligned_empty((len(indices), *src.shape[1:]), src.dtype)
            for i, j in enumerate(indices):
                out[i] = src[j]
            batch[name] = out
        batch["label"] = self.labels[indices]
        return batch


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """np.empty whose data starts on an `align`-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


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
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=ViT.cache_features), variables, images)
    fields = {}
    for name in FIELDS[kind]:
        shape = tuple(out[name].shape[1:])  # k, v: [M, H, N, Dh]
        fields[name] = (shape, dtype if name in NARROWABLE else "float32")
    return Spec(kind, num_examples, fields)


def fingerprint(config: Any, model_kwargs: Mapping[str, Any], kind: str) -> str:
    """A hash of everything a cache's contents depend on (see the module docstring)."""
    init = config.init or f"random init, seed {config.seed}"
    init_stat = None
    if config.init and "://" not in config.init:
        path = config.init.split(":")[0]
        if os.path.exists(path):
            st = os.stat(path)
            init_stat = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    backbone = {k: v for k, v in sorted(model_kwargs.items())
                if k not in IGNORED_OPTIONS[kind]}
    key = dict(version=FORMAT_VERSION, kind=kind, init=init, init_stat=init_stat,
               model=backbone, task=config.task, data_dir=config.data_dir,
               split=config.split, image_size=config.image_size,
               normalization=config.normalization, dtype=config.cache_dtype)
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_budget(spec: Spec, directory: str | None, max_gb: float) -> str | None:
    """Why a cache cannot be held (over the budget, or not enough free disk), or None."""
    size = spec.nbytes / 2**30
    if size > max_gb:
        return f"the cache would take {size:.2f} GiB, over config.cache_max_gb={max_gb:g}"
    if directory is not None:
        probe = directory
        while not os.path.exists(probe):
            probe = os.path.dirname(probe) or "."
        free = shutil.disk_usage(probe).free / 2**30
        if size * 1.02 > free:
            return f"the cache would take {size:.2f} GiB but {probe} has {free:.2f} GiB free"
    return None


def _meta(spec: Spec) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "kind": spec.kind, "num_examples": spec.num_examples,
            "fields": {k: [list(s), d] for k, (s, d) in spec.fields.items()}}


def _raw(path: str, dtype: str, shape: tuple[int, ...], mode: str) -> np.ndarray:
    """A raw memory-mapped array (bfloat16 goes through uint16: .npy cannot name it)."""
    np_dtype = np.dtype(_np_dtype(dtype))
    store = np.uint16 if dtype == "bfloat16" else np_dtype
    arr = np.memmap(path, dtype=store, mode=mode, shape=shape)
    return arr.view(np_dtype) if dtype == "bfloat16" else arr


def open_cache(path: str, spec: Spec) -> Cache | None:
    """The complete cache at `path` if it is there and matches `spec`, else None."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta != _meta(spec):
        logging.warning("Cache at %s does not match this run's shapes; rebuilding.", path)
        return None
    n = spec.num_examples
    arrays = {name: _raw(os.path.join(path, name + ".bin"), dtype, (n, *shape), "r")
              for name, (shape, dtype) in spec.fields.items()}
    labels = np.asarray(_raw(os.path.join(path, "label.bin"), "int32", (n,), "r"))
    return Cache(spec, arrays, labels, path)


def build(
    spec: Spec,
    model: ViT,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mesh: Mesh,
    batch_size: int,
    normalize: Callable[[np.ndarray], np.ndarray],
    path: str | None = None,
) -> Cache:
    """Runs the frozen backbone once over `images` and stores what `spec` names.

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

    Returns:
      The cache.
    """
    n = spec.num_examples
    if len(images) != n or len(labels) != n:
        raise ValueError(f"Expected {n} examples to cache, got {len(images)} images and "
                         f"{len(labels)} labels")
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    names = list(spec.fields)

    def forward(v, x):
        out = model.apply(v, x, method=ViT.cache_features)
        return {k: out[k].astype(_np_dtype(spec.fields[k][1])) for k in names}

    fn = jax.jit(forward, in_shardings=(replicated, batch_sharding), out_shardings=replicated)
    tmp = None
    if path is not None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        arrays = {}
        for name, (shape, dtype) in spec.fields.items():
            if tmp is None:
                arrays[name] = np.empty((n, *shape), _np_dtype(dtype))
            else:
                arrays[name] = _raw(os.path.join(tmp, name + ".bin"), dtype, (n, *shape), "w+")
        start_time = time.time()
        for rows, local in host_batches(n, batch_size, lambda sl: {"image": images[sl]}):
            x = jax.make_array_from_process_local_data(batch_sharding, normalize(local["image"]))
            out = jax.device_get(fn(variables, x))
            count = rows.stop - rows.start  # the padding is not stored
            for name in names:
                arrays[name][rows] = out[name][:count]
            done = rows.stop
            logging.log_every_n_seconds(
                logging.INFO, "Caching: %d/%d examples (%.1f examples/s)", 30, done, n,
                done / max(time.time() - start_time, 1e-9))
        labels = np.asarray(labels, np.int32)
        if tmp is None:
            return Cache(spec, arrays, labels, None)
        for a in arrays.values():
            a.flush()
        label_file = _raw(os.path.join(tmp, "label.bin"), "int32", (n,), "w+")
        label_file[:] = labels
        label_file.flush()
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(_meta(spec), f)
        del arrays, label_file
        if os.path.exists(path) and open_cache(path, spec) is None:
            shutil.rmtree(path)  # a cache of other shapes (an older run's): replace it
        try:
            os.replace(tmp, path)
            tmp = None
        except OSError:
            # Another run finished the same cache first (renaming onto a non-empty directory
            # fails): use theirs, which has the same contents.
            logging.info("Cache %s was built concurrently by another run; using it.", path)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    logging.info("Cached %d examples in %s (%.1f s).", n, path, time.time() - start_time)
    cache = open_cache(path, spec)
    if cache is None:
        raise RuntimeError(f"The cache just built in {path} cannot be read back")
    return cache


def host_batches(
    num_rows: int, batch_size: int, get: Callable[[slice], dict[str, np.ndarray]]
) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
    """One pass over rows [0, num_rows) in global batches, for every host alike.

    Args:
      num_rows: rows to cover.
      batch_size: global batch size (divisible by the number of hosts).
      get: rows -> {name: array whose first axis is those rows}.

    Yields:
      (the rows of the global batch, this host's slice of it). The last batch is padded with
      zeros to `batch_size`; the slice also holds 'mask' (1 for real rows, 0 for padding).
    """
    local = batch_size // jax.process_count()
    lo = jax.process_index() * local
    for start in range(0, num_rows, batch_size):
        rows = slice(start, min(start + batch_size, num_rows))
        count = rows.stop - rows.start
        batch = {k: np.concatenate([v, np.zeros((batch_size - count, *v.shape[1:]), v.dtype)])
                 for k, v in get(rows).items()}
        batch["mask"] = (np.arange(batch_size) < count).astype(np.float32)
        yield rows, {k: v[lo:lo + local] for k, v in batch.items()}


def train_batches(
    cache: Cache,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    fields: Sequence[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches from a cache: the same examples, in the same order, as the
    image pipeline (`data.make_train_iterator`) gives for the same seed and step.

    Batches hold `fields` (default: all) and 'label'. A background thread reads ahead
    `prefetch` batches (the copies release the GIL).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    n = cache.spec.num_examples

    def produce(step: int) -> dict[str, np.ndarray]:
        idx = data.train_indices(step, n, global_batch_size=global_batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count)
        return cache.gather(idx, fields)

    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():  # a consumer that stopped reading must not block the thread
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def worker():
        step = start_step
        try:
            while not stop.is_set():
                put(produce(step))
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
