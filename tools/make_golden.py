#!/usr/bin/env python3
"""Write the timm golden fixture for the vqt_jax checkpoint-loader tests.

Builds tiny, randomly initialised timm ``VisionTransformer`` models, writes each one in a
checkpoint format that ``vqt_jax`` must read (the original google-research/vision_transformer
``.npz``, big_vision ``.npz`` in its variants, timm ``.pth`` / ``.safetensors``), verifies every
written file with timm's own reader, and records timm's outputs on a fixed batch of images in
``golden.npz``. The test suite (which has no torch) loads the same files with vqt_jax and compares
against these outputs, so timm acts as an independent reference implementation.

Output directory (default ``tests/fixtures/golden/``):

* ``manifest.json``: versions and, per case, the file, its format, the image size and the model
  kwargs in vqt_jax's ViT API.
* ``golden.npz``: per case ``{name}/images`` (B, H, W, 3) in model input space, ``{name}/logits``,
  ``{name}/pre_logits``, ``{name}/tokens`` (after the final norm) and ``{name}/blocks`` (output
  of every transformer block, (depth, B, prefix + N, D)); and PyTorch's resampling of random
  grids by timm's and DINOv2's rules (``resample/...``, see ``resample_references``); all
  float32.
* one checkpoint file per case.

Usage (in a separate venv; this script must never import jax or tensorflow)::

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install -r tools/requirements-golden.txt
    # (re)write the fixture:
    /tmp/golden-venv/bin/python tools/make_golden.py
    # regenerate into a temp dir and compare every array with the committed fixture:
    /tmp/golden-venv/bin/python tools/make_golden.py --check

Everything is seeded, so a re-run reproduces the fixture: ``--check`` exits non-zero when a file
or key is missing or extra, a shape/dtype differs, or any value differs by more than 1e-6.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerScale, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, _load_weights, checkpoint_filter_fn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "golden"
BATCH = 2
CHECK_ATOL = 1e-6
# fp32 timm vs the fp64 golden: only a sanity bound, the real diffs are ~1e-6.
FP32_SANITY_ATOL = 1e-4

# Reference activations, used to assert timm built the activation we claim in the manifest.
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / np.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (
        1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One timm model written to one checkpoint file.

    Attributes:
        name: Case name (key prefix in golden.npz, key in the manifest).
        file: File name inside the fixture directory.
        format: Manifest format tag: 'orig_npz', 'big_vision_npz' or 'timm'.
        writer: How the file is written (see ``write_checkpoint``).
        image_size: Image size the golden outputs (and the JAX model) use.
        patch: Square patch size.
        file_suffix: Suffix appended to ``file`` in the manifest (':img' for the SigLIP tower).
        checkpoint_image_size: Image size the checkpoint was written for, if it differs.
        no_embed_class: timm-only switch: pos_embed covers patches only (big_vision semantics).
        The remaining fields mirror vqt_jax's ViT kwargs.
    """

    name: str
    file: str
    format: str
    writer: str
    image_size: int
    patch: int
    width: int = 48
    depth: int = 2
    mlp_dim: int = 96
    num_heads: int = 3
    num_classes: int = 5
    pool_type: str = "tok"
    class_token: bool = True
    num_registers: int = 0
    fc_norm: bool = False
    layerscale: bool = False
    mlp_act: str = "gelu"
    ln_eps: float = 1e-6
    pre_norm: bool = False
    qkv_bias: bool = True
    no_embed_class: bool = False
    file_suffix: str = ""
    checkpoint_image_size: int | None = None

    @property
    def source_image_size(self) -> int:
        """Image size of the model whose weights are written to disk."""
        return self.checkpoint_image_size or self.image_size

    def model_kwargs(self) -> dict[str, Any]:
        """The model kwargs in vqt_jax's ViT API (what the test builds the JAX model with)."""
        return {
            "patch_size": [self.patch, self.patch],
            "width": self.width,
            "depth": self.depth,
            "mlp_dim": self.mlp_dim,
            "num_heads": self.num_heads,
            "num_classes": self.num_classes,
            "pool_type": self.pool_type,
            "class_token": self.class_token,
            "num_registers": self.num_registers,
            "fc_norm": self.fc_norm,
            "layerscale": self.layerscale,
            "mlp_act": self.mlp_act,
            "ln_eps": self.ln_eps,
            "pre_norm": self.pre_norm,
            "qkv_bias": self.qkv_bias,
        }


