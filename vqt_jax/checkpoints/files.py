"""Reading checkpoint files into flat {name: numpy array} dicts, without torch or TF.

Three container formats, recognised by their bytes rather than by their file names (bucket paths
often have none):
  * numpy `.npz` (big_vision and the original vision_transformer releases);
  * PyTorch's zip serialisation (`torch.save`, `.pth`/`.pt`/`.bin`), read by a restricted
    unpickler that only rebuilds tensors and containers, so no code from the file ever runs and
    torch need not be installed; every tensor record is checked against its storage before any
    byte is read, so a crafted file cannot make the reader touch memory outside the storage;
  * `.safetensors`.

Paths may be local, `gs://...` (and anything else etils.epath opens, through fsspec: gcsfs,
the `gcs` extra, also where TensorFlow is installed; see `vqt_jax/__init__.py`), or
`http(s)://...` (downloaded once into a cache directory, atomically: a download that is cut
short, stalls, or is not a complete checkpoint never enters the cache).

Every error for a bad file is one `CheckpointError` (a ValueError) or `FileNotFoundError` whose
message names the path (for a download: the URL and the cached file) and the problem.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import http.client
import io
import json
import math
import os
import pickle
import struct
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
from absl import logging

from vqt_jax.progress import Progress
from vqt_jax.workdir import error_line, remote_reason

_CACHE_ENV = "VQT_JAX_CACHE"
_STALL_ENV = "VQT_JAX_DOWNLOAD_STALL_S"
# A transfer that brings fewer bytes than this in a whole stall window counts as stalled: a
# server trickling a byte now and then would otherwise keep the socket timeout from ever firing.
_STALL_MIN_BYTES = 64 * 1024
_PROGRESS_EVERY_S = 10.0
# The first bytes of a download, enough to tell a checkpoint from an HTML page and to quote it.
_HEAD_BYTES = 48


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def cache_dir() -> str:
    """Where downloaded checkpoints are kept: $VQT_JAX_CACHE or ~/.cache/vqt_jax."""
    return os.environ.get(_CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "vqt_jax"))


def cache_path(url: str) -> str:
    """The local file an http(s) URL is (or will be) cached as."""
    parsed = urllib.parse.urlparse(url)
    sub = (parsed.netloc + os.path.dirname(parsed.path)).replace("/", "_").replace(":", "_")
    return os.path.join(cache_dir(), sub, os.path.basename(parsed.path) or "checkpoint")


def stall_seconds() -> float:
    """Seconds a download may go without real progress: $VQT_JAX_DOWNLOAD_STALL_S or 60."""
    raw = os.environ.get(_STALL_ENV) or ""
    with contextlib.suppress(ValueError):
        value = float(raw or 60.0)
        if 0 < value < math.inf:
            return value
    raise CheckpointError(f"{_STALL_ENV} must be a positive number of seconds, got {raw!r}")


# --- downloads --------------------------------------------------------------------------------


def _open_part(fd: int) -> BinaryIO:
    """Opens the temporary download file; a seam that tests use to simulate a full disk."""
    return os.fdopen(fd, "wb")


def _not_cached(url: str, what: str, hint: str = "") -> CheckpointError:
    """The error for a failed download of `url`, after which nothing was cached."""
    return CheckpointError(f"Could not download {url}: {what}; nothing was cached{hint}")


def _stalled(url: str, received: int, total: int | None, stall_s: float,
             why: str) -> CheckpointError:
    of = f" of {total}" if total is not None else ""
    return _not_cached(url, f"the transfer stalled ({why}); {received}{of} bytes arrived in all",
                       f" (to wait longer, set {_STALL_ENV}; it is {stall_s:g} s now)")


def _fetch(url: str, out: BinaryIO) -> None:
    """Streams `url` into `out`.

    Raises CheckpointError (naming the URL) if the server refuses, stalls, sends fewer bytes
    than its Content-Length, or sends something that does not start like a checkpoint.
    """
    stall_s = stall_seconds()
    try:
        # The socket timeout catches a server that goes silent; the window below catches one
        # that keeps the socket alive with a trickle.
        resp = urllib.request.urlopen(url, timeout=stall_s)
    except (OSError, http.client.HTTPException) as e:
        # URLError is an OSError; getresponse()'s errors (e.g. RemoteDisconnected) are outside
        # its wrapping; socket.timeout is TimeoutError.
        if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
            raise _stalled(url, 0, None, stall_s, f"no answer in {stall_s:g} s") from e
        raise _not_cached(url, error_line(e)) from e
    with resp:
        content_type = resp.headers.get("Content-Type") or "no content type"
        length = resp.headers.get("Content-Length")
        total = int(length) if length is not None and length.strip().isdigit() else None
        progress = Progress(f"Downloading {url}", total, "bytes", every_s=_PROGRESS_EVERY_S)
        head, received = b"", 0
        window_start, window_bytes = time.monotonic(), 0
        while True:
            try:
                chunk = resp.read1(1 << 20)  # up to 1 MiB, whatever has arrived
            except TimeoutError as e:
                raise _stalled(url, received, total, stall_s, f"no data for {stall_s:g} s") from e
            except (OSError, http.client.HTTPException) as e:
                raise _not_cached(url, f"the connection failed after {received} bytes "
                                       f"({error_line(e)})") from e
            if not chunk:
                break
            if len(head) < _HEAD_BYTES:
                head += chunk[: _HEAD_BYTES - len(head)]
                if len(head) == _HEAD_BYTES:
                    _check_head(url, head, content_type)
            out.write(chunk)
            received += len(chunk)
            window_bytes += len(chunk)
            progress.update(len(chunk))
            now = time.monotonic()
            if now - window_start >= stall_s:
                if window_bytes < _STALL_MIN_BYTES:
                    raise _stalled(url, received, total, stall_s,
                                   f"{window_bytes} bytes in the last {now - window_start:.1f} s, "
                                   f"fewer than {_STALL_MIN_BYTES}")
                window_start, window_bytes = now, 0
        if len(head) < _HEAD_BYTES:
            _check_head(url, head, content_type)
        if total is not None and received != total:
            raise _not_cached(url, f"the server announced {total} bytes (Content-Length) but "
                                   f"sent {received}")
        progress.done()


def _kind_of_head(head: bytes) -> str | None:
    """The container a file's first bytes announce ('zip' or 'safetensors'), or None."""
    return "zip" if head[:4] == b"PK\x03\x04" else "safetensors" if head[8:9] == b"{" else None


