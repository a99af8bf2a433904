"""Checkpoint file readers on crafted bad input: torch records, safetensors headers, remote paths
and non-finite weights.

torch is not needed: `torch_pickle` writes the opcodes of a torch-like `data.pkl` by hand (the
same GLOBAL / BINPERSID / REDUCE records torch.save emits), and `write_pth` zips it up with its
storages the way torch.save lays them out. The makers (`write_pth`, `write_bad_pth`,
`write_safetensors`, `write_bad_safetensors`, `fake_remote`) are plain functions so other test
files can reuse them.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import struct
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from vqt_jax import checkpoints
from vqt_jax.checkpoints import CheckpointError, files
from vqt_jax.models import ViT

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())


# --- a torch-like pickle, written opcode by opcode ----------------------------------------------


class Global(NamedTuple):
    """A GLOBAL opcode: `module.name` as the unpickler's find_class sees it."""

    module: str
    name: str


class Reduce(NamedTuple):
    """func(*args), pickled as func, args, REDUCE."""

    func: Any
    args: tuple


class PersistentId(NamedTuple):
    """A persistent id (torch's storage record), pickled as the tuple then BINPERSID."""

    pid: tuple


def _opcodes(obj: Any) -> bytes:
    if isinstance(obj, Global):
        return b"c" + f"{obj.module}\n{obj.name}\n".encode()
    if isinstance(obj, Reduce):
        return _opcodes(obj.func) + _opcodes(obj.args) + b"R"
    if isinstance(obj, PersistentId):
        return _opcodes(obj.pid) + b"Q"
    if obj is None:
        return b"N"
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):  # LONG1: any size, signed little-endian.
        raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw
    if isinstance(obj, str):
        raw = obj.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(obj, tuple):
        return b"(" + b"".join(map(_opcodes, obj)) + b"t"
    if isinstance(obj, list):
        return b"]" + (b"(" + b"".join(map(_opcodes, obj)) + b"e" if obj else b"")
    if isinstance(obj, dict):
        items = b"".join(_opcodes(k) + _opcodes(v) for k, v in obj.items())
        return b"}" + (b"(" + items + b"u" if obj else b"")
    raise TypeError(f"cannot write {type(obj).__name__} into a torch pickle")


def torch_pickle(obj: Any) -> bytes:
    """A protocol-2 pickle of `obj` (dicts, lists, tuples, ints, strs, Global/Reduce/Persistent)."""
    return b"\x80\x02" + _opcodes(obj) + b"."


class Tensor(NamedTuple):
    """One tensor record of a torch pickle: a view (offset, size, stride) of a storage."""

    storage: str
    numel: int  # the storage's element count, as the record claims it
    offset: int = 0
    size: tuple = ()
    stride: tuple = ()
    storage_type: str = "FloatStorage"


def tensor_record(t: Tensor) -> Reduce:
    """The record torch.save writes for a tensor: _rebuild_tensor_v2(storage, offset, ...)."""
    storage = PersistentId(("storage", Global("torch", t.storage_type), t.storage, "cpu", t.numel))
    hooks = Reduce(Global("collections", "OrderedDict"), ())
    return Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                  (storage, t.offset, t.size, t.stride, False, hooks))


