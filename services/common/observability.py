"""Health, readiness and Prometheus metrics routes, request ids and JSON logs."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, or a short reason when not."""

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

REQUESTS = Counter("http_requests_total", "HTTP requests", ["service", "method", "route", "status"])
LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency (to response start)",
    ["service", "route"],
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)


class RequestContextMiddleware:
    """Request id (taken from X-Request-Id or made), metrics per route. Plain ASGI: no
    per-request task or stream copies, unlike BaseHTTPMiddleware."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value.decode("latin-1")[:128]
                break
        rid = rid or uuid.uuid4().hex
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode("latin-1")),
                ]
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                REQUESTS.labels(self.service, scope["method"], path, str(status)).inc()
                LATENCY.labels(self.service, path).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def install_observability(
    app: FastAPI,
    service: str,
    readiness: dict[str, ReadinessCheck] | None = None,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Add /healthz, /readyz, /metrics and the request-id middleware to an app. /readyz
    answers 503 while a readiness check fails, except those named in optional: their
    failures are reported as `degraded` in a 200 (a dependency the service can run without,
    such as a generator scaled to zero on a schedule)."""
    checks = readiness or {}

    app.add_middleware(RequestContextMiddleware, service=service)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        not_ready: dict[str, str] = {}
        for name, check in checks.items():
            try:
                reason = await check()
            except Exception as exc:  # a failing check means not ready, never a 500
                reason = type(exc).__name__
            if reason:
                not_ready[name] = reason
        degraded = {name: reason for name, reason in not_ready.items() if name in optional}
        required = {name: reason for name, reason in not_ready.items() if name not in optional}
        if required:
            return JSONResponse({"status": "not_ready", "not_ready": not_ready}, status_code=503)
        if degraded:
            return JSONResponse({"status": "ready", "degraded": degraded})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
