"""Loading pretrained ViT checkpoints into the backbone of a vqt_jax ViT.

    variables = model.init(rng, dummy_images)
    variables = checkpoints.load("gs://vit_models/imagenet21k/ViT-B_16.npz", variables,
                                 image_size=224)

Supported (see `layouts.LAYOUTS` and `files.read`): original vision_transformer `.npz`,
big_vision `.npz` (`params/` prefix or not, scanned or not, bfloat16 stored as void,
`file.npz:img` sub-trees, SigLIP's MAP head), and timm-layout PyTorch `.pth`/`.bin`/
`.safetensors` (MAE, DINOv2 with or without registers, CLIP, SigLIP, supervised timm), from
local, `gs://` or `http(s)://` paths. A position embedding of another grid is resampled by the
checkpoint family's rule (`resample`), or the one asked for.

Loading is all-or-nothing: every check (readable file, layout, width/depth/patch, unknown and
missing keys, shapes) runs before anything is returned, and the input variables are never
modified.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from vqt_jax.checkpoints import files, layouts, resample
from vqt_jax.checkpoints.files import CheckpointError
from vqt_jax.models.vit import variant_name

__all__ = ["CheckpointError", "load", "place", "read_backbone", "split_subtree"]

_BLOCK = r"Transformer/encoderblock_(\d+)/"
# Model parameters that a checkpoint does not provide by default: the task head is new.
DEFAULT_DONT_LOAD = ("head/.*",)

# Hints for the usual reason behind an unknown or missing key: a model option that does not
# match the checkpoint's architecture. (pattern, where the key is: 'unknown' (the checkpoint
# has it, the model not), 'missing' (the reverse) or 'any', the hint.)
_HINTS = [
    (r"norm_pre/", "any", "the checkpoint has a LayerNorm before the blocks (CLIP): pre_norm=True"),
    (r".*LayerScale_", "unknown", "the checkpoint has LayerScale (DINOv2): "
                                  "--config.model.layerscale=True (or 'auto')"),
    (r".*LayerScale_", "missing", "the checkpoint has no LayerScale: "
                                  "--config.model.layerscale=False (or 'auto')"),
    (r".*/(query|key|value)/bias", "any", "qkv_bias differs between the checkpoint and the model"),
    (r"cls$", "any", "class_token differs between the checkpoint and the model"),
    (r"MAPHead_0/", "unknown", "the checkpoint pools with a MAP head (SigLIP): "
                               "model.pool_type='map'"),
    (r"MAPHead_0/", "missing", "the checkpoint has no MAP head: model.pool_type='tok' (class "
                               "token) or 'gap'"),
    (r"registers$", "unknown", "the checkpoint has register tokens (DINOv2 with registers): "
                               "model.num_registers={registers}"),
    (r"registers$", "missing", "the checkpoint has no register tokens: model.num_registers=0"),
]


def place(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Puts every leaf of `tree` on `sharding` as a global array, without cross-host checks.

    Use it for values every host already holds (a loaded checkpoint, fresh parameters): each
    host builds its own shards from its own copy (`jax.make_array_from_callback`). With several
    processes, `jax.device_put(numpy_tree, global_sharding)` instead all-gathers every leaf to
    assert that the hosts agree, which for a whole backbone costs a collective per parameter;
    here nothing is compared, so the hosts must pass the same values.

    Args:
      tree: a pytree of numpy arrays, Python scalars or `jax.Array`s. A `jax.Array` already on
        an equivalent sharding is returned as it is; a non-fully-addressable one (another
        multi-host layout) is resharded with `jax.device_put` (a reshard, no equality check);
        any other (a local, e.g. single-device, array) is read back to the host first.
      sharding: the target sharding, e.g. `NamedSharding(mesh, P())` (replicated).

    Returns:
      The tree with every leaf a `jax.Array` on `sharding` (dtypes canonicalised as jax does:
      float64 becomes float32 unless x64 is enabled).
    """
    def one(x):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if not x.is_fully_addressable:
                return jax.device_put(x, sharding)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                                impl=jax.random.key_impl(x))
        host = np.asarray(x)
        host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def split_subtree(path: str) -> tuple[str, str | None]:
    """Splits big_vision's `file.npz:img` sub-tree suffix off a path (URL schemes are kept)."""
    head, sep, tail = path.rpartition(":")
    if sep and head and re.fullmatch(r"[A-Za-z_]\w*", tail) and not head.endswith(":/"):
        return head, tail
    return path, None