def _records(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return tensor_record(obj)
    if isinstance(obj, dict):
        return {k: _records(v) for k, v in obj.items()}
    return obj


def write_pth(path: pathlib.Path, state: dict, storages: dict[str, bytes],
              root: str = "archive") -> pathlib.Path:
    """Writes a torch.save-style zip: `root/data.pkl` (`state` with Tensor records) and storages."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{root}/data.pkl", torch_pickle(_records(state)))
        z.writestr(f"{root}/version", "3\n")
        for key, data in storages.items():
            z.writestr(f"{root}/data/{key}", data)
    return path


# Storage "0": six float32 elements 0..5.
SIX = np.arange(6, dtype=np.float32)


def write_good_pth(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Writes a torch file of valid but unusual views; returns the arrays torch would give."""
    state = {
        "matrix": Tensor("0", 6, 0, (2, 3), (3, 1)),
        "transposed": Tensor("0", 6, 0, (3, 2), (1, 3)),
        "tail": Tensor("0", 6, 4, (2,), (1,)),
        "scalar": Tensor("0", 6, 5, (), ()),
        "empty": Tensor("0", 6, 6, (0, 4), (4, 1)),  # offset at the end: fine, reads nothing
        "expanded": Tensor("0", 6, 2, (3, 2), (0, 1)),  # x.expand(): stride 0
        "bf16": Tensor("1", 2, 0, (2,), (1,), "BFloat16Storage"),
    }
    bf16 = np.array([1.5, -2.0], ml_dtypes.bfloat16)
    write_pth(path, {"model": state}, {"0": SIX.tobytes(), "1": bf16.tobytes()})
    return {
        "model/matrix": SIX.reshape(2, 3),
        "model/transposed": SIX.reshape(2, 3).T,
        "model/tail": SIX[4:],
        "model/scalar": SIX[5],
        "model/empty": np.zeros((0, 4), np.float32),
        "model/expanded": np.stack([SIX[2:4]] * 3),
        "model/bf16": bf16,
    }


# kind -> (the "w" tensor record or a whole state, storages, regex the error must match).
# Every record here once reached as_strided unchecked: a crash or a read of heap memory.
_W = "tensor 'w' \\(storage '0': 6 float32 elements\\)"
BAD_PTH: dict[str, tuple[Any, dict[str, bytes], str]] = {
    "offset_past_end": (Tensor("0", 6, 6, (1,), (1,)), {}, f"{_W}: .*reaches element 6, past"),
    "size_past_end": (Tensor("0", 6, 0, (2, 4), (4, 1)), {}, f"{_W}: .*reaches element 7"),
    "stride_past_end": (Tensor("0", 6, 0, (2, 3), (100, 1)), {}, f"{_W}: .*reaches element 102"),
    "huge_offset": (Tensor("0", 6, 2**62, (4,), (1,)), {}, f"{_W}: .*past the end"),
    "huge_size": (Tensor("0", 6, 0, (2**40,), (1,)), {}, f"{_W}: .*past the end"),
    "scalar_past_end": (Tensor("0", 6, 6, (), ()), {}, f"{_W}: .*reaches element 6"),
    "huge_expand": (Tensor("0", 6, 0, (2**20, 2**20), (0, 0)), {}, f"{_W}: .*too large to expand"),
    "negative_offset": (Tensor("0", 6, -1, (2,), (1,)), {}, f"{_W}: negative offset"),
    "negative_size": (Tensor("0", 6, 0, (-2, 3), (3, 1)), {}, f"{_W}: negative"),
    "negative_stride": (Tensor("0", 6, 5, (3,), (-1,)), {}, f"{_W}: negative"),
    "rank_mismatch": (Tensor("0", 6, 0, (2, 3), (1,)), {}, f"{_W}: size and stride do not"),
    "non_int_size": (Tensor("0", 6, 0, ("2",), (1,)), {}, f"{_W}: .*must be integers"),
    "storage_too_short": (Tensor("0", 6, 0, (2,), (1,)), {"0": b"\0" * 20},
                          "tensor 'w': storage '0' holds 20 bytes but its record says 6 float32 "
                          "elements \\(24 bytes\\)"),
    "storage_missing": (Tensor("0", 6, 0, (2,), (1,)), {"0": None},
                        "tensor 'w': its storage '0' is missing from the archive "
                        "\\(no member 'archive/data/0'\\)"),
    "unsupported_storage": (Tensor("0", 6, 0, (2,), (1,), "ComplexFloatStorage"), {},
                            "storage '0' has type torch.ComplexFloatStorage, which is not "
                            "supported \\(supported: .*FloatStorage"),
    "negative_numel": (Tensor("0", -6, 0, (2,), (1,)), {}, "storage '0' has an invalid element"),
    "not_a_storage": (Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                             (7, 0, (2,), (1,), False, None)), {},
                      "tensor 'w': its storage is not a torch storage record"),
    "nested_key": ({"state_dict": {"w": Tensor("0", 6, 9, (1,), (1,))}}, {},
                   "tensor 'state_dict/w' \\(storage '0'.*past the end"),
}


def write_bad_pth(path: pathlib.Path, kind: str) -> tuple[pathlib.Path, str]:
    """Writes the crafted torch file `kind` of BAD_PTH; returns (path, regex of its error)."""
    record, storages, pattern = BAD_PTH[kind]
    state = record if isinstance(record, dict) else {"w": record}
    data = {"0": SIX.tobytes(), **storages}
    write_pth(path, state, {k: v for k, v in data.items() if v is not None})
    return path, pattern


