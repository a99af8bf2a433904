"""Vision Transformer with Visual Query Tuning (VQT), in flax.linen.

The `params` tree is big_vision's ViT, name for name and shape for shape (non-scanned), so
big_vision and original ViT checkpoints map onto it directly. VQT adds a separate variable
collection, `queries`, holding T learnable tokens per layer (`queries/tokens`: [M, T, D]).

How the query path is computed, and why it is memory-efficient:
  Each layer m runs the frozen block on the ordinary tokens exactly as a plain ViT does. The
  layer's T query tokens then take a separate, small path through the same frozen weights:
  LN1 -> W_q -> attention over the ordinary tokens' keys/values -> W_o -> residual -> LN2 ->
  MLP -> residual. The ordinary tokens never see the queries, so the backbone's features are
  unchanged. When only `queries` and `head` are differentiated, nothing in the ordinary stream
  depends on a differentiated input, so JAX's autodiff never linearises it: the backward pass
  only runs through the query paths and keeps each layer's keys and values as residuals. No
  `stop_gradient` is needed for that (and none is used, so methods that also train the backbone
  still get correct gradients).

Compute options (`ViT` attributes): `dtype` is the compute dtype of the backbone and the query
path (parameters stay float32, logits are float32); `scan_blocks` runs the blocks under
`jax.lax.scan` and `remat` rematerialises each block's ordinary stream. None of them changes
the variables or, in float32, the results.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
KV = tuple[Array, Array]

# Widths, depths, MLP sizes and heads of the standard ViT variants (big_vision naming).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),  # SigLIP's shape-optimised
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
}


def _quick_gelu(x: Array) -> Array:
    # OpenAI CLIP's activation: x * sigmoid(1.702 x).
    return x * jax.nn.sigmoid(1.702 * x)


# MLP activations by name: big_vision uses the tanh approximation, timm/PyTorch the exact erf.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
}


def decode_variant(variant: str) -> dict[str, Any]:
    """Turns a variant name such as 'B/16' or 'S/14' into ViT keyword arguments.

    Args:
      variant: `<size>/<patch>` with size in VARIANTS, or just `<size>`.

    Returns:
      A dict with width, depth, mlp_dim, num_heads and (if given) patch_size.

    Raises:
      ValueError: if the size is unknown or the patch is not a positive integer.
    """
    size, _, patch = variant.partition("/")
    if size not in VARIANTS:
        raise ValueError(f"Unknown ViT variant {variant!r}; sizes: {sorted(VARIANTS)}")
    out: dict[str, Any] = dict(VARIANTS[size])
    if patch:
        if not patch.isdigit() or int(patch) <= 0:
            raise ValueError(f"Bad patch size in ViT variant {variant!r}")
        out["patch_size"] = (int(patch), int(patch))
    return out


def variant_name(width: int, depth: int, patch: int | None = None) -> str:
    """Names the standard variant with this width and depth, e.g. 'B/16', or describes it."""
    for name, v in VARIANTS.items():
        if v["width"] == width and v["depth"] == depth:
            return f"ViT-{name}/{patch}" if patch else f"ViT-{name}"
    suffix = f", patch {patch}" if patch else ""
    return f"a ViT of width {width}, depth {depth}{suffix}"


def query_init_scale(patch_size: Sequence[int], width: int) -> float:
    """VPT's prompt initialisation bound, which VQT reuses: sqrt(6 / (3 * ph * pw + D))."""
    return float(np.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + width)))


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||_2, eps) over the last axis (the same as torch's F.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT / DINOv2), `scale` param of shape [D]."""

    init_value: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * scale.astype(x.dtype)


class MlpBlock(nn.Module):
    """Transformer MLP: Dense_0 -> activation -> Dense_1 (big_vision names)."""

    mlp_dim: int
    act: str = "gelu_tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        h = ACTIVATIONS[self.act](dense(self.mlp_dim, name="Dense_0")(x))
        return dense(x.shape[-1], name="Dense_1")(h)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision's `MAPHead`, SigLIP's pooling): a learned probe
    attends over the tokens, then LayerNorm -> MLP -> residual; names and shapes as big_vision's
    (`probe` [1, 1, D], `MultiHeadDotProductAttention_0`, `LayerNorm_0`, `MlpBlock_0`)."""

    num_heads: int
    mlp_dim: int
    mlp_act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Tokens x [B, N, D] (after the encoder's norm) -> the pooled feature [B, D]."""
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
        attn = Attention(width=d, num_heads=self.num_heads, dtype=self.dtype,
                         name="MultiHeadDotProductAttention_0")
        q = attn.project_query(jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d)))
        o = attn.attend(q, *attn.key_value(x))
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_0")(o)
        o = o + MlpBlock(self.mlp_dim, self.mlp_act, self.dtype, name="MlpBlock_0")(y)
        return o[:, 0]


def _kaiming_uniform_linear(key: Array, shape: Sequence[int]) -> Array:
    # torch.nn.Linear's default init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)),
    # which LoRA's A and AdaptFormer's down-projection keep.
    bound = 1.0 / np.sqrt(shape[0])
    return jax.random.uniform(key, tuple(shape), jnp.float32, -bound, bound)


