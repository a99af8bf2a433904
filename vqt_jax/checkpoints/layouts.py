"""Parameter layouts of the ViT checkpoints users bring, mapped onto big_vision's tree.

Every layout converts a file's flat contents into one canonical flat dict whose keys are this
project's `params` paths joined by '/' (big_vision's names, non-scanned), plus one extra key,
`cls_pos`: the class token's own position embedding, which big_vision does not have (it adds
position embeddings to the patches only) and which the loader folds into `cls`.

Layouts are looked up by name in `LAYOUTS`; `detect` finds the one a file is in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vqt_jax.checkpoints.files import CheckpointError

Flat = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Layout:
    """One checkpoint layout.

    Attributes:
      name: key in LAYOUTS.
      description: what produces files in this layout.
      find_prefix: returns the key prefix under which this layout's ViT lives in the file's
        flat keys (given an optional sub-tree name such as 'img'), or None if it is not there.
      convert: (flat contents, prefix, num_heads) -> (canonical dict, keys deliberately dropped).
      resample_rule: (flat contents, prefix) -> how the family's authors resample the position
        embedding to another grid (a name in `resample.RULES`).
    """

    name: str
    description: str
    find_prefix: Callable[[Mapping[str, Any], str | None], str | None]
    convert: Callable[[Mapping[str, Any], str, int], tuple[Flat, list[str]]]
    resample_rule: Callable[[Mapping[str, Any], str], str]


def _first_prefix(keys: Mapping[str, Any], candidates: list[str], marker: str) -> str | None:
    return next((p for p in candidates if p + marker in keys), None)


def _npz_prefixes(sub: str | None) -> list[str]:
    # `file.npz:img` means the `img` sub-tree (two-tower SigLIP/LiT files); old
    # vision_transformer checkpoints sometimes live under `opt/target/`.
    if sub:
        return [f"params/{sub}/", f"{sub}/"]
    return ["", "params/", "opt/target/"]


def _strip(flat: Mapping[str, Any], prefix: str) -> Flat:
    return {k[len(prefix) :]: np.asarray(v) for k, v in flat.items() if k.startswith(prefix)}


def _unstack_scanned(tree: Flat) -> Flat:
    """big_vision with scan=True stores one `Transformer/encoderblock` with a leading depth axis."""
    out = {}
    scanned = "Transformer/encoderblock/"
    for k, v in tree.items():
        if k.startswith(scanned):
            for i in range(v.shape[0]):
                out[f"Transformer/encoderblock_{i}/{k[len(scanned):]}"] = v[i]
        else:
            out[k] = v
    return out


def _drop(tree: Flat, pattern: str) -> tuple[Flat, list[str]]:
    dropped = [k for k in tree if re.match(pattern, k)]
    return {k: v for k, v in tree.items() if k not in dropped}, dropped


def _split_cls_pos(pos: np.ndarray, has_cls: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Splits a (1, [1+]N, D) position embedding into patch part and class-token entry."""
    n = pos.shape[1]
    if has_cls and not _is_square(n) and _is_square(n - 1):
        return pos[:, 1:], pos[:, :1]
    return pos, None


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _bilinear_corners(flat: Mapping[str, Any], prefix: str) -> str:
    # big_vision's and vision_transformer's `resample_posemb`: scipy.ndimage.zoom, order 1.
    del flat, prefix
    return "bilinear_corners"


# --- big_vision -------------------------------------------------------------------------------


def _big_vision_prefix(flat: Mapping[str, Any], sub: str | None) -> str | None:
    return _first_prefix(flat, _npz_prefixes(sub), "embedding/kernel")


def _from_big_vision(flat: Mapping[str, Any], prefix: str, num_heads: int) -> tuple[Flat, list]:
    del num_heads
    tree = _unstack_scanned(_strip(flat, prefix))
    # A representation layer ("pre_logits") is not part of the features VQT reads.
    return _drop(tree, r"pre_logits/")


# --- original google-research/vision_transformer ----------------------------------------------

_ORIG_POS = "Transformer/posembed_input/pos_embedding"
# The pre-linen module numbering of the original release, and big_vision's names for them.
_ORIG_RENAMES = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}


def _orig_prefix(flat: Mapping[str, Any], sub: str | None) -> str | None:
    return _first_prefix(flat, _npz_prefixes(sub), _ORIG_POS)


def _from_orig(flat: Mapping[str, Any], prefix: str, num_heads: int) -> tuple[Flat, list]:
    del num_heads
    tree = _unstack_scanned(_strip(flat, prefix))
    out: Flat = {}
    for k, v in tree.items():
        if k == _ORIG_POS:
            out["pos_embedding"], cls_pos = _split_cls_pos(v, "cls" in tree)
            if cls_pos is not None:
                out["cls_pos"] = cls_pos
            continue
        parts = k.split("/")
        out["/".join(_ORIG_RENAMES.get(p, p) for p in parts)] = v
    return _drop(out, r"pre_logits/")


