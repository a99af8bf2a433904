"""An independent, naive VQT forward pass written directly on the params tree.

It follows the official PyTorch release: each layer's query tokens are concatenated with the
ordinary tokens and the whole sequence runs through the block together, with an attention mask
that lets every token attend to the ordinary tokens only. Autodiff then runs through the whole
backbone, which is what the memory-efficient model avoids; the query gradients must be equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _ln(p, x, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _block(p, tokens, num_ordinary, eps, act):
    """One block on [queries ; ordinary] tokens; keys/values restricted to the ordinary ones."""
    a = p["MultiHeadDotProductAttention_0"]
    y = _ln(p["LayerNorm_0"], tokens, eps)
    q = jnp.einsum("bnd,dhk->bnhk", y, a["query"]["kernel"]) + a["query"]["bias"]
    k = jnp.einsum("bnd,dhk->bnhk", y, a["key"]["kernel"]) + a["key"]["bias"]
    v = jnp.einsum("bnd,dhk->bnhk", y, a["value"]["kernel"]) + a["value"]["bias"]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    n = tokens.shape[1]
    allowed = jnp.arange(n) >= n - num_ordinary  # columns of ordinary tokens only
    logits = jnp.where(allowed[None, None, None, :], logits, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
    tokens = tokens + jnp.einsum("bqhd,hdo->bqo", o, a["out"]["kernel"]) + a["out"]["bias"]
    m = p["MlpBlock_0"]
    h = act(_dense(m["Dense_0"], _ln(p["LayerNorm_1"], tokens, eps)))
    return tokens + _dense(m["Dense_1"], h)


def naive_vqt_logits(params, queries, images, *, patch, eps=1e-6, act=None):
    """Logits of a class-token ViT with VQT, computed the release's way."""
    act = act or (lambda x: jax.nn.gelu(x, approximate=True))
    b = images.shape[0]
    e = params["embedding"]
    x = jax.lax.conv_general_dilated(
        images, e["kernel"], (patch, patch), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ) + e["bias"]
    x = x.reshape(b, -1, x.shape[-1]) + params["pos_embedding"]
    x = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, x.shape[-1])), x], axis=1)
    n = x.shape[1]
    t = queries.shape[1]
    outs = []
    for i in range(queries.shape[0]):
        q = jnp.broadcast_to(queries[i][None], (b, t, x.shape[-1]))
        y = _block(params["Transformer"][f"encoderblock_{i}"], jnp.concatenate([q, x], 1), n, eps,
                   act)
        outs.append(y[:, :t].reshape(b, -1))
        x = y[:, t:]
    cls = _ln(params["Transformer"]["encoder_norm"], x, eps)[:, 0]

    def l2n(z):
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    feats = jnp.concatenate([l2n(cls)] + [l2n(o) for o in outs], axis=-1)
    return _dense(params["head"], feats)
