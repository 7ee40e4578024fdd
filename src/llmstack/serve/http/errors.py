"""The one mapping from errors to HTTP: any exception becomes its status code and the OpenAI error body."""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from llmstack.errors import LLMStackError, RequestError


def as_request_error(exc: BaseException) -> LLMStackError:
    """``exc`` as an llmstack error: itself, the cause inside a Ray wrapper, or a 500 that names only its type."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LLMStackError):
        return cause
    if isinstance(exc, LLMStackError):
        return exc
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

