"""Reading checkpoint files into flat {name: numpy array} dicts, without torch or TF.

Three container formats, recognised by their bytes rather than by their file names (bucket paths
often have none):
  * numpy `.npz` (big_vision and the original vision_transformer releases);
  * PyTorch's zip serialisation (`torch.save`, `.pth`/`.pt`/`.bin`), read by a restricted
    unpickler that only rebuilds tensors and containers, so no code from the file ever runs and
    torch need not be installed;
  * `.safetensors`.

Paths may be local, `gs://...` (and anything else etils.epath / tf.io.gfile opens), or
`http(s)://...` (downloaded once into a cache directory, atomically).
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_CACHE_ENV = "VQT_JAX_CACHE"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def cache_dir() -> str:
    """Where downloaded checkpoints are kept: $VQT_JAX_CACHE or ~/.cache/vqt_jax."""
    return os.environ.get(_CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "vqt_jax"))


def _download(url: str) -> str:
    """Downloads an http(s) URL into the cache (once) and returns the local path.

    The file is written under a temporary name and renamed when complete, so an interrupted
    download never leaves a partial checkpoint behind.
    """
    parsed = urllib.parse.urlparse(url)
    name = os.path.basename(parsed.path) or "checkpoint"
    sub = (parsed.netloc + os.path.dirname(parsed.path)).replace("/", "_").replace(":", "_")
    local_dir = os.path.join(cache_dir(), sub)
    local = os.path.join(local_dir, name)
    if os.path.exists(local):
        return local
    os.makedirs(local_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 22):
                out.write(chunk)
        os.replace(tmp, local)
    except Exception as e:
        os.unlink(tmp)
        raise CheckpointError(f"Could not download {url}: {e}") from e
    return local


def open_file(path: str) -> BinaryIO:
    """Opens a local, gs:// or http(s):// checkpoint path for binary reading.

    Raises:
      FileNotFoundError: naming the path, if it does not exist.
    """
    if path.startswith(("http://", "https://")):
        path = _download(path)
    if "://" not in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return open(path, "rb")
    from etils import epath  # Remote file systems only; gs:// goes through tf.io.gfile.

    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    return p.open("rb")


# --- numpy .npz -------------------------------------------------------------------------------


def _npz_array(a: np.ndarray) -> np.ndarray:
    # big_vision saves bfloat16 arrays with np.savez, which stores them as 2-byte void.
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:
        return a.view(ml_dtypes.bfloat16)
    return a


def _read_npz(f: BinaryIO) -> dict[str, np.ndarray]:
    with np.load(f, allow_pickle=False) as z:
        return {k: _npz_array(z[k]) for k in z.files}


# --- PyTorch zip serialisation ----------------------------------------------------------------

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_TORCH_STORAGE_DTYPES[name])


class _Opaque:
    """Stands in for any non-tensor object in a training checkpoint (args, optimiser state)."""

    def __init__(self, *args: Any, **kwargs: Any):
        del args, kwargs

    def __setstate__(self, state: Any) -> None:
        del state

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque()


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any):
    if not size:
        return storage[offset].copy()
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds a torch state dict as numpy arrays; never imports or runs code from the file."""

    def __init__(self, f: BinaryIO, load_storage: Callable[[str, np.dtype], np.ndarray]):
        super().__init__(f)
        self._load_storage = load_storage
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in ("dict", "list", "tuple", "set", "slice"):
            return {"dict": dict, "list": list, "tuple": tuple, "set": set, "slice": slice}[name]
        return _Opaque

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"Unsupported torch storage record {pid!r}")
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, storage_type.dtype)
        return self._storages[key]


def _read_torch_zip(f: BinaryIO) -> dict[str, Any]:
    with zipfile.ZipFile(f) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError("zip archive holds neither .npy arrays nor a torch data.pkl")
        root = pkl[: -len("data.pkl")]

        def load_storage(key: str, dtype: np.dtype) -> np.ndarray:
            return np.frombuffer(z.read(f"{root}data/{key}"), dtype=dtype)

        with z.open(pkl) as p:
            return _TorchUnpickler(io.BytesIO(p.read()), load_storage).load()


# --- safetensors ------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors(f: BinaryIO) -> dict[str, np.ndarray]:
    data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError("safetensors header is longer than the file (truncated?)")
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if end > len(body):
            raise CheckpointError(f"tensor {name!r} runs past the end of the file (truncated?)")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(info["shape"]).copy()
    return out


# --- dispatch ---------------------------------------------------------------------------------


def _container(head: bytes, f: BinaryIO) -> str:
    if head[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
        f.seek(0)
        return "npz" if names and all(n.endswith(".npy") for n in names) else "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


_READERS: dict[str, Callable[[BinaryIO], dict[str, Any]]] = {
    "npz": _read_npz,
    "torch": _read_torch_zip,
    "safetensors": _read_safetensors,
}


def read(path: str) -> tuple[str, dict[str, Any]]:
    """Reads a checkpoint file.

    Args:
      path: local, gs:// or http(s):// path of an .npz, torch zip or .safetensors file.

    Returns:
      (container name, contents): contents is a flat {key: array} dict for npz and safetensors,
      and the unpickled object (usually a dict of arrays) for torch files.

    Raises:
      FileNotFoundError: the file does not exist.
      CheckpointError: the file is truncated, corrupt or not a checkpoint.
    """
    with open_file(path) as f:
        head = f.read(16)
        f.seek(0)
        try:
            kind = _container(head, f)
            if kind == "unknown":
                raise CheckpointError(
                    "not a recognised checkpoint (expected .npz, torch zip or .safetensors)"
                )
            return kind, _READERS[kind](f)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, struct.error,
                pickle.UnpicklingError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                f"({type(e).__name__}: {e})"
            ) from None
