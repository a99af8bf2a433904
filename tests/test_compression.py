"""Linear heads on fixed features and the release's feature compression (vqt_jax/compression)."""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqt_jax import compression

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


# Shared by the fit_head tests, so they share one compilation.
SEPARABLE_KWARGS = dict(lr=0.05, wd=0.0, epochs=30, batch_size=32, warmup_epochs=3)


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


def test_batches_are_full_and_cover_every_epoch():
    # 10 examples, batches of 4, 3 epochs -> 8 steps over 3.2 epochs of the shuffled stream.
    idx = np.asarray(compression._batch_indices(jax.random.key(0), 10, 4, 8))
    assert idx.shape == (8, 4)
    stream = idx.reshape(-1)
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(stream[10 * epoch:10 * (epoch + 1)]), range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # reshuffled each epoch


def test_fit_head_runs_the_main_loops_number_of_steps(monkeypatch):
    seen = {}
    real = compression._fit

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(compression, "_fit", spy)
    x, y = _separable()  # 100 examples: 3.125 batches of 32 per epoch
    compression.fit_head(x, y, 4, **SEPARABLE_KWARGS)
    assert seen["total_steps"] == math.ceil(30 * 100 / 32) == 94
    assert seen["steps_per_epoch"] == fractions.Fraction(100, 32)  # exact: no float drift
    assert (seen["epochs"], seen["warmup_epochs"]) == (30, 3)


def test_fit_head_separable_and_deterministic():
    x, y = _separable()
    kwargs = SEPARABLE_KWARGS
    head = compression.fit_head(x, y, 4, **kwargs, seed=3)
    assert head["kernel"].shape == (12, 4) and head["bias"].shape == (4,)
    assert compression.accuracy(head, x, y) == 1.0
    again = compression.fit_head(x, y, 4, **kwargs, seed=3)
    np.testing.assert_array_equal(np.asarray(head["kernel"]), np.asarray(again["kernel"]))
    np.testing.assert_array_equal(np.asarray(head["bias"]), np.asarray(again["bias"]))
    other = compression.fit_head(x, y, 4, **kwargs, seed=4)
    assert not np.array_equal(np.asarray(head["kernel"]), np.asarray(other["kernel"]))


def test_bias_init_and_zero_kernel_before_training():
    # With lr 0 throughout (one warm-up epoch only), the head stays at its initial values.
    x, y = _separable(n=32)
    head = compression.fit_head(x, y, 4, lr=1.0, wd=0.0, epochs=1, batch_size=32,
                                warmup_epochs=1, bias_init=-2.0)
    np.testing.assert_array_equal(np.asarray(head["kernel"]), 0.0)
    np.testing.assert_array_equal(np.asarray(head["bias"]), -2.0)


def test_group_lasso_enters_the_loss():
    x, y = _separable()
    kwargs = SEPARABLE_KWARGS
    plain = compression.group_norms(compression.fit_head(x, y, 4, **kwargs)["kernel"])
    lassoed = compression.group_norms(compression.fit_head(x, y, 4, **kwargs, lasso=0.3)
                                      ["kernel"])
    assert np.all(np.isfinite(lassoed))
    assert lassoed.sum() < 0.5 * plain.sum()


def test_compress_mocked_task():
    x_train, y_train, informative = _clusters(400, seed=0)
    x_eval, y_eval, _ = _clusters(400, seed=1)
    out = compression.compress(x_train, y_train, x_eval, y_eval, NUM_CLASSES, lr=0.05, wd=0.0,
                               keep_frac=0.25, lasso=1e-2, epochs=50)
    assert out["num_features"] == 64 and out["num_kept"] == 16 == len(out["kept"])
    assert out["head"]["kernel"].shape == (16, NUM_CLASSES)
    assert out["top1"] > 0.7 and out["top1_all"] > 0.5  # chance is 0.1
    # The lasso stage scores informative features above noise, so selection keeps them.
    assert informative[out["kept"]].sum() >= 14
    lasso_head = compression.fit_head(x_train, y_train, NUM_CLASSES, lr=0.025, wd=0.0,
                                      lasso=1e-2, epochs=50)
    norms = compression.group_norms(lasso_head["kernel"])
    assert np.median(norms[informative]) > 2 * np.median(norms[~informative])
    # The reported top-1 is the final head's on the kept eval features.
    assert out["top1"] == compression.accuracy(out["head"], x_eval[:, out["kept"]], y_eval)


