"""Resampling a checkpoint's position-embedding grid to another image size, by each family's rule.

A ViT trained at one resolution and used at another needs its grid of position embeddings
resized, and every checkpoint family's authors do it their own way; features differ by a few
percent between the rules, so a checkpoint is best resampled the way its authors do:

* ``bilinear_corners``: big_vision and the original vision_transformer
  (``scipy.ndimage.zoom(grid, zoom, order=1)``): linear, the first and last grid points stay
  where they are (corners aligned).
* ``bicubic_antialias``: timm (``resample_abs_pos_embed``, its default): PyTorch's
  ``interpolate(mode='bicubic', antialias=True)``, i.e. PIL's filter (Keys' cubic with
  a = -0.5, stretched over the source when shrinking, renormalised at the edges).
* ``bicubic``: DINOv2 as Hugging Face (and ONNX exports of it) run it: PyTorch's
  ``interpolate(mode='bicubic', align_corners=False)`` without antialiasing (a = -0.75, edge
  indices clamped), sized by the target grid.

Each rule gives a matrix per axis, so a grid [h, w, D] becomes ``Wh @ grid @ Ww^T``
in float64. `RULES` is the table (name -> its weights function); ``auto`` resolves per
checkpoint layout (`checkpoints.layouts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

AUTO = "auto"


def _bilinear_corners(n_in: int, n_out: int) -> np.ndarray:
    # scipy.ndimage.zoom (grid_mode=False): output i samples input i * (n_in - 1) / (n_out - 1).
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = i * step
        lo = min(int(math.floor(x)), n_in - 1)
        t = x - lo
        w[i, lo] += 1.0 - t
        if t > 0 and lo + 1 < n_in:
            w[i, lo + 1] += t
    return w


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a` at distances |x|."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch's upsample_bicubic2d (align_corners=False): source x = (i + 0.5) * n_in / n_out
    # - 0.5, four taps around floor(x), taps beyond the edge read the edge (clamped).
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * scale - 0.5
        lo = math.floor(x)
        taps = np.arange(lo - 1, lo + 3)
        # Unbuffered, in tap order: clamped taps add up as a loop over them would.
        np.add.at(w[i], np.clip(taps, 0, n_in - 1), _keys_cubic(taps - x, -0.75))
    return w


def _bicubic_antialias(n_in: int, n_out: int) -> np.ndarray:
    # PIL's (and PyTorch's antialias=True) resampling: the a = -0.5 kernel, widened by the
    # shrink factor when shrinking; only taps inside the source, renormalised to sum to one.
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        coeffs = _keys_cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
        total = coeffs.sum()
        w[i, lo:hi] = coeffs / total if total != 0 else coeffs
    return w


RULES: dict[str, Callable[[int, int], np.ndarray]] = {
    "bilinear_corners": _bilinear_corners, "bicubic_antialias": _bicubic_antialias,
    "bicubic": _bicubic,
}


def check_rule(rule: str) -> None:
    """Raises ValueError naming the choices if `rule` is neither a rule nor 'auto'."""
    if rule != AUTO and rule not in RULES:
        raise ValueError(f"posemb_resample={rule!r}: choose from {AUTO}, {', '.join(RULES)}")


def resample_grid(grid: np.ndarray, size: tuple[int, int], rule: str) -> np.ndarray:
    """A grid [h, w, D] resampled to `size` by `rule` (computed in float64, dtype kept)."""
    h, w = grid.shape[:2]
    if (h, w) == tuple(size):
        return grid
    check_rule(rule)
    if rule == AUTO:
        raise ValueError("'auto' is resolved per checkpoint layout before resampling")
    wh, ww = RULES[rule](h, size[0]), RULES[rule](w, size[1])
    return np.einsum("ih,hwd,jw->ijd", wh, grid.astype(np.float64), ww).astype(grid.dtype)
