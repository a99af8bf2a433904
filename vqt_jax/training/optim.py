"""Optimisers and learning-rate schedule of the VQT/VPT releases, in optax.

The optimisers transcribe the releases' torch optimisers (see "Optimisers" below).
The learning rate warms up linearly and then follows a
half cosine to zero, and the releases step that schedule once per epoch (so the whole first
epoch runs at lr 0).

Optimisers (`OPTIMIZERS`; tests/test_release_optimizers.py checks each against a numpy
transcription of the release code). `lr` is the scheduled lr of the step.

* 'adam', the VQT release (andytu28/VQT src/solver/optimizer.py, OPTIMIZER 'adam'):
  torch.optim.Adam (betas 0.9/0.999, eps 1e-8 added to the bias-corrected sqrt(v)) with
  coupled L2: g += wd * p before the moments. Every trainable leaf is decayed except the
  head's bias (the release exempts `last_layer.bias` only, so adapter/LoRA biases in VQT's
  combinations are decayed).
* 'sgd', the VPT release (KMnP/vpt src/solver/optimizer.py, OPTIMIZER 'sgd', MOMENTUM 0.9 in
  configs/base-linear.yaml and base-prompt.yaml): torch.optim.SGD, no dampening or Nesterov,
  coupled L2: buf = 0.9 * buf + (g + wd * p), p -= lr * buf. Only the head's bias
  (`last_layer.bias`) is not decayed.
* 'adamw', the VPT release's own AdamW class (KMnP/vpt src/solver/optimizer.py, taken from an
  old Hugging Face transformers), for full fine-tuning (configs/base-finetune.yaml): the
  moments as Adam's, then p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + 1e-6), so its
  eps (1e-6, not 1e-8) is added to the uncorrected sqrt(v) (optax.adamw adds it to the
  corrected one); then the decay, decoupled and applied to the already-updated weight:
  p -= lr * wd * p. Not decayed: every leaf whose name contains 'bias'. The release's list is
  ['bias', 'LayerNorm.bias', 'LayerNorm.weight'] matched as substrings of torch names, but its
  ViT calls its norms attention_norm, ffn_norm and encoder_norm, so only 'bias' ever matches:
  LayerNorm scales, class token, position embedding and all kernels are decayed, and so they
  are here (our norms are named LayerNorm_*, so copying the string test would exempt them).

Where a release is degenerate we follow the paper's intent and say so:

* VPT's make_optimizer builds its AdamW only `if WEIGHT_DECAY > 0`, and then with a hard-coded
  weight_decay 0.01, so tune_vtab.py's 'finetune' wd grid {0.01, 0.001, 0.0001, 0} gives
  AdamW(wd 0.01) three times, and wd 0 silently falls through to the SGD branch (momentum 0.9
  at AdamW's learning rates). Here 'adamw' always is AdamW and uses the wd it is given (the grid
  value; the paper searches wd for full fine-tuning), and wd 0 is AdamW without decay.
* With WEIGHT_DECAY 0, VPT's 'adam'/'sgd' branches build the same optimisers without decay,
  which is what wd 0 does here too; nothing to correct there.
"""

from __future__ import annotations

