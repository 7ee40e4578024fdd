"""Let a subpackage that shares its name with a public function be called as that function.

``llmstack.train`` is both the package ``llmstack/train/`` and the function ``train()``. Once the
package is imported, Python binds ``llmstack.train`` to the module, so the module forwards calls.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Make ``sys.modules[module_name](...)`` call ``function(...)``."""

    class CallableModule(types.ModuleType):
        @functools.wraps(function)
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule


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
