"""vqt_jax: Visual Query Tuning (CVPR 2023) for frozen Vision Transformers in JAX/Flax."""

import os

__version__ = "0.1.0"

# etils.epath serves gs:// through tf.io.gfile wherever TensorFlow is importable (the [prepare]
# extra), importing TensorFlow at the first remote path; vqt_jax runs without it, so fsspec
# serves them. epath reads this at the process's first file operation, so it is set when any
# part of the package is imported.
os.environ.setdefault("EPATH_USE_TF", "false")
