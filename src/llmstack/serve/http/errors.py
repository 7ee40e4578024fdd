"""The one mapping from errors to HTTP: any exception becomes its status code and the OpenAI error body."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from llmstack.errors import LLMStackError, RequestError


OVERLOADED_MESSAGE = "The server is overloaded: too many requests are queued. Retry shortly."


def overloaded_error(exc: BaseException, *, default_retry_after_s: float = 1.0) -> RequestError | None:
    """Ray Serve's load shedding (a ``BackPressureError``, also inside Ray's wrappers) as the OpenAI 503 with
    ``Retry-After`` (Ray's own value when the deployment sets one); None when ``exc`` is something else."""
    if "ray.serve.exceptions" not in sys.modules:  # Ray never loaded: it cannot have shed anything
        return None
    from ray.serve.exceptions import BackPressureError

    cause: BaseException | None = exc
    seen = 0
    while cause is not None and not isinstance(cause, BackPressureError) and seen < 16:
        cause = getattr(cause, "cause", None) or cause.__cause__
        seen += 1
    if not isinstance(cause, BackPressureError):
        return None
    retry = cause.retry_after_s if cause.retry_after_s is not None else default_retry_after_s
    return RequestError(OVERLOADED_MESSAGE, status_code=cause.status_code, type="server_overloaded",
                        code="overloaded", headers={"Retry-After": str(max(1, math.ceil(retry)))})


def as_request_error(exc: BaseException) -> LLMStackError:
    """``exc`` as an llmstack error: itself, the cause inside a Ray wrapper, Ray's load shedding as a 503 with
    Retry-After, or a 500 that names only its type."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LLMStackError):
        return cause
    if isinstance(exc, LLMStackError):
        return exc
    shed = overloaded_error(exc)
    if shed is not None:
        return shed
    return RequestError(f"internal error: {type(exc).__name__}", status_code=500, type="server_error")


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response of any error (LLMStackError fields; anything else is a 500 without internals)."""
    error = as_request_error(exc)
    return JSONResponse(error.to_openai(), status_code=error.status_code, headers=error.headers or None)


def validation_error(exc: RequestValidationError) -> RequestError:
    """FastAPI's body validation errors as one 400 that names the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return RequestError(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                           code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')} "
        f"(got {_short(e.get('input'))})" for e in errors[:5])
    return RequestError(f"invalid request: {message}", param=param, code="invalid_value")



def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