def test_hand_written_torch_pickle_reads_like_torch(tmp_path):
    expected = write_good_pth(tmp_path / "good.pth")
    kind, contents = files.read(str(tmp_path / "good.pth"))
    assert kind == "torch"
    got = {f"model/{k}": v for k, v in contents["model"].items()}
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_golden_torch_files_still_read():
    # Real torch.save output, for the same records the checks above look at.
    kind, contents = files.read(str(GOLDEN / "timm_vit.pth"))
    assert kind == "torch"
    assert contents["cls_token"].shape == (1, 1, 48)
    assert all(isinstance(v, np.ndarray) for v in contents.values())


@pytest.mark.parametrize("kind", sorted(BAD_PTH))
def test_bad_torch_record_is_one_named_error(tmp_path, kind):
    assert_one_named_error(*write_bad_pth(tmp_path / f"{kind}.pth", kind))


def assert_one_named_error(path: pathlib.Path, pattern: str) -> None:
    """Reading `path` raises one CheckpointError line that starts with the path."""
    with pytest.raises(CheckpointError) as e:
        files.read(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert re.search(pattern, msg), msg
    assert "\n" not in msg


# --- safetensors --------------------------------------------------------------------------------

_ST_NAMES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
    np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64",
    np.dtype(np.int64): "I64", np.dtype(np.bool_): "BOOL",
}


def write_safetensors(path: pathlib.Path, header: dict, body: bytes) -> pathlib.Path:
    """Writes a safetensors file from a header dict and a data section, as given (no checks)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def safetensors_of(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    """Writes `arrays` as a valid safetensors file."""
    header, body = {"__metadata__": {"format": "np"}}, b""
    for name, a in arrays.items():
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    return write_safetensors(path, header, body)


def test_safetensors_new_dtypes_read(tmp_path):
    arrays = {
        "e4m3": np.array([0.5, -448.0, 1.75], ml_dtypes.float8_e4m3fn),
        "e5m2": np.array([[0.25, -57344.0]], ml_dtypes.float8_e5m2),
        "u16": np.array([1, 65535], np.uint16),
        "u32": np.array([2**32 - 1], np.uint32),
        "u64": np.array([2**64 - 1, 3], np.uint64),
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "empty": np.zeros((0, 3), np.float32),
    }
    path = safetensors_of(tmp_path / "new.safetensors", arrays)
    kind, got = files.read(str(path))
    assert kind == "safetensors" and list(got) == list(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        np.testing.assert_array_equal(got[k].astype(np.float64), a.astype(np.float64), err_msg=k)
    got["f32"][0, 0] = 7  # writable, like the arrays of the other readers


def _entry(dtype="F32", shape=(2, 3), offsets=(0, 24)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


_BODY = np.arange(6, dtype=np.float32).tobytes()  # 24 bytes
# kind -> (header, body, regex the error must match).
BAD_SAFETENSORS: dict[str, tuple[dict, bytes, str]] = {
    "unsupported_dtype": ({"w": _entry("F8_E4M3FNUZ", (24,))}, _BODY,
                          "tensor 'w' has dtype 'F8_E4M3FNUZ', which this reader does not "
                          "support \\(supported: .*F8_E4M3, F8_E5M2.*U64"),
    "unknown_dtype": ({"w": _entry("C64", (3,))}, _BODY, "tensor 'w' has dtype 'C64'"),
    "shape_vs_offsets": ({"w": _entry("F32", (2, 2))}, _BODY,
                         "tensor 'w': shape \\[2, 2\\] of F32 needs 16 bytes but its "
                         "data_offsets \\[0, 24\\] hold 24"),
    "past_end": ({"w": _entry("F32", (2, 4), (0, 32))}, _BODY,
                 "tensor 'w' runs past the end of the file \\(truncated\\?\\): its data ends at "
                 "byte 32 of a 24-byte data section"),
    "reversed_offsets": ({"w": _entry("F32", (0,), (24, 0))}, _BODY,
                         "tensor 'w': invalid data_offsets \\[24, 0\\]"),
    "negative_offset": ({"w": _entry("F32", (7,), (-4, 24))}, _BODY,
                        "tensor 'w': invalid data_offsets"),
    "negative_shape": ({"w": _entry("F32", (-2, -3))}, _BODY, "tensor 'w': invalid shape"),
    "missing_field": ({"w": {"shape": [6], "data_offsets": [0, 24]}}, _BODY,
                      "tensor 'w': the header entry needs dtype, shape and data_offsets"),
    "overlapping_offsets": ({"w": _entry("F32", (4,), (0, 16)), "v": _entry("F32", (4,), (8, 24))},
                            _BODY, "tensor 'v' \\(data_offsets \\[8, 24\\]\\) overlaps tensor 'w', "
                            "which ends at byte 16"),
    "gap_in_offsets": ({"w": _entry("F32", (2,), (0, 8)), "v": _entry("F32", (2,), (16, 24))},
                       _BODY, "tensor 'v' \\(data_offsets \\[16, 24\\]\\) leaves bytes 8-16 "
                       "unused after tensor 'w'"),
}


def write_bad_safetensors(path: pathlib.Path, kind: str) -> tuple[pathlib.Path, str]:
    """Writes the crafted safetensors file `kind`; returns (path, regex of its error)."""
    if kind == "header_too_long":
        path.write_bytes(struct.pack("<Q", 10**6) + b'{"w": 1}')
        return path, "safetensors header is longer than the file \\(truncated\\?\\)"
    if kind == "header_not_json":
        path.write_bytes(struct.pack("<Q", 6) + b"{nope}")
        return path, "the safetensors header is not valid JSON"
    header, body, pattern = BAD_SAFETENSORS[kind]
    return write_safetensors(path, header, body), pattern


@pytest.mark.parametrize("kind", sorted(BAD_SAFETENSORS) + ["header_too_long", "header_not_json"])
def test_bad_safetensors_is_one_named_error(tmp_path, kind):
    assert_one_named_error(*write_bad_safetensors(tmp_path / f"{kind}.safetensors", kind))


# --- remote file systems (gs://), without a network ---------------------------------------------


class OpError(Exception):
    """Stands in for tensorflow.errors.OpError (TF is too slow to import in a unit test)."""


class PermissionDeniedError(OpError):
    pass


class UnavailableError(OpError):
    pass


class DefaultCredentialsError(Exception):
    """google.auth's error when no credentials are set up (not an OSError/ValueError)."""


