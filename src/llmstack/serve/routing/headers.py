"""The routing layer's one middleware: the session key in, the routing decisions out as response headers.

Every policy of a request's chain writes what it chose into the request's slot (:func:`current_slot`):
the region (``x-llmstack-region``, ``x-llmstack-retried``, ``x-llmstack-cost-usd``) and the canary version
(``x-llmstack-version``). The session key that pins a caller to a canary version is read here: a request
header, else the JSON body's ``user`` field.
"""

from __future__ import annotations

import contextvars
import json
from typing import Any

VERSION_HEADER = "x-llmstack-version"  # the canary version that answered
REGION_HEADER = "x-llmstack-region"  # the region that answered
COST_HEADER = "x-llmstack-cost-usd"  # the measured cost of a non-streamed answer
RETRIED_HEADER = "x-llmstack-retried"  # "1" when the answer came from a second region

_SLOT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("llmstack_routing_slot", default=None)


def current_slot() -> dict[str, Any]:
    """This request's slot (a throwaway one outside a request, e.g. in unit tests)."""
    slot = _SLOT.get()
    return slot if slot is not None else {}


class RoutingHeaders:
    """ASGI middleware: the session key (``session_header``, else the body's ``user``; None: no key is read)
    for sticky canary routing; the routing decisions as response headers."""

    def __init__(self, app: Any, *, session_header: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.header = session_header.lower().encode() if session_header else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from llmstack.serve.http.middleware import run_with_slot  # here: importing this module stays light

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot: dict[str, Any] = {}
        downstream = receive
        if self.header is not None:
            headers = dict(scope.get("headers") or [])
            slot["key"] = headers.get(self.header, b"").decode("latin-1").strip() or None
            if slot["key"] is None and scope.get("method") == "POST":
                downstream = await self._user_field(receive, slot)
        await run_with_slot(self.app, scope, downstream, send, _SLOT, slot, routing_headers)

    async def _user_field(self, receive: Any, slot: dict[str, Any]) -> Any:
        """Read the body (bounded: past the limit the guard inside answers 413) for its ``user``; replay it."""
        body = bytearray()
        first: list[dict] = []
        while True:
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

        async def replay() -> dict:
            if first:
                return first.pop(0)
            return await receive()

        return replay


def routing_headers(slot: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    extra = []
    if slot.get("region"):
        extra.append((REGION_HEADER.encode(), str(slot["region"]).encode()))
        if slot.get("retried"):
            extra.append((RETRIED_HEADER.encode(), b"1"))
        if "cost" in slot:
            extra.append((COST_HEADER.encode(), f"{slot['cost']:.9f}".encode()))
    if slot.get("version"):
        extra.append((VERSION_HEADER.encode(), str(slot["version"]).encode()))
    return extra
