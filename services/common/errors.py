"""The one error envelope of every service (OpenAI style)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def retry_after_headers(wait_s: float) -> dict[str, str]:
    """When to come back: Retry-After in whole seconds (HTTP's), and retry-after-ms, which
    the openai SDKs read first, in milliseconds."""
    return {
        "Retry-After": str(max(1, math.ceil(wait_s))),
        "retry-after-ms": str(max(1, round(wait_s * 1000))),
    }


def _seconds(value: str | None, default: float) -> float:
    """An upstream's Retry-After (seconds), or default when absent or not a number."""
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    return seconds if math.isfinite(seconds) and seconds >= 0 else default


def error_type(status_code: int) -> str:
    """The envelope's type for a status: its own, else that of its class (4xx or 5xx)."""
    if status_code in _TYPES:
        return _TYPES[status_code]
    return "invalid_request_error" if 400 <= status_code < 500 else "server_error"


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """Raise anywhere in a request to answer with the envelope."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status_code)
        self.headers = headers


def error_body(
    status_code: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
) -> dict[str, Any]:
    detail = ErrorDetail(
        message=message,
        type=type or error_type(status_code),
        code=code,
        param=param,
    )
    return ErrorResponse(error=detail).model_dump()


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status_code, exc.message, code=exc.code, param=exc.param, type=exc.type),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def error_responses(
    *statuses: int, descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """For a route's `responses=`: OpenAPI shows the envelope under each status it may answer,
    with that status's description when one is given."""
    return {
        status: {"model": ErrorResponse}
        | ({"description": descriptions[status]} if descriptions else {})
        for status in sorted(set(statuses))
    }


ERROR_RESPONSES = error_responses(400, 401, 404, 413, 415, 429, 503)


REQUEST_PARTS = ("body", "query", "path", "header", "cookie")


def validation_error(
    exc: ValidationError | RequestValidationError,
    *,
    field_messages: Mapping[str, str] | None = None,
) -> APIError:
    """A 400 naming the field of the first error pydantic found; a field in field_messages
    gets that message instead of pydantic's (for a field whose type pydantic words poorly)."""
    errors = exc.errors()
    first: Mapping[str, Any] = errors[0] if errors else {}
    loc = list(first.get("loc", ()))
    if isinstance(exc, RequestValidationError) and loc and loc[0] in REQUEST_PARTS:
        loc = loc[1:]  # where it was sent, not which field (a body field may be "query")
    field = str(loc[0]) if loc else None
    if field_messages and field is not None and field in field_messages:
        return APIError(400, field_messages[field], code="invalid_value", param=field)
    param = ".".join(str(part) for part in loc) or None
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, code="invalid_value", param=param)


MAX_UPSTREAM_MESSAGE_CHARS = 500  # an upstream's message is passed on, up to this long


def upstream_error(
    status: int,
    body: bytes,
    service: str,
    *,
    peer: Literal["service", "engine"] = "service",
    code_prefix: str | None = None,
    retry_after: str | None = None,
) -> APIError:
    """Our answer to an upstream's error answer: its message passed on (capped), never its
    internals. A "service" peer is one of ours: it speaks this envelope (its code and param
    are kept), its 503 names which of its own dependencies is down, and its 401/403 means
    our service credentials were refused (our fault: 502). An "engine" peer is an inference
    server: its codes are not ours (a 4xx is `{prefix}_rejected`) and any 5xx is a failure.
    Codes start with code_prefix (default: service); retry_after is the Retry-After to send
    with a 429 or 503 (the upstream's own, when it gave one)."""
    prefix = code_prefix or service
    message = f"the {service} rejected the request"
    code: str | None = None
    param: str | None = None
    try:
        detail = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        detail = None
    if isinstance(detail, dict) and isinstance(detail.get("message"), str):
        message = detail["message"][:MAX_UPSTREAM_MESSAGE_CHARS]
        if peer == "service":
            code = detail["code"] if isinstance(detail.get("code"), str) else None
            param = detail["param"] if isinstance(detail.get("param"), str) else None
    failed = APIError(502, f"the {service} failed", code=f"{prefix}_error")
    if status == 503 and peer == "service":
        # e.g. the retriever's own dependency (the embedder) is down: say which.
        return APIError(
            503,
            message,
            code=code or f"{prefix}_unavailable",
            headers=retry_after_headers(_seconds(retry_after, 5.0)),
        )
    if status in (401, 403) and peer == "service":  # our credentials, not the caller's
        logger.error("the %s refused our service credentials", service)
        return failed
    if status == 429:
        return APIError(
            429,
            message,
            code=code or "overloaded",
            headers=retry_after_headers(_seconds(retry_after, 1.0)),
        )
    if status >= 500:
        return failed
    if peer == "engine":
        return APIError(status, message, code=f"{prefix}_rejected")
    return APIError(status, message, code=code, param=param)


def _internal_error() -> JSONResponse:
    return JSONResponse(error_body(500, "internal server error"), status_code=500)


class UnhandledErrorMiddleware:
    """Answer an unhandled exception with the 500 envelope inside the app, so the server keeps
    the keep-alive connection (Starlette's ServerErrorMiddleware answers, then re-raises, and
    uvicorn closes it). Re-raises only when the response had already started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception:
            if started:  # too late for an envelope: the server ends the broken response
                raise
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await _internal_error()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    # Innermost of the app's middleware, so the request-id and metrics middleware see the 500.
    app.user_middleware.append(Middleware(UnhandledErrorMiddleware))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(
            error_body(exc.status_code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        # Only errors outside UnhandledErrorMiddleware (in other middleware) get here.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _internal_error()
