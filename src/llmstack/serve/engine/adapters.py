"""The adapters an engine serves on its one base model: which are loaded, who is using them, which is active.

Adapters are loaded lazily (on the engine thread) and unloaded when evicted, but never while a
request that uses them is still decoding: the unload waits for the last user.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from llmstack.errors import LLMStackError, RequestError
from llmstack.models.adapters import adapter_context, attach_adapter, detach_adapter
from llmstack.serve.engine.loading import AdapterSpec


class AdapterSlots:
    """Adapter bookkeeping for one engine. ``model`` is the base, wrapped by peft once an adapter is attached."""

    def __init__(self, model: Any, specs: Iterable[AdapterSpec], *, stats: dict[str, int],
                 on_unload: Callable[[str, str], None] | None = None) -> None:
        self.model = model
        self.on_unload = on_unload  # called with (served id, load name) once an adapter's weights are dropped
        self.specs: dict[str, AdapterSpec] = {a.id: a for a in specs}
        self.stats = stats
        self._loaded: dict[str, str] = {}  # served id -> name inside the peft model
        self._users: dict[str, int] = {}
        self._pending_unload: set[str] = set()
        self._default: str | None = None  # attached adapter that *is* the served model (adapter-as-model)

    def attach_default(self, directory: Path) -> None:
        """The served model is itself an adapter on its base: active whenever no other adapter is asked for."""
        from llmstack.models import describe_artifact

        self.model = attach_adapter(self.model, describe_artifact(directory), "default")
        self._default = "default"

    def note_default(self) -> None:
        """The loaded model already carries its adapter as ``"default"`` (``load_artifact`` of an adapter)."""
        self._default = "default"

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def load_name(self, adapter: str) -> str:
        """The name of this load of ``adapter`` inside the peft model: a reload gets a new one."""
        return self._loaded[adapter]

    def is_loaded(self, adapter: str) -> bool:
        return adapter in self._loaded

    def use(self, adapter: str) -> None:
        """Count a user of ``adapter`` (it will not be unloaded until :meth:`done` balances this)."""
        self._users[adapter] = self._users.get(adapter, 0) + 1
        self._pending_unload.discard(adapter)

    def done(self, adapter: str) -> bool:
        """One user fewer; True when an unload was waiting for the last one."""
        self._users[adapter] -= 1
        return self._users[adapter] <= 0 and adapter in self._pending_unload

    def load(self, adapter: str) -> None:
        """Load ``adapter`` into the model (engine thread only)."""
        if adapter in self._loaded:
            return
        spec = self.specs[adapter]
        name = f"a{len(self._loaded)}_{self.stats['adapter_loads']}"
        try:
            self.model = attach_adapter(self.model, spec.describe(), name)
        except LLMStackError:
            raise
        except Exception as exc:
            raise RequestError(f"cannot load adapter {adapter!r}: {type(exc).__name__}: {exc}", status_code=500,
                               type="server_error", code="adapter_load_failed") from None
        self._loaded[adapter] = name
        self.stats["adapter_loads"] += 1

    def unload(self, adapter: str) -> None:
        """Drop ``adapter``'s weights now, or as soon as its last running request ends (engine thread only)."""
        if adapter not in self._loaded:
            return
        if self._users.get(adapter, 0) > 0:
            self._pending_unload.add(adapter)
            return
        self._pending_unload.discard(adapter)
        name = self._loaded.pop(adapter)
        self.model = detach_adapter(self.model, name)
        self.stats["adapter_unloads"] += 1
        if self.on_unload is not None:
            self.on_unload(adapter, name)

    def select(self, adapter: str | None) -> Any:
        """Activate ``adapter`` (None: the served model) and return the context to run the forward pass in."""
        if adapter is None:
            # The served model: an adapter-as-model computes with its "default" adapter outside any context.
            return contextlib.nullcontext() if self._default else adapter_context(self.model, None)
        return adapter_context(self.model, self._loaded[adapter])