def _check_head(url: str, head: bytes, content_type: str) -> None:
    # Fail on the first bytes: an HTML login or error page served with HTTP 200 is common.
    if _kind_of_head(head) is None:
        raise _not_cached(url, f"not a checkpoint: the server sent {content_type}, starting "
                               f"{head!r}")


def _check_complete(path: str) -> None:
    """Raises CheckpointError (without a path) unless `path` is a complete zip or safetensors.

    A body cut short without a Content-Length looks like a finished download; the containers
    say their own length (zip: the central directory at the end; safetensors: the offsets).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
        kind = _kind_of_head(head)
        if kind == "zip":
            try:
                # The central directory is at the very end: a cut file has none.
                with zipfile.ZipFile(f) as z:
                    infos = z.infolist()
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                raise CheckpointError(f"the file is incomplete: the zip archive's central "
                                      f"directory cannot be read ({error_line(e)})") from None
            for info in infos:
                end = info.header_offset + info.compress_size
                if end > size:
                    raise CheckpointError(f"the file is incomplete: zip member {info.filename!r} "
                                          f"ends at byte {end}, past the end of the {size}-byte "
                                          f"file")
        elif kind == "safetensors":
            header, body_start = _safetensors_header(f, size)
            offsets = [info.get("data_offsets") for name, info in header.items()
                       if name != "__metadata__" and isinstance(info, dict)]
            ends = [o[1] for o in offsets if isinstance(o, list) and len(o) == 2
                    and isinstance(o[1], int)]
            expected = body_start + max(ends, default=0)
            if expected != size:
                raise CheckpointError(f"the file is incomplete: the safetensors header describes "
                                      f"{expected} bytes but the file has {size}")
        else:
            raise CheckpointError(f"not a checkpoint: the file starts with {head!r}")


def _download(url: str) -> str:
    """Downloads an http(s) URL into the cache (once) and returns the local path.

    The file is written under a temporary name and renamed only once it is complete (length as
    announced, container intact), so a failed download never leaves a partial checkpoint behind.

    Raises:
      CheckpointError: naming the URL, if the download fails; nothing is cached then.
    """
    local = cache_path(url)
    if os.path.exists(local):
        return local
    local_dir = os.path.dirname(local)
    try:
        os.makedirs(local_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(".part", f".{os.path.basename(local)}.", local_dir)
    except OSError as e:
        raise CheckpointError(f"Could not download {url}: cannot write to the cache directory "
                              f"{local_dir} ({error_line(e)}); set ${_CACHE_ENV} to a writable "
                              f"directory") from None
    out = None
    try:
        try:
            with (out := _open_part(fd)):
                _fetch(url, out)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointError(
                    f"no space left on device writing {tmp} for {url}; nothing was cached "
                    f"(free some space or point ${_CACHE_ENV} at another disk)") from None
            raise _not_cached(url, f"{error_line(e)} (writing {tmp})") from None
        try:
            _check_complete(tmp)
        except CheckpointError as e:
            raise _not_cached(url, str(e)) from None
        os.replace(tmp, local)
    except BaseException:
        # Whatever went wrong (even Ctrl-C), no partial file stays next to the cache.
        if out is None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return local


# --- opening files ----------------------------------------------------------------------------


class _RemoteError(Exception):
    """A remote file system's own error while reading, kept apart from a corrupt file."""


