"""The device-resident cache and the training loop that never waits on a step ([8] items 1-3).

Run with 8 simulated CPU devices (README's test command sets XLA_FLAGS).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax._src import array as array_impl
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests import train_utils
from vqt_jax import cache as cache_lib
from vqt_jax import device_cache, inference, sampling
from vqt_jax.models import ViT, create_model
from vqt_jax.training import engine, train, train_step


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.mark.parametrize("batching,n,b", [("epoch", 37, 16), ("stream", 37, 16),
                                          ("stream", 5, 16), ("epoch", 5, 16)])
def test_indices_drawn_on_device_equal_the_hosts_and_cover_every_epoch(batching, n, b):
    f = jax.jit(lambda s: sampling.batch_indices(s, 7, num_examples=n, batch_size=b,
                                                 batching=batching))
    steps = 3 * int(np.ceil(n / b)) + 1
    seen = []
    for step in range(steps):
        index, mask = f(step)
        host_index, host_mask = sampling.host_batch_indices(step, n, global_batch_size=b, seed=7,
                                                            batching=batching)
        np.testing.assert_array_equal(np.asarray(index), host_index)
        np.testing.assert_array_equal(np.asarray(mask), host_mask)
        seen.extend(host_index[host_mask > 0])
    # Every epoch is a permutation: each block of N consecutive real entries covers 0..N-1,
    # and consecutive epochs are drawn differently.
    epochs = [sorted(seen[i:i + n]) for i in range(0, len(seen) - n + 1, n)]
    assert len(epochs) >= 2 and all(e == list(range(n)) for e in epochs)
    assert seen[:n] != seen[n:2 * n]


def _one_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.mark.parametrize("devices", [8, 1])
def test_gather_on_device_equals_the_host_cache(devices):
    mesh = train.make_mesh() if devices == 8 else _one_device_mesh()
    assert mesh.size == devices, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    n, b = 37, 16
    rng = np.random.default_rng(0)
    spec = cache_lib.Spec("kv", n, {"k": ((2, 3), "bfloat16"), "cls": ((4,), "float32")})
    arrays = {"k": rng.normal(size=(n, 2, 3)).astype(ml_dtypes.bfloat16),
              "cls": rng.normal(size=(n, 4)).astype(np.float32)}
    host = cache_lib.Cache(spec, arrays, rng.integers(0, 9, n).astype(np.int32))
    dev = device_cache.upload(host, mesh, ["k", "cls"])
    # Each device holds its share (ceil(37 / 8) = 5 rows), not the whole cache.
    rows = -(-n // devices)
    assert {s.data.shape for s in dev.arrays["k"].addressable_shards} == {(rows, 1, 2, 3)}
    gather = jax.jit(lambda a, s: dev.gather(a, sampling.batch_indices(
        s, 3, num_examples=n, batch_size=b, batching="epoch")[0]))
    for step in range(6):
        out = gather(dev.arrays, step)
        assert out["k"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 3)
        assert out["k"].dtype == ml_dtypes.bfloat16
        index, _ = sampling.host_batch_indices(step, n, global_batch_size=b, seed=3,
                                               batching="epoch")
        want = host.gather(index)
        for name in ("k", "cls", "label"):
            np.testing.assert_array_equal(np.asarray(out[name]), want[name])


@pytest.mark.parametrize("devices", [1, 8])
def test_a_bfloat16_cache_is_never_upcast_whole_in_the_training_loop(tmp_path, devices):
    """XLA:CPU gathers bfloat16 in float32 and hoists the conversion of the whole cache out of
    a compiled loop (a float32 copy: twice the cache's bytes of temporaries). The loop that
    training compiles (`engine.Engine` over a `DeviceSource`, gathering with
    `DeviceCache.gather`) must keep its temporaries far below one copy of the cache, and on
    one CPU device the device cache is the disk cache's memory map itself."""
    mesh = train.make_mesh() if devices == 8 else _one_device_mesh()
    n, shape = 4096, (2, 17, 16)  # 2 MiB of bfloat16 per device and field at 8 devices
    path = tmp_path / "k.bin"
    rng = np.random.default_rng(0)
    k = np.memmap(path, np.uint16, "w+", shape=(n, *shape))
    k[:] = rng.normal(size=(n, *shape)).astype(ml_dtypes.bfloat16).view(np.uint16)
    k.flush()
    k = np.memmap(path, np.uint16, "r", shape=(n, *shape)).view(ml_dtypes.bfloat16)  # as cache.py
    spec = cache_lib.Spec("kv", n, {"k": (shape, "bfloat16")})
    dev = device_cache.upload(cache_lib.Cache(spec, {"k": k}, np.zeros(n, np.int32)), mesh,
                              ["k"])
    if devices == 1:
        pointer = dev.arrays["k"].addressable_shards[0].data.unsafe_buffer_pointer()
        assert pointer == k.ctypes.data

    def step(member, state, shared, batch, rng):
        return train_step.TrainState(state.step + 1, {}, ()), {
            "sum": batch["k"].astype(jnp.float32).sum()}

    state = train_step.TrainState(jnp.zeros((1,), jnp.int32), {}, ())
    run = engine.Engine(step, engine.DeviceSource(dev, ["k"], 8, "epoch", [0]), None,
                        {"lr": np.float32([0.0])}, jax.random.split(jax.random.key(0), 1),
                        state, max_steps=4)
    state, metrics = run.advance(state, 4)
    want = [k[sampling.host_batch_indices(s, n, global_batch_size=8, seed=0,
                                          batching="epoch")[0]].astype(np.float32).sum()
            for s in range(4)]
    np.testing.assert_allclose(np.asarray(metrics["sum"])[:, 0], want, rtol=1e-5)
    compiled = run.compiled
    share = int(np.prod(shape)) * 2 * -(-n // devices)  # bytes of the cache per device
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < share / 4, (temp, share)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def test_device_loop_trains_like_the_host_cache(folder, tmp_path):
    runs = {}
    for mode in ("on", "off"):
        config = train_utils.tiny_config(data_dir=folder, epochs=3, cache="on",
                                         cache_storage="memory", cache_on_device=mode)
        runs[mode] = train.run(config, str(tmp_path / mode))[0]
        assert runs[mode]["cached"] and runs[mode]["cache_on_device"] == (mode == "on")
    np.testing.assert_allclose(_losses(tmp_path / "on"), _losses(tmp_path / "off"), rtol=1e-5)
    assert runs["on"]["top1"] == runs["off"]["top1"]
    np.testing.assert_allclose(runs["on"]["eval_loss"], runs["off"]["eval_loss"], rtol=1e-5)


_SYNCS = ("__float__", "__int__", "__bool__", "__index__", "__array__", "item", "tolist",
          "block_until_ready")


@pytest.mark.parametrize("on_device", ["on", "off"])
def test_the_training_loop_never_waits_on_a_step(folder, tmp_path, monkeypatch, on_device):
    """Inside a chunk nothing reads a device value back; the host waits once per chunk."""
    inside = []

    def guard(name, original):
        def method(self, *args, **kwargs):
            if inside:
                raise AssertionError(f"jax.Array.{name} (a host sync) inside a training chunk")
            return original(self, *args, **kwargs)
        return method

    for name in _SYNCS:
        monkeypatch.setattr(array_impl.ArrayImpl, name,
                            guard(name, getattr(array_impl.ArrayImpl, name)))

    def device_get(x):
        if inside:
            raise AssertionError("jax.device_get inside a training chunk")
        return original_get(x)

    original_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", device_get)
    def advance(self, state, count, original=engine.Engine.advance):
        inside.append(count)
        try:
            return original(self, state, count)
        finally:
            inside.pop()
    monkeypatch.setattr(engine.Engine, "advance", advance)
    fetched = []
    original_fetch = engine.fetch
    monkeypatch.setattr(engine, "fetch",
                        lambda m, count: fetched.append(count) or original_fetch(m, count))
    # 3 epochs of 36 examples in batches of 8: 15 steps; chunks end at 5, 6, 10, 12, 15.
    config = train_utils.tiny_config(data_dir=folder, epochs=3, cache="on", log_every_steps=5,
                                     checkpoint_every_steps=6, cache_storage="memory",
                                     cache_on_device=on_device)
    results = train.run(config, str(tmp_path / "wd"))[0]
    assert results["steps"] == 15 and results["cache_on_device"] == (on_device == "on")
    assert fetched == [5, 1, 4, 2, 3]


def test_cache_build_output_is_sharded_over_the_batch():
    """The build's per-device output shrinks with the device count (memory_analysis)."""
    model = create_model(None, num_classes=3, patch_size=(8, 8), width=32, depth=2, mlp_dim=64,
                         num_heads=2, num_queries=1)
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def forward(v, images):
        return model.apply(v, images, method=ViT.cache_features)

    def placed(tree, sharding):
        return jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding),
                            tree)

    per_device = {}
    for d in (1, 2, 8):
        mesh = Mesh(np.asarray(jax.devices()[:d]), ("data",))
        v = placed(variables, NamedSharding(mesh, P()))
        images = placed(x, NamedSharding(mesh, P("data")))
        compiled = inference.forward_fn(forward, mesh).lower(v, images).compile()
        per_device[d] = compiled.memory_analysis().output_size_in_bytes
    assert per_device[2] * 2 == pytest.approx(per_device[1], rel=0.01)
    assert per_device[8] * 8 == pytest.approx(per_device[1], rel=0.01)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_cache_build_in_steps_equals_one_pass(num_devices):
    """`forward_fn`'s loop (`in_steps`) over a few rows per device at a time (CPU's default)
    gives the outputs of the whole batch at once, in the batch's order and sharding, without
    moving rows between devices, and with less working memory."""
    model = create_model(None, num_classes=3, patch_size=(8, 8), width=32, depth=2, mlp_dim=64,
                         num_heads=2, num_queries=1)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(48, 16, 16, 3)).astype(np.float32),
             "label": np.arange(48, dtype=np.int32)}
    variables = model.init(jax.random.key(0), batch["image"][:1])
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))

    def forward(v, b):
        return {"label": b["label"], **model.apply(v, b["image"], method=ViT.cache_features)}

    whole = inference.forward_fn(forward, mesh, rows_per_step=0)
    assert inference.CPU_ROWS_PER_STEP == 8 and jax.default_backend() == "cpu"
    stepped = {r: inference.forward_fn(forward, mesh, r) for r in (None, 2, 5)}  # None: CPU's 8
    expected = whole(variables, batch)
    for r, fn in stepped.items():
        compiled = fn.lower(variables, batch).compile()
        text = compiled.as_text()
        assert ("while" in text) == (48 // num_devices > 2), r  # 1 row per device: no loop
        for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
            assert op not in text, (r, op)
        out = fn(variables, batch)
        np.testing.assert_array_equal(out["label"], batch["label"])
        for k in expected:
            assert out[k].sharding.is_equivalent_to(expected[k].sharding, out[k].ndim), k
            np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-5, err_msg=k)
    if num_devices == 1:
        temp = {r: f.lower(variables, batch).compile().memory_analysis().temp_size_in_bytes
                for r, f in [(0, whole), (2, stepped[2])]}
        assert temp[2] < temp[0] / 4, temp