# Sizes are varied on purpose (grids 3x3..6x6, 3 or 4 heads, mlp 2x or 4x, depth 2 or 3) so a
# loader that mixes up grid/head/depth axes cannot pass by accident.
CASES: tuple[Case, ...] = (
    Case("orig_npz", "orig_vit.npz", "orig_npz", "orig", image_size=32, patch=8,
         mlp_act="gelu_tanh"),
    # big_vision adds pos_embedding to the patches before prepending cls; timm's
    # no_embed_class=True is exactly that, and is what timm's own npz reader expects.
    Case("bv_npz", "bv_vit.npz", "big_vision_npz", "bv", image_size=32, patch=8, num_heads=4,
         mlp_dim=192, mlp_act="gelu_tanh", no_embed_class=True),
    Case("bv_scan_bf16_npz", "bv_scan_bf16.npz", "big_vision_npz", "bv_scan_bf16", image_size=24,
         patch=8, depth=3, mlp_act="gelu_tanh", no_embed_class=True),
    Case("siglip_img_npz", "siglip_two_tower.npz", "big_vision_npz", "siglip", image_size=32,
         patch=8, mlp_act="gelu_tanh", no_embed_class=True, file_suffix=":img"),
    Case("timm_pth", "timm_vit.pth", "timm", "pth", image_size=40, patch=8, qkv_bias=False),
    Case("dinov2_safetensors", "dinov2_vit.safetensors", "timm", "safetensors", image_size=42,
         patch=14, mlp_dim=192, layerscale=True),
    Case("mae_pth", "mae_vit.pth", "timm", "pth_model", image_size=32, patch=8, num_heads=4,
         pool_type="gap", fc_norm=True),
    Case("clip_safetensors", "clip_vit.safetensors", "timm", "safetensors", image_size=32,
         patch=8, mlp_act="quick_gelu", ln_eps=1e-5, pre_norm=True),
    Case("resample_pth", "resample_vit.pth", "timm", "pth", image_size=48, patch=8,
         checkpoint_image_size=32),
    # SigLIP towers: no class token, big_vision's MAP head pools the final tokens.
    Case("siglip_map_npz", "siglip_map.npz", "big_vision_npz", "bv", image_size=32, patch=8,
         pool_type="map", class_token=False, mlp_act="gelu_tanh", no_embed_class=True),
    Case("siglip_map_img_npz", "siglip_map_two_tower.npz", "big_vision_npz", "siglip",
         image_size=24, patch=8, num_heads=4, mlp_dim=192, pool_type="map", class_token=False,
         mlp_act="gelu_tanh", no_embed_class=True, file_suffix=":img"),
    Case("siglip_map_safetensors", "siglip_map.safetensors", "timm", "safetensors",
         image_size=40, patch=8, depth=3, pool_type="map", class_token=False,
         mlp_act="gelu_tanh"),
    # DINOv2 with registers as timm holds it: cls and registers without position embedding.
    Case("dinov2_reg_safetensors", "dinov2_reg.safetensors", "timm", "safetensors",
         image_size=42, patch=14, mlp_dim=192, layerscale=True, num_registers=2,
         no_embed_class=True),
)

# Position-embedding grids resampled by PyTorch (timm's rule: bicubic with antialias; DINOv2 /
# Hugging Face: bicubic without), from these source sides to these target grids: both
# directions and a non-square target.
RESAMPLE_SOURCES = (7, 4)
RESAMPLE_TARGETS = ((3, 3), (5, 5), (9, 9), (4, 6))
RESAMPLE_RULES = {"bicubic_antialias": True, "bicubic": False}


# --------------------------------------------------------------------------------------------
# Model construction and randomisation
# --------------------------------------------------------------------------------------------


def build_timm(case: Case, image_size: int) -> VisionTransformer:
    """Builds the timm ViT for ``case`` (timm's own init; weights are overwritten later).

    Args:
        case: The case.
        image_size: Image size to build for (fixes the pos_embed grid).

    Returns:
        The model in eval mode.
    """
    model = VisionTransformer(
        img_size=image_size,
        patch_size=case.patch,
        num_classes=case.num_classes,
        global_pool={"tok": "token", "gap": "avg", "map": "map"}[case.pool_type],
        reg_tokens=case.num_registers,
        embed_dim=case.width,
        depth=case.depth,
        num_heads=case.num_heads,
        mlp_ratio=case.mlp_dim / case.width,
        qkv_bias=case.qkv_bias,
        # LayerScale is created only when init_values is truthy; the value is randomised anyway.
        init_values=1e-5 if case.layerscale else None,
        class_token=case.class_token,
        no_embed_class=case.no_embed_class,
        pre_norm=case.pre_norm,
        fc_norm=case.fc_norm,
        norm_layer=partial(LayerNorm, eps=case.ln_eps),
        act_layer=case.mlp_act,
    )
    _assert_architecture(model, case)
    return model.eval()


