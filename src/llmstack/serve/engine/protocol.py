"""The engine protocol: all the HTTP layer knows of an engine (a local object or a Ray Serve handle client).

Every :class:`~llmstack.serve.engine.base.Engine` satisfies it; the ABC adds what a replica needs besides.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard


@runtime_checkable
class EngineProtocol(Protocol):
    """What the HTTP layer may ask of an engine (local object or a Ray Serve handle client)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def abort(self, request_id: str) -> bool: ...

    async def check_health(self) -> None: ...

    async def models(self) -> list[ModelCard]: ...