def _reduce_scatter_gather(arrays, index, mesh):
    """The gather `device_cache` had before its ring ([12] A): every device builds all B slots
    (its rows, zeros elsewhere) and reduce-scatters them. Kept only as the memory baseline."""
    d = mesh.shape["data"]

    def local(shards, index):
        mine = index % d == jax.lax.axis_index("data")
        out = {}
        for name, shard in shards.items():
            rows = shard[index // d, 0]
            keep = mine.reshape(-1, *([1] * (rows.ndim - 1)))
            rows = jnp.where(keep, rows, jnp.zeros((), rows.dtype))
            out[name] = jax.lax.psum_scatter(rows, "data", scatter_dimension=0, tiled=True)
        return out

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, "data"), P()),
                         out_specs=P("data"))(arrays, index)


def _ring_cache(mesh, n, shape):
    rng = np.random.default_rng(1)
    k = rng.normal(size=(n, *shape)).astype(ml_dtypes.bfloat16)
    k.view(np.uint16).reshape(n, -1)[:3, 0] = [0x7FC1, 0x8000, 0xFF80]  # NaN payload, -0, -inf
    arrays = {"k": k, "cls": rng.normal(size=(n, 4)).astype(np.float32)}
    spec = cache_lib.Spec("kv", n, {"k": (shape, "bfloat16"), "cls": ((4,), "float32")})
    host = cache_lib.Cache(spec, arrays, rng.integers(0, 9, n).astype(np.int32))
    return host, device_cache.upload(host, mesh, ["k", "cls"])


