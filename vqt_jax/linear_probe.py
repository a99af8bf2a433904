"""Linear probes fitted to convergence on fixed features, regularisation tuned on validation.

A baseline head on fixed features is a convex problem, so it is solved, not trained: no
learning rate, no epochs, no schedule. Two pieces:

* `fit` / `tune`: multinomial logistic regression with an L2 penalty, the objective of
  scikit-learn's ``LogisticRegression(C=C, penalty='l2')`` (fit_intercept=True; since
  scikit-learn 1.8 spelled ``l1_ratio=0``, the default)::

      sum_i CE(x_i W + b, y_i) + 0.5 / C * ||W||_F^2      (the bias b is not penalised)

  over the classes present in the training labels (as scikit-learn), minimised by full-batch
  L-BFGS (`optax.lbfgs` with its zoom linesearch) inside one jitted `jax.lax.while_loop`, in
  float32, from W = 0, b = 0. The loop stops when the L2 norm of the gradient of the *mean*
  objective (the sum above divided by the number of examples: the same minimiser) is at most
  `tol` (default `TOL` = 1e-6), when `STALL` iterations in a row leave the parameters unchanged
  (float32 exhausted: the linesearch finds no lower value), or after `max_iter` (default
  `MAX_ITER`) iterations; `Probe.stop` says which, and `Probe.converged` is false only for the
  last. `tune` fits every C of a grid (default `DEFAULT_CS`: 1e-3 ... 1e3, 13 values, half a
  decade apart) on the training part, picks the C with the highest top-1 on the validation
  part (ties: the smaller C, i.e. stronger regularisation), and refits that C on training +
  validation. The grid is swept in increasing C, each fit starting from the previous solution
  (a warm start changes the path, not the optimum).

* `head2toe`: Head2Toe's selection (Evci et al. 2022) fitted the same way. A group-lasso head
  (`group_lasso`: mean CE + lam * sum_j ||W[j, :]||_2 with lam = `DEFAULT_LASSO_RATIO` times
  the smallest lam that zeroes every row; solved by FISTA to `LASSO_TOL` on the proximal-
  gradient mapping) scores every input feature by the norm of its row of weights; features
  its penalty zeroed are ordered after all others by the norm of their gradient row, which is
  how close they are to entering (at the optimum a zero row has gradient norm <= lam). For
  each keep fraction of a grid (default `DEFAULT_KEEP_FRACS`) the top features get a
  `tune`-style L2 probe; the (fraction, C) with the best validation top-1 wins (ties: the
  smaller fraction, then the smaller C). Then the group lasso is refitted on training +
  validation, its top features at that fraction are kept, and the probe with that C is
  refitted on them. As in Head2Toe the fraction is chosen on validation; the lasso strength is
  fixed (relative to its data-dependent maximum) to keep the search at one dimension plus C.

No standardisation is applied: the callers' features are already L2-normalised per group, and
scikit-learn is given the same features in the tests.

Exact reformulations keep this fast on a CPU without changing any solution:

* The L2 objective is invariant under an orthogonal change of feature coordinates, and its
  minimiser W lies in the span of the training rows. With more features than examples the
  probe is therefore fitted on Z = X V ([N, rank] instead of [N, F], V an orthonormal basis of
  the row space of all rows involved) and mapped back as W = V B; L-BFGS with a scaled-identity
  initial Hessian takes the same steps in either coordinates.
* Z is centred: the unpenalised bias absorbs the mean, and L-BFGS needs ~8x fewer iterations
  on DINOv2 features. The group lasso centres its features for the same reason.
* The training part is fitted on all rows with zero weight on the validation rows, and rows and
  columns are padded (zero-weight rows, zero columns) to multiples of `BUCKET`, so the grid,
  every keep fraction and the refit share one compiled solver.
* The group lasso is solved on a working set of features grown until every feature outside it
  satisfies the optimality condition of a zero row.

The grid is swept sequentially rather than vmapped over C: a batched `while_loop` runs every
C until the slowest has converged, and loses the warm starts of the sequential sweep.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from vqt_jax.compression import num_to_keep
from vqt_jax.progress import Progress

# C grid of scikit-learn's convention: 1e-3 ... 1e3, half a decade apart.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 3, 13))
# Head2Toe keep fractions searched on the validation part (1.0: every feature).
DEFAULT_KEEP_FRACS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# Group-lasso strength as a fraction of lam_max, the smallest lam that zeroes every row.
DEFAULT_LASSO_RATIO = 0.1
# Gradient-norm tolerance of the mean L2 objective, reachable in float32.
TOL = 1e-6
# A cap, not the usual stop: the loop ends by TOL or STALL. Large C on separable features can
# need over 2000 (C=100, 30 examples x 80 features: 2140 iterations to stall on an AVX-512
# CPU, where 2000 left it at grad norm 6e-6).
MAX_ITER = 5000
# Rows and solver columns are padded to multiples of this, so similar sizes share a compilation
# (compiling the L-BFGS loop takes seconds on a CPU).
BUCKET = 128
# Consecutive iterations that leave every parameter unchanged after which L-BFGS stops.
STALL = 10
# Group lasso: tolerance on the norm of the proximal-gradient mapping, and an iteration cap.
LASSO_TOL = 1e-5
LASSO_MAX_ITER = 10000
# Working-set rounds of the group lasso (each adds the worst violators; a few suffice).
_MAX_ROUNDS = 64

_HIGHEST = jax.lax.Precision.HIGHEST  # f32 matmuls on TPU/GPU would otherwise round to bf16/tf32


@dataclasses.dataclass(frozen=True)
class Probe:
    """A fitted linear softmax head over the classes seen in training.

    Attributes:
      kernel: [F, K] float32 weights, K = len(classes).
      bias: [K] float32.
      classes: [K] sorted labels the columns stand for (those of the training labels).
      C: the inverse regularisation strength it was fitted with.
      objective: the scikit-learn-scale objective at the solution (sum of CE + 0.5 / C ||W||^2
        over the examples fitted).
      grad_norm: L2 norm of the gradient of the mean objective at the solution.
      iterations: L-BFGS iterations.
      stop: why L-BFGS stopped: 'tolerance' (grad_norm <= tol), 'stalled' (`STALL` iterations
        in a row left every parameter unchanged: float32 cannot resolve a further decrease) or
        'max_iter'.
    """

    kernel: np.ndarray
    bias: np.ndarray
    classes: np.ndarray
    C: float
    objective: float
    grad_norm: float
    iterations: int
    stop: str

    @property
    def converged(self) -> bool:
        """Whether the fit ended at the optimum as far as float32 resolves it."""
        return self.stop != "max_iter"

    def predict(self, features: Any) -> np.ndarray:
        """Predicted labels [N] of features [N, F]."""
        x = np.asarray(features, np.float32)
        if x.ndim != 2 or x.shape[1] != self.kernel.shape[0]:
            raise ValueError(f"features must be [N, {self.kernel.shape[0]}] for this probe, "
                             f"got shape {x.shape}")
        return self.classes[np.argmax(x @ self.kernel + self.bias, axis=1)]

    def accuracy(self, features: Any, labels: Any) -> float:
        """Top-1 accuracy on features [N, F] with labels [N]."""
        labels = np.asarray(labels)
        if len(labels) == 0 or len(labels) != np.shape(features)[0]:
            raise ValueError(f"accuracy needs as many labels as feature rows (> 0), got "
                             f"{np.shape(features)[0]} rows and {len(labels)} labels")
        return float(np.mean(self.predict(features) == labels))


@dataclasses.dataclass(frozen=True)
class Tuned:
    """A probe whose C was chosen on a validation part, refitted on training + validation.

    Attributes:
      probe: the refitted probe.
      C: the chosen C.
      cs: the grid, increasing.
      val_top1: [len(cs)] validation top-1 of each C fitted on the training part.
    """

    probe: Probe
    C: float
    cs: tuple[float, ...]
    val_top1: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Head2Toe:
    """Head2Toe fitted with validation-chosen keep fraction and C (see `head2toe`).

    Attributes:
      probe: the final probe on the kept features (columns in `kept` order).
      kept: sorted indices of the kept input features (chosen on training + validation).
      keep_frac: the chosen keep fraction.
      C: the chosen C.
      lasso: the group-lasso strength of the final selection (lasso_ratio * its lam_max).
      lasso_converged: whether both group-lasso fits reached their tolerance.
      val_top1: {keep_frac: [len(cs)] validation top-1} of every grid point.
    """

    probe: Probe
    kept: np.ndarray
    keep_frac: float
    C: float
    lasso: float
    lasso_converged: bool
    val_top1: dict[float, tuple[float, ...]]


# ---------------------------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------------------------


def _check_features(features: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{what} features must be a 2-D [N, F] array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} features are empty (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} features must be numbers, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} features contain NaN or infinity")
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} labels must be a 1-D integer array, got shape {y.shape} and "
                         f"dtype {y.dtype}")
    if len(y) != len(x):
        raise ValueError(f"{what}: {len(x)} feature rows but {len(y)} labels")
    return x.astype(np.float32), y


def _check_pair(train_x: Any, train_y: Any, val_x: Any, val_y: Any
                ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Checked (x, y of training then validation rows, training rows, classes in training)."""
    train_x, train_y = _check_features(train_x, train_y, "training")
    val_x, val_y = _check_features(val_x, val_y, "validation")
    if val_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"training features have {train_x.shape[1]} columns but validation "
                         f"features {val_x.shape[1]}")
    classes = _classes(train_y)
    if len(unseen := np.setdiff1d(val_y, classes)):
        raise ValueError(f"the validation part has classes never seen in training: "
                         f"{unseen.tolist()[:10]}; a probe cannot predict them, so choosing C "
                         f"on it would be biased")
    return np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), len(train_x), classes


