"""The adapters an engine serves on its one base model: which are loaded, who is using them, which is active.

Adapters are loaded lazily (on the engine thread) and unloaded when evicted, but never while a
request that uses them is still decoding: the unload waits for the last user.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmstack.errors import ModelLoadError, RequestError
from llmstack.serve.engine.loading import AdapterSpec


class AdapterSlots:
    """Adapter bookkeeping for one engine. ``model`` is the base, wrapped by peft once an adapter is attached."""

    def __init__(self, model: Any, specs: Iterable[AdapterSpec], *, stats: dict[str, int]) -> None:
        self.model = model
        self.specs: dict[str, AdapterSpec] = {a.id: a for a in specs}
        self.stats = stats
        self._loaded: dict[str, str] = {}  # served id -> name inside the peft model
        self._users: dict[str, int] = {}
        self._pending_unload: set[str] = set()
        self._default: str | None = None  # attached adapter that *is* the served model (adapter-as-model)

    def attach_default(self, directory: Path) -> None:
        """The served model is itself an adapter on its base: active whenever no other adapter is asked for."""
        self._default = self._attach(directory, "default")

    def loaded(self) -> list[str]:
        return list(self._loaded)

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
        try:
            name = self._attach(spec.directory(), f"a{len(self._loaded)}_{self.stats['adapter_loads']}")
        except RequestError:
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
        remaining = [n for n in self.model.peft_config if n != name]
        if remaining:
            if getattr(self.model, "active_adapter", None) == name:
                self.model.set_adapter(remaining[0])
            self.model.delete_adapter(name)
        self.stats["adapter_unloads"] += 1

    def select(self, adapter: str | None) -> Any:
        """Activate ``adapter`` (None: the served model) and return the context to run the forward pass in."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return contextlib.nullcontext()
        name = self._loaded.get(adapter) if adapter else self._default
        if name is None:
            return self.model.disable_adapter()
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
        return contextlib.nullcontext()

    def _attach(self, directory: Path, name: str) -> str:
        from peft import PeftModel

        if not (directory / "adapter_config.json").is_file():
            raise ModelLoadError(f"{directory.name} holds no adapter_config.json: not a peft adapter")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(directory), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(directory), adapter_name=name)
        self.model.eval()
        return name