class _RemoteFile(io.BytesIO):
    """A remote file whose reads fail after `fail_after` bytes, as a dropped connection does."""

    def __init__(self, data: bytes, fail_after: int | None, error: Exception | None):
        super().__init__(data)
        self._fail_after, self._error = fail_after, error

    def read(self, n: int | None = -1) -> bytes:
        want = n if n is not None and n >= 0 else len(self.getbuffer()) - self.tell()
        if self._fail_after is not None and self.tell() + want > self._fail_after:
            raise self._error
        return super().read(n)


def fake_remote(data: bytes | None = None, *, exists_error: Exception | None = None,
                open_error: Exception | None = None, read_error: Exception | None = None,
                fail_after: int = 0) -> type:
    """An etils.epath.Path stand-in serving `data` (None: the file does not exist), or failing."""

    class FakePath:
        def __init__(self, path: str):
            self.path = path

        def exists(self) -> bool:
            if exists_error is not None:
                raise exists_error
            return data is not None

        def open(self, mode: str = "r") -> io.BytesIO:
            assert mode == "rb"
            if open_error is not None:
                raise open_error
            return _RemoteFile(data, fail_after if read_error else None, read_error)

    return FakePath


_403 = ("Error executing an HTTP request: HTTP response code 403 with body '{\n  \"error\": {\n"
        "    \"code\": 403,\n    \"message\": \"caller does not have storage.objects.get\"}}'")
REMOTE_FAILURES = {
    "permission_denied": (dict(exists_error=PermissionDeniedError(_403)),
                          "cannot reach the remote file \\(PermissionDeniedError: Error executing "
                          "an HTTP request: HTTP response code 403"),
    "no_credentials": (dict(exists_error=DefaultCredentialsError("Could not automatically "
                                                                 "determine credentials.")),
                       "cannot reach the remote file \\(DefaultCredentialsError: Could not"),
    "unreachable_on_open": (dict(data=b"", open_error=UnavailableError("bucket unreachable\n")),
                            "cannot open the remote file \\(UnavailableError: bucket "
                            "unreachable\\)"),
    # An OSError mid-read must not be reported as a corrupt file.
    "dropped_mid_read": (dict(read_error=OSError("connection reset by peer"), fail_after=1000),
                         "cannot read the remote file \\(OSError: connection reset by peer\\)"),
    "op_error_mid_read": (dict(read_error=UnavailableError("503 backend error"), fail_after=30000),
                          "cannot read the remote file \\(UnavailableError: 503 backend error\\)"),
}


