"""The device-resident cache built from this host's rows alone ([12] C): `build_device_rows`
computes and keeps only the rows its host's devices hold (`DeviceRows`), and gathers nothing
from other hosts.

The 2-process test runs this module as a script in 2 processes x 2 CPU devices.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

from tests import multihost, train_utils
from vqt_jax import cache as cache_lib
from vqt_jax import data, device_cache
from vqt_jax.models import ViT
from vqt_jax.training import train

TINY = dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=4, num_classes=5)


def _normalize(x):
    return data.normalize_array(x, "inception")


def _setup(n: int = 21):
    """A tiny ViT with random variables, `n` images and labels."""
    model = ViT(**TINY, num_queries=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    variables = jax.jit(model.init)(jax.random.key(0), _normalize(images[:1]))
    leaves, treedef = jax.tree.flatten(variables)
    leaves = [x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    return model, jax.tree.unflatten(treedef, leaves), images, rng.integers(0, 5, n)


def _build(model, variables, images, labels, mesh, rows: bool, path=None):
    spec = cache_lib.spec_for(model, "kv", len(images), 16, "bfloat16")
    fn = cache_lib.build_device_rows if rows else cache_lib.build
    return fn(spec, model, variables, images, labels, mesh=mesh, batch_size=8,
              normalize=_normalize, path=path)


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype == ml_dtypes.bfloat16 else x


def _check_columns(rows: cache_lib.DeviceRows, full: cache_lib.Cache, d: int) -> None:
    """Each of `rows`' columns c is the full cache's examples c, c + D, ... bit for bit, and
    zeros (label 0) where the layout pads."""
    blocks = -(-full.spec.num_examples // d)
    for c in rows.columns:
        for name, src in [*full.arrays.items(), ("label", full.labels)]:
            got = _bits(rows.column(name, c))
            want = _bits(src[c::d])
            assert got.shape[0] == blocks, (name, c)
            np.testing.assert_array_equal(got[:len(want)], want, err_msg=f"{name} column {c}")
            assert not got[len(want):].any(), (name, c)


@pytest.mark.parametrize("devices,on_disk", [(8, True), (8, False), (4, False)])
def test_device_rows_are_the_full_caches_rows_of_each_device(tmp_path, devices, on_disk):
    """One host holds every column: its rows are the full cache's, in the device layout, bit
    for bit (on disk, reopened from there too), and the device cache placed from them equals
    the one placed from the full cache."""
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    assert mesh.size == devices, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    model, variables, images, labels = _setup()
    full = _build(model, variables, images, labels, mesh, rows=False)
    path = str(tmp_path / "rows") if on_disk else None
    rows = _build(model, variables, images, labels, mesh, rows=True, path=path)
    assert rows.columns == tuple(range(devices)) and rows.num_devices == devices
    _check_columns(rows, full, devices)
    if on_disk:
        again = cache_lib.open_device_rows(path, rows.spec, mesh)
        _check_columns(again, full, devices)
    fields = ["k", "v", "cls"]
    placed = device_cache.upload(rows, mesh, fields)
    want = device_cache.upload(full, mesh, fields)
    for name in [*fields, "label"]:
        np.testing.assert_array_equal(np.asarray(placed.arrays[name]),
                                      np.asarray(want.arrays[name]), err_msg=name)
    assert placed.dtypes == want.dtypes


def test_device_rows_refuse_another_layout():
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    model, variables, images, labels = _setup(9)
    rows = _build(model, variables, images, labels, mesh, rows=True)
    with pytest.raises(ValueError, match="columns"):
        device_cache.upload(rows, Mesh(np.asarray(jax.devices()[:2]), ("data",)), ["k"])


def _worker(process_id: int, port: int) -> None:
    """One process of the 2-process test (its assertions are the test's)."""
    multihost.initialize(process_id, port)
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from vqt_jax.training.mesh import make_mesh  # noqa: PLC0415

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = make_mesh()
    model, variables, images, labels = _setup()
    variables = jax.device_put(variables, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    allgather = multihost_utils.process_allgather
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return allgather(*args, **kwargs)

    multihost_utils.process_allgather = counted
    rows = _build(model, variables, images, labels, mesh, rows=True)
    # Nothing is gathered from the other host: this host computed its own devices' rows.
    assert not calls, "build_device_rows all-gathered"
    full = _build(model, variables, images, labels, mesh, rows=False)
    assert calls, "the full build all-gathers (or this check sees nothing)"
    mine = (2 * process_id, 2 * process_id + 1)
    assert rows.columns == mine
    # This host keeps ceil(21 / 4) = 6 rows of each of its 2 columns, not 21.
    assert {a.shape[0] for a in rows.rows.arrays.values()} == {12}
    _check_columns(rows, full, 4)
    dev = device_cache.upload(rows, mesh, ["k", "cls"])
    index = np.array([20, 20, 0, 5, 3, 7, 1, 2])
    out = jax.jit(dev.gather)(dev.arrays, jnp.asarray(index, jnp.int32))
    for name, src in (("k", full.arrays["k"]), ("cls", full.arrays["cls"]),
                      ("label", full.labels)):
        for shard in out[name].addressable_shards:
            np.testing.assert_array_equal(_bits(shard.data), _bits(src[index][shard.index]))


def test_two_hosts_build_only_their_devices_rows():
    proc = multihost.launch("test_device_rows", timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]


def _train_config(folder: str, cache_dir: str):
    """A run whose cache goes on the devices and that reads no host cache after training."""
    c = train_utils.tiny_config(data_dir=folder, epochs=2, cache="on", cache_dir=cache_dir,
                                cache_storage="disk", baselines=())
    c.compression.enabled = False
    return c


def _train_worker(process_id: int, port: int, workdir: str, folder: str,
                  cache_root: str) -> None:
    multihost.initialize(process_id, port)
    train.run(_train_config(folder, os.path.join(cache_root, f"host{process_id}")), workdir)


def test_two_hosts_train_from_their_devices_rows_like_one_host(tmp_path):
    """`train.run` on 2 hosts: each host's cache directory holds its devices' rows alone
    (half of the cache's rows, padding included), and the run's numbers equal one host's,
    whose cache is complete."""
    folder = train_utils.make_image_folder(tmp_path / "folder")
    one, _ = train.run(_train_config(folder, str(tmp_path / "one_cache")),
                       str(tmp_path / "one"))
    proc = multihost.launch("test_device_rows", "train", str(tmp_path / "two"), folder,
                            str(tmp_path / "local"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["cache_on_device"] and two["cache_on_device"]
    (complete,) = os.listdir(tmp_path / "one_cache")
    n = json.loads((tmp_path / "one_cache" / complete / "meta.json").read_text())[
        "num_examples"]
    for i, columns in enumerate(("0-1", "2-3")):
        (name,) = os.listdir(tmp_path / "local" / f"host{i}")
        assert name.endswith(f"-host{i}-devices{columns}of4"), name
        meta = json.loads((tmp_path / "local" / f"host{i}" / name / "meta.json").read_text())
        assert meta["num_examples"] == 2 * -(-n // 4) < n
    assert two["top1"] == one["top1"]
    np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=1e-4)
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-4)


if __name__ == "__main__":
    if sys.argv[2:3] == ["train"]:
        multihost.run_two(_train_worker, int(sys.argv[1]), *sys.argv[3:6])
    else:
        multihost.run_two(_worker, int(sys.argv[1]))