import fractions
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def warmup_cosine(base_lr: float, total_steps: int,
                  warmup_steps: float) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up from 0, then cosine decay to 0, advanced every step.

    Args:
      base_lr: peak learning rate.
      total_steps: optimiser steps of the whole run.
      warmup_steps: steps of the linear warm-up.

    Returns:
      An optax schedule: step -> learning rate.
    """
    total, warm = float(total_steps), float(warmup_steps)

    def schedule(step: jax.Array) -> jax.Array:
        # The releases' lr_lambda: t / warm during warm-up, then a half cosine to 0 at total.
        t = jnp.asarray(step, jnp.float32)
        progress = (t - warm) / max(1.0, total - warm)
        cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return base_lr * jnp.where(t < warm, t / max(1.0, warm), cosine)

    return schedule


def epoch_warmup_cosine(base_lr: float, epochs: int, warmup_epochs: int,
                        steps_per_epoch: int | fractions.Fraction
                        ) -> Callable[[jax.Array], jax.Array]:
    """The releases' schedule: `WarmupCosineSchedule` stepped once per epoch.

    The releases (`src/solver/lr_scheduler.py`, `scheduler.step()` after each epoch of
    `src/engine/trainer.py`) train epoch e (from 0) at lr ``base_lr * f(e)`` with
    ``f(e) = e / W`` for e < W, else ``max(0, 0.5 (1 + cos(pi (e - W) / (E - W))))``: the first
    epoch runs at lr 0 and the last at f(E - 1) > 0.

    Args:
      base_lr: peak learning rate.
      epochs: E, the run's epochs.
      warmup_epochs: W.
      steps_per_epoch: optimiser steps per epoch: an integer (per-epoch batches, the last
        partial) or an exact fraction N / B (full batches across epoch boundaries); epoch e
        holds the steps s with floor(s / steps_per_epoch) = e, computed in integers.

    Returns:
      An optax schedule: step -> learning rate.
    """
    ratio = fractions.Fraction(steps_per_epoch)
    if ratio <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")

    # One factor per epoch, computed in float64 on the host: exact to float32's rounding (a
    # float32 cosine is 1e-5 off, relatively, in the last epochs).
    factors = np.array([_release_factor(e, warmup_epochs, epochs) for e in range(epochs)]
                       + [0.0], np.float32)

    def schedule(step: jax.Array) -> jax.Array:
        # floor(step / (p / q)) = (step * q) // p, exactly, in integers.
        epoch = (jnp.asarray(step, jnp.int32) * ratio.denominator) // ratio.numerator
        return base_lr * jnp.asarray(factors)[jnp.clip(epoch, 0, epochs)]

    return schedule


def training_schedule(lr: float, *, num_examples: int, batch_size: int, epochs: int,
                      warmup_epochs: int, batching: str = "epoch", per_epoch: bool = True
                      ) -> tuple[Callable[[jax.Array], jax.Array], int]:
    """A run's schedule and its number of steps, from the config's terms.

    Args:
      lr: peak learning rate.
      num_examples: N, training examples per epoch.
      batch_size: B, the global batch.
      epochs, warmup_epochs: of the run.
      batching: 'epoch' (ceil(N / B) steps per epoch, the last batch partial) or 'stream'
        (full batches across epochs: N / B steps per epoch, ceil(epochs * N / B) in all).
      per_epoch: step the schedule once per epoch (the releases) rather than every step.

    Returns:
      (schedule, total steps).
    """
    if batching == "epoch":
        steps_per_epoch: int | fractions.Fraction = -(-num_examples // batch_size)
        total_steps = epochs * steps_per_epoch
    else:
        steps_per_epoch = fractions.Fraction(num_examples, batch_size)
        total_steps = -(-epochs * num_examples // batch_size)
    total_steps = max(1, total_steps)
    if per_epoch:
        return epoch_warmup_cosine(lr, epochs, warmup_epochs, steps_per_epoch), total_steps
    return warmup_cosine(lr, total_steps, float(warmup_epochs * steps_per_epoch)), total_steps


def _release_factor(epoch: int, warmup: int, total: int) -> float:
    """The releases' `WarmupCosineSchedule.lr_lambda` at an epoch, in float64."""
    if epoch < warmup:
        return epoch / max(1.0, warmup)
    progress = (epoch - warmup) / max(1.0, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def decay_mask(trainable: dict, name: str = "adam") -> dict:
    """Which trainable leaves the optimiser `name` decays, following its release.

    Args:
      trainable: flat dict of '/'-joined keys (e.g. 'params/head/bias') to leaves.
      name: a key of OPTIMIZERS. 'adam' and 'sgd' decay all but the head's bias, 'adamw' all
        but biases (see the module docstring for the release code behind each).

    Returns:
      {key: bool} with the keys of `trainable`.

    Raises:
      ValueError: for an unknown name.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        # VPT src/solver/optimizer.py, the 'adamw' branch: no decay if any of ['bias',
        # 'LayerNorm.bias', 'LayerNorm.weight'] is a substring of the torch name. Only 'bias'
        # can match a VPT ViT name (its norms are attention_norm/ffn_norm/encoder_norm), so the
        # rule is "no decay on biases"; applied to the leaf's own name (e.g. `bias`, an
        # adapter's `down_bias`), since none of our module names contains 'bias'.
        return {k: "bias" not in k.rsplit("/", 1)[-1] for k in trainable}
    # VPT/VQT src/solver/optimizer.py, the 'adam'/'sgd' branch: weight_decay = 0.0 only
    # `if "last_layer.bias" in key`; every other trainable parameter keeps WEIGHT_DECAY. The
    # release's `last_layer.bias` is our head's bias, as train.py names it ('params/head/bias')
    # or as compression.py's bare head does ('head/bias').
    return {k: k.split("/")[-2:] != ["head", "bias"] for k in trainable}


def _sgd(schedule, weight_decay, mask) -> optax.GradientTransformation:
    # torch SGD (VPT's 'sgd'): buf = 0.9 * buf + (g + wd * p); p -= lr * buf. optax.trace starts
    # from a zero buffer, so its first step is g + wd * p, as torch's (buf = d_p) is.
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                       optax.trace(decay=0.9), optax.scale_by_learning_rate(schedule))


class AdamState(NamedTuple):
    """State of the Adam transcriptions: steps taken and torch's `exp_avg`, `exp_avg_sq`."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _adam_init(params: optax.Params) -> AdamState:
    return AdamState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params),
                     jax.tree.map(jnp.zeros_like, params))


def _adam_moments(learning_rate: float | Callable[[jax.Array], jax.Array], grads: optax.Updates,
                  state: AdamState, b1: float, b2: float):
    """The part both Adam transcriptions share: this step's lr (schedule of the count before
    it), the new count, the bias corrections (1 - b1^t, sqrt(1 - b2^t)) and the new moments."""
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = state.count + 1
    # torch computes the corrections in float64; in float32, 1 - 0.999 loses 1e-5 of its value,
    # so they are taken as -expm1(t * log(b)) instead, which is float32-accurate.
    t = count.astype(jnp.float32)
    bc1, sqrt_bc2 = -jnp.expm1(t * math.log(b1)), jnp.sqrt(-jnp.expm1(t * math.log(b2)))
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, grads)
    return lr, count, bc1, sqrt_bc2, mu, nu


