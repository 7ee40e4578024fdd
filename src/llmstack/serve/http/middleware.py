"""Per-request state for routing layers (canary, regions) that report their choice as response headers."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

Headers = list[tuple[bytes, bytes]]


async def run_with_slot(app: Any, scope: dict, receive: Any, send: Any, var: contextvars.ContextVar,
                        slot: dict[str, Any], headers_of: Callable[[dict[str, Any]], Headers]) -> None:
    """Run the ASGI ``app`` with ``slot`` in ``var`` for this request (the router fills it in as it routes);
    ``headers_of(slot)`` is appended to the response's headers when they are sent."""

    async def send_with_headers(message: dict) -> None:
        if message["type"] == "http.response.start":
            extra = headers_of(slot)
            if extra:
                message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    token = var.set(slot)
    try:
        await app(scope, receive, send_with_headers)
    finally:
        var.reset(token)
