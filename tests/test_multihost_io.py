"""Multi-host I/O: remote (gs://) workdirs, feature collection and placement across processes.

Nothing here touches the network: a gs:// workdir is checked on the paths computed, and on a
fake bucket (epath's backends redirected to a local directory). The multi-process test runs
this module as a script in 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import ml_collections
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from tests import multihost
from vqt_jax import export
from vqt_jax import workdir as workdir_lib
from vqt_jax.training import checkpointing, metrics_io

BUCKET = "gs://bucket/run"


def test_checkpoint_dir_of_a_remote_workdir_stays_remote(monkeypatch):
    assert str(checkpointing.checkpoint_dir(BUCKET)) == f"{BUCKET}/checkpoints"
    assert str(checkpointing.checkpoint_dir(epath.Path(BUCKET))) == f"{BUCKET}/checkpoints"
    # The manager is built on that directory (a stand-in records it: nothing is created).
    seen = []
    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager",
                        lambda directory, **kw: seen.append(directory))
    checkpointing.manager(BUCKET, keep=2)
    assert [str(d) for d in seen] == [f"{BUCKET}/checkpoints"]


def test_checkpoint_dir_of_a_relative_local_workdir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = checkpointing.checkpoint_dir("runs/a")
    assert os.path.isabs(os.fspath(path))
    assert os.fspath(path) == os.path.join(str(tmp_path), "runs", "a", "checkpoints")


@contextlib.contextmanager
def fake_gcs(root: str | os.PathLike) -> Iterator[Callable[[str], str]]:
    """gs://B/... paths land in ROOT/B/...; any local-only call on a gs: path raises.

    Yields `local`, the map from a gs:// path to its file under ROOT, for what does not go
    through epath (orbax's arrays, which TensorStore writes) and a test maps on its own.
    Usable in a test (`fake_bucket`) and in a worker process alike.
    """
    root = os.fspath(root)

    def local(path):
        p = os.fspath(path)
        return os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p

    def redirect(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def redirect2(original, src, dst, *args, **kwargs):
        return original(local(src), local(dst), *args, **kwargs)

    def guard(fn):
        def guarded(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith("gs:"):
                raise AssertionError(f"local-only {fn.__qualname__} on {path}")
            return fn(path, *args, **kwargs)
        return guarded

    fns = {n: redirect for n in ("open", "exists", "isdir", "listdir", "glob", "makedirs",
                                 "mkdir", "remove", "rmtree", "stat")}
    with contextlib.ExitStack() as stack:
        for module, name in [(os.path, "exists"), (os.path, "isfile"), (os, "replace"),
                             (os, "unlink"), (os, "remove"), (os, "open"), (builtins, "open")]:
            stack.enter_context(mock.patch.object(module, name, guard(getattr(module, name))))
        # With tensorflow installed, epath sends gs:// to tf.io.gfile whatever its backend
        # table says (mock_epath only replaces the table): make it use the table.
        stack.enter_context(mock.patch.object(gpath, "_is_tf_installed", lambda: False))
        stack.enter_context(epath_testing.mock_epath(**fns, rename=redirect2,
                                                     replace=redirect2, copy=redirect2))
        # Never reach a real bucket: stop here if epath picks another backend.
        backend = epath.Path(BUCKET)._backend  # noqa: SLF001
        assert type(backend).__name__ == "_MockBackend", backend
        yield local


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """gs://... paths land in tmp_path/gcs/... (`fake_gcs`); yields the directory of BUCKET.

    The test runs in an empty current directory: a gs:// path handed to a local call would
    name CWD/gs:/..., so besides the guards, that directory must stay empty.
    """
    root = tmp_path / "gcs"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs(root):
        epath.Path(BUCKET).mkdir(parents=True)
        yield root / "bucket" / "run"
    assert not os.listdir(cwd)


def _config(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"lr": 0.1, "wd": 0.0, "model": {"num_queries": 2},
                                      "data_dir": "/data", **kw})


def _workdir_round_trip(workdir: str) -> None:
    """config.json, the config guard, a non-finite stop and its lr change, results.json."""
    config = _config()
    assert workdir_lib.recorded_config(workdir) is None
    workdir_lib.record(workdir, config, None, 0)
    assert workdir_lib.recorded_config(workdir) == workdir_lib.as_dict(config)
    assert workdir_lib.load_config(workdir).lr == 0.1
    assert workdir_lib.check(workdir, _config(data_dir="/elsewhere")) is None  # neutral field
    with pytest.raises(workdir_lib.WorkdirError, match=r"wd: 0\.0 \(recorded\) vs 0\.5"):
        workdir_lib.check(workdir, _config(wd=0.5))
    with pytest.raises(workdir_lib.WorkdirError):  # a lower lr needs a non-finite stop first
        workdir_lib.check(workdir, _config(lr=0.01))
    workdir_lib.record_nonfinite_stop(workdir, 7, 0.1, "loss is nan")
    change = workdir_lib.check(workdir, _config(lr=0.01))
    assert change == {"lr": (0.1, 0.01)}
    workdir_lib.record(workdir, _config(lr=0.01), change, 6)
    assert workdir_lib.changes(workdir) == [{"resumed_at_step": 6,
                                             "lr": {"from": 0.1, "to": 0.01}}]
    assert not (epath.Path(workdir) / workdir_lib.NONFINITE_FILE).exists()
    assert workdir_lib.read_results(workdir) is None
    workdir_lib.write_results(workdir, {"top1": 0.5})
    workdir_lib.write_json(f"{workdir}/results.json", {"top1": 0.75})  # as train.py calls it
    assert workdir_lib.read_results(workdir) == {"top1": 0.75}
    with workdir_lib.lock(workdir):
        pass


def _metrics_round_trip(workdir: str) -> None:
    """metrics.jsonl, and a TensorBoard event file, both through epath."""
    writer = metrics_io.create_writer(workdir, is_chief=True)
    writer.write_hparams({"lr": 0.1})
    writer.write_scalars(2, {"train/loss": np.float32(1.5)})
    writer.close()
    writer = metrics_io.create_writer(workdir, is_chief=True)  # a resumed run appends
    writer.write_scalars(3, {"train/loss": 1.25})
    lines = (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"hparams": {"lr": 0.1}},
                                              {"step": 2, "train/loss": 1.5},
                                              {"step": 3, "train/loss": 1.25}]
    events = sorted(epath.Path(workdir).glob("events.out.tfevents.*"))
    assert len(events) == 2 and all(b"train/loss" in p.read_bytes() for p in events)


def test_workdir_files_of_a_remote_workdir_go_through_epath(fake_bucket, caplog):
    _workdir_round_trip(BUCKET)
    assert f"workdir {BUCKET} is not local: it is not locked" in caplog.text
    _metrics_round_trip(BUCKET)
    # Everything landed in the (fake) bucket, and only the workdir's own files.
    files = sorted(os.listdir(fake_bucket))
    assert [f for f in files if not f.startswith("events.out.tfevents.")] == [
        "config.json", "config_changes.json", "metrics.jsonl", "results.json"]
    assert json.loads((fake_bucket / "results.json").read_text()) == {"top1": 0.75}


def test_workdir_files_of_a_local_workdir(tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    _workdir_round_trip(str(workdir))
    _metrics_round_trip(str(workdir))
    # The lock's empty file stays (see workdir.lock); a bucket has no lock, so none there.
    files = sorted(os.listdir(workdir))
    assert [f for f in files if not f.startswith("events.out.tfevents.")] == [
        workdir_lib.LOCK_FILE, "config.json", "config_changes.json", "metrics.jsonl",
        "results.json"]


def test_local_json_writes_stay_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous file whole (and no temporary file)."""
    path = tmp_path / "results.json"
    workdir_lib.write_json(str(path), {"top1": 0.5})
    cls = type(epath.Path(tmp_path))
    original = cls.write_bytes

    def dies_half_way(self, data, *args, **kwargs):
        original(self, data[:len(data) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(cls, "write_bytes", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        workdir_lib.write_json(str(path), {"top1": 0.75, "more": list(range(50))})
    assert json.loads(path.read_text()) == {"top1": 0.5}
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_gs_url_that_lost_a_slash_is_never_local(tmp_path, monkeypatch):
    """pathlib joins gs://b/x into gs:/b/x (abspath: CWD/gs:/b/x); such a path is refused,
    by name, wherever a workdir path is used, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    assert str(Path(BUCKET) / "dtd") == "gs:/bucket/run/dtd"  # what the sweep used to join
    assert not workdir_lib.is_local(BUCKET) and not workdir_lib.is_local(f"{BUCKET}/dtd")
    assert str(workdir_lib.as_path(BUCKET) / "dtd") == f"{BUCKET}/dtd"
    assert workdir_lib.is_local("runs/gs/a") and workdir_lib.is_local("/tmp/gs:x/a")
    for mangled in ("gs:/bucket/run/dtd", os.path.abspath("gs:/bucket/run/dtd"), "s3:/b"):
        message = f"{re.escape(mangled)}: a remote URL that lost a slash"
        for use in (workdir_lib.is_local, workdir_lib.as_path, workdir_lib.read_results,
                    checkpointing.checkpoint_dir, lambda p: workdir_lib.write_results(p, {})):
            with pytest.raises(ValueError, match=message):
                use(mangled)
    assert not os.listdir(tmp_path)


def _export_to(path: str) -> str:
    """Writes a tiny VQT export (queries and head of 3 classes) to `path`."""
    config = ml_collections.ConfigDict({"method": "vqt", "task": "folder", "init": "",
                                        "image_size": 32, "model": {"num_queries": 2},
                                        "normalization": "imagenet"})
    variables = {"params": {"head": {"kernel": np.arange(12, dtype=np.float32).reshape(4, 3),
                                     "bias": np.ones(3, np.float32)}},
                 "queries": {"tokens": np.full((2, 1, 4), 0.5, np.float32)}}
    return export.write(path, config=config, variables=variables, provided=frozenset(),
                        class_names=["a", "b", "c"], results={"top1": 0.75})


def test_export_read_reads_what_write_wrote_to_a_bucket(fake_bucket, tmp_path):
    path = _export_to(f"{BUCKET}/model.vqt")
    assert os.listdir(fake_bucket) == ["model.vqt"]
    remote = export.read(path)
    local = export.read(_export_to(str(tmp_path / "model.vqt")))
    assert remote.path == path and remote.class_names == ["a", "b", "c"]
    assert remote.meta == local.meta and remote.meta["results"] == {"top1": 0.75}
    assert sorted(remote.arrays) == ["params/head/bias", "params/head/kernel", "queries/tokens"]
    for k, v in local.arrays.items():
        np.testing.assert_array_equal(remote.arrays[k], v, err_msg=k)
    with pytest.raises(FileNotFoundError, match=f"Export file not found: {BUCKET}/none.vqt"):
        export.read(f"{BUCKET}/none.vqt")
    (fake_bucket / "bad.vqt").write_bytes(b"not a zip")
    with pytest.raises(export.ExportError, match=f"{BUCKET}/bad.vqt is not a readable"):
        export.read(f"{BUCKET}/bad.vqt")


# --- 2 processes x 2 CPU devices ------------------------------------------------------------

NUM_ROWS, GLOBAL_BATCH = 11, 4  # 3 global batches, the last padded with 1 masked row


def _rows() -> dict[str, np.ndarray]:
    x = np.arange(NUM_ROWS * 3, dtype=np.float32).reshape(NUM_ROWS, 3)
    return {"x": x, "label": np.arange(NUM_ROWS, dtype=np.int32) % 4}


def _worker(process_id: int, port: int, out: str) -> None:
    """One process of the 2-process test: writes what it computed to `out` (.npz)."""
    import jax  # noqa: PLC0415  (after XLA_FLAGS is set by the parent)

    multihost.initialize(process_id, port)
    from jax.sharding import Mesh, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from vqt_jax import checkpoints  # noqa: PLC0415
    from vqt_jax.training import feature_heads  # noqa: PLC0415

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    rows = _rows()
    result = {}

    def fn(b):
        return {"sq": b["x"] ** 2, "label": b["label"]}

    # Outputs left sharded over both hosts' devices (as feature_heads.compute does), and
    # outputs made replicated: every host must get every row, in order.
    for name, jitted in [("sharded", jax.jit(fn)),
                         ("replicated", jax.jit(fn, out_shardings=replicated))]:
        batches = feature_heads._host_batches(NUM_ROWS, GLOBAL_BATCH, sharding, lambda sl: {
            k: v[sl] for k, v in rows.items()})
        got = feature_heads._collect(batches, jitted, sharding)
        result[f"{name}_sq"], result[f"{name}_label"] = got["sq"], got["label"]

    # The same values on every host: placed whole and replicated.
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b": jax.numpy.ones((5,), jax.numpy.bfloat16), "step": 3}
    placed = checkpoints.place(tree, replicated)
    for k, v in placed.items():
        assert v.is_fully_replicated and v.sharding.is_equivalent_to(replicated, v.ndim), k
        result[f"placed_{k}"] = np.asarray(v).astype(np.float32)
    # Different values on each host: device_put's cross-host check refuses them, `place` has
    # none, so it places them (what each host then holds is its own copy: not compared).
    differ = np.full((5,), process_id, np.float32)
    try:
        jax.device_put(differ, replicated).block_until_ready()
        result["device_put_checked"] = np.array(False)
    except AssertionError:
        result["device_put_checked"] = np.array(True)
    checkpoints.place({"d": differ}, replicated)["d"].block_until_ready()
    result["place_accepted_different_values"] = np.array(True)
    np.savez(out, **result)
    jax.distributed.shutdown()


def test_collect_and_place_in_two_processes(tmp_path):
    """jax.distributed on localhost, 2 processes x 2 CPU devices: feature_heads._collect and
    checkpoints.place."""
    outs = [str(tmp_path / f"process{i}.npz") for i in range(2)]
    proc = multihost.launch("test_multihost_io", *outs, timeout=240)
    assert proc.returncode == 0, proc.stdout[-5000:]
    rows = _rows()
    for i, out in enumerate(outs):
        got = dict(np.load(out))
        for name in ("sharded", "replicated"):
            np.testing.assert_array_equal(got[f"{name}_sq"], rows["x"] ** 2,
                                          err_msg=f"process {i}, {name}")
            np.testing.assert_array_equal(got[f"{name}_label"], rows["label"],
                                          err_msg=f"process {i}, {name}")
        np.testing.assert_array_equal(got["placed_w"], np.arange(12).reshape(3, 4))
        np.testing.assert_array_equal(got["placed_b"], np.ones(5))
        np.testing.assert_array_equal(got["placed_step"], 3)
        assert got["device_put_checked"], ("device_put accepted different values: the check "
                                           "that `place` avoids did not run")
        assert got["place_accepted_different_values"]


if __name__ == "__main__":
    from vqt_jax import checkpoints  # noqa: F401  (imported once, for both processes)
    from vqt_jax.training import feature_heads  # noqa: F401

    multihost.run_two(lambda i, port, outs: _worker(i, port, outs[i]), int(sys.argv[1]),
                      sys.argv[2:4])