@pytest.mark.parametrize("case", sorted(REMOTE_FAILURES))
def test_remote_file_system_errors_are_one_line(monkeypatch, case):
    from etils import epath

    kw, pattern = REMOTE_FAILURES[case]
    kw = {"data": (GOLDEN / "bv_vit.npz").read_bytes(), **kw}
    monkeypatch.setattr(epath, "Path", fake_remote(**kw))
    url = "gs://some-bucket/vit/bv_vit.npz"
    with pytest.raises(CheckpointError) as e:
        files.read(url)
    msg = str(e.value)
    assert msg.startswith(f"{url}: "), msg
    assert re.search(pattern, msg), msg
    assert "\n" not in msg and "truncated" not in msg


def test_remote_missing_file(monkeypatch):
    from etils import epath

    monkeypatch.setattr(epath, "Path", fake_remote(None))
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found: gs://b/x.npz"):
        files.read("gs://b/x.npz")


@pytest.mark.parametrize("name", ["bv_vit.npz", "timm_vit.pth", "clip_vit.safetensors"])
def test_remote_file_reads_like_local(monkeypatch, name):
    from etils import epath

    monkeypatch.setattr(epath, "Path", fake_remote((GOLDEN / name).read_bytes()))
    kind, remote = files.read(f"gs://b/{name}")
    _, local = files.read(str(GOLDEN / name))
    assert sorted(remote) == sorted(local)
    for k in local:
        np.testing.assert_array_equal(remote[k], local[k])


# --- non-finite weights -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
              ml_dtypes.float8_e5m2])
def test_all_finite_per_dtype(dtype):
    a = np.ones((70, 3), dtype)
    assert files.all_finite(a)
    a[69, 2] = np.nan
    assert not files.all_finite(a)
    assert not files.all_finite(np.array(np.nan, dtype))  # 0-d
    assert files.all_finite(np.zeros((0, 4), dtype))
    if dtype is not ml_dtypes.float8_e4m3fn:  # e4m3fn has no inf
        b = np.zeros(5, dtype)
        b[0] = np.inf
        assert not files.all_finite(b)


def test_all_finite_ignores_non_floats():
    assert files.all_finite(np.array([-1, 2**31 - 1], np.int32))
    assert files.all_finite(np.array([True, False]))
    assert files.nonfinite_keys({"a": np.zeros(2), "b": np.array([np.inf]),
                                 "c": np.array([1, 2])}) == ["b"]


@pytest.fixture(scope="module")
def bv_model_variables():
    kw = dict(MANIFEST["cases"]["bv_npz"]["model"])
    kw["patch_size"] = tuple(kw["patch_size"])
    size = MANIFEST["cases"]["bv_npz"]["image_size"]
    return ViT(**kw).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _bv_with(path: pathlib.Path, values: dict[str, float]) -> pathlib.Path:
    with np.load(GOLDEN / "bv_vit.npz") as z:
        flat = {k: z[k] for k in z.files}
    for k, v in values.items():
        flat[f"params/{k}"] = flat[f"params/{k}"].copy()
        flat[f"params/{k}"].flat[1] = v
    np.savez(path, **flat)
    return path


def test_nonfinite_weights_are_named_at_load(tmp_path, bv_model_variables):
    dense = "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"
    path = _bv_with(tmp_path / "diverged.npz",
                    {dense: np.nan, "cls": np.inf, "Transformer/encoder_norm/bias": -np.inf})
    with pytest.raises(CheckpointError) as e:
        checkpoints.load(str(path), bv_model_variables)
    assert str(e.value) == (
        f"{path}: 3 tensors hold NaN or inf values, e.g. Transformer/encoder_norm/bias, "
        f"{dense}, cls"
    )
    one = _bv_with(tmp_path / "one.npz", {"pos_embedding": np.nan})
    with pytest.raises(CheckpointError, match=re.escape(
            f"{one}: 1 tensor holds NaN or inf values, e.g. pos_embedding")):
        checkpoints.load(str(one), bv_model_variables)


def test_nonfinite_head_not_loaded_is_not_an_error(tmp_path, bv_model_variables):
    # The head keeps its fresh initialisation by default, so its values do not matter.
    path = _bv_with(tmp_path / "nan_head.npz", {"head/kernel": np.nan})
    loaded = checkpoints.load(str(path), bv_model_variables)
    assert np.all(np.isfinite(loaded["params"]["head"]["kernel"]))
    with pytest.raises(CheckpointError, match="1 tensor holds NaN or inf values, e.g. head/kernel"):
        checkpoints.load(str(path), bv_model_variables, dont_load=())