def _assert_architecture(model: VisionTransformer, case: Case) -> None:
    """Fails loudly if timm did not build what the manifest will claim."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            assert mod.eps == case.ln_eps, (case.name, name, mod.eps)
    for blk in model.blocks:
        assert blk.mlp.fc1.out_features == case.mlp_dim, case.name
        assert (blk.attn.qkv.bias is not None) == case.qkv_bias, case.name
        assert isinstance(blk.ls1, LayerScale) == case.layerscale, case.name
        # Compare the built activation with the formula, in fp64, on a wide range.
        x = torch.linspace(-6.0, 6.0, 1001, dtype=torch.float64)
        err = (blk.mlp.act(x) - ACTS[case.mlp_act](x)).abs().max().item()
        assert err < 1e-12, (case.name, case.mlp_act, err)
    x = torch.linspace(-6.0, 6.0, 1001, dtype=torch.float64)
    assert (model.attn_pool is not None) == (case.pool_type == "map"), case.name
    if model.attn_pool is not None:
        assert model.attn_pool.latent.shape == (1, 1, case.width), case.name
        assert model.attn_pool.mlp.fc1.out_features == case.mlp_dim, case.name
        err = (model.attn_pool.mlp.act(x) - ACTS[case.mlp_act](x)).abs().max().item()
        assert err < 1e-12, (case.name, "attn_pool", err)
    assert (model.cls_token is not None) == case.class_token, case.name
    assert model.num_reg_tokens == case.num_registers, case.name
    assert isinstance(model.norm_pre, torch.nn.LayerNorm) == case.pre_norm, case.name
    assert isinstance(model.fc_norm, torch.nn.LayerNorm) == case.fc_norm, case.name
    # timm moves the final norm after pooling when fc_norm is set (MAE), never both.
    assert isinstance(model.norm, torch.nn.LayerNorm) == (not case.fc_norm), case.name


@torch.no_grad()
def randomize_(model: torch.nn.Module, rng: np.random.Generator) -> None:
    """Overwrites every parameter with non-trivial random values.

    Scaled-normal weights keep activations O(1); LayerNorm scales are near (not at) 1, biases and
    LayerScale gammas are clearly non-zero, so every parameter visibly affects the outputs and a
    loader that drops or mis-maps one fails the comparison.

    Args:
        model: The timm model, modified in place.
        rng: Source of randomness (numpy, for reproducibility across torch versions).
    """
    owners = dict(model.named_modules())
    for name, p in model.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        mod = owners[mod_name]
        shape = tuple(p.shape)
        if isinstance(mod, torch.nn.LayerNorm):
            val = 1.0 + 0.1 * rng.standard_normal(shape) if leaf == "weight" else (
                0.1 * rng.standard_normal(shape))
        elif isinstance(mod, LayerScale):
            # Real LayerScale init is 1e-5, which would make the blocks nearly invisible.
            val = rng.uniform(0.1, 1.0, shape)
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and leaf == "weight":
            fan_in = int(np.prod(shape[1:]))
            val = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and leaf == "bias":
            val = 0.1 * rng.standard_normal(shape)
        elif name in ("cls_token", "pos_embed", "reg_token", "attn_pool.latent"):
            val = 0.5 * rng.standard_normal(shape)
        else:
            raise ValueError(f"randomize_: no rule for parameter {name!r} ({type(mod).__name__})")
        p.copy_(torch.from_numpy(np.asarray(val, dtype=np.float32)))
    # No buffers are expected; a buffer we did not set would silently carry timm's init.
    assert not list(model.buffers()), [n for n, _ in model.named_buffers()]


@torch.no_grad()
def round_to_bf16_(model: torch.nn.Module) -> None:
    """Rounds every parameter to the nearest bfloat16 value, kept in float32."""
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))


# --------------------------------------------------------------------------------------------
# Flax trees (original vision_transformer and big_vision layouts)
# --------------------------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().copy()


def _block_tree(blk: torch.nn.Module, num_heads: int, orig: bool) -> dict[str, np.ndarray]:
    """Flax params of one timm Block, relative to its encoderblock prefix.

    The original (pre-linen) vision_transformer numbered modules by creation order across the
    block (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3); big_vision
    (linen) numbers per module type (LayerNorm_0/1, MultiHeadDotProductAttention_0, MlpBlock_0).
    """
    mha, ln2, mlp = (
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if orig
        else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    assert isinstance(blk.ls1, torch.nn.Identity), "LayerScale has no flax npz layout"
    d = blk.norm1.weight.shape[0]
    dh = d // num_heads
    # torch Linear weight is (out, in); timm's fused qkv rows are [q; k; v], each head-major
    # (h * Dh + j), which is exactly flax DenseGeneral's (D, H, Dh) kernel flattened.
    w_qkv = _np(blk.attn.qkv.weight)
    b_qkv = _np(blk.attn.qkv.bias)
    tree = {
        "LayerNorm_0/scale": _np(blk.norm1.weight),
        "LayerNorm_0/bias": _np(blk.norm1.bias),
    }
    for i, n in enumerate(("query", "key", "value")):
        tree[f"{mha}/{n}/kernel"] = w_qkv[i * d:(i + 1) * d].T.reshape(d, num_heads, dh)
        tree[f"{mha}/{n}/bias"] = b_qkv[i * d:(i + 1) * d].reshape(num_heads, dh)
    tree[f"{mha}/out/kernel"] = _np(blk.attn.proj.weight).T.reshape(num_heads, dh, d)
    tree[f"{mha}/out/bias"] = _np(blk.attn.proj.bias)
    tree[f"{ln2}/scale"] = _np(blk.norm2.weight)
    tree[f"{ln2}/bias"] = _np(blk.norm2.bias)
    for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
        tree[f"{mlp}/Dense_{r}/kernel"] = _np(fc.weight).T
        tree[f"{mlp}/Dense_{r}/bias"] = _np(fc.bias)
    return tree


def _map_tree(pool: torch.nn.Module, num_heads: int) -> dict[str, np.ndarray]:
    """big_vision's MAPHead params from timm's AttentionPoolLatent (relative to MAPHead_0/).

    timm's q is a D->D Linear of the latent and kv one D->2D Linear of the tokens ([k; v] rows);
    big_vision's flax MultiHeadDotProductAttention has (D, H, Dh) query/key/value kernels and an
    (H, Dh, D) out kernel.
    """
    d = pool.q.weight.shape[1]
    dh = d // num_heads
    w_kv, b_kv = _np(pool.kv.weight), _np(pool.kv.bias)
    mha = "MultiHeadDotProductAttention_0"
    tree = {
        "probe": _np(pool.latent),
        f"{mha}/query/kernel": _np(pool.q.weight).T.reshape(d, num_heads, dh),
        f"{mha}/query/bias": _np(pool.q.bias).reshape(num_heads, dh),
        f"{mha}/key/kernel": w_kv[:d].T.reshape(d, num_heads, dh),
        f"{mha}/key/bias": b_kv[:d].reshape(num_heads, dh),
        f"{mha}/value/kernel": w_kv[d:].T.reshape(d, num_heads, dh),
        f"{mha}/value/bias": b_kv[d:].reshape(num_heads, dh),
        f"{mha}/out/kernel": _np(pool.proj.weight).T.reshape(num_heads, dh, d),
        f"{mha}/out/bias": _np(pool.proj.bias),
        "LayerNorm_0/scale": _np(pool.norm.weight),
        "LayerNorm_0/bias": _np(pool.norm.bias),
    }
    for r, fc in enumerate((pool.mlp.fc1, pool.mlp.fc2)):
        tree[f"MlpBlock_0/Dense_{r}/kernel"] = _np(fc.weight).T
        tree[f"MlpBlock_0/Dense_{r}/bias"] = _np(fc.bias)
    return tree


def flax_tree(model: VisionTransformer, case: Case, orig: bool, scanned: bool = False
              ) -> dict[str, np.ndarray]:
    """Converts a timm ViT to a flat '/'-joined flax parameter dict.

    Args:
        model: Source model.
        case: Its case (for the head count).
        orig: Original vision_transformer layout (else big_vision).
        scanned: big_vision scan=True: one ``Transformer/encoderblock`` with a leading depth axis.

    Returns:
        Flat dict of float32 arrays, in a fixed order.
    """
    assert model.patch_embed.proj.bias is not None
    assert model.reg_token is None, "big_vision has no register tokens"
    tree = {
        # conv (out, in, kh, kw) -> flax (kh, kw, in, out)
        "embedding/kernel": _np(model.patch_embed.proj.weight).transpose(2, 3, 1, 0),
        "embedding/bias": _np(model.patch_embed.proj.bias),
    }
    if model.cls_token is not None:
        tree["cls"] = _np(model.cls_token)
    if orig:
        # Original layout: (1, 1 + N, D), cls entry first, added after the cls is prepended.
        assert not model.no_embed_class
        tree["Transformer/posembed_input/pos_embedding"] = _np(model.pos_embed)
    else:
        # big_vision: (1, N, D), added to the patches only.
        assert model.no_embed_class
        tree["pos_embedding"] = _np(model.pos_embed)
    blocks = [_block_tree(blk, case.num_heads, orig) for blk in model.blocks]
    if scanned:
        for k in blocks[0]:
            tree[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            for k, v in b.items():
                tree[f"Transformer/encoderblock_{i}/{k}"] = v
    tree["Transformer/encoder_norm/scale"] = _np(model.norm.weight)
    tree["Transformer/encoder_norm/bias"] = _np(model.norm.bias)
    if model.attn_pool is not None:
        tree.update({f"MAPHead_0/{k}": v for k, v in _map_tree(model.attn_pool,
                                                                case.num_heads).items()})
    tree["head/kernel"] = _np(model.head.weight).T
    tree["head/bias"] = _np(model.head.bias)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tree.items()}


def to_bf16_void(a: np.ndarray) -> np.ndarray:
    """Encodes float32 values that are exactly bf16 as raw bf16 bytes in a 'V2' array.

    This is what ``np.savez`` produces for jax/ml_dtypes bfloat16 arrays (numpy has no bf16,
    the header records '<V2'), i.e. how big_vision checkpoints store bf16 params.
    """
    u32 = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    assert not np.any(u32 & 0xFFFF), "value is not bf16-representable; round first"
    return (u32 >> 16).astype(np.uint16).view(np.dtype("V2"))


def from_bf16_void(a: np.ndarray) -> np.ndarray:
    """Decodes a 'V2' raw-bf16 array to float32 (exact)."""
    assert a.dtype == np.dtype("V2"), a.dtype
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------------------------
# Writers and timm-side verification
# --------------------------------------------------------------------------------------------


def state_dict_f32(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous, float32 copy of the state dict (safe for torch.save/safetensors)."""
    return {k: v.detach().to(torch.float32).contiguous().clone()
            for k, v in model.state_dict().items()}


