"""HTTP client factory for calls between services."""

from __future__ import annotations

import httpx
from fastapi import Request

from services.common.errors import APIError
from services.common.observability import request_id_var


async def _propagate_request_id(request: httpx.Request) -> None:
    rid = request_id_var.get()
    if rid != "-":
        request.headers.setdefault("x-request-id", rid)


def make_client(
    base_url: str,
    *,
    timeout: float = 30.0,
    connect_timeout: float = 3.0,
    headers: dict[str, str] | None = None,
    max_connections: int = 100,
) -> httpx.AsyncClient:
    """An async client with bounded timeouts and request-id propagation."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
        headers=headers,
        event_hooks={"request": [_propagate_request_id]},
    )


async def read_capped_body(request: Request, limit: int) -> bytes:
    """Read a request body, answering 413 as soon as it passes limit bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is larger than {limit} bytes", code="too_large")
    body = bytearray()
    async for part in request.stream():
        body.extend(part)
        if len(body) > limit:
            raise APIError(413, f"request body is larger than {limit} bytes", code="too_large")
    return bytes(body)
