"""JAX's persistent compilation cache, pointed where `config.compilation_cache_dir` says.

A VTAB-1k sweep compiles the same programs for every task and every re-run (the same model,
batch and stage shapes); with the cache on disk a re-run, a resumed run or the next task of the
same shapes loads them instead of compiling again (minutes on a pod for ViT-L).

The setting is process-wide (it is JAX's), so the first run of a process decides where the
cache lives; a later run that asks for another directory is told so in the log.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def enable(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns the directory in use (None: off).

    Args:
      directory: where compiled programs are kept. None: the directory JAX already uses (set
        by $JAX_COMPILATION_CACHE_DIR or an earlier call), else $VQT_JAX_CACHE/xla (default
        ~/.cache/vqt_jax/xla). '': leave the cache as it is (off unless something else turned
        it on).
    """
    from vqt_jax.checkpoints import files  # noqa: PLC0415 (the cache dir's one definition)

    current = jax.config.jax_compilation_cache_dir
    if directory == "":
        return current
    directory = directory or current or os.path.join(files.cache_dir(), "xla")
    if "://" not in directory:
        directory = os.path.abspath(os.path.expanduser(directory))
    if current and current != directory:
        logging.info("JAX's compilation cache stays in %s (this process set it first; %s is "
                     "not used).", current, directory)
    elif not current:
        jax.config.update("jax_compilation_cache_dir", directory)
        logging.info("JAX's persistent compilation cache: %s", directory)
    return current or directory
