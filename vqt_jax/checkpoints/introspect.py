"""The model options a checkpoint file determines, read from its keys and shapes only.

The resolve step (`vqt_jax.resolve`) fills the `config.model` fields left 'auto' from them
before the model is built. Only a safetensors file's JSON header and an npz file's member
headers are read, so the weights are read once, by the loader; a torch pickle has no header
to read, so it is read whole.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Any

import numpy as np

from vqt_jax.checkpoints import files, layouts, split_subtree
from vqt_jax.checkpoints.files import CheckpointError
from vqt_jax.models.vit import VARIANTS, variant_name

# config.model fields a file can determine, and their values where nothing sets them (no file,
# an http(s) file not downloaded yet, or a file that does not tell: npz files do not record
# their activation).
DEFAULTS: dict[str, Any] = {"variant": "B/16", "layerscale": False, "num_registers": 0,
                            "pool_type": "tok", "mlp_act": "gelu_tanh"}


def shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the checkpoint at a local or gs:// `path`.

    Raises:
      FileNotFoundError, CheckpointError: as `files.read`, which names the problem.
    """
    # From the headers of a safetensors or npz file. Any failure falls through to files.read
    # below, which raises the error that names it; so does a torch zip, which has no header.
    with contextlib.suppress(Exception), files.open_file(path) as f:
        kind = files._container(f)
        if kind == "safetensors":
            entries, _ = files._safetensors_entries(f)
            return {k: tuple(shape) for k, (_, shape, _, _) in entries.items()}
        if kind == "npz":
            with zipfile.ZipFile(f) as z:
                out = {}
                for name in z.namelist():
                    with z.open(name) as m:
                        major, _ = np.lib.format.read_magic(m)
                        read = (np.lib.format.read_array_header_1_0 if major == 1
                                else np.lib.format.read_array_header_2_0)
                        out[name[:-4]] = tuple(read(m)[0])
                return out
    kind, contents = files.read(path)
    flat = layouts.unwrap_state_dict(contents) if kind == "torch" else contents
    return {k: tuple(np.shape(v)) for k, v in flat.items()}


def model_options(init: str, download: bool = False) -> dict[str, Any] | None:
    """What the checkpoint `init` (a path, URL or `file.npz:img`) determines of the model.

    An http(s) file is read from the download cache, where `download` puts it first (as a run
    would); without it, nothing is read over the network.

    Returns:
      {'variant' ('S/14', or None for sizes no named variant has), 'layerscale',
      'num_registers', 'pool_type', 'mlp_act' (None where the file does not tell),
      'described' (e.g. 'ViT-S/14 (width 384, depth 12, patch 14)')}; None for an http(s)
      file not downloaded (yet).

    Raises:
      FileNotFoundError, CheckpointError: the file is missing, unreadable or no known layout.
    """
    path, sub = split_subtree(init)
    if path.startswith(("http://", "https://")):
        if download:
            files.open_file(path).close()
        path = files.cache_path(path)
        if not os.path.exists(path):
            return None
    keys = shapes(path)
    try:
        layout, prefix = layouts.detect(keys, sub)
    except CheckpointError as e:
        raise CheckpointError(f"{init}: {e}") from None
    told = layout.options({k[len(prefix):]: s for k, s in keys.items() if k.startswith(prefix)})
    width, depth, patch = told.pop("width"), told.pop("depth"), told.pop("patch")
    told["variant"] = next((f"{name}/{patch}" for name, v in VARIANTS.items()
                            if (v["width"], v["depth"]) == (width, depth)), None)
    told["described"] = variant_name(width, depth, patch) + (
        f" (width {width}, depth {depth}, patch {patch})" if told["variant"] else "")
    return told