def read_backbone(path: str, num_heads: int) -> tuple[dict[str, np.ndarray], str]:
    """Reads a checkpoint file into the canonical flat layout (see `layouts`).

    Returns:
      (canonical {key: array}, the family's rule for resampling the position embedding: a name
      in `resample.RULES`).
    """
    file_path, sub = split_subtree(path)
    kind, contents = files.read(file_path)
    flat = layouts.unwrap_state_dict(contents) if kind == "torch" else contents
    try:
        layout, prefix = layouts.detect(flat, sub)
        return layout.convert(flat, prefix, num_heads), layout.resample_rule(flat, prefix)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _describe(kernel_shape: Sequence[int], keys: Sequence[str]) -> str:
    """The variant of a patch-embedding kernel [p, p, C, width] and the blocks in `keys`."""
    width, depth, patch = kernel_shape[-1], layouts.depth(keys, _BLOCK), kernel_shape[0]
    return f"{variant_name(width, depth, patch)} (width {width}, depth {depth}, patch {patch})"


def _hints(unknown: Sequence[str], missing: Sequence[str], canon: Mapping[str, Any]) -> list[str]:
    keys = {"unknown": unknown, "missing": missing, "any": [*unknown, *missing]}
    registers = canon["registers"].shape[1] if "registers" in canon else 0
    return sorted({msg.format(registers=registers) for pattern, where, msg in _HINTS
                   for k in keys[where] if re.match(pattern, k)})


