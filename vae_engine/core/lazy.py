"""Lazy re-exports: a package names what its modules define without importing them (and torch, Numba, ONNX
Runtime with them) until a name is first used, so `vae-engine --help` and `info` start fast."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: name -> the sub-module (relative to `package`) defining it."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{table[name]}", package), name)

    return __getattr__
