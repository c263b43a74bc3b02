"""A package's public names imported on first use, so ``import rlsubnet`` and ``rlsubnet --help`` stay instant."""

from __future__ import annotations

import importlib


def lazy_getattr(package: str, where: dict[str, str]):
    """A module ``__getattr__`` that imports the module ``where[name]`` on first access and returns its ``name``."""

    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