@pytest.mark.parametrize("keep_frac,expected", [(0.25, 7), (0.05, 1)])
def test_compress_keeps_the_requested_number(keep_frac, expected):
    # 30 features: 0.25 -> 7.5 truncates to 7, 0.05 -> 1.5 -> 1 (the release's int()).
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 30)).astype(np.float32), rng.integers(0, 3, 40)
    out = compression.compress(x, y, x[:10], y[:10], 3, lr=0.01, wd=1e-4, keep_frac=keep_frac,
                               epochs=2, batch_size=16, warmup_epochs=1)
    assert out["num_kept"] == expected == len(out["kept"])
    assert out["head"]["kernel"].shape == (expected, 3)
    assert 0.0 <= out["top1"] <= 1.0


def _no_compile(*args, **kwargs):
    raise AssertionError("validation must fail before training compiles")


X_OK, Y_OK = np.zeros((8, 5), np.float32), np.arange(8) % 3


@pytest.mark.parametrize("features,labels,match", [
    (np.zeros((8, 5), np.float32), np.arange(7) % 3, "8 feature rows but 7 labels"),
    (X_OK, np.full(8, 3), r"labels must be in \[0, 3\)"),
    (X_OK, np.full(8, -1), r"labels must be in \[0, 3\)"),
    (X_OK, Y_OK.astype(np.float32), "must be integers"),
    (np.zeros((0, 5), np.float32), np.zeros(0, np.int64), "empty"),
    (np.zeros((8, 0), np.float32), Y_OK, "empty"),
    (np.zeros(8, np.float32), Y_OK, "2-D"),
    (np.full((8, 5), np.nan, np.float32), Y_OK, "NaN"),
])
def test_bad_data_raises_before_compiling(monkeypatch, features, labels, match):
    monkeypatch.setattr(compression, "_fit", _no_compile)
    with pytest.raises(ValueError, match=match):
        compression.fit_head(features, labels, 3, lr=0.1, wd=0.0)
    with pytest.raises(ValueError, match=match):
        compression.compress(features, labels, X_OK, Y_OK, 3, lr=0.1, wd=0.0)
    with pytest.raises(ValueError, match=match):  # bad evaluation data is caught up front too
        compression.compress(X_OK, Y_OK, features, labels, 3, lr=0.1, wd=0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep_frac=0.0), "keep_frac"),
    (dict(keep_frac=1.5), "keep_frac"),
    (dict(lr=0.0), "lr must be"),
    (dict(lr_scale=0.0), "lr_scale"),
    (dict(lasso=-1.0), "lasso"),
    (dict(optimizer="lion"), "Unknown optimizer"),
])
def test_bad_hyperparameters_raise_before_compiling(monkeypatch, kwargs, match):
    monkeypatch.setattr(compression, "_fit", _no_compile)
    kwargs = dict(dict(lr=0.1, wd=0.0), **kwargs)
    with pytest.raises(ValueError, match=match):
        compression.compress(X_OK, Y_OK, X_OK, Y_OK, 3, **kwargs)


def test_mismatched_eval_columns_and_predict_shapes(monkeypatch):
    monkeypatch.setattr(compression, "_fit", _no_compile)
    with pytest.raises(ValueError, match="columns"):
        compression.compress(X_OK, Y_OK, np.zeros((8, 4), np.float32), Y_OK, 3, lr=0.1, wd=0.0)
    head = {"kernel": jnp.eye(5, 3), "bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        compression.predict(head, np.zeros((2, 4), np.float32))
    x = np.eye(5, dtype=np.float32)[:3]
    assert compression.accuracy(head, x, [0, 1, 0]) == pytest.approx(2 / 3)