class _Guarded:
    """Wraps a remote file so that any error its methods raise becomes a `_RemoteError`.

    Readers catch OSError/ValueError as signs of a corrupt file; a permission or network error
    from gcs must not be reported as one.
    """

    def __init__(self, f: Any):
        self._f = f

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._f, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                raise _RemoteError(error_line(e)) from e

        return call

    def __enter__(self) -> _Guarded:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._f.close()
        except Exception:  # A failed close after a failed read must not hide the first error.
            if exc[0] is None:
                raise


def _open_remote(path: str) -> _Guarded:
    from etils import epath  # Remote file systems only (gs:// through fsspec's gcsfs).

    try:
        p = epath.Path(path)
        exists = p.exists()
    except Exception as e:
        # gcsfs raises its own HttpError, OSErrors or google-auth's errors; a ValueError names
        # the path, where main.py would print a traceback.
        raise CheckpointError(f"{path}: cannot reach the remote file "
                              f"({remote_reason(e)})") from None
    if not exists:
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        return _Guarded(p.open("rb"))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot open the remote file ({remote_reason(e)})") from None


def open_file(path: str) -> BinaryIO:
    """Opens a local, gs:// or http(s):// checkpoint path for binary reading.

    Raises:
      FileNotFoundError: naming the path, if it does not exist.
      CheckpointError: naming the path, if a download or the remote file system fails.
    """
    if path.startswith(("http://", "https://")):
        path = _download(path)
    if "://" in path:
        return _open_remote(path)  # type: ignore[return-value]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    return open(path, "rb")


# --- numpy .npz -------------------------------------------------------------------------------


def _read_npz(f: BinaryIO) -> dict[str, np.ndarray]:
    with np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    # big_vision saves bfloat16 arrays with np.savez, which stores them as 2-byte void.
    return {k: a.view(ml_dtypes.bfloat16) if a.dtype.kind == "V" and a.dtype.itemsize == 2 else a
            for k, a in arrays.items()}


# --- PyTorch zip serialisation ----------------------------------------------------------------

_TORCH_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                         "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
                         "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                         "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
# Tensors may overlap their storage (expand(), as_strided()); materialising one is a copy of
# numel elements, so a crafted record could ask for terabytes from a few bytes. Weight files
# never hold large overlapping tensors.
_MAX_OVERLAPPING_BYTES = 64 << 20
_MAX_NESTING = 64


class _StorageType:
    """A `torch.*Storage` class the pickle names; `dtype` is None for one this reader lacks."""

    def __init__(self, name: str):
        dtype = _TORCH_STORAGE_DTYPES.get(name)
        self.name, self.dtype = name, None if dtype is None else np.dtype(dtype)


class _StorageRef:
    """A storage named by the pickle; read from the zip only when a tensor needs it."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRecord:
    """A tensor as the pickle describes it (torch's `_rebuild_tensor[_v2]`, whose further
    arguments are ignored); checked and copied out once its name is known."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Opaque:
    """Stands in for any non-tensor object in a training checkpoint (args, optimiser state)."""

    def __init__(self, *args: Any, **kwargs: Any):
        del args, kwargs

    __setstate__ = __init__  # The state a pickle's BUILD gives is ignored too.

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque()


