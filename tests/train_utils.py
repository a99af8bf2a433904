"""Tiny training configs and data for the training tests."""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image

from configs import vtab

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden"
TINY_MODEL = dict(variant=None, patch_size=(8, 8), width=48, depth=2, mlp_dim=192, num_heads=4,
                  num_queries=2)


def make_image_folder(root: str | os.PathLike, counts=(("train", 8), ("val", 4), ("test", 5)),
                      num_classes: int = 3, size: int = 20, seed: int = 0) -> str:
    """Writes ROOT/{split}/class{c}/{i}.png: noise with one colour channel raised per class."""
    rng = np.random.default_rng(seed)
    for split, per_class in counts:
        for c in range(num_classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 160, (size, size, 3), dtype=np.uint8)
                img[..., c] = 230
                Image.fromarray(img).save(os.path.join(d, f"{i}.png"))
    return str(root)


def tiny_config(task: str = "folder", data_dir: str | None = None, **overrides):
    """configs/vtab.py with a tiny ViT initialised from the golden big_vision file."""
    c = vtab.get_config(task)
    c.data_dir = data_dir
    c.init = str(GOLDEN / "bv_vit.npz")
    c.model.update(TINY_MODEL)
    c.image_size = 32
    c.batch_size = 8
    c.eval_batch_size = 8
    c.epochs = 6
    c.warmup_epochs = 1
    c.lr = 0.05
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    for k, v in overrides.items():
        c[k] = v
    return c
