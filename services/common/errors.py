"""The one error envelope of every service (OpenAI style)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
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


# For `responses=` on routes, so OpenAPI shows the envelope.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 429, 503)
}


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
        first = exc.errors()[0] if exc.errors() else {}
        loc = list(first.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:]  # where it was sent, not which field (a body field may be "query")
        param = ".".join(str(part) for part in loc) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return JSONResponse(
            error_body(400, message, code="invalid_value", param=param), status_code=400
        )

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        # Only errors outside UnhandledErrorMiddleware (in other middleware) get here.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _internal_error()
