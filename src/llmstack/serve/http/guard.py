"""Pure ASGI middleware in front of every route: the API key (401), then the body size (413)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from llmstack.errors import RequestError
from llmstack.serve.http.errors import error_response

OPEN_PATHS = ("/health",)  # routes the API key does not guard


class RequestGuard:
    """Pure ASGI middleware: API key (401) on every route but health, then body size (413)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        # Exact paths only (under the app's route prefix): /v1/models/health is guarded like any route.
        prefix = scope.get("root_path", "").rstrip("/")
        if self.api_key is not None and not (path.startswith(prefix) and path[len(prefix):] in OPEN_PATHS):
            refusal = self._check_key(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send)
                return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = RequestError(f"request body exceeds {self.max_body_bytes} bytes", status_code=413,
                              code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await error_response(too_big)(scope, receive, send)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            # Buffer the body (bounded) so a chunked upload cannot exceed the limit either.
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    await error_response(too_big)(scope, receive, send)
                    return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)

    def _check_key(self, scope: dict) -> RequestError | None:
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, token = value.partition(" ")
        if not value or scheme.lower() != "bearer" or not token.strip():
            return RequestError("Missing API key: send the header 'Authorization: Bearer <key>'.", status_code=401,
                               type="authentication_error", code="missing_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):  # type: ignore[union-attr]
            return RequestError("Incorrect API key provided.", status_code=401, type="authentication_error",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