class LoRA(nn.Module):
    """A low-rank update x -> (alpha / r) * (x A) B of a projection, B zero-initialised.

    Its variables live in the `lora` collection (not `params`), so checkpoints never see them
    and a method's trainable rule can name them as a whole.

    Attributes:
      rank: r.
      features: output shape of the projection it updates, e.g. (H, Dh).
      alpha: scale numerator; default r (scale 1).
    """

    rank: int
    features: Sequence[int]
    alpha: float | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = int(np.prod(self.features))
        a = self.variable("lora", "a", lambda: _kaiming_uniform_linear(
            self.make_rng("params"), (x.shape[-1], self.rank))).value
        b = self.variable("lora", "b", lambda: jnp.zeros((self.rank, out), jnp.float32)).value
        scale = (self.alpha if self.alpha is not None else self.rank) / self.rank
        y = (x @ a.astype(x.dtype)) @ b.astype(x.dtype) * scale
        return y.reshape(*x.shape[:-1], *self.features)


class Adapter(nn.Module):
    """AdaptFormer's parallel adapter: scale * up(relu(down(x))), up zero-initialised.

    As in AdaptFormer's VTAB setting (no adapter LayerNorm), it reads the block's residual
    stream before LN2, and its output is added beside the MLP branch. Variables live in the
    `adapter` collection.

    Attributes:
      bottleneck: the hidden size (64 in AdaptFormer's VTAB runs).
      scale: the output scale (0.1 there).
      dropout: dropout on the bottleneck after the ReLU, in training (AdaptFormer's
        `models/adapter.py`: 0.1).
    """

    bottleneck: int
    scale: float = 0.1
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        d = x.shape[-1]
        var = functools.partial(self.variable, "adapter")
        down = var("down_kernel", lambda: _kaiming_uniform_linear(
            self.make_rng("params"), (d, self.bottleneck))).value
        down_b = var("down_bias", lambda: jnp.zeros((self.bottleneck,), jnp.float32)).value
        up = var("up_kernel", lambda: jnp.zeros((self.bottleneck, d), jnp.float32)).value
        up_b = var("up_bias", lambda: jnp.zeros((d,), jnp.float32)).value
        h = jax.nn.relu(x @ down.astype(x.dtype) + down_b.astype(x.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return (h @ up.astype(x.dtype) + up_b.astype(x.dtype)) * self.scale


class Attention(nn.Module):
    """Multi-head attention with big_vision's parameter layout.

    query/key/value kernels are [D, H, Dh], out is [H, Dh, D]. The projections and the attention
    itself are separate methods so that the query tokens of VQT can reuse the ordinary tokens'
    keys and values instead of projecting their own.
    """

    width: int
    num_heads: int
    qkv_bias: bool = True
    lora_rank: int = 0
    lora_alpha: float | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.width // self.num_heads
        proj = functools.partial(
            nn.DenseGeneral,
            features=(self.num_heads, head_dim),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
        )
        self.query = proj()
        self.key = proj()
        self.value = proj()
        self.out = nn.DenseGeneral(
            features=self.width,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
        )
        if self.lora_rank:
            self.lora_query = LoRA(self.lora_rank, (self.num_heads, head_dim), self.lora_alpha)
            self.lora_value = LoRA(self.lora_rank, (self.num_heads, head_dim), self.lora_alpha)

    def qkv(self, y: Array) -> tuple[Array, Array, Array]:
        """Projects normalised tokens [B, N, D] to q, k, v, each [B, N, H, Dh]."""
        return self.project_query(y), *self.key_value(y)

    def key_value(self, y: Array) -> KV:
        """The keys and values [B, N, H, Dh] of normalised tokens y [B, N, D]."""
        v = self.value(y)
        if self.lora_rank:
            v = v + self.lora_value(y).astype(v.dtype)
        return self.key(y), v

    def project_query(self, y: Array) -> Array:
        q = self.query(y)
        if self.lora_rank:
            q = q + self.lora_query(y).astype(q.dtype)
        return q

    @staticmethod
    def probs(q: Array, k: Array, heads_major: bool = False) -> Array:
        """Attention probabilities [B, H, Nq, Nk] of q [B, Nq, H, Dh] over k [B, Nk, H, Dh]
        (or [B, H, Nk, Dh] with `heads_major`)."""
        spec = "bqhd,bhkd->bhqk" if heads_major else "bqhd,bkhd->bhqk"
        logits = jnp.einsum(spec, q * q.shape[-1] ** -0.5, k,
                            preferred_element_type=jnp.float32)
        return jax.nn.softmax(logits, axis=-1)

    def attend(self, q: Array, k: Array, v: Array, stash_dtype: Dtype | None = None,
               heads_major: bool = False) -> Array:
        """Scaled dot-product attention of q [B, Nq, H, Dh] over k, v [B, Nk, H, Dh] -> [B, Nq, D].

        Args:
          q, k, v: projected queries, keys and values.
          stash_dtype: if set, the forward is computed exactly but the backward keeps k and v
            in this (narrower) dtype, e.g. bfloat16 for VQT's per-layer key/value stash.
          heads_major: k and v are laid out [B, H, Nk, Dh] (a cache's layout: each head's
            keys contiguous, so the batched matmuls read them without a transpose).
        """
        if heads_major:
            o = _sdpa(q, k, v, heads_major=True)
        elif stash_dtype is None:
            o = _sdpa(q, k, v)
        else:
            o = _sdpa_narrow_stash(q, k, v, jnp.dtype(stash_dtype))
        return self.out(o.astype(self.dtype))

    def self_attend(self, q: Array, k: Array, v: Array) -> Array:
        """The ordinary tokens' self-attention, q, k, v [B, N, H, Dh] -> [B, N, D].

        On GPU and TPU it is `jax.nn.dot_product_attention`, which reads this layout as is.
        On a GPU with a 16-bit compute dtype it asks for cuDNN's fused flash attention (JAX's
        default, `implementation=None`, is XLA's unfused attention) and falls back to XLA's
        where cuDNN does not support the shapes (it says so while tracing, before anything
        runs). On CPU it is `_sdpa_heads_major`: XLA:CPU runs the per-(image, head) matmuls
        of `dot_product_attention`'s [B, N, H, Dh] einsums at a fraction of its matmul speed,
        and heads-major ones faster.
        Logits and softmax are float32 for any input dtype, like `attend`'s. The query path
        keeps `attend`: it needs the heads-major cache layout and the narrow key/value stash.
        """
        platform = _platform()
        o = None
        if platform == "cpu":
            o = _sdpa_heads_major(q, k, v)
        elif platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:
                o = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except Exception:  # noqa: BLE001 - unsupported shape/dtype/cuDNN: use XLA's
                o = None
        if o is None:
            o = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        return self.out(o.astype(self.dtype))


def _platform() -> str:
    """The backend the attention is traced for (one place, so tests can choose it)."""
    return jax.default_backend()


def _sdpa_heads_major(q: Array, k: Array, v: Array) -> Array:
    """`jax.nn.dot_product_attention`'s result, q, k, v [B, N, H, Dh] -> [B, N, H, Dh],
    computed on [B, H, N, Dh] copies, whose per-(image, head) matrices are contiguous."""
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh * q.shape[-1] ** -0.5, kh,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhqk,bhkd->bhqd", probs, vh, preferred_element_type=jnp.float32)
    return o.astype(q.dtype).transpose(0, 2, 1, 3)


def _sdpa(q: Array, k: Array, v: Array, heads_major: bool = False) -> Array:
    """softmax(q k^T / sqrt(Dh)) v with float32 logits and accumulation."""
    probs = Attention.probs(q, k, heads_major).astype(v.dtype)
    spec = "bhqk,bhkd->bqhd" if heads_major else "bhqk,bkhd->bqhd"
    return jnp.einsum(spec, probs, v, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sdpa_narrow_stash(q: Array, k: Array, v: Array, stash_dtype: Any) -> Array:
    return _sdpa(q, k, v)


def _sdpa_narrow_stash_fwd(q, k, v, stash_dtype):
    # The barrier keeps XLA from folding the narrowing cast into a wide copy it would keep.
    res = jax.lax.optimization_barrier((q, k.astype(stash_dtype), v.astype(stash_dtype)))
    return _sdpa(q, k, v), res


def _sdpa_narrow_stash_bwd(stash_dtype, saved, g):
    del stash_dtype
    q, k, v = saved
    # Cotangents for k and v too, in q's dtype, in case the backbone is trained as well.
    _, vjp = jax.vjp(_sdpa, q, k.astype(q.dtype), v.astype(q.dtype))
    return vjp(g.astype(jnp.float32))


_sdpa_narrow_stash.defvjp(_sdpa_narrow_stash_fwd, _sdpa_narrow_stash_bwd)


class BlockOptions(nn.Module):
    """The options of a transformer block, shared by Encoder1DBlock and Encoder."""

    width: int
    mlp_dim: int
    num_heads: int
    qkv_bias: bool = True
    mlp_act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    layerscale: bool = False
    kv_dtype: Dtype | None = None
    adapter_dim: int = 0
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    lora_rank: int = 0
    lora_alpha: float | None = None
    dtype: Dtype = jnp.float32
    remat: bool = False


class Encoder1DBlock(BlockOptions):
    """Pre-LN transformer block that also carries VQT's query tokens through its frozen weights.

    With `adapter_dim` it has AdaptFormer's parallel adapter, with `lora_rank` LoRA updates of
    W_q and W_v; both act on the ordinary tokens and on the query tokens alike.

    With `remat`, the ordinary tokens' part of the block (`ordinary`) is rematerialised: a
    backward through it keeps only its inputs and recomputes the rest. The query path stays
    outside the checkpoint: it is small (T tokens), and when only the queries are
    differentiated nothing in the checkpoint is, so VQT's backward neither recomputes nor
    runs through the backbone and still keeps each layer's keys and values (in `kv_dtype`).

    Attributes:
      in_scan: set by `Encoder` on the block it applies inside `jax.lax.scan`; the scan
        already keeps XLA from merging the recomputation into the forward, so remat needs no
        CSE barriers of its own there.
    """

    in_scan: bool = False

    def setup(self):
        ln = functools.partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype)
        self.LayerNorm_0 = ln()
        self.MultiHeadDotProductAttention_0 = Attention(
            width=self.width, num_heads=self.num_heads, qkv_bias=self.qkv_bias,
            lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, dtype=self.dtype,
        )
        self.LayerNorm_1 = ln()
        self.MlpBlock_0 = MlpBlock(mlp_dim=self.mlp_dim, act=self.mlp_act, dtype=self.dtype)
        if self.layerscale:
            self.LayerScale_0 = LayerScale()
            self.LayerScale_1 = LayerScale()
        if self.adapter_dim:
            self.Adapter_0 = Adapter(self.adapter_dim, self.adapter_scale, self.adapter_dropout)

    def _scale(self, i: int, x: Array) -> Array:
        return getattr(self, f"LayerScale_{i}")(x) if self.layerscale else x

    def _mlp_residual(self, x: Array, train: bool = False) -> Array:
        y = x + self._scale(1, self.MlpBlock_0(self.LayerNorm_1(x)))
        if self.adapter_dim:
            y = y + self.Adapter_0(x, train)
        return y

    def __call__(self, x: Array, q: Array | None = None,
                 train: bool = False) -> tuple[Array, Array | None, KV]:
        """Runs the block on ordinary tokens x [B, N, D] and query tokens q [B, T, D] (or None).

        Returns:
          The block's outputs for the ordinary tokens and for the query tokens, and the
          ordinary tokens' keys and values (each [B, N, H, Dh]), which are all the query path
          reads from the ordinary stream.
        """
        ordinary = Encoder1DBlock.ordinary
        if self.remat:
            # Argument 2 is `train` (0 is the module): a Python bool that picks the dropout.
            ordinary = nn.remat(ordinary, static_argnums=(2,), prevent_cse=not self.in_scan)
        x_out, (k, v) = ordinary(self, x, train)
        q_out = None if q is None else self.query_path(q, k, v, self.kv_dtype, train=train)
        return x_out, q_out, (k, v)

    def ordinary(self, x: Array, train: bool = False) -> tuple[Array, KV]:
        """The block on the ordinary tokens x [B, N, D] alone: (output [B, N, D], (k, v))."""
        attn = self.MultiHeadDotProductAttention_0
        qx, k, v = attn.qkv(self.LayerNorm_0(x))
        x_out = self._mlp_residual(x + self._scale(0, attn.self_attend(qx, k, v)), train)
        return x_out, (k, v)

    def query_path(self, q: Array, k: Array, v: Array, stash_dtype: Dtype | None = None,
                   heads_major: bool = False, train: bool = False) -> Array:
        """VQT's query tokens q [B, T, D] through the block, attending only to k and v.

        LN1 -> W_q -> attention over the ordinary tokens' keys/values -> W_o -> residual ->
        LN2 -> MLP -> residual. k, v are [B, N, H, Dh], or [B, H, N, Dh] with `heads_major`.
        `stash_dtype` (the model's `kv_dtype`) keeps k and v for the backward in a narrower
        dtype; the forward stays exact. With the `intermediates` collection mutable, the
        attention probabilities [B, H, T, N] are sown as `query_attention` (attention maps).
        """
        attn = self.MultiHeadDotProductAttention_0
        qq = attn.project_query(self.LayerNorm_0(q))
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "query_attention", Attention.probs(qq, k, heads_major))
        o = attn.attend(qq, k, v, stash_dtype, heads_major)
        return self._mlp_residual(q + self._scale(0, o), train)


def _block_options(module: nn.Module) -> dict[str, Any]:
    """The BlockOptions a module carries under the same names."""
    names = [f.name for f in dataclasses.fields(BlockOptions) if f.name not in ("parent", "name")]
    return {n: getattr(module, n) for n in names}


def _replace_prompts(x: Array, prompts: Array, start: int) -> Array:
    """x [B, N, D] with the P tokens at `start` replaced by prompts [B, P, D] (VPT-deep)."""
    p = prompts.shape[1]
    return jnp.concatenate([x[:, :start], prompts, x[:, start + p:]], axis=1)


def _layers_first(a: Array | None) -> Array | None:
    """[B, M, ...] -> [M, B, ...]: per-layer inputs as `jax.lax.scan` slices them."""
    return None if a is None else jnp.moveaxis(a, 1, 0)


def _layers_second(a: Array | None) -> Array | None:
    """[M, B, ...] -> [B, M, ...]: a scan's stacked outputs in the model's layout."""
    return None if a is None else jnp.moveaxis(a, 0, 1)


class Encoder(BlockOptions):
    """The stack of blocks plus the final LayerNorm (`Transformer/...` in big_vision).

    The parameters are always per block (`encoderblock_{i}`, big_vision's non-scanned layout),
    whatever `scan_blocks` says, so checkpoints, trainable rules and optimiser states see one
    tree. With `scan_blocks`, `apply` stacks the blocks' variables along a new leading axis and
    runs one block's program under `jax.lax.scan`: XLA compiles the block once instead of
    `depth` times (the program, and its compile time, no longer grow with the depth), at the
    cost of one copy of the blocks' variables per step (their gradients are sliced back per
    block). `init`, and forwards that sow `intermediates` (per-block names), run the loop.

    Attributes: `depth`, `scan_blocks`, and the BlockOptions of every block.
    """

    depth: int = 12
    scan_blocks: bool = False

    def setup(self):
        self.blocks = [
            Encoder1DBlock(**_block_options(self), name=f"encoderblock_{i}")
            for i in range(self.depth)
        ]
        self.encoder_norm = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)

    def __call__(
        self,
        x: Array,
        queries: Array | None = None,
        *,
        prompts: Array | None = None,
        prompt_start: int = 1,
        collect: Callable[[Array, KV], dict[str, Array]] | None = None,
        train: bool = False,
    ) -> tuple[Array, Array | None, dict[str, Array]]:
        """Runs every block.

        Args:
          x: ordinary tokens [B, N, D] (VPT prompts, if any, already inserted).
          queries: per-layer query tokens [B, M, T, D], or None for a plain ViT.
          prompts: VPT-deep prompts [B, M, P, D]: layer m > 0 replaces the P tokens at
            `prompt_start` with its own before running (layer 0's are already in x).
          prompt_start: index of the first prompt token.
          collect: a pure function of (block m's ordinary output, block m's (k, v)) to a dict
            of per-layer arrays [B, ...] to keep (it may run inside `jax.lax.scan`).
          train: training mode (the adapters' dropout).

        Returns:
          (last block's ordinary tokens [B, N, D] before the final norm,
           query outputs [B, M, T, D] or None,
           `collect`'s arrays stacked per layer, each [B, M, ...]).
        """
        if self._scanning():
            return self._scan(x, queries, prompts, prompt_start, collect, train)
        q_outs, kept = [], []
        for i, block in enumerate(self.blocks):
            if prompts is not None and i > 0:
                x = _replace_prompts(x, prompts[:, i], prompt_start)
            x, q, kv = block(x, None if queries is None else queries[:, i], train)
            q_outs.append(q)
            kept.append({} if collect is None else collect(x, kv))
        q_out = None if queries is None else jnp.stack(q_outs, axis=1)
        return x, q_out, {name: jnp.stack([k[name] for k in kept], axis=1) for name in kept[0]}

    def _scanning(self) -> bool:
        # init builds the per-block tree the unrolled way (the same tree either way); sown
        # intermediates are kept under each block's own name, which only the loop gives.
        return (self.scan_blocks and not self.is_initializing()
                and not self.is_mutable_collection("intermediates"))

    def _scanned_block(self) -> Encoder1DBlock:
        # An unbound block applied functionally to one layer's variables inside the scan.
        return Encoder1DBlock(**_block_options(self), in_scan=True, parent=None)

    def _stacked_blocks(self) -> dict[str, Any]:
        """Every collection's block variables, stacked: {collection: {leaf: [M, ...]}}."""
        per_block = []
        for i in range(self.depth):
            name = f"encoderblock_{i}"
            per_block.append({c: tree[name] for c, tree in self.variables.items() if name in tree})
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_block)

    def _scan(self, x: Array, queries: Array | None, prompts: Array | None, prompt_start: int,
              collect: Callable[[Array, KV], dict[str, Array]] | None,
              train: bool) -> tuple[Array, Array | None, dict[str, Array]]:
        block = self._scanned_block()
        rngs = None
        if train and self.adapter_dim and self.has_rng("dropout"):
            # One dropout key per layer (a different stream than the unrolled loop's, which
            # derives keys from module paths; the same distribution).
            rngs = jax.random.split(self.make_rng("dropout"), self.depth)

        def body(x, xs):
            variables, q, p, rng = xs
            if p is not None:
                # Layer 0 puts back the prompts x already holds: the same values, and the
                # replaced copy gets no gradient, so the gradient is the unrolled loop's.
                x = _replace_prompts(x, p, prompt_start)
            x, q_out, kv = block.apply(variables, x, q, train,
                                       rngs=None if rng is None else {"dropout": rng})
            return x, (q_out, {} if collect is None else collect(x, kv))

        xs = (self._stacked_blocks(), _layers_first(queries), _layers_first(prompts), rngs)
        x, (q_out, kept) = jax.lax.scan(body, x, xs)
        return x, _layers_second(q_out), jax.tree.map(_layers_second, kept)

    def queries_from_kv(self, queries: Array, k: Array, v: Array) -> Array:
        """The query path alone, over given per-layer keys and values.

        Args:
          queries: [B, M, T, D] query tokens.
          k, v: [B, M, H, N, Dh] every layer's keys and values of the ordinary tokens, heads
            major (the cache's layout, see `ViT.cache_features`); not differentiated.

        Returns:
          Query outputs [B, M, T, D], the same as `__call__` gives for the same images.
        """
        if not self._scanning():
            outs = [block.query_path(queries[:, i], k[:, i].astype(self.dtype),
                                     v[:, i].astype(self.dtype), heads_major=True)
                    for i, block in enumerate(self.blocks)]
            return jnp.stack(outs, axis=1)
        block = self._scanned_block()

        def body(carry, xs):
            variables, q, i = xs
            # Each layer's slice is read in place: moving M first would copy the whole batch
            # of keys and values (by far the largest input) before the scan.
            k_i, v_i = (jax.lax.dynamic_index_in_dim(a, i, 1, keepdims=False).astype(self.dtype)
                        for a in (k, v))
            q_out = block.apply(variables, q, k_i, v_i, heads_major=True, method="query_path")
            return carry, q_out

        xs = (self._stacked_blocks(), _layers_first(queries), jnp.arange(self.depth))
        _, outs = jax.lax.scan(body, None, xs)
        return _layers_second(outs)

    def norm(self, x: Array) -> Array:
        return self.encoder_norm(x)


