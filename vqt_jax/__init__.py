"""vqt_jax: Visual Query Tuning (CVPR 2023) for frozen Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"