def write_checkpoint(case: Case, model: VisionTransformer, out_dir: Path,
                     rng: np.random.Generator) -> None:
    """Writes ``model`` to ``out_dir / case.file`` in the case's format.

    Args:
        case: The case.
        model: The source model (at ``case.source_image_size``).
        out_dir: Fixture directory.
        rng: Randomness for the arrays the model does not use (pre_logits, SigLIP text tower).
    """
    path = out_dir / case.file
    d = case.width
    if case.writer == "orig":
        tree = flax_tree(model, case, orig=True)
        # The original files carry a D->D 'pre_logits' Dense the classifier no longer uses;
        # random and non-zero so a loader that applies it produces wrong logits.
        tree["pre_logits/kernel"] = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
        tree["pre_logits/bias"] = (0.1 * rng.standard_normal(d)).astype(np.float32)
        np.savez(path, **tree)
    elif case.writer == "bv":
        tree = flax_tree(model, case, orig=False)
        np.savez(path, **{f"params/{k}": v for k, v in tree.items()})
    elif case.writer == "bv_scan_bf16":
        tree = flax_tree(model, case, orig=False, scanned=True)
        np.savez(path, **{k: to_bf16_void(v) for k, v in tree.items()})
    elif case.writer == "siglip":
        tree = {f"params/img/{k}": v for k, v in flax_tree(model, case, orig=False).items()}

        def rnd(*shape: int) -> np.ndarray:
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)

        # A two-tower file: a (tiny, dummy) text tower and the SigLIP temperature/bias
        # scalars next to the image tower. The loader must take only the 'img' sub-tree.
        tree.update({
            "params/txt/Embed_0/embedding": rnd(16, d),
            "params/txt/pos_embedding": rnd(1, 8, d),
            "params/txt/Encoder_0/encoder_norm/scale": 1.0 + rnd(d),
            "params/txt/Encoder_0/encoder_norm/bias": rnd(d),
            "params/txt/head/kernel": rnd(d, d),
            "params/txt/head/bias": rnd(d),
            "params/t": rnd(1),
            "params/b": rnd(1),
        })
        np.savez(path, **tree)
    elif case.writer == "pth":
        torch.save(state_dict_f32(model), path)
    elif case.writer == "pth_model":
        # MAE releases wrap the state dict: {'model': state_dict}.
        torch.save({"model": state_dict_f32(model)}, path)
    elif case.writer == "safetensors":
        safetensors.torch.save_file(state_dict_f32(model), str(path), metadata={"format": "pt"})
    else:
        raise ValueError(case.writer)


