"""absl's process-wide verbosity, set for a test and restored (no jax: conftest imports it)."""

import contextlib
from collections.abc import Iterator

from absl import logging as absl_logging


@contextlib.contextmanager
def info() -> Iterator[None]:
    """absl at INFO inside, then its verbosity and its logger's level as they were.

    absl's default verbosity is WARNING. Until something sets a verbosity, absl's logger has
    no level of its own and follows caplog's; afterwards it keeps the one set (and drops INFO
    records caplog would keep), so both are restored.
    """
    logger = absl_logging.get_absl_logger()
    verbosity, level = absl_logging.get_verbosity(), logger.level
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
        logger.setLevel(level)
