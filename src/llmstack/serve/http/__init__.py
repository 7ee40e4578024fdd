"""The HTTP layer: the OpenAI-compatible FastAPI app (``app``), its guard middleware (``guard``), server-sent
events (``sse``), the one error-to-HTTP mapping (``errors``) and Prometheus metrics (``metrics``); plus the
middleware of Ray Serve's own HTTP proxy (``proxy_errors``: its errors in the same OpenAI shape)."""

from __future__ import annotations

from llmstack.serve.http.app import make_api
from llmstack.serve.http.errors import error_response

__all__ = ["error_response", "make_api"]
