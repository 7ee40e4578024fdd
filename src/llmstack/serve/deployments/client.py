"""The engine protocol over a Ray Serve ``DeploymentHandle`` (to ``LLMServer``, or a router with its methods)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from llmstack.errors import LLMStackError, RequestError, model_not_found
from llmstack.serve.http.errors import overloaded_error
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult, ModelCard


RESUME_ATTEMPTS = 2  # times one request is resumed on another replica after its replica died


class ReplicaLost(Exception):
    """The replica serving a call died (or became unreachable) before answering in full; ``error`` is what the
    caller sees when the request cannot be resumed."""

    def __init__(self, error: LLMStackError) -> None:
        super().__init__(str(error))
        self.error = error


def replica_died(exc: BaseException) -> bool:
    """Whether ``exc`` (or a cause inside Ray's and Serve's wrappers) says the actor that served the call died or
    is unreachable: ``RayActorError`` and its subclasses ``ActorDiedError`` and ``ActorUnavailableError``."""
    if "ray.exceptions" not in sys.modules:  # Ray never loaded: no actor can have died
        return False
    from ray.exceptions import RayActorError

    cause: BaseException | None = exc
    for _ in range(16):
        if cause is None or isinstance(cause, LLMStackError):  # a replica's own answer, not its death
            return False
        if isinstance(cause, RayActorError):
            return True
        cause = getattr(cause, "cause", None) or cause.__cause__
    return False


class ServeEngineClient:
    """The engine protocol over a ``DeploymentHandle`` to ``LLMServer`` (or a router with the same methods).

    Adapter requests are sent with ``multiplexed_model_id`` so Serve routes them to replicas that
    hold the adapter and batches them apart from the base model.

    A request whose replica dies is resumed on another one (up to ``resume_attempts`` times): a stream
    continues after the token ids already delivered (sent as ``resume_token_ids``; the client sees one
    stream, with usage counted against the original prompt), a non-streamed request is sent again.
    """

    CARDS_TTL_S: float | None = None  # how long the model list is reused (None: for the replica's life)

    def __init__(self, handle: Any, *, retry_after_s: float = 1.0, resume_attempts: int = RESUME_ATTEMPTS) -> None:
        self.handle = handle
        self.retry_after_s = retry_after_s
        self.resume_attempts = resume_attempts
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
        try:
            return await self._call_once(method, *args)
        except ReplicaLost as lost:
            raise lost.error from None

    async def _call_once(self, method: Any, *args: Any) -> Any:
        """Like :meth:`_call`, but a dead replica raises :class:`ReplicaLost` (the caller may resume)."""
        response = method.remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            _cancel(response)
            raise
        except Exception as exc:
            raise self._failure(exc) from None

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
        """The request's result; sent again (nothing of it was delivered yet) when its replica dies."""
        resumes = 0
        while True:
            try:
                result: GenerationResult = await self._call_once((await self._target(request)).generate, request)
            except ReplicaLost as lost:
                if resumes >= self.resume_attempts:
                    raise lost.error from None
                resumes += 1
                continue
            result.resumed += resumes
            return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """The request's chunks; when its replica dies mid-stream, the rest continues on another replica from the
        ids already delivered, so the caller sees one stream (greedy: token-identical to an uninterrupted one)."""
        delivered: list[int] = []  # ids this client yielded, resent as the continuation
        chars = 0  # characters of text this client yielded
        resumes = 0
        current = request
        while True:
            target = await self._target(current, stream=True)
            try:
                async with contextlib.aclosing(self._relay(target.stream.remote(current))) as chunks:
                    async for chunk in chunks:  # the engine counts usage of the original prompt
                        chunk.resumed += resumes
                        for delta in chunk.deltas:
                            delivered += delta.token_ids
                            chars += len(delta.text)
                        yield chunk
                return
            except ReplicaLost as lost:
                if resumes >= self.resume_attempts or request.sampling.n != 1:
                    raise lost.error from None
                resumes += 1
                current = request.model_copy(update={
                    "resume_token_ids": request.resume_token_ids + delivered,
                    "resume_text_chars": request.resume_text_chars + chars})

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
            raise self._failure(exc) from None
        finally:
            if not finished:
                _cancel(responses)

    async def abort(self, request_id: str) -> bool:
        return await self._call(self.handle.abort, request_id)

    async def check_health(self) -> None:
        await self._call(self.handle.check_health)

    def _failure(self, exc: BaseException) -> LLMStackError | ReplicaLost:
        """``exc`` translated; wrapped in :class:`ReplicaLost` when the replica died."""
        error = self._translate(exc)
        return ReplicaLost(error) if replica_died(exc) else error

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