# The only classes the unpickler rebuilds; any other becomes an `_Opaque`.
_TORCH_CLASSES: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _TensorRecord,
    ("torch._utils", "_rebuild_tensor"): _TensorRecord,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("builtins", c.__name__): c for c in (dict, list, tuple, set, slice)},
}


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds a torch state dict as tensor records; never imports or runs code from the file."""

    def __init__(self, f: BinaryIO):
        super().__init__(f)
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return _TORCH_CLASSES.get((module, name), _Opaque)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported torch persistent record {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise CheckpointError(f"unsupported torch storage record {pid!r:.200}")
        if storage_type.dtype is None:
            supported = ", ".join(sorted(_TORCH_STORAGE_DTYPES))
            raise CheckpointError(f"storage {key!r} has type torch.{storage_type.name}, which is "
                                  f"not supported (supported: {supported})")
        if not _is_int(numel) or numel < 0:
            raise CheckpointError(f"storage {key!r} has an invalid element count {numel!r:.50}")
        ref = self._storages.setdefault(key, _StorageRef(key, storage_type.dtype, numel))
        if (ref.dtype, ref.numel) != (storage_type.dtype, numel):
            raise CheckpointError(f"storage {key!r} is declared twice with different types/sizes")
        return ref


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_record(rec: _TensorRecord, name: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Checks a tensor record against its storage; returns (offset, size, stride).

    Nothing is read or viewed before this passes: as_strided trusts its arguments, so an
    unchecked record could read memory outside the storage or crash the process.
    """
    st = rec.storage
    if not isinstance(st, _StorageRef):
        raise CheckpointError(f"tensor {name!r}: its storage is not a torch storage record")
    where = f"tensor {name!r} (storage {st.key!r}: {st.numel} {st.dtype} elements)"
    offset, size, stride = rec.offset, rec.size, rec.stride
    sequences = isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
    if not (_is_int(offset) and sequences and all(map(_is_int, [*size, *stride]))):
        raise CheckpointError(f"{where}: offset, size and stride must be integers, got "
                              f"offset={offset!r:.50}, size={size!r:.100}, stride={stride!r:.100}")
    size, stride = tuple(size), tuple(stride)
    detail = f"offset={offset}, size={size}, stride={stride}"
    if len(size) != len(stride) or len(size) > 32:
        raise CheckpointError(f"{where}: size and stride do not describe a tensor ({detail})")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"{where}: negative offset, size or stride ({detail})")
    numel = math.prod(size)
    if numel == 0:
        return offset, size, stride  # An empty tensor reads nothing.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= st.numel:
        raise CheckpointError(f"{where}: the tensor reaches element {last}, past the end of its "
                              f"storage ({detail})")
    if numel > st.numel and numel * st.dtype.itemsize > _MAX_OVERLAPPING_BYTES:
        raise CheckpointError(f"{where}: the tensor has {numel} elements, more than its storage "
                              f"holds, and is too large to expand ({detail})")
    return offset, size, stride


