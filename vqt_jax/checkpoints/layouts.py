"""Parameter layouts of the ViT checkpoints users bring, mapped onto big_vision's tree.

Every layout converts a file's flat contents into one canonical flat dict whose keys are this
project's `params` paths joined by '/' (big_vision's names, non-scanned), plus one extra key,
`cls_pos`: the class token's own position embedding, which big_vision does not have (it adds
position embeddings to the patches only) and which the loader folds into `cls`.

Layouts are looked up by name in `LAYOUTS`; `detect` finds the one a file is in.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from vqt_jax.checkpoints.files import CheckpointError

Flat = dict[str, np.ndarray]


class Layout(NamedTuple):
    """One checkpoint layout.

    Attributes:
      marker: a key, below the prefix, that files in this layout hold.
      prefixes: (sub-tree name such as 'img', or None) -> the key prefixes to look under.
      convert: (flat contents, prefix, num_heads) -> the canonical dict.
      resample_rule: (flat contents, prefix) -> how the family's authors resample the position
        embedding to another grid (a name in `resample.RULES`).
      options: {key below the prefix: shape} -> the model options the file determines (width,
        depth, patch, layerscale, num_registers, pool_type; mlp_act, or None where the file does
        not tell it), read from the key names and shapes alone (`introspect`).
    """

    marker: str
    prefixes: Callable[[str | None], list[str]]
    convert: Callable[[Mapping[str, Any], str, int], Flat]
    resample_rule: Callable[[Mapping[str, Any], str], str]
    options: Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any]]


def is_square(n: int) -> bool:
    """Whether `n` is a positive perfect square."""
    return n > 0 and math.isqrt(n) ** 2 == n


def depth(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest block index that `pattern` (a regex whose group 1 is it) finds in keys."""
    return 1 + max((int(m.group(1)) for k in keys if (m := re.match(pattern, k))), default=-1)


def _strip(flat: Mapping[str, Any], prefix: str) -> Flat:
    return {k[len(prefix) :]: np.asarray(v) for k, v in flat.items() if k.startswith(prefix)}


def _put_pos(out: Flat, pos: np.ndarray, has_cls: bool) -> None:
    """Stores a (1, [1+]N, D) position embedding: the patch part and the class token's entry."""
    if has_cls and not is_square(pos.shape[1]) and is_square(pos.shape[1] - 1):
        out["cls_pos"], pos = pos[:, :1], pos[:, 1:]
    out["pos_embedding"] = pos


# --- big_vision and original google-research/vision_transformer .npz ---------------------------

_ORIG_POS = "Transformer/posembed_input/pos_embedding"
# The pre-linen module numbering of the original release, and big_vision's names for them.
_ORIG_RENAMES = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
                 "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
_SCANNED = "Transformer/encoderblock/"


def _npz_prefixes(sub: str | None) -> list[str]:
    # `file.npz:img` means the `img` sub-tree (two-tower SigLIP/LiT files); old
    # vision_transformer checkpoints sometimes live under `opt/target/`.
    return [f"params/{sub}/", f"{sub}/"] if sub else ["", "params/", "opt/target/"]


def _from_npz(flat: Mapping[str, Any], prefix: str, num_heads: int,
              renames: Mapping[str, str] | None = None) -> Flat:
    """Unstacks scanned blocks (big_vision's scan=True: one block with a leading depth axis),
    renames modules by `renames`, and drops `pre_logits` (not part of the features VQT reads)."""
    del num_heads
    tree: Flat = {}
    for k, v in _strip(flat, prefix).items():
        if k.startswith(_SCANNED):
            tree.update({f"Transformer/encoderblock_{i}/{k[len(_SCANNED):]}": v[i]
                         for i in range(v.shape[0])})
        else:
            tree[k] = v
    out: Flat = {}
    for k, v in tree.items():
        if k == _ORIG_POS:
            _put_pos(out, v, "cls" in tree)
        elif not k.startswith("pre_logits/"):
            out["/".join((renames or {}).get(p, p) for p in k.split("/"))] = v
    return out


def _pool_type(map_head: bool, class_token: bool) -> str:
    return "map" if map_head else "tok" if class_token else "gap"


