"""Vision Transformer with Visual Query Tuning (VQT), in flax.linen.

The `params` tree is big_vision's ViT (non-scanned), name for name and shape for shape, so
big_vision and original ViT checkpoints map onto it directly. VQT adds the `queries`
collection: T learnable tokens per layer (`queries/tokens`: [M, T, D]).

Each layer runs its frozen block on the ordinary tokens as a plain ViT does; the layer's query
tokens then take a small path through the same weights (LN1 -> W_q -> attention over the
ordinary tokens' keys/values -> W_o -> residual -> LN2 -> MLP -> residual). The ordinary tokens
never see the queries, so the backbone's features are unchanged, and when only `queries` and
`head` are differentiated, JAX never linearises the ordinary stream: the backward runs through
the query paths alone and keeps each layer's keys and values. No `stop_gradient` is used, so
methods that also train the backbone get correct gradients.

`ViT` has one path per use: the backbone over images (`__call__`, `features`,
`cache_features`), the query path over given keys/values (`queries_from_kv`, `from_cache`)
and the head (`head_input`). Its compute options (`dtype`, `attention`, `scan_blocks`,
`remat`) change how it computes, not its variables nor, in float32, its results.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
KV = tuple[Array, Array]
# What to keep of each block: (its ordinary tokens' output, its (k, v)) -> {name: array}.
Collect = Callable[[Array, KV], dict[str, Array]]

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


# MLP activations by name: big_vision uses the tanh approximation, timm/PyTorch the exact erf,
# OpenAI CLIP x * sigmoid(1.702 x).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# The ordinary tokens' self-attention (`ViT.attention`): jax.nn.dot_product_attention's 'xla'
# or 'cudnn' (cuDNN's fused flash attention), or 'heads_major' (einsums on [B, H, N, Dh]
# copies, which XLA:CPU runs faster); 'auto' picks one (`attention_implementation`).
ATTENTION = ("auto", "xla", "cudnn", "heads_major")


def decode_variant(variant: str) -> dict[str, Any]:
    """ViT keyword arguments (width, depth, mlp_dim, num_heads, patch_size if given) of a
    variant name `<size>/<patch>` or `<size>`, e.g. 'B/16'; ValueError if it is not one."""
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


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||_2, eps) over the last axis (the same as torch's F.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def _platform() -> tuple[str, tuple[int, int]]:
    """The backend the model is traced for, and its first device's CUDA compute capability
    ((0, 0) if it has none): the one place tests patch to choose them."""
    cc = re.fullmatch(r"(\d+)\.(\d+)", str(getattr(jax.devices()[0], "compute_capability", "")))
    return jax.default_backend(), (int(cc[1]), int(cc[2])) if cc else (0, 0)


def attention_implementation(option: str, dtype: Dtype, head_dim: int) -> str:
    """The self-attention that `ViT.attention=option` runs (see ATTENTION).

    'auto' is 'heads_major' on CPU, and 'cudnn' where cuDNN's flash attention applies: a CUDA
    GPU of compute capability 8.0 or newer (10.3 needs a cuDNN version 'auto' does not check),
    float16 or bfloat16, and a head dim that is a multiple of 8 and at most 128 (256 from
    9.0), as JAX's cuDNN attention checks; 'xla' everywhere else. An explicit 'cudnn' where
    cuDNN cannot run fails with JAX's error.
    """
    if option != "auto":
        return option
    backend, capability = _platform()
    if backend == "cpu":
        return "heads_major"
    head_dim_fits = head_dim % 8 == 0 and head_dim <= (256 if capability >= (9, 0) else 128)
    if (backend == "gpu" and capability >= (8, 0) and capability != (10, 3) and head_dim_fits
            and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)):
        return "cudnn"
    return "xla"


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
        dense = functools.partial(nn.Dense, dtype=self.dtype,
                                  kernel_init=nn.initializers.xavier_uniform(),
                                  bias_init=nn.initializers.normal(stddev=1e-6))
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
    """A low-rank update x -> (alpha / r) * (x A) B of a projection to `features` (e.g.
    (H, Dh)), B zero-initialised; alpha defaults to r. Its variables live in the `lora`
    collection, so checkpoints never see them and a trainable rule can name them as a whole."""

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
    """AdaptFormer's parallel adapter: scale * up(dropout(relu(down(x)))), up zero-initialised.

    As in AdaptFormer's VTAB setting (no adapter LayerNorm), it reads the block's residual
    stream before LN2 and its output is added beside the MLP branch. Variables live in the
    `adapter` collection; `bottleneck`, `scale` and `dropout` are AdaptFormer's (64, 0.1 and
    0.1 in its VTAB runs).
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
    """Multi-head attention with big_vision's parameter layout (query/key/value kernels
    [D, H, Dh], out [H, Dh, D]). Projections and attention are separate methods, so VQT's query
    tokens reuse the ordinary tokens' keys and values. `implementation` is the ordinary tokens'
    self-attention, resolved (see ATTENTION)."""

    width: int
    num_heads: int
    qkv_bias: bool = True
    lora_rank: int = 0
    lora_alpha: float | None = None
    dtype: Dtype = jnp.float32
    implementation: str = "xla"

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.width // self.num_heads
        proj = functools.partial(nn.DenseGeneral, dtype=self.dtype,
                                 kernel_init=nn.initializers.xavier_uniform())
        self.query, self.key, self.value = (
            proj((self.num_heads, head_dim), use_bias=self.qkv_bias) for _ in range(3))
        self.out = proj(self.width, axis=(-2, -1))
        if self.lora_rank:
            self.lora_query, self.lora_value = (
                LoRA(self.lora_rank, (self.num_heads, head_dim), self.lora_alpha) for _ in range(2))

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
        """Attention of q [B, Nq, H, Dh] over k, v [B, Nk, H, Dh] (or [B, H, Nk, Dh], a cache's
        layout, with `heads_major`) -> [B, Nq, D], float32 logits and softmax. With
        `stash_dtype` (e.g. bfloat16) the forward is exact but the backward keeps k and v in
        that dtype (VQT's per-layer key/value stash)."""
        o = (_sdpa(q, k, v, heads_major) if heads_major or stash_dtype is None
             else _sdpa_narrow_stash(q, k, v, jnp.dtype(stash_dtype)))
        return self.out(o.astype(self.dtype))

    def self_attend(self, q: Array, k: Array, v: Array) -> Array:
        """The ordinary tokens' self-attention by `implementation`, q, k, v [B, N, H, Dh] ->
        [B, N, D]; float32 logits and softmax whatever the dtype."""
        o = (_sdpa_heads_major(q, k, v) if self.implementation == "heads_major"
             else jax.nn.dot_product_attention(q, k, v, implementation=self.implementation))
        return self.out(o.astype(self.dtype))


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


