"""The release's feature compression: selection (vqt_jax/compression) and its two stages on
fixed features (vqt_jax/training/compression_stage)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_utils
from vqt_jax import cache as cache_lib
from vqt_jax import compression, device_cache
from vqt_jax.models import create_model
from vqt_jax.training import compression_stage, engine, train

NUM_CLASSES = 10
NUM_INFORMATIVE, NUM_NOISE = 16, 48


def _clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mocked task: 10 Gaussian class clusters on 16 of 64 features, the rest pure noise.

    The class means and the column order are fixed (not drawn from `seed`), so splits with
    different seeds are the same task. Returns (features [n, 64], labels, informative mask).
    """
    means = np.random.default_rng(1234).normal(size=(NUM_CLASSES, NUM_INFORMATIVE))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    x = np.concatenate([means[labels] + rng.normal(size=(n, NUM_INFORMATIVE)),
                        rng.normal(size=(n, NUM_NOISE))], axis=1).astype(np.float32)
    # Shuffled columns, so "informative = the first ones" cannot pass by accident.
    order = np.random.default_rng(7).permutation(NUM_INFORMATIVE + NUM_NOISE)
    return x[:, order], labels, order < NUM_INFORMATIVE


def _separable(n: int = 100, f: int = 12, c: int = 4, seed: int = 0):
    """Well-separated clusters: each class offset along its own axis."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    x = 0.3 * rng.normal(size=(n, f)) + 3.0 * np.eye(f)[labels]
    return x.astype(np.float32), labels


@pytest.mark.parametrize("num_features,keep_frac,expected", [
    (13, 0.7, 9),     # 9.1 -> 9: truncated, as the release counts
    (13, 0.75, 9),    # 9.75 -> 9, not rounded to 10
    (13, 0.5, 6),     # 6.5 -> 6
    (10, 0.25, 2),    # 2.5 -> 2
    (13, 1.0, 13),
    (13, 0.01, 1),    # at least one feature
])
def test_select_features_keeps_the_top_by_norm(num_features, keep_frac, expected):
    kernel = np.random.default_rng(num_features).normal(size=(num_features, 3))
    kept = compression.select_features(kernel, keep_frac)
    assert compression.num_to_keep(num_features, keep_frac) == expected
    assert len(kept) == expected and np.all(np.diff(kept) > 0)
    norms = np.linalg.norm(kernel, axis=1)
    dropped = np.setdiff1d(np.arange(num_features), kept)
    if len(dropped):
        assert norms[kept].min() > norms[dropped].max()


def test_select_features_breaks_ties_by_lower_index():
    kernel = np.zeros((6, 2), np.float32)
    kernel[[1, 3, 4]] = 1.0  # three equal norms, room for two
    kernel[5] = 5.0
    np.testing.assert_array_equal(compression.select_features(kernel, 0.5), [1, 3, 5])


def _stage_heads(x, y, num_classes, *, seeds=(0,), lasso=0.0, keep_frac=1.0, epochs=30,
                 lr=0.1, batch_size=32, train_mode=False):
    """`compression_stage.train` of len(seeds) members on fixed features `x` (a 'features'
    cache on the devices: the model's head input is the cached `pre_logits` itself)."""
    mesh = train.make_mesh()
    n, f = x.shape
    model = create_model(None, num_classes=num_classes, patch_size=(8, 8), width=8, depth=1,
                         mlp_dim=8, num_heads=1, num_queries=0)
    spec = cache_lib.Spec("features", n, {"pre_logits": ((f,), "float32")})
    cache = cache_lib.Cache(spec, {"pre_logits": np.asarray(x, np.float32)},
                            np.asarray(y, np.int32))
    dev = device_cache.upload(cache, mesh, ["pre_logits"])
    configs = []
    for seed in seeds:
        # Logged every 100 steps: the chunks between two logs are compiled loops, and the
        # tiny heads' hundreds of steps would otherwise be hundreds of dispatches.
        c = train_utils.tiny_config(lr=lr, wd=0.0, batch_size=batch_size, warmup_epochs=3,
                                    seed=seed, optimizer="adam", log_every_steps=100)
        c.compression.update(enabled=True, lasso=lasso, keep_frac=keep_frac, epochs=epochs,
                             lr_scale=1.0, train_mode=train_mode)
        configs.append(c)
    return compression_stage.train(
        configs, model, {}, {},
        lambda orders: engine.DeviceSource(dev, ["pre_logits"], batch_size, "stream", orders),
        n, f, num_classes)


def test_stage_separable_and_deterministic():
    x, y = _separable()
    heads = _stage_heads(x, y, 4, seeds=(3, 3, 4))
    final = heads.final
    assert final["head/kernel"].shape == (3, 12, 4) and final["head/bias"].shape == (3, 4)
    scores = heads.scores([x, x, x], y)
    assert [sc["top1"] for sc in scores] == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(final["head/kernel"][0], final["head/kernel"][1])
    assert not np.array_equal(final["head/kernel"][0], final["head/kernel"][2])


def test_compress_mocked_task():
    """The stage's group lasso scores the informative features above noise, so the selection
    keeps them, and the lasso shrinks the head (members: without and with the lasso)."""
    x_train, y_train, informative = _clusters(400, seed=0)
    x_eval, y_eval, _ = _clusters(400, seed=1)
    heads = _stage_heads(x_train, y_train, NUM_CLASSES, lasso=1e-2, keep_frac=0.25, epochs=25,
                         lr=0.1, batch_size=64)
    (out,) = heads.scores([x_eval], y_eval)
    assert out["num_features"] == 64 and out["num_kept"] == 16 == heads.kept.shape[1]
    assert out["top1"] > 0.7 and out["top1_all"] > 0.5  # chance is 0.1
    assert informative[heads.kept[0]].sum() >= 14
    norms = compression.group_norms(heads.lasso["head/kernel"][0])
    assert np.median(norms[informative]) > 2 * np.median(norms[~informative])
    plain = _stage_heads(x_train, y_train, NUM_CLASSES, epochs=25, lr=0.1, batch_size=64)
    assert norms.sum() < 0.5 * compression.group_norms(plain.lasso["head/kernel"][0]).sum()
    # The reported top-1 is the final head's on the kept eval features.
    final = {"kernel": heads.final["head/kernel"][0], "bias": heads.final["head/bias"][0]}
    assert out["top1"] == compression.accuracy(final, x_eval[:, heads.kept[0]], y_eval)


def test_predict_shapes_and_accuracy():
    head = {"kernel": jnp.eye(5, 3), "bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        compression.predict(head, np.zeros((2, 4), np.float32))
    x = np.eye(5, dtype=np.float32)[:3]
    assert compression.accuracy(head, x, [0, 1, 0]) == pytest.approx(2 / 3)
