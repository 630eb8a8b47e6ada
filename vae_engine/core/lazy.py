"""Lazy re-exports: a package names what its modules define without importing them (and torch, Numba, ONNX
Runtime with them) until a name is first used, so `vae-engine --help` and `info` start fast."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


def exports(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: name -> the sub-module (relative to `package`) defining it."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{table[name]}", package), name)

    return __getattr__


@contextlib.contextmanager
def without(module: str) -> Iterator[None]:
    """While inside, `import module` raises ImportError (a third party's optional import we never use, skipped
    while that library loads); afterwards it imports as ever. A process that imported it before is left as it is."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]  (the import system raises ImportError for None)
    try:
        yield
    finally:
        if sys.modules.get(module, 0) is None:
            del sys.modules[module]
