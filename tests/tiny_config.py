"""A tiny folder-task config for tests that run main.py: --config=tests/tiny_config.py:ROOT."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import train_utils  # noqa: E402


def get_config(arg: str):
    return train_utils.tiny_config(data_dir=arg, epochs=3)
