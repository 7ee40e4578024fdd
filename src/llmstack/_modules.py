"""Module helpers: lazily exported package names, and objects named by ``module:name`` import paths."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any],
                                                                          Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose public names load on first use.

    ``modules`` maps each defining module to the public names it provides, so importing the package stays fast.
    """
    names = {name: module for module, provided in modules.items() for name in provided}

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(getattr(sys.modules[package], "__all__", names))

    return __getattr__, __dir__


def import_object(path: str) -> Any:
    """The object an import path ``module:name`` names.

    Raises:
        ImportError: the module cannot be imported or has no such name (the message says which).
    """
    import importlib

    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError:
        raise ImportError(f"module {module!r} has no attribute {name!r}") from None
