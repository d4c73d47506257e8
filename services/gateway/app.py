"""Gateway app factory: clients made in the lifespan, routes in services.gateway.routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from services.common.errors import install_error_handlers
from services.common.http import make_client
from services.common.observability import install_observability
from services.common.relay import EngineClient
from services.gateway.auth import CognitoVerifier, JwksCache
from services.gateway.limits import RateLimiter, SharedLimits
from services.gateway.routes import openapi_schema, router
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import RetrieverClient

DESCRIPTION = (
    "Answers questions from your own documents, with citations. "
    "Authenticate with an Amazon Cognito access token: `Authorization: Bearer <token>`."
)


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
        limiter: RateLimiter = app.state.limiter
        if settings.limits_store == "shared":
            limiter.shared = SharedLimits(
                app.state.retriever, settings.limits_timeout_s, settings.stream_lease_s
            )
        app.state.generator = generator_http
        app.state.generator_stream = EngineClient.from_url(settings.generator_url)
        try:
            yield
        finally:
            await limiter.aclose()  # stream leases still being given back go out first
            for client in (jwks_http, retriever_http, generator_http):
                await client.aclose()
            await app.state.generator_stream.aclose()

    app = FastAPI(title="RAG gateway", version="0.1.0", lifespan=lifespan, description=DESCRIPTION)
    install_error_handlers(app)
    app.state.settings = settings
    app.state.limiter = RateLimiter(
        settings.rate_limit_per_minute, settings.rate_limit_burst, settings.max_concurrent_streams
    )

    def dependency_check(client_attr: str) -> Callable[[], Awaitable[str | None]]:
        async def check() -> str | None:
            http: Any = getattr(app.state, client_attr)
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
        {"retriever": dependency_check("retriever"), "generator": dependency_check("generator")},
        optional=frozenset(settings.readiness_optional),
    )
    app.include_router(router)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app
