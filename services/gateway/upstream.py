"""Calls from the gateway to the retriever and the generator."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
from fastapi import Response

from services.common.errors import APIError

logger = logging.getLogger(__name__)


def unavailable(service: str) -> APIError:
    return APIError(
        503,
        f"the {service} is unavailable",
        code=f"{service}_unavailable",
        headers={"Retry-After": "5"},
    )


def passthrough_error(
    status: int, body: bytes, service: str, retry_after: str | None = None
) -> APIError:
    """Re-raise an upstream error, keeping its envelope's message when it has one."""
    try:
        detail = json.loads(body)["error"]
        message, code, param = str(detail["message"]), detail.get("code"), detail.get("param")
    except (ValueError, KeyError, TypeError):
        message, code, param = f"the {service} rejected the request", None, None
    if status == 503:
        # e.g. the retriever's own dependency (the embedder) is down: say which.
        return APIError(
            503,
            message,
            code=code or f"{service}_unavailable",
            headers={"Retry-After": retry_after or "5"},
        )
    if status in (401, 403):  # our own credentials, not the caller's: a server-side fault
        logger.error("the %s refused the gateway's service credentials", service)
        return APIError(502, f"the {service} failed", code=f"{service}_error")
    if status == 429:
        return APIError(
            429, message, code=code or "overloaded", headers={"Retry-After": retry_after or "1"}
        )
    if status >= 500:
        return APIError(502, f"the {service} failed", code=f"{service}_error")
    return APIError(status, message, code=code, param=param)


class RetrieverClient:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def request(
        self,
        method: str,
        path: str,
        tenant: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        try:
            resp = await self.http.request(
                method,
                path,
                json=json,
                content=content,
                params=params,
                headers={"X-Tenant-Id": tenant, **(headers or {})},
            )
        except httpx.HTTPError as exc:
            raise unavailable("retriever") from exc
        if resp.status_code >= 400:
            raise passthrough_error(
                resp.status_code, resp.content, "retriever", resp.headers.get("retry-after")
            )
        return resp

    async def search(self, tenant: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        resp = await self.request("POST", "/search", tenant, json=body)
        return list(resp.json()["data"])


def relay(resp: httpx.Response) -> Response:
    return Response(
        resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type")
    )
