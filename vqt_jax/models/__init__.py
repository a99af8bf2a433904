"""Models: the Vision Transformer with Visual Query Tuning."""

from vqt_jax.models.vit import VARIANTS, ViT, create_model, decode_variant, variant_name

__all__ = ["VARIANTS", "ViT", "create_model", "decode_variant", "variant_name"]
