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
