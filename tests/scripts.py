"""Loads experiments/ scripts as modules, the way `python experiments/NAME.py` runs them."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"


def load_script(name: str) -> ModuleType:
    """experiments/NAME.py as a module (once per process; experiments/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
