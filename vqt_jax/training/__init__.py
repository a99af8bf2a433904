"""Pieces of the training loop: config checks, orbax checkpointing, metric writers."""
