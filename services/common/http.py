"""HTTP client factory for calls between services."""

from __future__ import annotations

import asyncio

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


BODY_IDLE_TIMEOUT_S = 30.0  # the longest wait for the next piece of a request body


async def read_capped_body(
    request: Request, limit: int, *, idle_timeout_s: float = BODY_IDLE_TIMEOUT_S
) -> bytes:
    """Read a request body: 413 as soon as it passes limit bytes, 408 once it stops arriving."""
    too_large = APIError(413, f"request body is larger than {limit} bytes", code="too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    parts = request.stream()
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                part = await anext(parts)
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:
            # The rest of the body may still come: the connection is closed after the answer.
            raise APIError(
                408,
                f"the request body stopped arriving (nothing for {idle_timeout_s:g} s)",
                code="body_timeout",
                headers={"Connection": "close"},
            ) from None
        body.extend(part)
        if len(body) > limit:
            raise too_large