# How the final tokens become one feature (`ViT.pool_type`).
POOL_TYPES = ("tok", "gap", "map")

# Head kernel initialisers by name. torch's kaiming_normal_(a=0, mode='fan_out') on a Linear
# weight [C, F] draws N(0, 2 / C); flax's kernel is [F, C], whose fan_out is also C.
HEAD_INITS = {
    "zeros": nn.initializers.zeros,
    "kaiming_fan_out": nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
}


class ViT(nn.Module):
    """Vision Transformer with Visual Query Tuning and the methods it is compared/combined with.

    Attributes:
      num_classes: classes of the linear head; None or 0 for no head.
      patch_size: (ph, pw).
      width, depth, mlp_dim, num_heads: the transformer's shape (see `decode_variant`).
      pool_type: 'tok' (class token), 'gap' (mean of the patch tokens) or 'map' (big_vision's
        `MAPHead`, SigLIP's: a learned probe attends over the final tokens; VPT's prompts are
        left out, as from 'gap').
      class_token: whether there is a class token; default: only for pool_type 'tok'.
      num_registers: register tokens (DINOv2 with registers, `registers` [1, R, D]): after the
        class token, without position embedding; they take part in attention like the other
        tokens (VQT's queries read their keys and values too) and are left out of patch
        pooling ('gap', Head2Toe's mean patch token).
      fc_norm: apply the final LayerNorm after pooling (timm/MAE) instead of to every token.
      layerscale: per-channel scales on both residual branches (DINOv2).
      mlp_act: 'gelu_tanh' (big_vision), 'gelu' (exact, timm), 'quick_gelu' (OpenAI CLIP).
      ln_eps: LayerNorm epsilon (1e-6 for ViT/DINOv2/MAE, 1e-5 for CLIP).
      pre_norm: a LayerNorm after the embeddings, before the blocks (CLIP's `norm_pre`).
      qkv_bias: bias on the query/key/value projections.
      num_queries: T, VQT's query tokens per layer (`queries` collection); 0: none.
      query_dropout: dropout on the query tokens during training (0.1 in the release).
      num_prompts: VPT's prompt length P (`prompts` collection); 0: none. The prompts sit
        after the class token, take no position embedding, and are excluded from 'gap' pooling.
      deep_prompts: VPT-deep (each layer replaces the prompts with its own) instead of
        VPT-shallow (one set, inserted before the first layer).
      prompt_dropout: dropout on the prompts during training (0.1 in VPT's VTAB runs).
      adapter_dim: AdaptFormer's bottleneck (`adapter` collection); 0: no adapters.
      adapter_scale: AdaptFormer's output scale.
      adapter_dropout: dropout in the adapter's bottleneck during training (0.1, AdaptFormer).
      lora_rank: rank of LoRA's updates of W_q and W_v (`lora` collection); 0: none.
      lora_alpha: LoRA's scale numerator (scale alpha / rank); default: the rank.
      head2toe: the head reads Head2Toe's features (each block's class token and mean patch
        token, 2 groups per layer) instead of the final CLS (+ VQT's query outputs).
      l2_normalize: L2-normalise each feature group before the head; default: on for VQT's
        and Head2Toe's head inputs, off for a plain CLS (linear probing).
      head_init: the head kernel's initialisation: 'zeros' (big_vision) or
        'kaiming_fan_out' (the VQT/VPT releases: torch's `kaiming_normal_(mode='fan_out')`, an
        untruncated normal of variance 2 / num_classes).
      head_bias_init: constant initial head bias (the release uses -log(99) as a prior).
      kv_dtype: dtype in which the query path's backward keeps each layer's keys and values,
        e.g. jnp.bfloat16 to halve VQT's stash; the forward is unchanged (exact). None keeps
        them in the compute dtype.
      dtype: the compute dtype, a name ('float32', 'bfloat16') or a dtype: the backbone's
        and the query path's activations, matmul operands and attention inputs are in it;
        parameters stay float32 (each layer casts them), LayerNorm statistics and attention
        logits/softmax are float32. The head runs in float32 on a float32 input (see
        `head_input`), so logits are float32 whatever the compute dtype. Outputs per token
        (`tokens`, `blocks`, `k`, `v`) are in the compute dtype, per image (`cls`, `queries`,
        `pooled`, `pre_logits`, `logits`) in float32.
      scan_blocks: run the blocks under `jax.lax.scan` (one compiled block instead of
        `depth`; see `Encoder`); the `params` tree stays per block, the results the same.
      remat: rematerialise each block's ordinary-token computation in the backward (memory
        for backbone-training methods on ViT-L/H; see `Encoder1DBlock`); results the same.
        Pair it with `scan_blocks`: in the unrolled loop XLA is free to schedule the
        recomputation early, and on CPU it does (remat alone then saves no temporaries;
        experiments/memory.py measures them).
    """

    num_classes: int | None = None
    patch_size: Sequence[int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None
    num_heads: int = 12
    pool_type: str = "tok"
    class_token: bool | None = None
    num_registers: int = 0
    fc_norm: bool = False
    layerscale: bool = False
    mlp_act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    pre_norm: bool = False
    qkv_bias: bool = True
    num_queries: int = 0
    query_dropout: float = 0.1
    num_prompts: int = 0
    deep_prompts: bool = False
    prompt_dropout: float = 0.1
    adapter_dim: int = 0
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    lora_rank: int = 0
    lora_alpha: float | None = None
    head2toe: bool = False
    l2_normalize: bool | None = None
    head_init: str = "zeros"
    head_bias_init: float = 0.0
    kv_dtype: Dtype | None = None
    dtype: Dtype = jnp.float32
    scan_blocks: bool = False
    remat: bool = False

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a numpy dtype (it may be given by name).

        Raises:
          ValueError: if it names no dtype or not a floating-point one.
        """
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"dtype={self.dtype!r} is not a dtype; e.g. 'float32' or "
                             f"'bfloat16'") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"dtype={self.dtype!r}: the compute dtype must be floating-point")
        return dtype

    @property
    def has_class_token(self) -> bool:
        return self.pool_type == "tok" if self.class_token is None else self.class_token

    @property
    def feature_dim(self) -> int:
        """Size of the head's input."""
        if self.head2toe:
            return self.width * self.depth * (1 + int(self.has_class_token))
        return self.width * (1 + self.depth * self.num_queries)

    def check_image_size(self, height: int, width: int) -> None:
        """Raises ValueError if an image size is not a positive multiple of the patch size."""
        ph, pw = self.patch_size
        if height <= 0 or width <= 0 or height % ph or width % pw:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of the patch size {ph}x{pw}"
            )

    def _validate(self) -> None:
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {', '.join(POOL_TYPES)}, got "
                             f"{self.pool_type!r}")
        if self.pool_type == "tok" and not self.has_class_token:
            raise ValueError("pool_type 'tok' needs a class token")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"Unknown head_init {self.head_init!r}; choose from "
                             f"{', '.join(HEAD_INITS)}")
        if self.mlp_act not in ACTIVATIONS:
            raise ValueError(f"Unknown mlp_act {self.mlp_act!r}; choose from {sorted(ACTIVATIONS)}")
        _ = self.compute_dtype  # raises on a bad dtype, before any layer uses it
        if self.pool_type == "map" and self.fc_norm:
            raise ValueError("pool_type 'map' pools the normed tokens; fc_norm is for 'gap'")
        for name in ("num_queries", "num_prompts", "adapter_dim", "lora_rank", "num_registers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.head2toe and self.num_queries:
            raise ValueError("head2toe and num_queries > 0 are two different head inputs; "
                             "choose one")

    def _tokens(self, collection: str, shape: Sequence[int], rate: float, batch: int,
                train: bool) -> Array:
        """Learnable tokens [L, K, D] with VPT's uniform init, broadcast to [B, L, K, D]."""
        bound = query_init_scale(self.patch_size, self.width)
        tokens = self.variable(
            collection, "tokens",
            lambda: jax.random.uniform(self.make_rng("params"), tuple(shape), jnp.float32,
                                       -bound, bound),
        ).value
        t = jnp.broadcast_to(tokens.astype(self.compute_dtype)[None], (batch, *tokens.shape))
        return nn.Dropout(rate, name=f"{collection}_dropout")(t, deterministic=not train)

    @nn.compact
    def _forward(self, images: Array | None, train: bool, *, cached: dict | None = None,
                 keep_blocks: bool = False, keep_kv: bool = False,
                 keep_pooled: bool = False) -> dict[str, Array]:
        self._validate()
        d = self.width
        options = {**_block_options(self), "mlp_dim": self.mlp_dim or 4 * d,
                   "dtype": self.compute_dtype}
        encoder = Encoder(depth=self.depth, scan_blocks=self.scan_blocks, **options,
                          name="Transformer")
        b = (images if cached is None else cached["cls"]).shape[0]
        q = None
        if self.num_queries:
            q = self._tokens("queries", (self.depth, self.num_queries, d), self.query_dropout,
                             b, train)
        if cached is not None:
            out = self._from_cache(encoder, cached, q)
        else:
            out = self._from_images(encoder, images, q, train, keep_blocks, keep_kv,
                                    keep_pooled or self.head2toe)
        if self.num_classes:
            # float32 whatever the compute dtype: pre_logits are float32 (`head_input`), and
            # the head is one small matmul, so its logits (and the loss) cost nothing to keep
            # exact.
            out["logits"] = nn.Dense(
                self.num_classes,
                dtype=jnp.float32,
                kernel_init=HEAD_INITS[self.head_init],
                bias_init=nn.initializers.constant(self.head_bias_init),
                name="head",
            )(out["pre_logits"])
        return out

    def _from_cache(self, encoder: Encoder, cached: dict, q: Array | None) -> dict[str, Array]:
        if "pre_logits" in cached:
            return {"pre_logits": cached["pre_logits"]}
        if "queries" in cached:  # the query path ran elsewhere (several query sets as one)
            return {"queries": cached["queries"],
                    "pre_logits": self.head_input(cached["cls"], cached["queries"])}
        if q is None:
            raise ValueError("A key/value cache is only useful with query tokens "
                             "(num_queries > 0)")
        q_out = encoder.queries_from_kv(q, cached["k"], cached["v"])
        return {"queries": q_out.astype(jnp.float32),
                "pre_logits": self.head_input(cached["cls"], q_out)}

    def _from_images(self, encoder: Encoder, images: Array, q: Array | None, train: bool,
                     keep_blocks: bool, keep_kv: bool, keep_pooled: bool) -> dict[str, Array]:
        b, h, w, _ = images.shape
        self.check_image_size(h, w)
        d = self.width
        dtype = self.compute_dtype
        x = nn.Conv(
            d, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
            dtype=dtype, name="embedding",
        )(images.astype(dtype))
        x = x.reshape(b, -1, d)
        # big_vision's layout: the position embedding covers the patches only and is added
        # before the class token is prepended (a checkpoint's cls position entry is folded into
        # `cls` at load time, which is equivalent).
        pos = self.param(
            "pos_embedding", nn.initializers.normal(stddev=1.0 / np.sqrt(d)), (1, x.shape[1], d)
        )
        x = x + pos.astype(x.dtype)
        prefix = []
        if self.has_class_token:
            prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, d)))
        if self.num_registers:
            prefix.append(self.param("registers", nn.initializers.normal(stddev=1e-6),
                                     (1, self.num_registers, d)))
        if prefix:
            x = jnp.concatenate([jnp.tile(t.astype(x.dtype), (b, 1, 1)) for t in prefix] + [x],
                                axis=1)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.ln_eps, dtype=dtype, name="norm_pre")(x)

        num_prefix = int(self.has_class_token) + self.num_registers
        prompts = None
        if self.num_prompts:
            layers = self.depth if self.deep_prompts else 1
            prompts = self._tokens("prompts", (layers, self.num_prompts, d),
                                   self.prompt_dropout, b, train)
            x = jnp.concatenate([x[:, :num_prefix], prompts[:, 0], x[:, num_prefix:]], axis=1)
        prompt_start = num_prefix
        num_prefix += self.num_prompts

        def pool(t: Array) -> Array:
            if self.pool_type == "tok":
                return t[:, 0]
            if self.pool_type == "map":
                without_prompts = jnp.concatenate([t[:, :prompt_start], t[:, num_prefix:]], 1)
                return MAPHead(self.num_heads, self.mlp_dim or 4 * d, self.mlp_act,
                               self.ln_eps, dtype, name="MAPHead_0")(without_prompts)
            return t[:, num_prefix:].mean(axis=1)

        def collect(x_i: Array, kv: KV) -> dict[str, Array]:
            # Pure (it may run inside the encoder's scan): what to keep of one block.
            kept = {}
            if keep_blocks:
                kept["blocks"] = x_i
            if keep_pooled:
                groups = [x_i[:, 0]] if self.has_class_token else []
                groups.append(x_i[:, num_prefix:].astype(jnp.float32).mean(axis=1))
                kept["pooled"] = jnp.stack(groups, axis=1).astype(jnp.float32)
            if keep_kv:
                kept["k"], kept["v"] = kv
            return kept

        keep = keep_blocks or keep_pooled or keep_kv
        x, q_out, out = encoder(x, q, prompts=prompts if self.deep_prompts else None,
                                prompt_start=prompt_start, collect=collect if keep else None,
                                train=train)
        if "pooled" in out:  # [B, M, G, D] -> [B, M * G, D]: layer-major groups
            out["pooled"] = out["pooled"].reshape(b, -1, d)
        if self.fc_norm:
            # timm's MAE layout: no norm on the tokens, the norm acts on the pooled feature.
            tokens_out, cls_out = x, encoder.norm(pool(x))
        else:
            tokens_out = encoder.norm(x)
            cls_out = pool(tokens_out)
        out.update(cls=cls_out.astype(jnp.float32), tokens=tokens_out)
        if q_out is not None:
            out["queries"] = q_out.astype(jnp.float32)
        out["pre_logits"] = self.head_input(cls_out, q_out, out.get("pooled"))
        return out

    def head_input(self, cls: Array, queries: Array | None, pooled: Array | None = None) -> Array:
        """The head's input: [CLS ; layer 1..M query outputs] or Head2Toe's groups.

        Args:
          cls: the final pooled feature [B, D].
          queries: VQT's query outputs [B, M, T, D], or None.
          pooled: Head2Toe's per-layer pooled tokens [B, G, D] (used when `head2toe`).

        Returns:
          [B, feature_dim] float32 features, L2-normalised per group when `l2_normalize`
          resolves on (each layer's T*D query vector is one group, each Head2Toe pooled token
          one group). float32 whatever the compute dtype: the norms, the head and the
          feature caches read them, and they are small.
        """
        normalize = self.l2_normalize
        if normalize is None:
            normalize = self.num_queries > 0 or self.head2toe
        if self.head2toe:
            groups = [pooled]
        else:
            groups = [cls[:, None, :]]
            if queries is not None:
                b, m, t, d = queries.shape
                groups.append(queries.reshape(b, m, t * d))
        groups = [g.astype(jnp.float32) for g in groups]
        if normalize:
            groups = [l2_normalize(g) for g in groups]
        return jnp.concatenate([g.reshape(g.shape[0], -1) for g in groups], axis=-1)

    def features(self, images: Array, train: bool = False, *,
                 keep_blocks: bool = True) -> dict[str, Array]:
        """Everything the model computes, for analysis.

        Returns:
          A dict with `cls` [B, D] (the final pooled feature), `tokens` [B, N, D] (the final
          tokens, prompts included; after the final norm unless fc_norm), `blocks`
          [B, M, N, D] (every block's ordinary-token output), `queries` [B, M, T, D] (VQT's
          query outputs, if T > 0), `pooled` [B, G, D] (Head2Toe's pooled tokens: each
          block's class token and mean patch token), `pre_logits` [B, F] (the head's input)
          and `logits` (if there is a head). `keep_blocks=False` leaves out `blocks`.
        """
        return self._forward(images, train, keep_blocks=keep_blocks, keep_pooled=True)

    def cache_features(self, images: Array) -> dict[str, Array]:
        """What a cache keeps per image: everything the trainable part reads.

        Returns:
          `k`, `v` [B, M, H, N, Dh] (every layer's keys and values of the ordinary tokens,
          heads major: the layout `from_cache` reads fastest),
          `cls` [B, D], `pooled` [B, G, D] (see `features`) and `pre_logits` [B, F] (the
          head's input; constant only when there are no query tokens), in eval mode.
        """
        out = self._forward(images, False, keep_kv=True, keep_pooled=True)
        out["k"], out["v"] = (jnp.swapaxes(out[n], 2, 3) for n in ("k", "v"))
        return {k: out[k] for k in ("k", "v", "cls", "pooled", "pre_logits")}

    def from_cache(self, cached: dict[str, Array], train: bool = False) -> Array:
        """Logits from cached features, without the backbone.

        Args:
          cached: {'k', 'v', 'cls'} (see `cache_features`; k/v may be narrower, e.g.
            bfloat16) to run VQT's query path over the cached keys and values, or
            {'pre_logits'} for a head on fixed features.
          train: training mode (query dropout).

        Returns:
          Logits (or the head's input without a head), equal to `__call__` on the same images.
        """
        out = self._forward(None, train, cached=cached)
        return out["logits"] if self.num_classes else out["pre_logits"]

    def features_from_cache(self, cached: dict[str, Array]) -> dict[str, Array]:
        """`pre_logits` (and `queries` for a key/value cache) from cached features, eval mode.

        `cached` may also be {'cls', 'queries'}: the final feature and the query outputs
        [B, M, T, D], computed elsewhere (e.g. by one model whose query tokens are several
        query sets' together); the head then reads them.
        """
        return self._forward(None, False, cached=cached)

    def __call__(self, images: Array, train: bool = False) -> Array:
        """Returns logits [B, num_classes] (or the head's input if there is no head)."""
        out = self._forward(images, train)
        return out["logits"] if self.num_classes else out["pre_logits"]


def create_model(variant: str | None = None, **kwargs: Any) -> ViT:
    """Builds a ViT from a variant name ('B/16') with keyword overrides."""
    cfg = decode_variant(variant) if variant else {}
    cfg.update(kwargs)
    if "patch_size" in cfg:
        cfg["patch_size"] = tuple(cfg["patch_size"])
    return ViT(**cfg)