# --- timm-layout PyTorch state dicts (MAE, DINO/DINOv2, CLIP, supervised timm) ----------------

_TIMM_MARKER = "patch_embed.proj.weight"
# Keys of self-supervised training checkpoints that are not part of the encoder.
_TIMM_IGNORED = r"(decoder_|mask_token|head_drop|pre_logits)"
# Register tokens: timm's DINOv2-reg name and Meta's own.
_TIMM_REGISTERS = ("reg_token", "register_tokens")

# (timm key suffix within a block, canonical suffix, how to convert the torch tensor).
_LINEAR = "linear"  # torch Linear weight (out, in) -> flax kernel (in, out)
_COPY = "copy"
_TIMM_BLOCK = [
    ("norm1.weight", "LayerNorm_0/scale", _COPY),
    ("norm1.bias", "LayerNorm_0/bias", _COPY),
    ("norm2.weight", "LayerNorm_1/scale", _COPY),
    ("norm2.bias", "LayerNorm_1/bias", _COPY),
    ("mlp.fc1.weight", "MlpBlock_0/Dense_0/kernel", _LINEAR),
    ("mlp.fc1.bias", "MlpBlock_0/Dense_0/bias", _COPY),
    ("mlp.fc2.weight", "MlpBlock_0/Dense_1/kernel", _LINEAR),
    ("mlp.fc2.bias", "MlpBlock_0/Dense_1/bias", _COPY),
    ("ls1.gamma", "LayerScale_0/scale", _COPY),
    ("ls2.gamma", "LayerScale_1/scale", _COPY),
    ("attn.proj.bias", "MultiHeadDotProductAttention_0/out/bias", _COPY),
]
_TIMM_TOP = [
    ("cls_token", "cls"),
    ("norm_pre.weight", "norm_pre/scale"),
    ("norm_pre.bias", "norm_pre/bias"),
    ("patch_embed.proj.bias", "embedding/bias"),
    ("head.bias", "head/bias"),
]


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """Finds the state dict inside a training checkpoint ({'model': ...}, {'state_dict': ...})."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
            inner = next(
                (obj[k] for k in ("model", "state_dict", "module", "teacher") if k in obj), None
            )
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError("torch file does not hold a state dict")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "shape"):
            # DistributedDataParallel wraps every name in `module.`.
            out[k[len("module.") :] if k.startswith("module.") else k] = np.asarray(v)
    return out


def _timm_resample_rule(flat: Mapping[str, Any], prefix: str) -> str:
    # Meta's own DINOv2 files (their training keys: mask_token, register_tokens) are resampled
    # as DINOv2 / Hugging Face do; anything else in this layout as timm's loader does.
    if any(prefix + k in flat for k in ("mask_token", "register_tokens")):
        return "bicubic"
    return "bicubic_antialias"


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


def _map_head(sd: Flat, take: Callable[[str], np.ndarray], out: Flat, num_heads: int) -> None:
    """timm's `attn_pool` (AttentionPoolLatent) -> big_vision's `MAPHead_0`."""
    src, dst = "attn_pool.", "MAPHead_0/"
    mha = dst + "MultiHeadDotProductAttention_0/"
    latent = take(src + "latent")
    if latent.shape[1] != 1:
        raise CheckpointError(f"attn_pool.latent {latent.shape}: only one latent (big_vision's "
                              "MAP probe) is supported")
    out[dst + "probe"] = latent
    kv = take(src + "kv.weight")
    d_model = kv.shape[1]
    _attention(out, mha, take(src + "q.weight"), kv[:d_model], kv[d_model:],
               take(src + "proj.weight"), num_heads)
    out[mha + "query/bias"] = take(src + "q.bias").reshape(num_heads, -1)
    kv_bias = take(src + "kv.bias").reshape(2, num_heads, -1)
    out[mha + "key/bias"], out[mha + "value/bias"] = kv_bias[0], kv_bias[1]
    out[mha + "out/bias"] = take(src + "proj.bias")
    out[dst + "LayerNorm_0/scale"] = take(src + "norm.weight")
    out[dst + "LayerNorm_0/bias"] = take(src + "norm.bias")
    for r in range(2):
        out[f"{dst}MlpBlock_0/Dense_{r}/kernel"] = take(f"{src}mlp.fc{r + 1}.weight").T
        out[f"{dst}MlpBlock_0/Dense_{r}/bias"] = take(f"{src}mlp.fc{r + 1}.bias")


def _timm_prefix(flat: Mapping[str, Any], sub: str | None) -> str | None:
    candidates = [f"{sub}.", f"{sub}.trunk."] if sub else ["", "visual.trunk.", "backbone."]
    return _first_prefix(flat, candidates, _TIMM_MARKER)


def _from_timm(flat: Mapping[str, Any], prefix: str, num_heads: int) -> tuple[Flat, list]:
    sd = {k[len(prefix) :]: np.asarray(v) for k, v in flat.items() if k.startswith(prefix)}
    sd, dropped = _drop(sd, _TIMM_IGNORED)
    out: Flat = {}
    used = set()

    def take(key: str) -> np.ndarray:
        used.add(key)
        return sd[key]

    w = take(_TIMM_MARKER)  # (D, C, kh, kw) -> (kh, kw, C, D)
    out["embedding/kernel"] = w.transpose(2, 3, 1, 0)
    if "patch_embed.proj.bias" not in sd:
        # timm builds CLIP's patch projection without a bias (bias=not pre_norm): a zero bias.
        out["embedding/bias"] = np.zeros(w.shape[0], w.dtype)
    for src, dst in _TIMM_TOP:
        if src in sd:
            out[dst] = take(src)
    for name in _TIMM_REGISTERS:
        if name in sd:
            out["registers"] = take(name)
    if "attn_pool.latent" in sd:
        _map_head(sd, take, out, num_heads)
    if "head.weight" in sd:
        out["head/kernel"] = take("head.weight").T
    # The final norm is `norm` for CLS-pooled models and `fc_norm` after average pooling (MAE).
    for norm in ("fc_norm", "norm"):
        if f"{norm}.weight" in sd and sd[f"{norm}.weight"].size:
            out["Transformer/encoder_norm/scale"] = take(f"{norm}.weight")
            out["Transformer/encoder_norm/bias"] = take(f"{norm}.bias")
            break
    if "pos_embed" in sd:
        out["pos_embedding"], cls_pos = _split_cls_pos(take("pos_embed"), "cls_token" in sd)
        if cls_pos is not None:
            out["cls_pos"] = cls_pos

    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))),
                    default=-1)
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for s, d, kind in _TIMM_BLOCK:
            if src + s in sd:
                v = take(src + s)
                out[dst + d] = v.T if kind == _LINEAR else v
        attn = dst + "MultiHeadDotProductAttention_0/"
        if src + "attn.qkv.weight" in sd and src + "attn.proj.weight" in sd:
            qkv = take(src + "attn.qkv.weight")  # (3D, D): rows are [q; k; v], heads inside.
            d_model = qkv.shape[1]
            _attention(out, attn, *(qkv[j * d_model:(j + 1) * d_model] for j in range(3)),
                       take(src + "attn.proj.weight"), num_heads)
            if src + "attn.qkv.bias" in sd:
                bias = take(src + "attn.qkv.bias").reshape(3, num_heads, -1)
                for j, name in enumerate(("query", "key", "value")):
                    out[f"{attn}{name}/bias"] = bias[j]
    # Anything left over keeps its timm name, so the loader reports it as an unknown key.
    out.update({k: v for k, v in sd.items() if k not in used})
    return out, dropped


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout(
            "vision_transformer",
            "original google-research/vision_transformer .npz (ViT-B_16.npz, imagenet21k)",
            _orig_prefix,
            _from_orig,
            _bilinear_corners,
        ),
        Layout(
            "big_vision",
            "big_vision .npz (AugReg, SigLIP and SigLIP 2 `file.npz:img` with the MAP head), "
            "plain or scanned blocks",
            _big_vision_prefix,
            _from_big_vision,
            _bilinear_corners,
        ),
        Layout(
            "timm",
            "timm-layout PyTorch state dict (.pth/.bin/.safetensors: timm, MAE, DINOv2 with or "
            "without registers, CLIP, SigLIP)",
            _timm_prefix,
            _from_timm,
            _timm_resample_rule,
        ),
    ]
}


def detect(flat: Mapping[str, Any], sub: str | None) -> tuple[Layout, str]:
    """Finds the layout (and key prefix) of a checkpoint's flat contents.

    Raises:
      CheckpointError: if no layout matches; the message lists a few of the file's keys.
    """
    for layout in LAYOUTS.values():
        prefix = layout.find_prefix(flat, sub)
        if prefix is not None:
            return layout, prefix
    some = sorted(flat)[:8]
    hint = ""
    if sub is None and any(re.match(r"(params/)?img/", k) for k in flat):
        hint = " It looks like a two-tower file: append ':img' to the path."
    where = f" under sub-tree {sub!r}" if sub else ""
    raise CheckpointError(
        f"no ViT found{where}: the file is in none of the known layouts "
        f"({', '.join(LAYOUTS)}); first keys: {some}.{hint}"
    )
