"""The canary app's HTTP ingress: the OpenAI API over the router, sticky session keys, admin routes under /canary."""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from llmstack.config import ServeConfig, load_config
from llmstack.errors import LLMStackError, RequestError
from llmstack.serve.canary.config import INGRESS, VERSION_HEADER
from llmstack.serve.deployments.client import ServeEngineClient
from llmstack.serve.http import error_response, make_api
from llmstack.serve.http.metrics import append_metrics
from llmstack.serve.http.middleware import run_with_slot
from llmstack.serve.protocol import GenerationChunk, GenerationRequest, GenerationResult

_SLOT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("llmstack_canary_slot", default=None)


class CanaryEngineClient(ServeEngineClient):
    """The engine protocol over the router's handle; passes the session key, notes which version answered."""

    CARDS_TTL_S = 5.0  # the stable version may change

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        slot = _SLOT.get() or {}
        try:
            version, result = await self._call(self.handle.generate, request, slot.get("key"))
        except LLMStackError as exc:
            slot["version"] = getattr(exc, "version", None)  # the router names the version that failed
            raise
        slot["version"] = version
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        slot = _SLOT.get() or {}
        responses = self.handle.options(stream=True).stream.remote(request, slot.get("key"))
        # The router sends {"version": ...} first: which version answers this stream.
        relay = self._relay(responses, on_marker=lambda marker: slot.__setitem__("version", marker.get("version")))
        async with contextlib.aclosing(relay) as chunks:
            async for chunk in chunks:
                yield chunk

    async def check_health(self) -> None:
        await self._call(self.handle.backend_health)


class _SessionKey:
    """ASGI middleware: the session key (header, else the body's ``user``) for sticky routing; the answering
    version as a response header."""

    def __init__(self, app: Any, *, header: str, max_body_bytes: int) -> None:
        self.app = app
        self.header = header.lower().encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        key = headers.get(self.header, b"").decode("latin-1").strip() or None
        slot: dict[str, Any] = {"key": key, "version": None}
        downstream = receive
        if key is None and scope.get("method") == "POST":
            body = bytearray()
            first: list[dict] = []
            while True:  # bounded: past the limit the guard inside answers 413
                message = await receive()
                first.append(message)
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                if not message.get("more_body") or len(body) > self.max_body_bytes:
                    break
            if len(body) <= self.max_body_bytes:
                try:
                    user = json.loads(body).get("user")
                    if isinstance(user, str) and user:
                        slot["key"] = user
                except (ValueError, AttributeError):
                    pass
            pending = list(first)

            async def replay() -> dict:
                if pending:
                    return pending.pop(0)
                return await receive()

            downstream = replay

        await run_with_slot(self.app, scope, downstream, send, _SLOT, slot, _version_header)


def _version_header(slot: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(VERSION_HEADER.encode(), str(slot["version"]).encode())] if slot.get("version") else []


def _add_admin_routes(app: Any, router: Any) -> None:
    async def reply(call: Any) -> JSONResponse:
        try:
            result = await call
        except Exception as exc:  # the router's llmstack errors, unwrapped from Ray's, map to their status
            return error_response(exc)
        return JSONResponse(json.loads(json.dumps({"ok": True, **result}, default=str)))

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise RequestError("request body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise RequestError("request body must be a JSON object")
        return data

    @app.get("/canary", summary="Canary status: versions, weights, live KPIs, the rollout in progress")
    async def canary_status_route() -> JSONResponse:
        return await reply(router.status.remote())  # type: ignore[arg-type]

    @app.post("/canary/start", summary="Start a rollout of a deployed version: {candidate, plan?, thresholds?, force?}")
    async def canary_start_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        if not isinstance(b.get("candidate"), str):
            raise RequestError("candidate: a deployed version name or registry ref is required", param="candidate")
        return await reply(router.start.remote(b["candidate"], plan=b.get("plan"), thresholds=b.get("thresholds"),
                                               force=bool(b.get("force", False))))

    @app.post("/canary/promote", summary="Promote the candidate now: {force?, reason?}")
    async def canary_promote_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        return await reply(router.promote.remote(force=bool(b.get("force", False)), reason=b.get("reason")))

    @app.post("/canary/abort", summary="Abort the canary: the candidate's share drops to 0: {reason?}")
    async def canary_abort_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        return await reply(router.abort_canary.remote(reason=b.get("reason")))

    @app.post("/canary/rollback", summary="Route back to the previous version and roll the alias back: {reason?}")
    async def canary_rollback_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        return await reply(router.rollback.remote(reason=b.get("reason")))

    @app.post("/canary/weights", summary="Static traffic split between deployed versions: {weights: {name: pct}}")
    async def canary_weights_route(request: Request) -> JSONResponse:
        b = await body_of(request)
        if not isinstance(b.get("weights"), dict):
            raise RequestError("weights: a mapping of version name to percent is required", param="weights")
        try:
            weights = {str(k): float(v) for k, v in b["weights"].items()}
        except (TypeError, ValueError):
            raise RequestError("weights: percentages must be numbers", param="weights") from None
        return await reply(router.set_weights.remote(weights))

    # /metrics: the ingress's own metrics followed by the router's per-version KPIs (one scrape target).
    async def router_metrics() -> str:
        return await router.metrics_text.remote()

    append_metrics(app, router_metrics, summary="Prometheus metrics (with canary KPIs)")


@serve.deployment(name=INGRESS)
@serve.ingress()
class CanaryIngress:
    """HTTP ingress of a canary app: the OpenAI API over the router, admin routes under /canary."""

    def __init__(self, router: Any, config: dict[str, Any], session_header: str = "x-session-id") -> None:
        self.config = load_config(ServeConfig, config)
        self.router = router
        self.session_header = session_header

    def __serve_build_asgi_app__(self) -> Any:
        app = make_api(CanaryEngineClient(self.router, retry_after_s=self.config.retry_after_s), self.config)
        _add_admin_routes(app, self.router)
        app.add_middleware(_SessionKey, header=self.session_header, max_body_bytes=self.config.max_body_bytes)
        return app

