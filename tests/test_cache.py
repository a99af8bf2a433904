"""Training from the cache of the frozen backbone: equal to training from images, reused, safe."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from tests import train_utils
from vqt_jax import cache as cache_lib
from vqt_jax import data, inference
from vqt_jax import trainable as trainable_lib
from vqt_jax.models import ViT
from vqt_jax.training import caching, train, train_step

TINY = dict(patch_size=(8, 8), width=32, depth=3, mlp_dim=64, num_heads=4, num_classes=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_utils.make_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(autouse=True)
def features(tmp_path_factory, monkeypatch):
    """Where this module's caches go by default (caching.default_cache_dir), under a fresh
    $VQT_JAX_CACHE outside the runs' workdirs: never the user's own ~/.cache."""
    root = tmp_path_factory.mktemp("vqt_jax_cache")
    monkeypatch.setenv("VQT_JAX_CACHE", str(root))
    return root / caching.FEATURES_SUBDIR


def _randomized(model, images):
    """Variables with every leaf random (so no zero-init head hides a wrong query path)."""
    variables = jax.jit(model.init)(jax.random.key(0), images)
    leaves, treedef = jax.tree.flatten(variables)
    # Drawn on the host: one eager jax.random call per leaf shape would compile a program each.
    rng = np.random.default_rng(1)
    leaves = [x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


def _cached_batch(model, variables, images, dtype=jnp.float32):
    out = jax.jit(lambda v, x: model.apply(v, x, method=ViT.cache_features))(variables, images)
    return {"k": out["k"].astype(dtype), "v": out["v"].astype(dtype), "cls": out["cls"]}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cached_step_equals_uncached_step(dropout):
    model = ViT(**TINY, num_queries=2, query_dropout=dropout)
    images = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    labels = jnp.array([0, 1, 2, 3])
    variables = _randomized(model, images)
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for("vqt"))
    tx = optax.adam(1e-2)
    rng = jax.random.key(5)

    uncached = jax.jit(train_step.make_train_step(train_step.make_loss_fn(model), tx))
    cached = jax.jit(train_step.make_train_step(train_step.make_loss_fn(model, True), tx))
    batch = {"image": images, "label": labels}
    cbatch = {**_cached_batch(model, variables, images), "label": labels}
    loss_fn = train_step.make_loss_fn(model)
    closs_fn = train_step.make_loss_fn(model, from_cache=True)
    (l0, _), g0 = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable, frozen, batch,
                                                                     rng)
    (l1, _), g1 = jax.jit(jax.value_and_grad(closs_fn, has_aux=True))(trainable, frozen, cbatch,
                                                                      rng)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-6)
    assert set(g0) == set(g1) == {"queries/tokens", "params/head/kernel", "params/head/bias"}
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(jnp.abs(g0["queries/tokens"]).max()) > 1e-4  # the queries do get a gradient

    t0, s0, m0 = uncached(trainable, tx.init(trainable), frozen, batch, rng)
    t1, s1, m1 = cached(trainable, tx.init(trainable), frozen, cbatch, rng)
    for k in t0:
        np.testing.assert_allclose(t1[k], t0[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5)


def test_cached_step_reads_the_cache():
    """A wrong key/value cache changes the loss (the cached path is not a silent no-op)."""
    model = ViT(**TINY, num_queries=1, query_dropout=0.0)
    images = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    variables = _randomized(model, images)
    trainable, frozen = trainable_lib.partition(variables, trainable_lib.rule_for("vqt"))
    loss_fn = jax.jit(train_step.make_loss_fn(model, from_cache=True))
    cbatch = {**_cached_batch(model, variables, images), "label": jnp.array([0, 1])}
    wrong = {**cbatch, "v": cbatch["v"][::-1]}
    key = jax.random.key(0)
    assert abs(float(loss_fn(trainable, frozen, cbatch, key)[0]) -
               float(loss_fn(trainable, frozen, wrong, key)[0])) > 1e-4


def test_bfloat16_cache_is_close():
    model = ViT(**TINY, num_queries=1, query_dropout=0.0)
    images = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    variables = _randomized(model, images)
    exact = model.apply(variables, images)
    c = _cached_batch(model, variables, images, jnp.bfloat16)
    assert c["k"].dtype == jnp.bfloat16
    narrow = model.apply(variables, c, method=ViT.from_cache)
    rel = float(jnp.abs(narrow - exact).max() / jnp.abs(exact).max())
    assert 0 < rel < 2e-2


def test_cached_run_ends_like_uncached_run(folder, tmp_path, features):
    runs = {}
    for mode in ("off", "on"):
        config = train_utils.tiny_config(data_dir=folder, epochs=4, cache=mode)
        runs[mode] = train.run(config, str(tmp_path / mode))
    (r_off, v_off), (r_on, v_on) = runs["off"], runs["on"]
    assert not r_off["cached"] and r_on["cached"]
    for key in ("train_loss", "eval_loss"):
        np.testing.assert_allclose(r_on[key], r_off[key], rtol=1e-5, err_msg=key)
    assert r_on["top1"] == r_off["top1"]
    t_off, _ = trainable_lib.partition(v_off, trainable_lib.rule_for("vqt"))
    t_on, _ = trainable_lib.partition(v_on, trainable_lib.rule_for("vqt"))
    for k in t_off:
        np.testing.assert_allclose(t_on[k], t_off[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The cache lies in $VQT_JAX_CACHE/features, not in the workdir: complete files, nothing
    # half-written beside them.
    (entry,) = os.listdir(features)
    assert not entry.startswith(".")
    assert sorted(os.listdir(features / entry)) == [
        "cls.bin", "k.bin", "label.bin", "meta.json", "pooled.bin", "v.bin"]
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".bin")]


def test_cache_is_reused_across_runs_and_invalidated_by_the_backbone(folder, tmp_path,
                                                                     monkeypatch, features):
    # Runs in three workdirs, with the default cache_dir: one directory of entries named by
    # their contents, shared by every run whatever its workdir.
    shared = str(features)
    config = train_utils.tiny_config(data_dir=folder, epochs=1, cache="on")
    train.run(config, str(tmp_path / "a"))
    (entry,) = os.listdir(shared)

    def no_build(*a, **k):
        raise AssertionError("rebuilt a cache that exists")

    # Another lr, wd, seed and query count: the same backbone outputs, the same cache.
    other = train_utils.tiny_config(data_dir=folder, epochs=1, cache="on", lr=0.01, wd=0.0,
                                    seed=3)
    other.model.num_queries = 3
    with monkeypatch.context() as patched:  # (undo() would drop $VQT_JAX_CACHE too)
        patched.setattr(cache_lib, "build", no_build)
        assert train.run(other, str(tmp_path / "b"))[0]["cached"]
    assert os.listdir(shared) == [entry]
    # Another image size changes what the backbone computes: a new cache is needed.
    resized = train_utils.tiny_config(data_dir=folder, epochs=1, cache="on", image_size=16)
    train.run(resized, str(tmp_path / "c"))
    assert len(os.listdir(shared)) == 2


def test_killed_build_leaves_nothing(folder, tmp_path, monkeypatch, features):
    calls = []
    real = data.normalize_array

    def dies_on_second_batch(x, n):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(x, n)

    monkeypatch.setattr(data, "normalize_array", dies_on_second_batch)
    config = train_utils.tiny_config(data_dir=folder, epochs=1, cache="on", eval_batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        train.run(config, str(tmp_path / "wd"))
    assert os.listdir(features) == []


def test_memory_storage(folder, tmp_path, features):
    config = train_utils.tiny_config(data_dir=folder, epochs=1, cache="on",
                                     cache_storage="memory", cache_dtype="bfloat16")
    results, _ = train.run(config, str(tmp_path))
    assert results["cached"] and not features.exists() and not (tmp_path / "cache").exists()


def test_over_budget_falls_back_or_fails_before_compiling(folder, tmp_path, monkeypatch):
    auto = train_utils.tiny_config(data_dir=folder, epochs=1, cache="auto", cache_max_gb=1e-6)
    assert not train.run(auto, str(tmp_path / "auto"))[0]["cached"]

    monkeypatch.setattr(train.jax, "jit", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("compiled before validating the config")))
    on = train_utils.tiny_config(data_dir=folder, epochs=1, cache="on", cache_max_gb=1e-6)
    with pytest.raises(ValueError, match=r"cache='on' but the cache would take .* GiB, over "
                                         r"config.cache_max_gb=1e-06"):
        train.run(on, str(tmp_path / "on"))
    full = train_utils.tiny_config(data_dir=folder, epochs=1, cache="on", method="full")
    with pytest.raises(ValueError, match="method 'full' changes the backbone's tokens"):
        train.run(full, str(tmp_path / "full"))
    bad = train_utils.tiny_config(data_dir=folder, epochs=1, cache="sometimes")
    with pytest.raises(ValueError, match="config.cache='sometimes'"):
        train.run(bad, str(tmp_path / "bad"))


def test_size_is_computed_before_building():
    model = ViT(patch_size=(16, 16), width=768, depth=12, mlp_dim=3072, num_heads=12,
                num_classes=10, num_queries=1)
    spec = cache_lib.spec_for(model, "kv", 800, 224, "bfloat16")
    assert spec.fields["k"] == ((12, 12, 197, 64), "bfloat16")  # [M, H, N, Dh]
    per_image_kv = 2 * 12 * 197 * 768 * 2
    assert spec.nbytes == 800 * (per_image_kv + 768 * 4 + 24 * 768 * 4 + 4)
    assert "GiB" in spec.describe()


@pytest.mark.parametrize("batching", ["stream", "epoch"])
def test_train_indices_follow_the_image_pipeline(batching):
    n, labels = 13, np.arange(13, dtype=np.int32)
    ds = data.train_dataset(np.zeros((n, 2, 2, 3), np.uint8), labels, global_batch_size=6,
                            seed=3, process_index=1, process_count=2, batching=batching)
    it = ds
    for step in range(9):  # 3 epochs' worth (with 'stream', batches straddle epochs)
        idx, mask = data.train_indices(step, n, global_batch_size=6, seed=3, process_index=1,
                                       process_count=2, batching=batching)
        batch = next(it)
        np.testing.assert_array_equal(batch["label"], idx)
        np.testing.assert_array_equal(batch["mask"], mask)


def test_cache_gather_keeps_the_order(tmp_path):
    spec = cache_lib.Spec("kv", 5, {"k": ((2,), "bfloat16")})
    arrays = {"k": np.arange(10, dtype=np.float32).reshape(5, 2).astype(ml_dtypes.bfloat16)}
    cache = cache_lib.Cache(spec, arrays, np.arange(5, dtype=np.int32) * 10)
    batch = cache.gather(np.array([3, 0, 3, 1]))
    np.testing.assert_array_equal(batch["label"], [30, 0, 30, 10])
    np.testing.assert_array_equal(batch["k"].astype(np.float32)[:, 0], [6, 0, 6, 2])


def test_results_record_cache_use(folder, tmp_path):
    config = train_utils.tiny_config(data_dir=folder, epochs=1, method="full", cache="auto")
    results, _ = train.run(config, str(tmp_path))
    assert results["cached"] is False
    assert json.loads((tmp_path / "results.json").read_text())["cached"] is False


def test_fingerprint_tracks_what_the_contents_depend_on(folder, monkeypatch):
    config = train_utils.tiny_config(data_dir=folder)
    model = dict(width=48, depth=2, num_queries=1, l2_normalize=None, head2toe=False)
    base = cache_lib.fingerprint(config, model, "kv")
    # Key/value caches do not depend on the queries or on how the head input is normalised...
    assert cache_lib.fingerprint(config, {**model, "num_queries": 4, "l2_normalize": True},
                                 "kv") == base
    # ...but a cached head input does, and every cache depends on the backbone and the data.
    feats = cache_lib.fingerprint(config, {**model, "num_queries": 0}, "features")
    assert cache_lib.fingerprint(config, {**model, "num_queries": 0, "l2_normalize": True},
                                 "features") != feats
    assert cache_lib.fingerprint(config, {**model, "width": 64}, "kv") != base
    for field, value in (("normalization", "inception"), ("resize", "uint8"),
                         ("fc_norm_init", "checkpoint")):
        assert config[field] != value, field  # the release protocol's differ
        other = train_utils.tiny_config(data_dir=folder, **{field: value})
        assert cache_lib.fingerprint(other, model, "kv") != base, field
    other = train_utils.tiny_config(data_dir=folder, cache_dtype="bfloat16")
    assert cache_lib.fingerprint(other, model, "kv") != base
    # A cache of another format version (another way of computing it) is not reused.
    monkeypatch.setattr(cache_lib, "FORMAT_VERSION", cache_lib.FORMAT_VERSION + 1)
    assert cache_lib.fingerprint(config, model, "kv") != base


def test_build_keeps_float32_rows_and_stores_the_same_cache(tmp_path):
    """`build(keep_float32=)`: the stored cache is bit for bit the one built without it (its
    first batch, which holds no kept row, from the narrow program; the others from the float32
    one and a cast), and the kept rows (straddling batches, the last one padded) are the
    float32 pass's outputs."""
    model = ViT(**TINY, num_queries=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(20) % 5

    def normalize(x):
        return data.normalize_array(x, "inception")

    variables = _randomized(model, normalize(images[:1]))
    mesh = train.make_mesh(8 if jax.device_count() >= 8 else 1)

    def build(dtype, path=None, keep=None):
        spec = cache_lib.spec_for(model, "kv", 20, 16, dtype)
        return cache_lib.build(spec, model, variables, images, labels, mesh=mesh, batch_size=8,
                               normalize=normalize, path=path, keep_float32=keep)

    plain = build("bfloat16", str(tmp_path / "plain"))
    kept = build("bfloat16", str(tmp_path / "kept"), slice(10, 20))
    wide = build("float32")
    assert plain.float32 is None and (kept.float32.start, kept.float32.stop) == (10, 20)
    np.testing.assert_array_equal(kept.float32.images, images[10:20])
    for name, array in plain.arrays.items():
        bits = [np.asarray(a).view(np.uint8) for a in (array, kept.arrays[name])]
        np.testing.assert_array_equal(bits[0], bits[1], err_msg=name)
        assert kept.float32.arrays[name].dtype == np.float32
        np.testing.assert_array_equal(kept.float32.arrays[name], wide.arrays[name][10:20],
                                      err_msg=name)
    # Not vacuous: the float32 outputs are not what the bfloat16 cache holds.
    assert not np.array_equal(kept.float32.arrays["k"], np.asarray(kept.arrays["k"][10:20],
                                                                    np.float32))


def test_host_batches_pad_the_last_batch_to_a_multiple():
    """`last_multiple`: the last global batch is padded only to the next multiple (not to the
    batch size), and each host's slice follows that batch's own size."""
    mesh = train.make_mesh(2 if jax.device_count() >= 2 else 1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    values = np.arange(21)
    out = list(cache_lib.host_batches(21, 8, lambda sl: {"x": values[sl]}, sharding=sharding,
                                      last_multiple=mesh.shape["data"]))
    last = 6 if mesh.shape["data"] == 2 else 5
    assert [len(b["x"]) for _, b in out] == [8, 8, last]
    assert [(r.start, r.stop) for r, _ in out] == [(0, 8), (8, 16), (16, 21)]
    np.testing.assert_array_equal(out[-1][1]["x"][:5], values[16:])
    np.testing.assert_array_equal(out[-1][1]["mask"], np.arange(last) < 5)
    # Without it, the last batch is padded to the batch size.
    full = list(cache_lib.host_batches(21, 8, lambda sl: {"x": values[sl]}, sharding=sharding))
    assert [len(b["x"]) for _, b in full] == [8, 8, 8]


def test_build_pads_its_last_batch_only_to_the_device_count(monkeypatch):
    """The cache's backbone pass runs its last batch at the smallest size the devices take,
    not at the batch size (no rows of padding computed beyond that), and stores every row's
    outputs."""
    model = ViT(**TINY, num_queries=2)
    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)

    def normalize(x):
        return data.normalize_array(x, "inception")

    variables = _randomized(model, normalize(images[:1]))
    mesh = train.make_mesh(2 if jax.device_count() >= 2 else 1)
    sizes = []
    forward_fn = inference.forward_fn

    def recording(fn, mesh):
        jitted = forward_fn(fn, mesh)

        def call(v, x):
            sizes.append(x.shape[0])
            return jitted(v, x)

        return call

    monkeypatch.setattr(inference, "forward_fn", recording)
    spec = cache_lib.spec_for(model, "kv", 20, 16, "float32")
    cache = cache_lib.build(spec, model, variables, images, np.arange(20) % 5, mesh=mesh,
                            batch_size=8, normalize=normalize)
    assert sizes == [8, 8, 4]
    want = _cached_batch(model, variables, normalize(images))
    for name in ("k", "v", "cls"):
        np.testing.assert_allclose(cache.arrays[name], want[name], atol=1e-5, err_msg=name)