def load(path: str, variables: Mapping[str, Any], *, image_size: int | Sequence[int] | None = None,
         dont_load: Sequence[str] = DEFAULT_DONT_LOAD, resample_rule: str = resample.AUTO
         ) -> dict[str, Any]:
    """Fills the backbone of `variables` from a pretrained checkpoint.

    Args:
      path: checkpoint path or URL; `file.npz:img` loads big_vision's `img` sub-tree.
      variables: the model's variables (from `model.init`); `params` is filled, every other
        collection (e.g. `queries`) is returned unchanged.
      image_size: the image size the model will see (int or (h, w)); checked against the patch
        size and the model's position-embedding grid. Default: the grid of `variables`,
        assumed square.
      dont_load: regular expressions (full match) of parameter paths to keep at their fresh
        initialisation; the head by default.
      resample_rule: how the position embedding is resampled to another grid: a name in
        `resample.RULES`, or 'auto', the checkpoint family's own rule (big_vision and
        vision_transformer files: 'bilinear_corners'; timm files: 'bicubic_antialias';
        Meta's own DINOv2 files: 'bicubic').

    Returns:
      New variables with the backbone parameters replaced (cast to the model's dtypes); the
      position embedding is resampled to the model's grid.

    Raises:
      FileNotFoundError: the file does not exist.
      CheckpointError (a ValueError): unreadable file, unknown layout, another architecture
        than the model, unknown or missing keys, mismatched shapes, or NaN/inf weights; each
        names the problem.
      ValueError: image_size is not a multiple of the patch size or does not match the model.
    """
    params = flax.traverse_util.flatten_dict(dict(variables["params"]), sep="/")
    patch = tuple(params["embedding/kernel"].shape[:2])
    query_kernel = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    num_heads = params[query_kernel].shape[1]  # kernels are [D, H, Dh]
    n_pos = params["pos_embedding"].shape[1] if "pos_embedding" in params else None
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if any(s <= 0 or s % p for s, p in zip(size, patch, strict=True)):
            raise ValueError(f"image_size {size[0]}x{size[1]} is not a multiple of the patch size "
                             f"{patch[0]}x{patch[1]}")
        grid = (size[0] // patch[0], size[1] // patch[1])
        if n_pos is not None and grid[0] * grid[1] != n_pos:
            raise ValueError(f"image_size {size[0]}x{size[1]} gives a {grid[0]}x{grid[1]} grid but "
                             f"the model was initialised with {n_pos} patches: init it at this "
                             f"image size")
    elif n_pos is not None:
        grid = (int(round(np.sqrt(n_pos))),) * 2

    resample.check_rule(resample_rule)
    canon, rule = read_backbone(path, num_heads)
    rule = rule if resample_rule == resample.AUTO else resample_rule

    # Architecture first: one clear message instead of a list of shape mismatches.
    if "embedding/kernel" in canon:
        c_kernel = canon["embedding/kernel"].shape
        c_desc = _describe(c_kernel, list(canon))
        m_desc = _describe(params["embedding/kernel"].shape, list(params))
        if c_desc != m_desc or tuple(c_kernel[:2]) != patch:
            name = c_desc.split(" ")[0].removeprefix("ViT-")
            fix = (f"set --config.model.variant={name} (or 'auto')" if "/" in name else
                   "build the model with the checkpoint's sizes")
            raise CheckpointError(f"{path}: the checkpoint is {c_desc} but the model is {m_desc}; "
                                  f"{fix}")

    cls_pos = canon.pop("cls_pos", None)
    if cls_pos is not None and "cls" in canon:
        canon["cls"] = canon["cls"] + cls_pos

    skipped = lambda k: any(re.fullmatch(p, k) for p in dont_load)
    canon = {k: v for k, v in canon.items() if not skipped(k)}
    unknown = sorted(set(canon) - set(params))
    missing = sorted(k for k in params if k not in canon and not skipped(k))
    if unknown or missing:
        # The likely cause first, and a few keys of each list: a model option that differs
        # from the file leaves every block's keys unmatched.
        hints = _hints(unknown, missing, canon)
        few = lambda keys: f"{keys[:3]}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        lines = [f"{path}: the checkpoint does not match the model's parameters"
                 + (f"; likely cause: {'; '.join(hints)}." if hints else ".")]
        if unknown:
            lines.append(f"Keys in the checkpoint that the model does not have: {few(unknown)}")
        if missing:
            lines.append(f"Model parameters missing from the checkpoint: {few(missing)}")
        raise CheckpointError("\n".join(lines))

    pos = canon.get("pos_embedding")
    if pos is not None and pos.shape != params["pos_embedding"].shape:
        n, d = pos.shape[1], pos.shape[2]
        side = int(round(np.sqrt(n)))
        if side * side != n:
            raise CheckpointError(f"{path}: position embedding of {n} entries is not a square grid")
        pos = resample.resample_grid(pos.reshape(side, side, d), tuple(grid), rule)
        canon["pos_embedding"] = pos.reshape(1, grid[0] * grid[1], d)

    if bad := [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(params[k].shape)}"
               for k, v in canon.items() if tuple(v.shape) != tuple(params[k].shape)]:
        raise CheckpointError(f"{path}: shapes do not match the model:\n  " + "\n  ".join(bad))

    # NaN/inf weights load silently and only show up later as a diverging loss, which looks
    # like a learning-rate problem; name them here.
    if nonfinite := files.nonfinite_keys(canon):
        n = len(nonfinite)
        raise CheckpointError(f"{path}: {n} tensor{'s hold' if n > 1 else ' holds'} NaN or inf "
                              f"values, e.g. {', '.join(nonfinite[:3])}")

    new = {**params, **{k: jax.numpy.asarray(np.asarray(v, dtype=np.float32), dtype=params[k].dtype)
                        for k, v in canon.items()}}
    return {**variables, "params": flax.traverse_util.unflatten_dict(new, sep="/")}
