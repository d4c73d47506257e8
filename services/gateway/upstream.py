"""Calls from the gateway to the retriever and the generator."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx
from fastapi import Response

from services.common.errors import APIError, retry_after_headers, upstream_error
from services.common.protocol import (
    ModelList,
    RequestTokenRequest,
    RequestTokenResult,
    StreamLeaseRequest,
    StreamLeaseResult,
)
from services.common.timing import parse_server_timing

logger = logging.getLogger(__name__)

# The retriever's search stages a chat reports: the query's embedding, each ranking, reranking.
RETRIEVER_STAGES = ("embed", "vector", "text", "rerank")


def unavailable(service: str) -> APIError:
    return APIError(
        503,
        f"the {service} is unavailable",
        code=f"{service}_unavailable",
        headers=retry_after_headers(5.0),
    )


# Calls that may be sent again: reads, deletes, searches (read-only), and uploads, which the
# retriever keys on (user, content hash): a replay of an upload that did land answers 200 with
# the same document ("duplicate": true) instead of storing or ingesting it twice; a batch
# of uploads likewise, item by item.
IDEMPOTENT_POSTS = frozenset({"/search", "/documents", "/documents/batch"})
STALE_CONNECTION_MESSAGE = "Server disconnected without sending a response"


def is_idempotent(method: str, path: str) -> bool:
    """Whether sending the call twice does what sending it once does."""
    method = method.upper()
    return method in ("GET", "HEAD", "DELETE") or (method == "POST" and path in IDEMPOTENT_POSTS)


class AttemptTrace:
    """What httpcore reports about one attempt: a connection opened, response headers read."""

    def __init__(self) -> None:
        self.opened_connection = False
        self.got_response = False

    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.startswith("connection.connect_"):
            self.opened_connection = True
        elif event.endswith(".receive_response_headers.complete"):
            self.got_response = True

    def peer_closed_reused_connection(self, exc: httpx.HTTPError) -> bool:
        """The peer closed a kept-alive connection as this call went out on it, unanswered.

        A fresh connection's failure, a timeout or any response (even a broken one) is not that.
        """
        if self.opened_connection or self.got_response:
            return False
        if isinstance(exc, httpx.RemoteProtocolError):  # end of stream before any response
            return str(exc).startswith(STALE_CONNECTION_MESSAGE)
        return isinstance(exc, httpx.ReadError | httpx.WriteError)  # reset by the peer


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
        """Call the retriever; an idempotent call goes out once more when the peer closed the
        kept-alive connection it was sent on."""
        may_retry = is_idempotent(method, path)
        while True:
            trace = AttemptTrace()
            try:
                resp = await self.http.request(
                    method,
                    path,
                    json=json,
                    content=content,
                    params=params,
                    headers={"X-Tenant-Id": tenant, **(headers or {})},
                    extensions={"trace": trace},
                )
                break
            except httpx.HTTPError as exc:
                if not (may_retry and trace.peer_closed_reused_connection(exc)):
                    raise unavailable("retriever") from exc
                may_retry = False
                logger.info(
                    "the retriever closed a kept-alive connection under %s %s; sending it again",
                    method,
                    path,
                )
        resent = not may_retry and is_idempotent(method, path)
        if resent and method.upper() == "DELETE" and resp.status_code == 404:
            return resp  # the first copy may have deleted it before the connection broke
        if resp.status_code >= 400:
            raise upstream_error(
                resp.status_code,
                resp.content,
                "retriever",
                retry_after=resp.headers.get("retry-after"),
            )
        return resp

    async def search(
        self, tenant: str, body: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """The hits, and the retriever's own stages (its Server-Timing, milliseconds)."""
        resp = await self.request("POST", "/search", tenant, json=body)
        stages = parse_server_timing(resp.headers.get("server-timing"))
        return list(resp.json()["data"]), {
            name: ms for name, ms in stages.items() if name in RETRIEVER_STAGES
        }

    # Per-user limits kept in the retriever's database (services/retriever/limits.py).

    async def take_request_token(
        self, tenant: str, body: RequestTokenRequest
    ) -> RequestTokenResult:
        resp = await self.request(
            "POST", "/limits/requests", tenant, json=body.model_dump(mode="json")
        )
        return RequestTokenResult.model_validate_json(resp.content)

    async def acquire_stream_lease(
        self, tenant: str, body: StreamLeaseRequest
    ) -> StreamLeaseResult:
        resp = await self.request(
            "POST", "/limits/streams", tenant, json=body.model_dump(mode="json")
        )
        return StreamLeaseResult.model_validate_json(resp.content)

    async def release_stream_lease(self, tenant: str, lease_id: uuid.UUID, lease_s: float) -> None:
        await self.request(
            "DELETE", f"/limits/streams/{lease_id}", tenant, params={"lease_s": lease_s}
        )


def relay(resp: httpx.Response) -> Response:
    return Response(
        resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type")
    )


async def generator_models(generator: httpx.AsyncClient) -> ModelList:
    """The generator's /v1/models, parsed; raises httpx.HTTPError when the generator is
    unreachable or refuses, pydantic's ValidationError when it answers nonsense."""
    resp = await generator.get("/v1/models", timeout=5.0)
    resp.raise_for_status()
    return ModelList.model_validate_json(resp.content)