def assert_same_model(case: Case, what: str, ref: torch.nn.Module, got: torch.nn.Module,
                      images: np.ndarray) -> None:
    """Asserts two timm models have bit-identical parameters and identical outputs."""
    sd_ref, sd_got = ref.state_dict(), got.state_dict()
    if sd_ref.keys() != sd_got.keys():
        raise AssertionError(f"{case.name}: {what}: key sets differ")
    for k in sd_ref:
        if not torch.equal(sd_ref[k], sd_got[k]):
            diff = (sd_ref[k] - sd_got[k]).abs().max().item()
            raise AssertionError(f"{case.name}: {what}: parameter {k} differs (max {diff:g})")
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        if not torch.equal(ref(x), got(x)):
            raise AssertionError(f"{case.name}: {what}: outputs differ")


def load_timm_file(case: Case, path: Path) -> dict[str, torch.Tensor]:
    """Reads a .pth / .safetensors case file back as a flat state dict."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["model"] if case.writer == "pth_model" else obj


def verify_checkpoint(case: Case, model: VisionTransformer, out_dir: Path,
                      images: np.ndarray, tmp_dir: Path) -> None:
    """Reads the written file back with timm's own readers and compares with ``model``.

    Args:
        case: The case.
        model: The source model that was written (at ``case.source_image_size``).
        out_dir: Fixture directory holding the file.
        images: NHWC images at ``case.source_image_size``.
        tmp_dir: Scratch directory.
    """
    path = out_dir / case.file
    fresh = build_timm(case, case.source_image_size)
    if path.suffix == ".npz":
        npz_path = path
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        if any(a.dtype == np.dtype("V2") for a in arrays.values()):
            # timm reads raw-bf16 npz only through jax (load_bfloat16=True), which must not be
            # imported here; decode exactly to float32 and give timm that copy instead.
            assert all(a.dtype == np.dtype("V2") for a in arrays.values()), "mixed dtypes"
            npz_path = tmp_dir / f"{case.name}_f32.npz"
            np.savez(npz_path, **{k: from_bf16_void(a) for k, a in arrays.items()})
        # timm auto-detects the layout: 'params/' or 'params/img/' prefix, big_vision (no cls pos
        # entry) vs original numbering, and the scanned encoderblock.
        _load_weights(fresh, str(npz_path))
    else:
        fresh.load_state_dict(load_timm_file(case, path), strict=True)
    assert_same_model(case, f"timm reader of {case.file}", model, fresh, images)


def resample_pos_embed(pos: torch.Tensor, old: int, new: int, num_prefix: int) -> torch.Tensor:
    """timm's rule (bicubic, half-pixel, antialias) for the square patch part of a pos_embed.

    Args:
        pos: (1, num_prefix + old * old, D).
        old: Old grid side.
        new: New grid side.
        num_prefix: Leading entries (cls) kept as they are.

    Returns:
        (1, num_prefix + new * new, D).
    """
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False,
                         antialias=True)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new * new, d)], dim=1)


def build_resampled_model(case: Case, sd: dict[str, torch.Tensor],
                          images: np.ndarray) -> VisionTransformer:
    """Builds the golden model at ``case.image_size`` from a state dict for a smaller image.

    The patch part of pos_embed is resampled with our own F.interpolate call, which is
    cross-checked against timm's ``resample_abs_pos_embed`` and ``checkpoint_filter_fn``.
    """
    model = build_timm(case, case.image_size)
    old = case.source_image_size // case.patch
    new = case.image_size // case.patch
    assert not case.no_embed_class
    pos = resample_pos_embed(sd["pos_embed"], old, new, num_prefix=1)
    # timm's defaults, as its loaders resample.
    timm_pos = resample_abs_pos_embed(sd["pos_embed"], new_size=[new, new], num_prefix_tokens=1)
    if not torch.equal(pos, timm_pos):
        raise AssertionError(f"{case.name}: resample differs from timm's resample_abs_pos_embed")
    model.load_state_dict({**sd, "pos_embed": pos}, strict=True)
    # timm's own .pth path, with its default rule.
    via_filter = build_timm(case, case.image_size)
    via_filter.load_state_dict(checkpoint_filter_fn(dict(sd), via_filter), strict=True)
    assert_same_model(case, "timm checkpoint_filter_fn resample", model, via_filter, images)
    return model


# --------------------------------------------------------------------------------------------
# Golden outputs
# --------------------------------------------------------------------------------------------


def _forward_all(model: VisionTransformer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    feats: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, out: feats.append(out.detach()))
             for blk in model.blocks]
    try:
        with torch.no_grad():
            tokens = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        pre_logits = model.forward_head(tokens, pre_logits=True)
        logits = model(x)
    assert len(feats) == len(model.blocks)
    return {"logits": logits, "pre_logits": pre_logits, "tokens": tokens,
            "blocks": torch.stack(feats)}


def golden_outputs(case: Case, model: VisionTransformer, images: np.ndarray
                   ) -> dict[str, np.ndarray]:
    """timm's outputs for ``images`` (NHWC), computed in float64 and stored as float32.

    float64 makes the golden the (nearly) exact function of the stored fp32 weights, independent
    of thread count/BLAS; the fp32 timm forward is checked against it as a sanity bound.
    """
    m64 = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    out64 = _forward_all(m64, x.double())
    out32 = _forward_all(model, x)
    n_tok = int(case.class_token) + case.num_registers + (case.image_size // case.patch) ** 2
    expected = {
        "logits": (BATCH, case.num_classes),
        "pre_logits": (BATCH, case.width),
        "tokens": (BATCH, n_tok, case.width),
        "blocks": (case.depth, BATCH, n_tok, case.width),
    }
    for k, shape in expected.items():
        assert tuple(out64[k].shape) == shape, (case.name, k, out64[k].shape, shape)
        err = (out64[k] - out32[k].double()).abs().max().item()
        assert err < FP32_SANITY_ATOL, (case.name, k, err)
        print(f"    {k:10s} {str(shape):18s} |x|max={out64[k].abs().max().item():7.3f}"
              f"  fp32-vs-fp64={err:.1e}")
    return {k: v.to(torch.float32).numpy() for k, v in out64.items()}


def assert_all_params_matter(case: Case, model: VisionTransformer, images: np.ndarray) -> None:
    """Perturbs each parameter tensor in turn and requires the outputs to move.

    Guards the premise of the fixture: a loader that drops any parameter must fail the test.
    """
    m = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    gen = torch.Generator().manual_seed(0)

    def outputs() -> torch.Tensor:
        with torch.no_grad():
            tokens = m.forward_features(x)
            return torch.cat([tokens.flatten(), m.forward_head(tokens).flatten()])

    base = outputs()
    for name, p in m.named_parameters():
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        moved = (outputs() - base).abs().max().item()
        with torch.no_grad():
            p.copy_(saved)
        if moved < 1e-4:
            raise AssertionError(f"{case.name}: parameter {name} barely affects outputs ({moved})")


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def make_case(case: Case, out_dir: Path, tmp_dir: Path) -> dict[str, np.ndarray]:
    """Builds, writes, verifies one case and returns its golden arrays."""
    print(f"[{case.name}] -> {case.file}{case.file_suffix}")
    # crc32 of the name: a per-case seed that does not shift when cases are added or reordered.
    seeds = np.random.SeedSequence(zlib.crc32(case.name.encode())).spawn(3)
    param_rng, image_rng, extra_rng = (np.random.default_rng(s) for s in seeds)
    torch.manual_seed(0)  # timm's own init is overwritten, but keep construction deterministic

    model = build_timm(case, case.source_image_size)
    randomize_(model, param_rng)
    if case.writer == "bv_scan_bf16":
        # The file can only hold bf16, so the golden must be the output of the bf16 weights.
        round_to_bf16_(model)

    def uniform_images(size: int) -> np.ndarray:
        # Pixels already in the model's input space ([-1, 1], as big_vision/ViT expect).
        return image_rng.uniform(-1.0, 1.0, (BATCH, size, size, 3)).astype(np.float32)

    src_images = uniform_images(case.source_image_size)
    write_checkpoint(case, model, out_dir, extra_rng)
    verify_checkpoint(case, model, out_dir, src_images, tmp_dir)

    if case.checkpoint_image_size is not None:
        images = uniform_images(case.image_size)
        sd = load_timm_file(case, out_dir / case.file)
        model = build_resampled_model(case, sd, images)
    else:
        images = src_images
    assert_all_params_matter(case, model, images)
    golden = golden_outputs(case, model, images)
    return {"images": images, **golden}


def resample_references() -> dict[str, np.ndarray]:
    """PyTorch's resampling of random grids [side, side, D] by each torch rule, float64 (stored
    float32): ``resample/input/{side}`` and ``resample/{rule}/{side}/{h}x{w}``."""
    rng = np.random.default_rng(zlib.crc32(b"resample"))
    out: dict[str, np.ndarray] = {}
    for side in RESAMPLE_SOURCES:
        grid = rng.standard_normal((side, side, 3)).astype(np.float32)
        out[f"resample/input/{side}"] = grid
        x = torch.from_numpy(grid).double().permute(2, 0, 1)[None]
        for rule, antialias in RESAMPLE_RULES.items():
            for h, w in RESAMPLE_TARGETS:
                y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False,
                                  antialias=antialias)
                out[f"resample/{rule}/{side}/{h}x{w}"] = y[0].permute(1, 2, 0).numpy()
    # timm's loaders resample with its defaults; they must be the rule recorded as timm's.
    pos = torch.from_numpy(out[f"resample/input/{RESAMPLE_SOURCES[0]}"]).double()
    via_timm = resample_abs_pos_embed(pos.reshape(1, -1, pos.shape[-1]), new_size=[5, 5],
                                      num_prefix_tokens=0)
    ours = out[f"resample/bicubic_antialias/{RESAMPLE_SOURCES[0]}/5x5"]
    # (timm resamples in float32.)
    assert np.abs(via_timm.reshape(5, 5, -1).numpy() - ours).max() < 1e-5
    return out


def generate(out_dir: Path) -> None:
    """Writes the whole fixture (checkpoint files, golden.npz, manifest.json) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # fewer sources of run-to-run float noise
    golden: dict[str, np.ndarray] = {}
    manifest: dict[str, Any] = {
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            for k, v in make_case(case, out_dir, Path(tmp)).items():
                golden[f"{case.name}/{k}"] = np.ascontiguousarray(v, dtype=np.float32)
            entry: dict[str, Any] = {
                "file": case.file + case.file_suffix,
                "format": case.format,
                "image_size": case.image_size,
            }
            if case.checkpoint_image_size is not None:
                entry["checkpoint_image_size"] = case.checkpoint_image_size
            entry["model"] = case.model_kwargs()
            manifest["cases"][case.name] = entry
    golden.update({k: np.ascontiguousarray(v, dtype=np.float32)
                   for k, v in resample_references().items()})
    np.savez(out_dir / "golden.npz", **golden)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------------


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array in a fixture file, keyed by name (V2 raw-bf16 arrays keep their dtype)."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if path.suffix == ".safetensors":
        return {k: v.numpy() for k, v in safetensors.torch.load_file(str(path)).items()}
    if path.suffix == ".pth":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        flat: dict[str, np.ndarray] = {}

        def walk(prefix: str, o: Any) -> None:
            if isinstance(o, dict):
                for k, v in o.items():
                    walk(f"{prefix}{k}/", v)
            else:
                flat[prefix.rstrip("/")] = o.numpy()

        walk("", obj)
        return flat
    raise ValueError(f"unexpected fixture file {path}")


def compare_dirs(new: Path, ref: Path, atol: float) -> list[str]:
    """Compares a freshly generated fixture with the committed one.

    Args:
        new: Freshly generated fixture directory.
        ref: Committed fixture directory.
        atol: Max abs difference allowed per array element.

    Returns:
        Human-readable problems; empty when everything matches.
    """
    problems: list[str] = []
    names_new = {p.name for p in new.iterdir()}
    names_ref = {p.name for p in ref.iterdir()} if ref.is_dir() else set()
    problems += [f"missing from committed fixture: {n}" for n in sorted(names_new - names_ref)]
    problems += [f"not produced by this script: {n}" for n in sorted(names_ref - names_new)]
    n_arrays = 0
    for name in sorted(names_new & names_ref):
        if name.endswith(".json"):
            a = json.loads((new / name).read_text())
            b = json.loads((ref / name).read_text())
            if a != b:
                problems.append(f"{name}: content differs")
            continue
        arrs_new, arrs_ref = _read_arrays(new / name), _read_arrays(ref / name)
        if arrs_new.keys() != arrs_ref.keys():
            problems.append(f"{name}: keys differ: {sorted(arrs_new.keys() ^ arrs_ref.keys())}")
        for k in sorted(arrs_new.keys() & arrs_ref.keys()):
            a, b = arrs_new[k], arrs_ref[k]
            n_arrays += 1
            if a.dtype != b.dtype or a.shape != b.shape:
                problems.append(f"{name}:{k}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
                continue
            if a.dtype == np.dtype("V2"):
                a, b = from_bf16_void(a), from_bf16_void(b)
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
            if not diff <= atol:  # also catches NaN
                problems.append(f"{name}:{k}: max abs diff {diff:g} > {atol:g}")
    print(f"compared {len(names_new & names_ref)} files, {n_arrays} arrays")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="fixture directory (default: tests/fixtures/golden)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temp dir and compare with --out instead of writing")
    args = parser.parse_args(argv)
    if "jax" in sys.modules or "tensorflow" in sys.modules:
        raise RuntimeError("make_golden.py must run without jax/tensorflow imported")

    if not args.check:
        generate(args.out)
        total = sum(p.stat().st_size for p in args.out.iterdir())
        for p in sorted(args.out.iterdir()):
            print(f"  {p.stat().st_size:9d}  {p.name}")
        print(f"  {total:9d}  total  ({args.out})")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        problems = compare_dirs(Path(tmp), args.out, CHECK_ATOL)
    for p in problems:
        print("MISMATCH", p)
    print("check FAILED" if problems else "check OK: regenerated fixture matches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