def _sdpa_narrow_stash_bwd(_stash_dtype, saved, g):
    q, k, v = saved
    # Cotangents for k and v too, in q's dtype, in case the backbone is trained as well.
    _, vjp = jax.vjp(_sdpa, q, k.astype(q.dtype), v.astype(q.dtype))
    return vjp(g.astype(jnp.float32))


_sdpa_narrow_stash.defvjp(_sdpa_narrow_stash_fwd, _sdpa_narrow_stash_bwd)


class BlockOptions(nn.Module):
    """The options of a transformer block, shared by Encoder1DBlock and Encoder (`attention`
    resolved, see ATTENTION)."""

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
    attention: str = "xla"


class Encoder1DBlock(BlockOptions):
    """Pre-LN transformer block that also carries VQT's query tokens through its frozen weights.

    AdaptFormer's adapter (`adapter_dim`) and LoRA on W_q and W_v (`lora_rank`) act on the
    ordinary and the query tokens alike. With `remat`, the ordinary tokens' part (`ordinary`)
    is rematerialised; the small query path stays outside the checkpoint, so VQT's backward
    neither recomputes nor runs through the backbone. `in_scan` is set by `Encoder` on the
    block it scans: the scan already keeps XLA from merging the recomputation into the
    forward, so remat needs no CSE barriers there.
    """

    in_scan: bool = False

    def setup(self):
        ln = functools.partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype)
        self.LayerNorm_0 = ln()
        self.MultiHeadDotProductAttention_0 = Attention(
            width=self.width, num_heads=self.num_heads, qkv_bias=self.qkv_bias,
            lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, dtype=self.dtype,
            implementation=self.attention)
        self.LayerNorm_1 = ln()
        self.MlpBlock_0 = MlpBlock(mlp_dim=self.mlp_dim, act=self.mlp_act, dtype=self.dtype)
        if self.layerscale:
            self.LayerScale_0, self.LayerScale_1 = LayerScale(), LayerScale()
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
        """Ordinary tokens x [B, N, D] and query tokens q [B, T, D] (or None) -> their outputs,
        and the ordinary tokens' keys and values [B, N, H, Dh] (all the query path reads)."""
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
        y = self.LayerNorm_0(x)
        qx = attn.project_query(y)  # before k, v: the backward sums their cotangents in order
        k, v = attn.key_value(y)
        x_out = self._mlp_residual(x + self._scale(0, attn.self_attend(qx, k, v)), train)
        return x_out, (k, v)

    def query_path(self, q: Array, k: Array, v: Array, stash_dtype: Dtype | None = None,
                   heads_major: bool = False, train: bool = False) -> Array:
        """VQT's query tokens q [B, T, D] through the block, attending only to k and v
        ([B, N, H, Dh], or [B, H, N, Dh] with `heads_major`); `stash_dtype` as in `attend`.
        With `intermediates` mutable, the attention probabilities [B, H, T, N] are sown as
        `query_attention`."""
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