def _read_torch_zip(f: BinaryIO) -> dict[str, Any]:
    with zipfile.ZipFile(f) as z:
        infos = {i.filename: i for i in z.infolist()}
        pkl = next((n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError("zip archive holds neither .npy arrays nor a torch data.pkl")
        root = pkl[: -len("data.pkl")]
        data: dict[str, np.ndarray] = {}

        def tensor(rec: _TensorRecord, name: str) -> np.ndarray:
            offset, size, stride = _check_record(rec, name)
            # The storage's zip member must exist and fit before anything is read.
            ref, member = rec.storage, f"{root}data/{rec.storage.key}"
            info = infos.get(member)
            if info is None:
                raise CheckpointError(f"tensor {name!r}: its storage {ref.key!r} is missing "
                                      f"from the archive (no member {member!r})")
            expected = ref.numel * ref.dtype.itemsize
            if info.file_size != expected:
                raise CheckpointError(
                    f"tensor {name!r}: storage {ref.key!r} holds {info.file_size} bytes but "
                    f"its record says {ref.numel} {ref.dtype} elements ({expected} bytes)")
            if math.prod(size) == 0:
                return np.zeros(size, ref.dtype)  # An empty tensor reads nothing.
            if ref.key not in data:
                data[ref.key] = np.frombuffer(z.read(member), dtype=ref.dtype)
            strides = tuple(s * ref.dtype.itemsize for s in stride)
            return np.array(np.lib.stride_tricks.as_strided(data[ref.key][offset:], size, strides))

        seen: set[int] = set()

        def materialise(obj: Any, name: str, depth: int) -> Any:
            if isinstance(obj, _TensorRecord):
                return tensor(obj, name)
            if not isinstance(obj, (dict, list, tuple)) or id(obj) in seen:
                return obj
            if depth > _MAX_NESTING:
                raise CheckpointError(f"{name!r}: containers nested over {_MAX_NESTING} deep")
            prefix = f"{name}/" if name else ""
            if isinstance(obj, tuple):
                return tuple(materialise(v, f"{prefix}{i}", depth + 1) for i, v in enumerate(obj))
            seen.add(id(obj))
            for k, v in list(obj.items() if isinstance(obj, dict) else enumerate(obj)):
                obj[k] = materialise(v, f"{prefix}{k}", depth + 1)
            return obj

        return materialise(_TorchUnpickler(io.BytesIO(z.read(pkl))).load(), "", 0)


# --- safetensors ------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def _safetensors_header(f: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    """Reads the header of a safetensors file at its start; returns (header, body start)."""
    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"the file is only {size} bytes, too short for safetensors")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
        raise CheckpointError(f"safetensors header is longer than the file (truncated?): {n} "
                              f"bytes announced, {size - 8} present")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError("the safetensors header is not a JSON object")
    return header, 8 + n


def _safetensors_entry(name: str, info: Any, body_len: int) -> tuple[np.dtype, list, int, int]:
    """Checks one header entry; returns (dtype, shape, begin, end)."""
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        raise CheckpointError(f"tensor {name!r}: the header entry needs dtype, shape and "
                              f"data_offsets, got {info!r:.100}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype_name not in _SAFETENSORS_DTYPES:
        supported = ", ".join(sorted(_SAFETENSORS_DTYPES))
        raise CheckpointError(f"tensor {name!r} has dtype {dtype_name!r:.30}, which this reader "
                              f"does not support (supported: {supported})")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(f"tensor {name!r}: invalid shape {shape!r:.100}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"tensor {name!r}: invalid data_offsets {offsets!r:.100}")
    begin, end = offsets
    if end > body_len:
        raise CheckpointError(f"tensor {name!r} runs past the end of the file (truncated?): its "
                              f"data ends at byte {end} of a {body_len}-byte data section")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    need = math.prod(shape) * dtype.itemsize
    if need != end - begin:
        raise CheckpointError(f"tensor {name!r}: shape {shape} of {dtype_name} needs {need} bytes "
                              f"but its data_offsets [{begin}, {end}] hold {end - begin}")
    return dtype, shape, begin, end


def _safetensors_entries(f: BinaryIO) -> tuple[dict[str, tuple[np.dtype, list, int, int]], int]:
    """Reads and checks an opened safetensors file's header, not its data.

    Returns:
      ({tensor name: (dtype, shape, begin, end)}, the byte where the data section starts).
    """
    size = f.seek(0, os.SEEK_END)
    header, body_start = _safetensors_header(f, size)
    return {name: _safetensors_entry(name, info, size - body_start)
            for name, info in header.items() if name != "__metadata__"}, body_start


def _read_safetensors(f: BinaryIO) -> dict[str, np.ndarray]:
    entries, body_start = _safetensors_entries(f)
    # The tensors tile the data section: each starts where the one before it ends. Checked for
    # every tensor before any is read, so a malformed file costs no read of its data.
    order, last, pos = sorted(entries.items(), key=lambda e: e[1][2:]), None, 0
    for name, (_, _, begin, end) in order:
        if begin != pos:
            before = f"tensor {last!r}" if last else "the data section's start"
            raise CheckpointError(
                f"tensor {name!r} (data_offsets [{begin}, {end}]) "
                + (f"overlaps {before}, which ends at byte {pos}" if begin < pos else
                   f"leaves bytes {pos}-{begin} unused after {before}"))
        last, pos = name, end
    # In file order: one sequential pass, each tensor read straight into its own buffer (no
    # second copy of the whole file in memory).
    arrays = {}
    for name, (dtype, shape, begin, end) in order:
        f.seek(body_start + begin)
        buf = bytearray(end - begin)
        if _read_into(f, buf) != len(buf):
            raise CheckpointError(f"tensor {name!r} runs past the end of the file (truncated?)")
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return {name: arrays[name] for name in entries}


def _read_into(f: BinaryIO, buf: bytearray) -> int:
    """Fills `buf` from `f` (by readinto where the file has it); returns the bytes read."""
    readinto = getattr(f, "readinto", None)
    view, got = memoryview(buf), 0
    while got < len(buf):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            chunk = f.read(len(buf) - got)
            n = len(chunk)
            view[got : got + n] = chunk
        if not n:
            break
        got += n
    return got


# --- dispatch ---------------------------------------------------------------------------------


_READERS: dict[str, Callable[[BinaryIO], dict[str, Any]]] = {
    "npz": _read_npz, "torch": _read_torch_zip, "safetensors": _read_safetensors}


def _container(f: BinaryIO) -> str | None:
    """'npz', 'torch' or 'safetensors', as an opened file's bytes say, or None; rewinds `f`."""
    kind = _kind_of_head(f.read(16))
    f.seek(0)
    if kind == "zip":
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
        f.seek(0)
        kind = "npz" if names and all(n.endswith(".npy") for n in names) else "torch"
    return kind


def _parse(f: BinaryIO) -> tuple[str, dict[str, Any]]:
    """Reads an opened checkpoint; every failure is a CheckpointError without the path."""
    try:
        kind = _container(f)
        if kind is None:
            raise CheckpointError("not a recognised checkpoint (expected .npz, torch zip or "
                                  ".safetensors)")
        return kind, _READERS[kind](f)
    except (CheckpointError, _RemoteError):
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, struct.error,
            pickle.UnpicklingError, json.JSONDecodeError, IndexError, TypeError) as e:
        raise CheckpointError(f"cannot read checkpoint, the file is truncated or corrupt "
                              f"({error_line(e)})") from None


def _read_path(path: str, label: str) -> tuple[str, dict[str, Any]]:
    with open_file(path) as f:
        try:
            return _parse(f)
        except CheckpointError as e:
            raise CheckpointError(f"{label}: {e}") from None
        except _RemoteError as e:
            raise CheckpointError(f"{label}: cannot read the remote file ({e})") from None


def _read_url(url: str) -> tuple[str, dict[str, Any]]:
    local = cache_path(url)
    label, rm = f"{url} (cached at {local})", f"remove the cached copy with: rm {local}"
    was_cached = os.path.exists(local)
    path = _download(url)  # Its errors name the URL; nothing is cached then.
    try:
        return _read_path(path, label)
    except CheckpointError as e:
        if not was_cached:
            raise CheckpointError(f"{e}; the file was just downloaded ({rm})") from None
        # A file that was fine when it entered the cache was damaged since (a full disk, a
        # killed copy, bit rot): one fresh download usually fixes it.
        logging.warning("%s; deleting the cached file %s and downloading it again", e, local)
        os.unlink(local)
    try:
        return _read_path(_download(url), label)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the cached file was deleted and downloaded again and still "
                              f"cannot be read, so the file on the server is likely bad "
                              f"({rm})") from None


def read(path: str) -> tuple[str, dict[str, Any]]:
    """Reads a checkpoint file.

    Args:
      path: local, gs:// or http(s):// path of an .npz, torch zip or .safetensors file.

    Returns:
      (container name, contents): contents is a flat {key: array} dict for npz and safetensors,
      and the unpickled object (usually a dict of arrays) for torch files.

    Raises:
      FileNotFoundError: the file does not exist.
      CheckpointError: the file is truncated, corrupt or not a checkpoint, its download failed,
        or the remote file system failed; the message names the path (and the cached file).
    """
    return _read_url(path) if path.startswith(("http://", "https://")) else _read_path(path, path)


# --- values -----------------------------------------------------------------------------------


def all_finite(a: np.ndarray) -> bool:
    """Whether a floating array holds no NaN or inf (always True for other dtypes).

    Works in slices along the first axis, so a large array needs no full-size temporary.
    """
    a = np.asarray(a)
    try:
        ml_dtypes.finfo(a.dtype)  # numpy floats and bfloat16/float8 alike; ints raise.
    except (TypeError, ValueError):
        return True
    if a.ndim == 0 or a.size == 0:
        return bool(np.isfinite(a).all())
    step = max(1, (1 << 22) // max(1, a.size // a.shape[0]))
    return all(bool(np.isfinite(a[i : i + step]).all()) for i in range(0, a.shape[0], step))


def nonfinite_keys(arrays: Mapping[str, Any]) -> list[str]:
    """The keys (sorted) of the floating arrays in `arrays` that hold NaN or inf values."""
    return sorted(k for k, v in arrays.items() if not all_finite(v))
