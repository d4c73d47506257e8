"""Gateway app factory and public routes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse

from services.common.errors import ERROR_RESPONSES, APIError, install_error_handlers
from services.common.http import make_client, read_capped_body
from services.common.observability import install_observability
from services.common.relay import EngineClient
from services.gateway.auth import CognitoVerifier, JwksCache
from services.gateway.chat import ChatRequest, chat_completion
from services.gateway.deps import User
from services.gateway.limits import RateLimiter
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import RetrieverClient, relay, unavailable

logger = logging.getLogger(__name__)

UPLOAD_MEDIA_TYPES = ("multipart/form-data", "application/json")


def media_type(content_type: str) -> str:
    """A Content-Type's type/subtype: before any parameters, lower case."""
    return content_type.split(";", 1)[0].strip().lower()


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jwks_http = make_client("", timeout=5.0, connect_timeout=2.0)
        retriever_http = make_client(
            settings.retriever_url,
            timeout=60.0,
            headers={"Authorization": f"Bearer {settings.service_token}"},
        )
        generator_http = make_client(settings.generator_url, timeout=settings.generator_timeout_s)
        app.state.verifier = CognitoVerifier(
            settings.cognito_issuer,
            settings.cognito_client_id,
            settings.token_use,
            JwksCache(settings.cognito_jwks_url, settings.jwks_refresh_penalty_s, jwks_http),
        )
        app.state.retriever = RetrieverClient(retriever_http)
        app.state.generator = generator_http
        app.state.generator_stream = EngineClient.from_url(settings.generator_url)
        try:
            yield
        finally:
            for client in (jwks_http, retriever_http, generator_http):
                await client.aclose()
            await app.state.generator_stream.aclose()

    app = FastAPI(
        title="RAG gateway",
        version="0.1.0",
        lifespan=lifespan,
        description="Answers questions from your own documents, with citations. "
        "Authenticate with an Amazon Cognito access token: `Authorization: Bearer <token>`.",
    )
    install_error_handlers(app)
    app.state.settings = settings

    async def read_body(request: Request, limit: int) -> bytes:
        return await read_capped_body(request, limit, idle_timeout_s=settings.body_idle_timeout_s)

    app.state.limiter = RateLimiter(
        settings.rate_limit_per_minute, settings.rate_limit_burst, settings.max_concurrent_streams
    )

    def _dependency_check(client_attr: str) -> Any:
        async def check() -> str | None:
            http: httpx.AsyncClient = getattr(app.state, client_attr)
            if isinstance(http, RetrieverClient):
                http = http.http
            try:
                resp = await http.get("/readyz", timeout=2.0)
            except httpx.HTTPError:
                return "unreachable"
            return None if resp.status_code == 200 else "not ready"

        return check

    install_observability(
        app,
        "gateway",
        {
            "retriever": _dependency_check("retriever"),
            "generator": _dependency_check("generator"),
        },
    )

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def create_chat_completion(request: Request, user: User) -> Response:
        raw = await read_body(request, settings.max_body_bytes)
        try:
            body = ChatRequest.model_validate_json(raw)
        except ValueError as exc:
            errors = getattr(exc, "errors", lambda: [])()
            where = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
            where = where or None  # an error of the whole body (e.g. invalid Unicode) has no field
            raise APIError(
                400, f"invalid chat request{f' at {where}' if where else ''}", param=where
            ) from exc
        return await chat_completion(request, body, user, settings)

    @app.post("/v1/documents", status_code=202, responses=ERROR_RESPONSES)
    async def create_document(request: Request, user: User) -> Response:
        content_type = request.headers.get("content-type", "")
        if media_type(content_type) not in UPLOAD_MEDIA_TYPES:
            raise APIError(415, "send multipart/form-data (file) or application/json (text)")
        raw = await read_body(request, settings.max_upload_bytes + 64 * 1024)
        resp = await request.app.state.retriever.request(
            "POST", "/documents", user.sub, content=raw, headers={"Content-Type": content_type}
        )
        return relay(resp)

    @app.get("/v1/documents", responses=ERROR_RESPONSES)
    async def list_documents(
        request: Request,
        user: User,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: str | None = None,
        status: str | None = None,
        metadata: Annotated[
            str | None, Query(description="JSON object the metadata contains")
        ] = None,
    ) -> Response:
        given = {"limit": limit, "cursor": cursor, "status": status, "metadata": metadata}
        params = {k: v for k, v in given.items() if v is not None}
        resp = await request.app.state.retriever.request(
            "GET", "/documents", user.sub, params=params
        )
        return relay(resp)

    @app.get("/v1/documents/{doc_id}", responses=ERROR_RESPONSES)
    async def get_document(doc_id: uuid.UUID, request: Request, user: User) -> Response:
        resp = await request.app.state.retriever.request("GET", f"/documents/{doc_id}", user.sub)
        return relay(resp)

    @app.delete("/v1/documents/{doc_id}", status_code=204, responses=ERROR_RESPONSES)
    async def delete_document(doc_id: uuid.UUID, request: Request, user: User) -> Response:
        await request.app.state.retriever.request("DELETE", f"/documents/{doc_id}", user.sub)
        return Response(status_code=204)

    @app.post("/v1/search", responses=ERROR_RESPONSES)
    async def search(request: Request, user: User) -> Response:
        raw = await read_body(request, settings.max_body_bytes)
        resp = await request.app.state.retriever.request(
            "POST", "/search", user.sub, content=raw, headers={"Content-Type": "application/json"}
        )
        return relay(resp)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(request: Request, user: User) -> JSONResponse:
        try:
            resp = await request.app.state.generator.get("/v1/models", timeout=5.0)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            raise unavailable("generator") from exc
        return JSONResponse(resp.json())

    return app