def _classes(labels: np.ndarray) -> np.ndarray:
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"training labels hold {len(classes)} class(es); a classifier needs "
                         f"examples of at least 2")
    return classes


def _check_grid(values: Sequence[float], name: str, upper: float = np.inf) -> tuple[float, ...]:
    grid = tuple(sorted(float(v) for v in values))
    if not grid:
        raise ValueError(f"{name} is empty")
    if not all(0 < v <= upper and np.isfinite(v) for v in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"{name} must be distinct finite values in (0, {upper}], got "
                         f"{list(values)}")
    return grid


# ---------------------------------------------------------------------------------------------
# The L2 problem.
# ---------------------------------------------------------------------------------------------


def _mean_ce(params: dict, x: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """The weighted mean cross-entropy of the head on x."""
    logits = jnp.matmul(x, params["kernel"], precision=_HIGHEST) + params["bias"]
    return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, y)) / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _lbfgs(z: jax.Array, y: jax.Array, w: jax.Array, c: jax.Array, init: dict, tol: jax.Array,
           *, max_iter: int) -> tuple[dict, jax.Array, jax.Array, jax.Array, jax.Array]:
    # c, tol and the warm start are traced: one compilation serves a whole grid.
    inv_c_n = 1.0 / (c * jnp.sum(w))

    def fun(params):  # the L2 objective divided by the weighted number of examples
        return _mean_ce(params, z, y, w) + 0.5 * inv_c_n * jnp.sum(params["kernel"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def running(carry):
        _, state, still = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        # At count 0 the state's gradient is a placeholder, not the gradient at `init`. (The
        # objective is no stopping signal: near the optimum its float32 value stops changing
        # while the gradient still shrinks by orders of magnitude.)
        return (count == 0) | ((count < max_iter) & (grad_norm > tol) & (still < STALL))

    def step(carry):
        params, state, still = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        new = optax.apply_updates(params, updates)
        # No parameter moved: the linesearch found no lower float32 value along its direction.
        # Once in a while that passes (the memory changes the next direction); `STALL` times
        # in a row means float32 is exhausted.
        moved = jax.tree.reduce(jnp.logical_or, jax.tree.map(
            lambda a, b: jnp.any(a != b), new, params))
        return new, state, jnp.where(moved, 0, still + 1)

    params, state, still = jax.lax.while_loop(running, step, (init, opt.init(init), jnp.asarray(0)))
    value, grad = jax.value_and_grad(fun)(params)
    return params, value, otu.tree_norm(grad), otu.tree_get(state, "count"), still >= STALL


def _basis(x: np.ndarray, width: int) -> np.ndarray:
    """P [F, width] with orthonormal columns spanning the rows of x [N, F] (zero-padded).

    With F <= width it is the identity padded with zero columns (z = x P is x padded). Else
    the right singular vectors of x with non-negligible singular values, from the
    eigendecomposition of the [N, N] Gram matrix in float64.
    """
    if x.shape[1] <= width:
        return np.eye(x.shape[1], width, dtype=np.float64)
    x64 = x.astype(np.float64)
    eigvals, eigvecs = np.linalg.eigh(x64 @ x64.T)
    # Directions with singular values below 1e-6 of the largest carry no signal in float32.
    keep = eigvals > max(eigvals[-1], 0.0) * 1e-12
    basis = x64.T @ (eigvecs[:, keep] / np.sqrt(eigvals[keep]))
    return np.pad(basis, ((0, 0), (0, width - basis.shape[1])))


def _bucket(n: int) -> int:
    """n rounded up to a multiple of `BUCKET`: the padded size of rows and solver columns."""
    return -(-n // BUCKET) * BUCKET


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    return np.pad(a, [(0, n - len(a))] + [(0, 0)] * (a.ndim - 1))


class _Problem:
    """All rows of one fit sequence (training part first), in the solver's coordinates.

    Rows are padded with zero-weight rows to a multiple of `BUCKET`, and the solver's columns
    (`width`, a multiple of `BUCKET`) with zero features, which keep zero weights: problems of
    similar sizes then share one compiled solver.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, classes: np.ndarray, width: int | None = None):
        self.x, self.n, self.classes = x, len(x), classes
        self.basis = _basis(x, width or _width(x))
        z = x.astype(np.float64) @ self.basis
        # Centred coordinates: the unpenalised bias absorbs the mean (logits = (z - mean) B +
        # b' = z B + b' - mean B), so W and the objective are unchanged, while L-BFGS no longer
        # fights the features' common direction (far fewer iterations on DINOv2 features).
        self.mean = z.mean(axis=0)
        self.z64 = z - self.mean
        self.y_idx = np.searchsorted(classes, y)
        self.z = jnp.asarray(_pad_rows(self.z64, _bucket(self.n)), jnp.float32)
        self.y = jnp.asarray(_pad_rows(self.y_idx, _bucket(self.n)), jnp.int32)

    def fit(self, weights: np.ndarray, c: float, init: dict | None, tol: float,
            max_iter: int) -> tuple[Probe, dict]:
        """The probe on the rows with weight 1, and the solver's parameters (a warm start)."""
        k = len(self.classes)
        if init is None:
            init = {"kernel": jnp.zeros((self.z.shape[1], k), jnp.float32),
                    "bias": jnp.zeros((k,), jnp.float32)}
        w = jnp.asarray(_pad_rows(weights, self.z.shape[0]), jnp.float32)
        params, value, grad_norm, count, stalled = _lbfgs(
            self.z, self.y, w, jnp.float32(c), init, jnp.float32(tol), max_iter=max_iter)
        value, grad_norm = float(value), float(grad_norm)
        stop = "tolerance" if grad_norm <= tol else "stalled" if bool(stalled) else "max_iter"
        if not np.isfinite(value):
            raise FloatingPointError(f"L-BFGS diverged at C={c} (objective {value})")
        b = np.asarray(params["kernel"], np.float64)
        kernel = self.basis @ b
        bias = np.asarray(params["bias"], np.float64) - self.mean @ b
        # scikit-learn's objective in float64 (float32 would round away a CE near 0).
        logits = self.z64 @ b + np.asarray(params["bias"], np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        ce = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(self.n), self.y_idx]
        return Probe(kernel=kernel.astype(np.float32), bias=bias.astype(np.float32),
                     classes=self.classes, C=float(c),
                     objective=float(weights @ ce + 0.5 / c * np.sum(kernel * kernel)),
                     grad_norm=grad_norm, iterations=int(count), stop=stop), params


def _width(x: np.ndarray) -> int:
    """Solver columns for the rows x [N, F]: their row space fits in min(N, F)."""
    return _bucket(min(x.shape))


def fit(features: Any, labels: Any, C: float, *, tol: float = TOL,
        max_iter: int = MAX_ITER) -> Probe:
    """Fits the L2 logistic regression of scikit-learn's convention to convergence.

    Minimises sum_i CE(x_i W + b, y_i) + 0.5 / C * ||W||^2 (b not penalised) over the classes
    present in `labels`; see the module docstring for the solver and stopping rule.

    Args:
      features: [N, F] float features.
      labels: [N] integer labels (at least two distinct).
      C: inverse regularisation strength (> 0), as scikit-learn's.
      tol: gradient-norm tolerance of the mean objective.
      max_iter: iteration cap.

    Returns:
      The fitted `Probe`.

    Raises:
      ValueError: malformed or empty inputs, fewer than two classes, C <= 0.
    """
    (c,) = _check_grid([C], "C")
    x, y = _check_features(features, labels, "training")
    return _Problem(x, y, _classes(y)).fit(np.ones(len(x)), c, None, tol, max_iter)[0]


def select_c(val_correct: Sequence[int], cs: Sequence[float]) -> int:
    """Index of the C to keep: most validation examples right; ties go to the smaller C.

    Args:
      val_correct: number of correctly classified validation examples per C (counts, so ties
        are exact).
      cs: the grid, increasing.
    """
    if len(val_correct) != len(cs) or not len(cs):
        raise ValueError(f"need one count per C, got {len(val_correct)} for {len(cs)} Cs")
    if list(cs) != sorted(cs):
        raise ValueError(f"cs must be increasing, got {list(cs)}")
    return int(np.argmax(np.asarray(val_correct)))  # argmax returns the first maximum


def _counter(progress: Progress | None, fits: int) -> Callable[[], None]:
    """Counts one fit on `progress` per call (its total set to `fits`); a no-op without one."""
    if progress is None:
        return lambda: None
    progress.total = fits
    return progress.update


def _sweep(problem: _Problem, n_train: int, cs: Sequence[float], tol: float,
           max_iter: int, fitted: Callable[[], None]) -> tuple[list[int], tuple[float, ...]]:
    """Validation correct counts and top-1 of every C fitted on the first `n_train` rows
    (warm-started; the other rows are the validation part); `fitted()` after each fit."""
    weights = (np.arange(problem.n) < n_train).astype(np.float32)
    x_val, y_val = problem.x[n_train:], problem.classes[problem.y_idx[n_train:]]
    correct, init = [], None
    for c in cs:
        probe, init = problem.fit(weights, c, init, tol, max_iter)
        correct.append(int(np.sum(probe.predict(x_val) == y_val)))
        fitted()
    return correct, tuple(k / len(y_val) for k in correct)


def tune(train_features: Any, train_labels: Any, val_features: Any, val_labels: Any, *,
         cs: Sequence[float] = DEFAULT_CS, tol: float = TOL,
         max_iter: int = MAX_ITER, progress: Progress | None = None) -> Tuned:
    """C chosen on the validation part (see `select_c`), then refitted on train + val.

    Args:
      train_features: [N, F] training part.
      train_labels: [N] integer labels.
      val_features: [M, F] validation part.
      val_labels: [M] integer labels, all seen in training.
      cs: the C grid (sorted here).
      tol: gradient-norm tolerance of each fit.
      max_iter: iteration cap of each fit.
      progress: counts the fits (one per C, then the refit), its total set here.

    Returns:
      `Tuned`: the refitted probe, the chosen C and every C's validation top-1.

    Raises:
      ValueError: malformed or empty inputs, a validation class missing from training, fewer
        than two training classes, a bad grid.
    """
    cs = _check_grid(cs, "cs")
    x, y, n, classes = _check_pair(train_features, train_labels, val_features, val_labels)
    problem = _Problem(x, y, classes)
    fitted = _counter(progress, len(cs) + 1)
    correct, val_top1 = _sweep(problem, n, cs, tol, max_iter, fitted)
    best = select_c(correct, cs)
    probe, _ = problem.fit(np.ones(len(x)), cs[best], None, tol, max_iter)
    fitted()
    return Tuned(probe=probe, C=cs[best], cs=cs, val_top1=val_top1)


# ---------------------------------------------------------------------------------------------
# Head2Toe: group-lasso selection.
# ---------------------------------------------------------------------------------------------


def _group_shrink(kernel: jax.Array, threshold: jax.Array) -> jax.Array:
    """The proximal operator of threshold * sum_j ||kernel[j]||: row-wise soft-thresholding."""
    norms = jnp.linalg.norm(kernel, axis=1, keepdims=True)
    return kernel * jnp.maximum(0.0, 1.0 - threshold / jnp.maximum(norms, 1e-30))


@jax.jit
def _row_grad_norms(x: jax.Array, y: jax.Array, w: jax.Array, kernel: jax.Array,
                    bias: jax.Array) -> jax.Array:
    params = {"kernel": kernel, "bias": bias}
    return jnp.linalg.norm(jax.grad(_mean_ce)(params, x, y, w)["kernel"], axis=1)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fista(x: jax.Array, y: jax.Array, w: jax.Array, columns: jax.Array, init: dict,
           lam: jax.Array, lipschitz: jax.Array, tol: jax.Array, *, max_iter: int):
    """FISTA with gradient-based adaptive restart (O'Donoghue & Candes 2015) on x[:, columns].

    Stops when the proximal-gradient mapping norm ||L (point - prox step)|| is <= tol.
    """
    x = x[:, columns]  # the working set: a traced gather, so one compilation per size
    step = 1.0 / lipschitz

    def running(carry):
        *_, count, mapping = carry
        return (count < max_iter) & (mapping > tol)

    def body(carry):
        params, point, t, count, _ = carry
        grad = jax.grad(_mean_ce)(point, x, y, w)
        new = {"kernel": _group_shrink(point["kernel"] - step * grad["kernel"], step * lam),
               "bias": point["bias"] - step * grad["bias"]}
        mapping = otu.tree_norm(otu.tree_sub(point, new)) * lipschitz
        # Restart the momentum when it points uphill: (point - new) . (new - params) > 0.
        uphill = otu.tree_vdot(otu.tree_sub(point, new), otu.tree_sub(new, params)) > 0
        t = jnp.where(uphill, 1.0, t)
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        point = jax.tree.map(lambda a, b: a + (t - 1.0) / t_next * (a - b), new, params)
        return new, point, t_next, count + 1, mapping

    carry = (init, init, jnp.float32(1.0), jnp.asarray(0), jnp.float32(jnp.inf))
    params, _, _, count, mapping = jax.lax.while_loop(running, body, carry)
    return params, count, mapping


@dataclasses.dataclass(frozen=True)
class GroupLasso:
    """A group-lasso head and the feature order it implies.

    Attributes:
      kernel: [F, K] weights over the classes of the weighted rows (rows of unselected features
        exactly zero).
      lam: the penalty used.
      lam_max: the smallest penalty at which every row is zero.
      order: [F] feature indices, best first: nonzero rows by decreasing norm, then zero rows
        by decreasing norm of their gradient row; remaining ties by index.
      iterations: FISTA iterations, all working sets together.
      converged: whether the proximal-gradient mapping norm of the full problem reached `tol`.
    """

    kernel: np.ndarray
    lam: float
    lam_max: float
    order: np.ndarray
    iterations: int
    converged: bool


def group_lasso(features: Any, labels: Any, *, lasso_ratio: float = DEFAULT_LASSO_RATIO,
                weights: Any = None, tol: float = LASSO_TOL, max_iter: int = LASSO_MAX_ITER,
                working_set: int = 256) -> GroupLasso:
    """Group-lasso softmax head: mean CE + lam * sum_j ||W[j, :]||_2, lam = ratio * lam_max.

    lam_max, the smallest penalty whose solution is W = 0, is the largest row norm of the
    W-gradient at W = 0 with the bias of the class frequencies; a ratio makes the strength
    independent of the features' scale and count. The bias is not penalised, so the features
    are centred first (the bias absorbs the means; W and the objective are unchanged), which
    shrinks the gradient's Lipschitz constant from the features' mean direction.

    Solver: FISTA with step 1/L (L = 0.5 * the largest eigenvalue of the centred features'
    second-moment matrix, or 0.5 for the bias: Bohning's bound on the softmax CE Hessian) and
    adaptive restart, on a working set of features: the `working_set` (doubled as needed)
    with nonzero rows or the largest gradient rows. After each solve every feature outside the
    set is checked against the optimality condition of a zero row (gradient row norm <= lam);
    violators join the set and the solve resumes, until there is none. Then the proximal-
    gradient mapping of the full problem equals the working set's, so `tol` bounds it.

    Args:
      features: [N, F] float features.
      labels: [N] integer labels.
      lasso_ratio: lam / lam_max, in (0, 1).
      weights: [N] 0/1 row weights (default all 1): rows with 0 are ignored.
      tol: tolerance on the proximal-gradient mapping norm.
      max_iter: FISTA iteration cap per working set.
      working_set: initial working-set size.

    Returns:
      The `GroupLasso` head and its feature order.

    Raises:
      ValueError: malformed or empty inputs, fewer than two classes, a bad ratio or weights.
    """
    if not 0 < lasso_ratio < 1:
        raise ValueError(f"lasso_ratio must be in (0, 1), got {lasso_ratio}")
    x, y = _check_features(features, labels, "training")
    w = np.ones(len(x), np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (len(x),) or not np.all((w == 0) | (w == 1)) or not w.any():
        raise ValueError(f"weights must be [N] zeros and ones with a one, got shape {w.shape}")
    rows = w > 0
    classes = _classes(y[rows])
    n, f, k = int(rows.sum()), x.shape[1], len(classes)
    x = x - x[rows].mean(axis=0)
    # Rows without weight may hold other classes; any valid index does for them.
    y_idx = np.minimum(np.searchsorted(classes, y), k - 1)
    # At W = 0 the best bias gives the class frequencies; its W-gradient row norms are the
    # smallest penalties that keep each row at zero.
    bias0 = np.log(np.bincount(y_idx[rows], minlength=k) / n).astype(np.float32)
    # Zero-weight padding rows: sizes alike share a compilation.
    xd, yd, wd = (jnp.asarray(_pad_rows(a, _bucket(len(x))))
                  for a in (x, y_idx.astype(np.int32), w))
    kernel, bias = np.zeros((f, k), np.float32), bias0
    grad_rows = np.asarray(_row_grad_norms(xd, yd, wd, kernel, bias))
    lam_max = float(grad_rows.max())
    lam = lasso_ratio * lam_max
    x64 = x[rows].astype(np.float64)
    gram = x64 @ x64.T if n <= f else x64.T @ x64
    lipschitz = 0.5 * max(1.0, float(np.linalg.eigvalsh(gram)[-1]) / n)

    size, iterations, mapping, outside = min(f, working_set), 0, np.inf, np.ones(f, bool)
    for round_ in range(_MAX_ROUNDS + 1):
        nonzero = np.linalg.norm(kernel, axis=1) > 0
        # Zero rows outside the last working set that break optimality (inside it, the solve
        # has already weighed them, to its tolerance).
        optimal = not (outside & (grad_rows > lam)).any()
        if optimal or round_ == _MAX_ROUNDS:
            break
        while size < f and 2 * nonzero.sum() > size:  # room for the support and as many more
            size = min(f, 2 * size)
        # Nonzero rows first, then the largest gradient rows (the worst violators).
        columns = np.lexsort((np.arange(f), -grad_rows, ~nonzero))[:size]
        outside = ~np.isin(np.arange(f), columns)
        init = {"kernel": jnp.asarray(kernel[columns]), "bias": jnp.asarray(bias)}
        params, count, mapping = _fista(xd, yd, wd, jnp.asarray(columns), init, jnp.float32(lam),
                                        jnp.float32(lipschitz), jnp.float32(tol), max_iter=max_iter)
        iterations += int(count)
        kernel = np.zeros((f, k), np.float32)
        kernel[columns] = np.asarray(params["kernel"])
        bias = np.asarray(params["bias"])
        grad_rows = np.asarray(_row_grad_norms(xd, yd, wd, kernel, bias))
        if int(count) >= max_iter:
            break  # not converged on the working set: more features would not help
    # Primary key: the row norm; among zero rows, the gradient-row norm; then the index.
    order = np.lexsort((np.arange(f), -grad_rows, -np.linalg.norm(kernel, axis=1)))
    return GroupLasso(kernel=kernel, lam=lam, lam_max=lam_max, order=order,
                      iterations=iterations, converged=optimal and float(mapping) <= tol)


def head2toe(train_features: Any, train_labels: Any, val_features: Any, val_labels: Any, *,
             keep_fracs: Sequence[float] = DEFAULT_KEEP_FRACS, cs: Sequence[float] = DEFAULT_CS,
             lasso_ratio: float = DEFAULT_LASSO_RATIO, tol: float = TOL,
             max_iter: int = MAX_ITER, progress: Progress | None = None) -> Head2Toe:
    """Head2Toe: group-lasso feature order, then an L2 probe on the top features.

    On the training part: `group_lasso` orders the features; for each keep fraction f (the
    top `num_to_keep(F, f, nearest=True)` features) every C of `cs` is fitted (as in `tune`)
    and scored on the validation part. The best (f, C) by validation top-1 wins, ties going to
    the smaller f and then the smaller C. Then on training + validation: the group lasso orders
    the features again, the top `num_to_keep(F, f, nearest=True)` are kept and the L2 probe
    with C is refitted on them.

    Args:
      train_features: [N, F] training part (e.g. every block's pooled tokens, L2-normalised).
      train_labels: [N] integer labels.
      val_features: [M, F] validation part.
      val_labels: [M] integer labels, all seen in training.
      keep_fracs: fractions in (0, 1] to choose from.
      cs: the C grid.
      lasso_ratio: group-lasso strength relative to its lam_max (see `group_lasso`).
      tol: gradient-norm tolerance of each L2 fit.
      max_iter: iteration cap of each L2 fit.
      progress: counts the fits (both group lassos, every (f, C), the refit), its total set
        here.

    Returns:
      `Head2Toe`.

    Raises:
      ValueError: as `tune`, or a bad keep-fraction grid.
    """
    keep_fracs = _check_grid(keep_fracs, "keep_fracs", upper=1.0)
    cs = _check_grid(cs, "cs")
    x, y, n, classes = _check_pair(train_features, train_labels, val_features, val_labels)
    f = x.shape[1]
    width = _width(x)  # every kept subset fits in this width: one compilation
    fitted = _counter(progress, len(keep_fracs) * len(cs) + 3)
    selection = group_lasso(x, y, lasso_ratio=lasso_ratio, weights=np.arange(len(x)) < n)
    fitted()
    val_top1: dict[float, tuple[float, ...]] = {}
    best = (-1, 0.0, 0.0)  # (correct, keep_frac, C)
    for frac in keep_fracs:
        kept = np.sort(selection.order[:num_to_keep(f, frac, nearest=True)])
        problem = _Problem(x[:, kept], y, classes, width)
        correct, val_top1[frac] = _sweep(problem, n, cs, tol, max_iter, fitted)
        i = select_c(correct, cs)
        if correct[i] > best[0]:  # strict: a tie keeps the smaller fraction
            best = (correct[i], frac, cs[i])
    _, frac, c = best

    final = group_lasso(x, y, lasso_ratio=lasso_ratio)
    fitted()
    kept = np.sort(final.order[:num_to_keep(f, frac, nearest=True)])
    probe, _ = _Problem(x[:, kept], y, classes, width).fit(np.ones(len(x)), c, None, tol, max_iter)
    fitted()
    return Head2Toe(probe=probe, kept=kept, keep_frac=frac, C=c, lasso=final.lam,
                    lasso_converged=selection.converged and final.converged, val_top1=val_top1)