def _npz_options(keys: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    # Not the activation: these files do not record it (big_vision trains with tanh GELU, the
    # release runs them with exact GELU: a protocol's choice).
    p, _, _, width = keys["embedding/kernel"]
    scanned = next((s[0] for k, s in keys.items() if k.startswith(_SCANNED)), 0)
    blocks = scanned or depth(keys, r"Transformer/encoderblock_(\d+)/")
    return dict(width=width, patch=p, depth=blocks,
                layerscale=any("/LayerScale_" in k for k in keys),
                num_registers=keys["registers"][1] if "registers" in keys else 0, mlp_act=None,
                pool_type=_pool_type(any(k.startswith("MAPHead_0/") for k in keys), "cls" in keys))


# big_vision's and vision_transformer's `resample_posemb`: scipy.ndimage.zoom, order 1.
_bilinear_corners = lambda flat, prefix: "bilinear_corners"


# --- timm-layout PyTorch state dicts (MAE, DINO/DINOv2, CLIP, supervised timm) ----------------

_TIMM_MARKER = "patch_embed.proj.weight"
# Keys of self-supervised training checkpoints that are not part of the encoder.
_TIMM_IGNORED = r"(decoder_|mask_token|head_drop|pre_logits)"
# timm key within a block -> canonical key; a `kernel` is a torch Linear weight (out, in), which
# becomes a flax kernel (in, out).
_TIMM_BLOCK = {
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_1/scale", "norm2.bias": "LayerNorm_1/bias",
    "mlp.fc1.weight": "MlpBlock_0/Dense_0/kernel", "mlp.fc1.bias": "MlpBlock_0/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_0/Dense_1/kernel", "mlp.fc2.bias": "MlpBlock_0/Dense_1/bias",
    "ls1.gamma": "LayerScale_0/scale", "ls2.gamma": "LayerScale_1/scale",
    "attn.proj.bias": "MultiHeadDotProductAttention_0/out/bias",
}
# The same for timm's `attn_pool` (AttentionPoolLatent) under big_vision's `MAPHead_0`.
_TIMM_MAP_HEAD = {"norm.weight": "LayerNorm_0/scale", "norm.bias": "LayerNorm_0/bias",
                  "proj.bias": "MultiHeadDotProductAttention_0/out/bias",
                  **{k: v for k, v in _TIMM_BLOCK.items() if k.startswith("mlp.")}}
# Top-level timm keys; the register tokens under timm's DINOv2-reg name and Meta's own.
_TIMM_TOP = {"cls_token": "cls", "norm_pre.weight": "norm_pre/scale",
             "norm_pre.bias": "norm_pre/bias", "patch_embed.proj.bias": "embedding/bias",
             "head.bias": "head/bias", "reg_token": "registers", "register_tokens": "registers"}


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """Finds the state dict inside a training checkpoint ({'model': ...}, {'state_dict': ...})."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
            wrappers = ("model", "state_dict", "module", "teacher")
            inner = next((obj[k] for k in wrappers if k in obj), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError("torch file does not hold a state dict")
    # DistributedDataParallel wraps every name in `module.`.
    return {k.removeprefix("module."): np.asarray(v) for k, v in obj.items() if hasattr(v, "shape")}


def _timm_resample_rule(flat: Mapping[str, Any], prefix: str) -> str:
    # Meta's own DINOv2 files (their training keys: mask_token, register_tokens) are resampled
    # as DINOv2 / Hugging Face do; anything else in this layout as timm's loader does.
    meta_dinov2 = any(prefix + k in flat for k in ("mask_token", "register_tokens"))
    return "bicubic" if meta_dinov2 else "bicubic_antialias"


def _timm_options(keys: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    # LayerScale marks DINOv2 (exact GELU); other timm-layout families share no activation
    # (CLIP's quick GELU or not, SigLIP's tanh GELU), so the file does not tell theirs.
    width, _, p, _ = keys[_TIMM_MARKER]
    layerscale = "blocks.0.ls1.gamma" in keys
    return dict(width=width, patch=p, depth=depth(keys, r"blocks\.(\d+)\."), layerscale=layerscale,
                num_registers=next((keys[k][1] for k in ("reg_token", "register_tokens")
                                    if k in keys), 0),
                pool_type=_pool_type("attn_pool.latent" in keys, "cls_token" in keys),
                mlp_act="gelu" if layerscale else None)


def _attention(out: Flat, dst: str, q: np.ndarray, k: np.ndarray, v: np.ndarray,
               proj: np.ndarray, num_heads: int) -> None:
    """torch Linear weights (out, in) of an attention -> flax DenseGeneral kernels under `dst`
    (query/key/value [D, H, Dh], out [H, Dh, D])."""
    d_model = k.shape[1]
    if d_model % num_heads:
        raise CheckpointError(f"width {d_model} is not divisible by {num_heads} heads")
    for name, w in (("query", q), ("key", k), ("value", v)):
        out[f"{dst}{name}/kernel"] = w.T.reshape(d_model, num_heads, -1)
    out[f"{dst}out/kernel"] = proj.T.reshape(num_heads, -1, proj.shape[0])


def _take_table(sd: Flat, out: Flat, src: str, dst: str, table: Mapping[str, str]) -> None:
    """Moves each `src{key}` in `sd` to `dst{table[key]}`, transposing kernels."""
    for s, d in table.items():
        if src + s in sd:
            out[dst + d] = sd.pop(src + s).T if d.endswith("/kernel") else sd.pop(src + s)


def _map_head(sd: Flat, out: Flat, num_heads: int) -> None:
    """timm's `attn_pool` (AttentionPoolLatent) -> big_vision's `MAPHead_0`."""
    src, dst = "attn_pool.", "MAPHead_0/"
    mha = dst + "MultiHeadDotProductAttention_0/"
    latent = sd.pop(src + "latent")
    if latent.shape[1] != 1:
        raise CheckpointError(f"attn_pool.latent {latent.shape}: only one latent (big_vision's "
                              "MAP probe) is supported")
    out[dst + "probe"] = latent
    kv = sd.pop(src + "kv.weight")
    d_model = kv.shape[1]
    _attention(out, mha, sd.pop(src + "q.weight"), kv[:d_model], kv[d_model:],
               sd.pop(src + "proj.weight"), num_heads)
    out[mha + "query/bias"] = sd.pop(src + "q.bias").reshape(num_heads, -1)
    out[mha + "key/bias"], out[mha + "value/bias"] = (
        sd.pop(src + "kv.bias").reshape(2, num_heads, -1))
    _take_table(sd, out, src, dst, _TIMM_MAP_HEAD)


def _timm_prefixes(sub: str | None) -> list[str]:
    return [f"{sub}.", f"{sub}.trunk."] if sub else ["", "visual.trunk.", "backbone."]


def _from_timm(flat: Mapping[str, Any], prefix: str, num_heads: int) -> Flat:
    # Every key converted is popped from `sd`, so what is left over is what no rule knows.
    sd = {k: v for k, v in _strip(flat, prefix).items() if not re.match(_TIMM_IGNORED, k)}
    w = sd.pop(_TIMM_MARKER)  # (D, C, kh, kw) -> (kh, kw, C, D)
    # timm builds CLIP's patch projection without a bias (bias=not pre_norm): a zero bias.
    out: Flat = {"embedding/kernel": w.transpose(2, 3, 1, 0),
                 "embedding/bias": np.zeros(w.shape[0], w.dtype)}
    out.update({dst: sd.pop(src) for src, dst in _TIMM_TOP.items() if src in sd})
    if "attn_pool.latent" in sd:
        _map_head(sd, out, num_heads)
    if "head.weight" in sd:
        out["head/kernel"] = sd.pop("head.weight").T
    # The final norm is `norm` for CLS-pooled models and `fc_norm` after average pooling (MAE).
    norm = next((n for n in ("fc_norm", "norm") if f"{n}.weight" in sd and sd[f"{n}.weight"].size),
                None)
    if norm:
        out["Transformer/encoder_norm/scale"] = sd.pop(f"{norm}.weight")
        out["Transformer/encoder_norm/bias"] = sd.pop(f"{norm}.bias")
    if "pos_embed" in sd:
        _put_pos(out, sd.pop("pos_embed"), "cls" in out)  # `cls` is the popped `cls_token`
    for i in range(depth(sd, r"blocks\.(\d+)\.")):
        src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        _take_table(sd, out, src, dst, _TIMM_BLOCK)
        attn = dst + "MultiHeadDotProductAttention_0/"
        if src + "attn.qkv.weight" in sd and src + "attn.proj.weight" in sd:
            qkv = sd.pop(src + "attn.qkv.weight")  # (3D, D): rows are [q; k; v], heads inside.
            d_model = qkv.shape[1]
            _attention(out, attn, *(qkv[j * d_model:(j + 1) * d_model] for j in range(3)),
                       sd.pop(src + "attn.proj.weight"), num_heads)
            if src + "attn.qkv.bias" in sd:
                out[f"{attn}query/bias"], out[f"{attn}key/bias"], out[f"{attn}value/bias"] = (
                    sd.pop(src + "attn.qkv.bias").reshape(3, num_heads, -1))
    # Anything left over keeps its timm name, so the loader reports it as an unknown key.
    out.update(sd)
    return out


LAYOUTS: dict[str, Layout] = {
    # The original google-research/vision_transformer .npz (ViT-B_16.npz, imagenet21k).
    "vision_transformer": Layout(_ORIG_POS, _npz_prefixes,
                                 functools.partial(_from_npz, renames=_ORIG_RENAMES),
                                 _bilinear_corners, _npz_options),
    # big_vision .npz (AugReg, SigLIP and SigLIP 2 `file.npz:img` with the MAP head), plain or
    # scanned blocks.
    "big_vision": Layout("embedding/kernel", _npz_prefixes, _from_npz, _bilinear_corners,
                         _npz_options),
    # timm-layout PyTorch state dicts (.pth/.bin/.safetensors: timm, MAE, DINOv2 with or without
    # registers, CLIP, SigLIP).
    "timm": Layout(_TIMM_MARKER, _timm_prefixes, _from_timm, _timm_resample_rule, _timm_options),
}


def detect(flat: Mapping[str, Any], sub: str | None) -> tuple[Layout, str]:
    """Finds the layout (and key prefix) of a checkpoint's flat contents.

    Raises:
      CheckpointError: if no layout matches; the message lists a few of the file's keys.
    """
    for layout in LAYOUTS.values():
        # The prefix under which this layout's ViT lives in `flat`, if any.
        prefix = next((p for p in layout.prefixes(sub) if p + layout.marker in flat), None)
        if prefix is not None:
            return layout, prefix
    hint = (" It looks like a two-tower file: append ':img' to the path."
            if sub is None and any(re.match(r"(params/)?img/", k) for k in flat) else "")
    where = f" under sub-tree {sub!r}" if sub else ""
    raise CheckpointError(f"no ViT found{where}: the file is in none of the known layouts "
                          f"({', '.join(LAYOUTS)}); first keys: {sorted(flat)[:8]}.{hint}")