def test_the_gather_holds_b_over_d_rows_per_device_and_equals_numpy_indexing():
    """[12] A: the compiled gather's per-device buffers (memory_analysis at 8 devices) are
    O(B / D) rows, at most 1/4 of the reduce-scatter gather's for the same batch, and its
    batches are bit for bit the full cache indexed with numpy: random batches with repeats,
    a batch whose rows all live on one device (owners as unbalanced as they get), and the
    B x S gather of members with their own orders (`engine.Engine`)."""
    mesh = train.make_mesh()
    assert mesh.size == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    n, shape, b = 1000, (2, 17, 16), 256
    host, dev = _ring_cache(mesh, n, shape)
    row_bytes = int(np.prod(shape)) * 2 + 4 * 4 + 4  # k (bf16) + cls (4 x f32) + label
    gather = jax.jit(dev.gather)
    rng = np.random.default_rng(2)
    seeds = [sampling.host_batch_indices(7, n, global_batch_size=b // 4, seed=s,
                                         batching="epoch")[0] for s in range(4)]
    indices = {"random": rng.integers(0, n, b), "one owner": rng.integers(0, n // 8, b) * 8 + 3,
               "first rows": np.arange(b) % 3, "members": np.stack(seeds, 1).reshape(-1)}
    for what, index in indices.items():
        out = gather(dev.arrays, jnp.asarray(index, jnp.int32))
        assert out["k"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
        for name, full in [*host.arrays.items(), ("label", host.labels)]:
            got = np.asarray(out[name])
            assert got.dtype == full.dtype, (what, name)
            np.testing.assert_array_equal(got.view(np.uint8), full[index].view(np.uint8),
                                          err_msg=f"{what}: {name}")

    index = jax.ShapeDtypeStruct((b,), np.int32, sharding=NamedSharding(mesh, P()))
    ring = gather.lower(dev.arrays, index).compile().memory_analysis()
    baseline = jax.jit(lambda a, i: _reduce_scatter_gather(a, i, mesh)).lower(
        dev.arrays, index).compile().memory_analysis()
    block = b // 8 * row_bytes  # one device's slots of the batch
    assert ring.output_size_in_bytes == pytest.approx(block, rel=0.01)  # (+ a tuple)
    assert ring.temp_size_in_bytes <= 1.5 * block, (ring.temp_size_in_bytes, block)
    assert baseline.temp_size_in_bytes >= 0.9 * 8 * block  # about the whole batch
    assert ring.temp_size_in_bytes <= baseline.temp_size_in_bytes / 4


@pytest.mark.parametrize("devices", [2, 4])
def test_the_gather_shrinks_with_the_device_count(devices):
    """The same batch at 2 and 4 devices: each device's temporaries stay one block of B / D
    rows (O(B / D), not O(B)), and the batches equal numpy indexing."""
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    n, shape, b = 301, (3, 64), 64  # rows far larger than the loop's few indices
    host, dev = _ring_cache(mesh, n, shape)
    row_bytes = int(np.prod(shape)) * 2 + 4 * 4 + 4
    index = np.random.default_rng(devices).integers(0, n, b)
    gather = jax.jit(dev.gather)
    out = gather(dev.arrays, jnp.asarray(index, jnp.int32))
    for name, full in [*host.arrays.items(), ("label", host.labels)]:
        np.testing.assert_array_equal(np.asarray(out[name]).view(np.uint8),
                                      full[index].view(np.uint8))
    spec = jax.ShapeDtypeStruct((b,), np.int32, sharding=NamedSharding(mesh, P()))
    temp = gather.lower(dev.arrays, spec).compile().memory_analysis().temp_size_in_bytes
    block = b // devices * row_bytes
    assert temp <= 1.5 * block, (temp, block)