def _swap_layers(a: Array | None) -> Array | None:
    """[B, M, ...] <-> [M, B, ...]: per-layer inputs as `jax.lax.scan` slices them, and a
    scan's stacked outputs back in the model's layout."""
    return None if a is None else jnp.swapaxes(a, 0, 1)


class Encoder(BlockOptions):
    """The stack of blocks plus the final LayerNorm (`Transformer/...` in big_vision).

    The parameters are always per block (`encoderblock_{i}`), so checkpoints, trainable rules
    and optimiser states see one tree. With `scan_blocks`, `apply` stacks the blocks' variables
    along a new leading axis and runs one block's program under `jax.lax.scan` (compiled once
    instead of `depth` times); `init`, and forwards that sow `intermediates`, run the loop.
    """

    depth: int = 12
    scan_blocks: bool = False

    def setup(self):
        self.blocks = [
            Encoder1DBlock(**_block_options(self), name=f"encoderblock_{i}")
            for i in range(self.depth)
        ]
        self.encoder_norm = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)

    def __call__(self, x: Array, queries: Array | None = None, *, prompts: Array | None = None,
                 prompt_start: int = 1, collect: Collect | None = None,
                 train: bool = False) -> tuple[Array, Array | None, dict[str, Array]]:
        """Runs every block on ordinary tokens x [B, N, D] (VPT prompts already inserted) and
        query tokens [B, M, T, D] (or None). VPT-deep `prompts` [B, M, P, D]: layer m > 0
        replaces the P tokens at `prompt_start` with its own. `collect`, a pure function of a
        block's (ordinary output, (k, v)), names per-layer arrays [B, ...] to keep.

        Returns: (the last block's ordinary tokens [B, N, D] before the final norm, query
        outputs [B, M, T, D] or None, `collect`'s arrays stacked per layer, each [B, M, ...]).
        """
        if self._scanning():
            return self._scan(x, queries, prompts, prompt_start, collect, train)
        outs = []  # per block: (query outputs or None, what `collect` keeps)
        for i, block in enumerate(self.blocks):
            if prompts is not None and i > 0:
                x = _replace_prompts(x, prompts[:, i], prompt_start)
            x, q, kv = block(x, None if queries is None else queries[:, i], train)
            outs.append((q, {} if collect is None else collect(x, kv)))
        q_out, kept = jax.tree.map(lambda *layers: jnp.stack(layers, axis=1), *outs)
        return x, q_out, kept

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
        names = [f"encoderblock_{i}" for i in range(self.depth)]
        per_block = [{c: tree[n] for c, tree in self.variables.items() if n in tree} for n in names]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_block)

    def _scan(self, x: Array, queries: Array | None, prompts: Array | None, prompt_start: int,
              collect: Collect | None, train: bool) -> tuple[Array, Array | None, dict[str, Array]]:
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

        xs = (self._stacked_blocks(), _swap_layers(queries), _swap_layers(prompts), rngs)
        x, (q_out, kept) = jax.lax.scan(body, x, xs)
        return x, _swap_layers(q_out), jax.tree.map(_swap_layers, kept)

    def queries_from_kv(self, queries: Array, k: Array, v: Array) -> Array:
        """The query path alone: query tokens [B, M, T, D] over every layer's keys and values
        k, v [B, M, H, N, Dh] (heads major, the cache's layout; not differentiated) -> query
        outputs [B, M, T, D], the same as the backbone pass gives for the same images."""
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
            return carry, block.apply(variables, q, k_i, v_i, heads_major=True, method="query_path")

        xs = (self._stacked_blocks(), _swap_layers(queries), jnp.arange(self.depth))
        _, outs = jax.lax.scan(body, None, xs)
        return _swap_layers(outs)


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
        `MAPHead`, SigLIP's; VPT's prompts are left out, as from 'gap').
      class_token: whether there is a class token; default: only for pool_type 'tok'.
      num_registers: register tokens (DINOv2 with registers, `registers` [1, R, D]): after the
        class token, without position embedding; they take part in attention (VQT's queries
        read their keys and values too) and are left out of patch pooling.
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
      adapter_dim, adapter_scale, adapter_dropout: AdaptFormer's adapters (`adapter`
        collection; see `Adapter`); adapter_dim 0: none.
      lora_rank, lora_alpha: LoRA's updates of W_q and W_v (`lora` collection; see `LoRA`);
        rank 0: none.
      head2toe: the head reads Head2Toe's features (each block's class token and mean patch
        token) instead of the final CLS (+ VQT's query outputs).
      l2_normalize: L2-normalise each feature group before the head; default: on for VQT's
        and Head2Toe's head inputs, off for a plain CLS (linear probing).
      head_init: the head kernel's initialisation (HEAD_INITS): 'zeros' (big_vision) or
        'kaiming_fan_out' (the VQT/VPT releases).
      head_bias_init: constant initial head bias (the release uses -log(99) as a prior).
      kv_dtype: dtype in which the query path's backward keeps each layer's keys and values
        (e.g. bfloat16); the forward stays exact. None: the compute dtype.
      dtype: the compute dtype, a name ('bfloat16') or a dtype, of activations, matmul operands
        and attention inputs; parameters, LayerNorm statistics, attention logits/softmax, the
        head and per-image outputs (`cls`, `queries`, `pooled`, `pre_logits`, `logits`) stay
        float32; per-token outputs (`tokens`, `blocks`, `k`, `v`) are in the compute dtype.
      attention: the ordinary tokens' self-attention, one of ATTENTION (default 'auto', see
        `attention_implementation`).
      scan_blocks: run the blocks under `jax.lax.scan` (see `Encoder`).
      remat: rematerialise each block's ordinary-token computation in the backward (see
        `Encoder1DBlock`); pair it with `scan_blocks`, since in the unrolled loop XLA may
        schedule the recomputation early.
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
    attention: str = "auto"
    scan_blocks: bool = False
    remat: bool = False

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a numpy dtype; ValueError if it names no floating-point dtype."""
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
            raise ValueError(f"Image size {height}x{width} is not a multiple of the patch "
                             f"size {ph}x{pw}")

    def _validate(self) -> None:
        for name, choices in (("pool_type", POOL_TYPES), ("head_init", HEAD_INITS),
                              ("mlp_act", ACTIVATIONS), ("attention", ATTENTION)):
            if getattr(self, name) not in choices:
                raise ValueError(f"Unknown {name} {getattr(self, name)!r}; choose from "
                                 f"{', '.join(choices)}")
        if self.pool_type == "tok" and not self.has_class_token:
            raise ValueError("pool_type 'tok' needs a class token")
        _ = self.compute_dtype  # raises on a bad dtype, before any layer uses it
        if self.pool_type == "map" and self.fc_norm:
            raise ValueError("pool_type 'map' pools the normed tokens; fc_norm is for 'gap'")
        for name in ("num_queries", "num_prompts", "adapter_dim", "lora_rank", "num_registers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.head2toe and self.num_queries:
            raise ValueError("head2toe and num_queries > 0 are two different head inputs; "
                             "choose one")

    # Public methods: each runs one path through `_scope`.

    def __call__(self, images: Array, train: bool = False) -> Array:
        """Returns logits [B, num_classes] (or the head's input if there is no head)."""
        return self._scope(lambda: self._prediction(self._backbone(images, train)))

    def features(self, images: Array, train: bool = False) -> dict[str, Array]:
        """Everything the model computes, for analysis: `cls` [B, D] (the final pooled
        feature), `tokens` [B, N, D] (the final tokens, prompts included; after the final norm
        unless fc_norm), `blocks` [B, M, N, D] (every block's ordinary-token output), `queries`
        [B, M, T, D] (if T > 0), `pooled` [B, G, D] (Head2Toe's: each block's class token and
        mean patch token), `pre_logits` [B, F] and `logits` (if there is a head)."""
        return self._scope(lambda: self._head(self._backbone(images, train, ("blocks", "pooled"))))

    def features_without_blocks(self, images: Array, train: bool = False) -> dict[str, Array]:
        """`features` without `blocks`."""
        return self._scope(lambda: self._head(self._backbone(images, train, ("pooled",))))

    def cache_features(self, images: Array) -> dict[str, Array]:
        """What a cache keeps per image, in eval mode: `k`, `v` [B, M, H, N, Dh] (every layer's
        keys and values, heads major: the layout `from_cache` reads fastest), `cls`, `pooled`
        and `pre_logits` (see `features`; constant only without query tokens)."""
        out = self._scope(lambda: self._backbone(images, False, ("kv", "pooled")))
        return {"k": jnp.swapaxes(out["k"], 2, 3), "v": jnp.swapaxes(out["v"], 2, 3),
                **{n: out[n] for n in ("cls", "pooled", "pre_logits")}}

    def from_cache(self, cached: dict[str, Array], train: bool = False) -> Array:
        """Logits (or the head's input without a head) from cached features, equal to
        `__call__` on the same images: {'k', 'v', 'cls'} (see `cache_features`; k/v may be
        narrower) runs VQT's query path over the cached keys and values, {'pre_logits'} only
        the head. `train`: query dropout."""
        return self._scope(lambda: self._prediction(self._from_cached(cached, train)))

    def features_from_cache(self, cached: dict[str, Array]) -> dict[str, Array]:
        """`pre_logits` (and `queries`, `logits` where there are) from cached features, eval
        mode. `cached` may also be {'cls', 'queries'}: query outputs [B, M, T, D] computed
        elsewhere (e.g. by one model holding several query sets), which the head then reads."""
        return self._scope(lambda: self._head(self._from_cached(cached, False)))

    def queries_from_kv(self, k: Array, v: Array, train: bool = False) -> Array:
        """VQT's query outputs [B, M, T, D] (float32) over every layer's keys and values
        k, v [B, M, H, N, Dh] (`cache_features`' layout)."""
        return self._scope(lambda: self._queries_from_kv(k, v, train).astype(jnp.float32))

    def head_input(self, cls: Array, queries: Array | None, pooled: Array | None = None) -> Array:
        """The head's input [B, feature_dim], float32: [CLS [B, D] ; layer 1..M query outputs
        [B, M, T, D]], or Head2Toe's pooled groups [B, G, D] with `head2toe`; L2-normalised per
        group (one CLS, each layer's T*D query vector, each pooled token) when `l2_normalize`
        resolves on."""
        normalize = self.l2_normalize
        normalize = self.num_queries > 0 or self.head2toe if normalize is None else normalize
        groups = [pooled] if self.head2toe else [cls[:, None, :]]
        if queries is not None and not self.head2toe:  # [B, M, T * D]: one group per layer
            groups.append(queries.reshape(*queries.shape[:2], -1))
        groups = [g.astype(jnp.float32) for g in groups]
        if normalize:
            groups = [l2_normalize(g) for g in groups]
        return jnp.concatenate([g.reshape(g.shape[0], -1) for g in groups], axis=-1)

    # The paths. flax lets one method per module declare layers and variables (`_scope`); the
    # paths run inside it, each declaring what it uses.

    @nn.compact
    def _scope(self, path: Callable[[], Any]) -> Any:
        self._validate()
        return path()

    def _backbone(self, images: Array, train: bool,
                  per_layer: Sequence[str] = ()) -> dict[str, Array]:
        """The backbone pass over images [B, H, W, C], VQT's query path beside it.

        Returns `cls`, `tokens`, `queries` (if T > 0) and `pre_logits` (see `features`), and
        what `per_layer` names of each block: 'blocks', 'pooled' (kept for Head2Toe's head
        anyway), 'kv' (`k`, `v` [B, M, N, H, Dh]).
        """
        b, h, w, _ = images.shape
        self.check_image_size(h, w)
        queries = self._query_tokens(b, train)  # first: the init draws its variables in order
        x, prompts, prompt_start = self._embed(images, train)
        num_prefix = prompt_start + self.num_prompts
        per_layer = set(per_layer) | ({"pooled"} if self.head2toe else set())

        def collect(x_i: Array, kv: KV) -> dict[str, Array]:
            # Pure (it may run inside the encoder's scan): what to keep of one block.
            kept = {}
            if "blocks" in per_layer:
                kept["blocks"] = x_i
            if "pooled" in per_layer:
                groups = [x_i[:, 0]] if self.has_class_token else []
                groups.append(x_i[:, num_prefix:].astype(jnp.float32).mean(axis=1))
                kept["pooled"] = jnp.stack(groups, axis=1).astype(jnp.float32)
            if "kv" in per_layer:
                kept["k"], kept["v"] = kv
            return kept

        encoder = self._encoder()
        x, q_out, out = encoder(x, queries, prompts=prompts if self.deep_prompts else None,
                                prompt_start=prompt_start, collect=collect if per_layer else None,
                                train=train)
        if "pooled" in out:  # [B, M, G, D] -> [B, M * G, D]: layer-major groups
            out["pooled"] = out["pooled"].reshape(b, -1, self.width)
        if self.fc_norm:  # timm's MAE layout: the norm acts on the pooled feature only
            tokens, cls = x, encoder.encoder_norm(self._pool(x, prompt_start, num_prefix))
        else:
            tokens = encoder.encoder_norm(x)
            cls = self._pool(tokens, prompt_start, num_prefix)
        out.update(cls=cls.astype(jnp.float32), tokens=tokens)
        if q_out is not None:
            out["queries"] = q_out.astype(jnp.float32)
        out["pre_logits"] = self.head_input(cls, q_out, out.get("pooled"))
        return out

    def _embed(self, images: Array, train: bool) -> tuple[Array, Array | None, int]:
        """Patch and position embeddings, class and register tokens, `norm_pre` and VPT's
        prompts: (tokens [B, N, D], prompts [B, L, P, D] or None, the first prompt's index)."""
        b, d, dtype = images.shape[0], self.width, self.compute_dtype
        x = nn.Conv(d, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
                    dtype=dtype, name="embedding")(images.astype(dtype))
        x = x.reshape(b, -1, d)
        # big_vision's layout: the position embedding covers the patches only (a checkpoint's
        # cls position entry is folded into `cls` at load time, which is equivalent).
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=1.0 / np.sqrt(d)),
                         (1, x.shape[1], d))
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
        start = int(self.has_class_token) + self.num_registers
        if not self.num_prompts:
            return x, None, start
        layers = self.depth if self.deep_prompts else 1
        prompts = self._tokens("prompts", (layers, self.num_prompts, d), self.prompt_dropout,
                               b, train)
        return jnp.concatenate([x[:, :start], prompts[:, 0], x[:, start:]], axis=1), prompts, start

    def _pool(self, tokens: Array, prompt_start: int, num_prefix: int) -> Array:
        """The final feature [B, D] of the final tokens, by `pool_type`."""
        if self.pool_type == "tok":
            return tokens[:, 0]
        if self.pool_type == "map":
            without_prompts = jnp.concatenate([tokens[:, :prompt_start], tokens[:, num_prefix:]],
                                              axis=1)
            return MAPHead(self.num_heads, self.mlp_dim or 4 * self.width, self.mlp_act,
                           self.ln_eps, self.compute_dtype, name="MAPHead_0")(without_prompts)
        return tokens[:, num_prefix:].mean(axis=1)

    def _from_cached(self, cached: dict[str, Array], train: bool) -> dict[str, Array]:
        """`pre_logits` (and `queries`) from a cache: see `from_cache`, `features_from_cache`."""
        if "pre_logits" in cached:
            return {"pre_logits": cached["pre_logits"]}
        q_out = cached.get("queries")  # the query path ran elsewhere
        if q_out is None:
            q_out = self._queries_from_kv(cached["k"], cached["v"], train).astype(jnp.float32)
        return {"queries": q_out, "pre_logits": self.head_input(cached["cls"], q_out)}

    def _queries_from_kv(self, k: Array, v: Array, train: bool) -> Array:
        if not self.num_queries:
            raise ValueError("A key/value cache is only useful with query tokens "
                             "(num_queries > 0)")
        queries = self._query_tokens(k.shape[0], train)
        return self._encoder().queries_from_kv(queries, k, v)

    def _head(self, out: dict[str, Array]) -> dict[str, Array]:
        """`out` with `logits` [B, num_classes] of its `pre_logits`, if there is a head. The head
        is float32 whatever the compute dtype: one small matmul on a float32 input."""
        if self.num_classes:
            out["logits"] = nn.Dense(
                self.num_classes, dtype=jnp.float32, kernel_init=HEAD_INITS[self.head_init],
                bias_init=nn.initializers.constant(self.head_bias_init), name="head",
            )(out["pre_logits"])
        return out

    def _prediction(self, out: dict[str, Array]) -> Array:
        return self._head(out)["logits"] if self.num_classes else out["pre_logits"]

    def _encoder(self) -> Encoder:
        d, dtype = self.width, self.compute_dtype
        attention = attention_implementation(self.attention, dtype, d // self.num_heads)
        return Encoder(depth=self.depth, scan_blocks=self.scan_blocks, name="Transformer",
                       **{**_block_options(self), "mlp_dim": self.mlp_dim or 4 * d,
                          "dtype": dtype, "attention": attention})

    def _query_tokens(self, batch: int, train: bool) -> Array | None:
        """VQT's query tokens [B, M, T, D] (None without them)."""
        if not self.num_queries:
            return None
        return self._tokens("queries", (self.depth, self.num_queries, self.width),
                            self.query_dropout, batch, train)

    def _tokens(self, collection: str, shape: Sequence[int], rate: float, batch: int,
                train: bool) -> Array:
        """Learnable tokens [L, K, D] with VPT's uniform init, broadcast to [B, L, K, D]."""
        # VPT's prompt initialisation bound, which VQT reuses: sqrt(6 / (3 * ph * pw + D)).
        bound = float(np.sqrt(6.0 / (3 * self.patch_size[0] * self.patch_size[1] + self.width)))
        tokens = self.variable(collection, "tokens", lambda: jax.random.uniform(
            self.make_rng("params"), tuple(shape), jnp.float32, -bound, bound)).value
        t = jnp.broadcast_to(tokens.astype(self.compute_dtype)[None], (batch, *tokens.shape))
        return nn.Dropout(rate, name=f"{collection}_dropout")(t, deterministic=not train)


def create_model(variant: str | None = None, **kwargs: Any) -> ViT:
    """Builds a ViT from a variant name ('B/16') with keyword overrides."""
    cfg = decode_variant(variant) if variant else {}
    cfg.update(kwargs)
    if "patch_size" in cfg:
        cfg["patch_size"] = tuple(cfg["patch_size"])
    return ViT(**cfg)
