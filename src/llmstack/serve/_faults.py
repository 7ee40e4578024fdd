"""TEST/FAULT INJECTION ONLY: a model deployment that misbehaves on purpose, to exercise canary rollback.

Used by the canary integration tests (through tests/integration/canary/faults.py) and
benchmarks/canary_bench.py, as ``{"deployment": "llmstack.serve._faults:FaultInjectingLLMServer"}``. It lives in
the package, not in tests/, so Ray workers and the benchmarks import it like any llmstack module. Never used by
the library itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from llmstack.serve.deployments.server import LLMServer
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult

FAULTS = ("raise", "garbage", "slow", "paced")

_BaseServer: Any = LLMServer.func_or_class


class FaultInjectingLLMServer(_BaseServer):  # type: ignore[misc, valid-type]
    """TEST/FAULT INJECTION ONLY: an ``LLMServer`` that misbehaves on purpose, to exercise canary rollback.

    ``raise``: every generation raises; ``garbage``: outputs are replaced by one repeated token;
    ``slow``: every request waits ``delay_s`` first; ``paced``: every streamed chunk waits ``delay_s`` before it
    is sent and a non-streamed request waits ``delay_s`` per token it may generate (so a test can kill a replica
    while a request is surely in flight). A canary version runs it with
    ``{"deployment": "faults:FaultInjectingLLMServer", "deployment_args": {"fault": "raise"}}``.
    """

    def __init__(self, config: dict[str, Any], fault: str | None = None, delay_s: float = 2.0) -> None:
        super().__init__(config)
        self.fault = fault
        self.delay_s = delay_s

    async def set_fault(self, fault: str | None, delay_s: float | None = None) -> None:
        """TEST/FAULT INJECTION ONLY: switch the injected fault (None: behave) without a restart."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS} or None, got {fault!r}")
        self.fault = fault
        if delay_s is not None:
            self.delay_s = delay_s

    async def _before(self) -> None:
        if self.fault == "slow":
            await asyncio.sleep(self.delay_s)
        elif self.fault == "raise":
            raise RuntimeError("injected fault (test only): this version raises on every request")

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        await self._before()
        if self.fault == "paced":
            await asyncio.sleep(self.delay_s * (request.sampling.max_tokens or 1))
        result = await super().generate(request)
        if self.fault == "garbage" and isinstance(result, GenerationResult):
            for choice in result.choices:
                n = max(8, len(choice.token_ids))
                choice.text, choice.token_ids = "\ufffd" * n, [0] * n
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        await self._before()
        async for item in super().stream(request):
            if self.fault == "garbage" and isinstance(item, GenerationChunk):
                for delta in item.deltas:
                    delta.text, delta.token_ids = "\ufffd" * max(1, len(delta.token_ids)), [0] * len(delta.token_ids)
            if self.fault == "paced":
                await asyncio.sleep(self.delay_s)
            yield item