def torch_adam(learning_rate: float | Callable[[jax.Array], jax.Array],
               weight_decay: float | jax.Array, mask: dict, *, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """torch.optim.Adam with coupled L2, as the VQT release uses it (OPTIMIZER 'adam').

    Per leaf, at step t (from 1) with lr = learning_rate(t - 1):
      d = g + wd * p   (decayed leaves only)
      m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d^2
      p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    torch's defaults: betas (0.9, 0.999), eps 1e-8, amsgrad off.

    Args:
      learning_rate: a constant or a schedule of the step count (optax's convention: the
        first update uses learning_rate(0)).
      weight_decay: wd; may be a traced value.
      mask: {key: bool} like the params (True: decayed; `decay_mask`).
      b1, b2, eps: Adam's constants.

    Returns:
      The transformation; its update needs `params`.
    """

    def update_fn(grads: optax.Updates, state: AdamState,
                  params: optax.Params | None = None) -> tuple[optax.Updates, AdamState]:
        if params is None:
            raise ValueError("torch_adam needs the params: its L2 term is wd * p")
        # The coupled L2 enters the gradient before the moments (torch: grad.add(p, alpha=wd)).
        grads = jax.tree.map(lambda g, p, d: jnp.where(d, g + weight_decay * p, g),
                             grads, params, mask)
        lr, count, bc1, sqrt_bc2, mu, nu = _adam_moments(learning_rate, grads, state, b1, b2)
        updates = jax.tree.map(
            lambda m, v, p: (-(lr / bc1) * m / (jnp.sqrt(v) / sqrt_bc2 + eps)).astype(p.dtype),
            mu, nu, params)
        return updates, AdamState(count, mu, nu)

    return optax.GradientTransformation(_adam_init, update_fn)


def vpt_adamw(learning_rate: float | Callable[[jax.Array], jax.Array],
              weight_decay: float | jax.Array, mask: dict, *, b1: float = 0.9,
              b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
    """The VPT release's AdamW (KMnP/vpt src/solver/optimizer.py, class AdamW), in optax.

    Per leaf, at step t (from 1) with lr = learning_rate(t - 1):
      m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
      p' = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
      p'' = p' - lr * wd * p'   (decayed leaves only; the decay acts on the updated p')
    The release's defaults: betas (0.9, 0.999), eps 1e-6, correct_bias True. Unlike the release,
    the decay is `weight_decay` as given (its make_optimizer hard-codes 0.01) and wd 0 is just
    no decay (the release switches to SGD there); see the module docstring.

    Args:
      learning_rate: a constant or a schedule of the step count (optax's convention: the
        first update uses learning_rate(0)).
      weight_decay: wd; may be a traced value.
      mask: {key: bool} like the params (True: decayed; `decay_mask`).
      b1, b2, eps: Adam's constants.

    Returns:
      The transformation; its update needs `params`.
    """

    def update_fn(grads: optax.Updates, state: AdamState,
                  params: optax.Params | None = None) -> tuple[optax.Updates, AdamState]:
        if params is None:
            raise ValueError("vpt_adamw needs the params: its decay acts on the weights")
        lr, count, bc1, sqrt_bc2, mu, nu = _adam_moments(learning_rate, grads, state, b1, b2)
        step_size = lr * sqrt_bc2 / bc1

        def leaf_update(m, v, p, decayed):
            u = -step_size * m / (jnp.sqrt(v) + eps)
            # p'' = p' - lr * wd * p' with p' = p + u, written as an update of p; `where` keeps
            # u exact on leaves without decay (and accepts traced masks).
            u = jnp.where(decayed, u - lr * weight_decay * (p + u), u)
            return u.astype(p.dtype)

        updates = jax.tree.map(leaf_update, mu, nu, params, mask)
        return updates, AdamState(count, mu, nu)

    return optax.GradientTransformation(_adam_init, update_fn)


# Optimisers by name: each takes (schedule, weight_decay, decay mask); the release each
# transcribes is in the module docstring.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": torch_adam, "sgd": _sgd, "adamw": vpt_adamw}


def make_optimizer(schedule: Callable[[jax.Array], jax.Array], weight_decay: float,
                   trainable: dict, name: str = "adam") -> optax.GradientTransformation:
    """The named optimiser (see OPTIMIZERS), decaying the leaves its release decays.

    Args:
      schedule: step -> learning rate.
      weight_decay: wd (coupled L2 for 'adam'/'sgd', decoupled for 'adamw').
      trainable: the flat dict of trainable leaves (its keys name them for `decay_mask`).
      name: a key of OPTIMIZERS.

    Raises:
      ValueError: for an unknown name.
    """
    mask = decay_mask(trainable, name)  # raises for an unknown name
    return OPTIMIZERS[name](schedule, weight_decay, mask)
