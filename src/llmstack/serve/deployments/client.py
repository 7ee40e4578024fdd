"""The engine protocol over a Ray Serve ``DeploymentHandle`` (to ``LLMServer``, or a router with its methods)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from llmstack.errors import LLMStackError, RequestError, model_not_found
from llmstack.serve.http.errors import overloaded_error
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard


class ServeEngineClient:
    """The engine protocol over a ``DeploymentHandle`` to ``LLMServer`` (or a router with the same methods).

    Adapter requests are sent with ``multiplexed_model_id`` so Serve routes them to replicas that
    hold the adapter and batches them apart from the base model.
    """

    CARDS_TTL_S: float | None = None  # how long the model list is reused (None: for the replica's life)

    def __init__(self, handle: Any, *, retry_after_s: float = 1.0) -> None:
        self.handle = handle
        self.retry_after_s = retry_after_s
        self._cards: list[ModelCard] | None = None
        self._cards_at = 0.0
        self._cards_lock = asyncio.Lock()

    async def models(self) -> list[ModelCard]:
        """The served models, fetched by one request at a time (a burst on a fresh replica sends one call,
        not one per request) and with backend errors translated like generation's (503 + Retry-After)."""
        if self._cards_fresh():
            return self._cards  # type: ignore[return-value]
        async with self._cards_lock:
            if not self._cards_fresh():
                self._cards = await self._call(self.handle.models)
                self._cards_at = time.monotonic()
        return self._cards  # type: ignore[return-value]

    def _cards_fresh(self) -> bool:
        if self._cards is None:
            return False
        return self.CARDS_TTL_S is None or time.monotonic() - self._cards_at <= self.CARDS_TTL_S

    async def _call(self, method: Any, *args: Any) -> Any:
        """``await method.remote(*args)``: backend errors translated (503 + Retry-After for shedding), and
        the call cancelled downstream when the caller is (client gone or timed out)."""
        response = method.remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            _cancel(response)
            raise
        except Exception as exc:
            raise self._translate(exc) from None

    async def route(self, model: str) -> str | None:
        """The multiplexed model id for ``model`` (None for the base); 404 for a model nobody serves."""
        cards = await self.models()
        for card in cards:
            if model == card.id or model == card.root or model in card.aliases:
                return card.id if card.parent else None
        raise model_not_found(model, [c.id for c in cards])

    async def _target(self, request: GenerationRequest, *, stream: bool = False) -> Any:
        adapter = await self.route(request.model)
        options: dict[str, Any] = {"stream": True} if stream else {}
        if adapter:
            options["multiplexed_model_id"] = adapter
        return self.handle.options(**options) if options else self.handle

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self._call((await self._target(request)).generate, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        target = await self._target(request, stream=True)
        async with contextlib.aclosing(self._relay(target.stream.remote(request))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _relay(self, responses: Any) -> AsyncIterator[GenerationChunk]:
        """Chunks of a streaming Serve response: errors re-raised as llmstack errors, the call cancelled
        downstream when the consumer stops early."""
        finished = False
        try:
            async for item in responses:
                yield item
            finished = True
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._translate(exc) from None
        finally:
            if not finished:
                _cancel(responses)

    async def abort(self, request_id: str) -> bool:
        return await self._call(self.handle.abort, request_id)

    async def check_health(self) -> None:
        await self._call(self.handle.check_health)

    def _translate(self, exc: BaseException) -> LLMStackError:
        """A backend failure as the caller's error: the replica's own llmstack error (from inside Ray's wrapper),
        503 + Retry-After for shedding, else 503 backend unavailable (naming the failure's type only)."""
        if isinstance(exc, LLMStackError) and getattr(exc, "cause", None) is None:
            return exc
        if isinstance(getattr(exc, "cause", None), LLMStackError):
            return exc.cause  # type: ignore[union-attr, return-value]
        shed = overloaded_error(exc, default_retry_after_s=self.retry_after_s)
        if shed is not None:
            return shed
        return RequestError(f"model backend unavailable ({type(exc).__name__}); retry shortly", status_code=503,
                           type="service_unavailable", code="backend_unavailable",
                           headers={"Retry-After": str(max(1, int(self.retry_after_s)))})



def _cancel(response: Any) -> None:
    """Cancel a Serve call downstream. Best effort: a call that already failed has nothing left to cancel, and
    Ray's ``cancel()`` re-raises that failure (e.g. the BackPressureError of a shed stream) from its router
    loop, which must not replace the translated error the caller is handling."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - the call's own outcome is what the caller reports
        pass
