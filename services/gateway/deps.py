"""Request dependencies of the gateway."""

from __future__ import annotations

from typing import Annotated

import httpx
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.common.errors import APIError
from services.common.timing import StageTimes
from services.gateway.auth import CognitoVerifier, Principal, unauthorized
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import RetrieverClient

# Declares the scheme in OpenAPI (the Authorize button of /docs); current_user checks the token.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="CognitoBearer",
    bearerFormat="JWT",
    description="An Amazon Cognito access token: `Authorization: Bearer <token>`.",
)


async def current_user(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal:
    """The verified caller, within their rate limit: 401, 403 or 429 otherwise."""
    authorization = request.headers.get("authorization")
    if not authorization:
        raise unauthorized("missing bearer token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("authorization must be a bearer token")
    verifier: CognitoVerifier = request.app.state.verifier
    times = request.state.times = StageTimes()  # the request's Server-Timing stages
    with times.stage("auth"):
        principal = await verifier.verify(token.strip())
    settings = request.app.state.settings
    if settings.required_groups and not set(settings.required_groups) & set(principal.groups):
        raise APIError(403, "the token's user is not in a group allowed here", code="forbidden")
    if settings.required_scopes and not set(settings.required_scopes) & set(principal.scopes):
        raise APIError(
            403,
            "the token lacks a scope allowed here",
            code="insufficient_scope",
            headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
        )
    with times.stage("limits"):
        await request.app.state.limiter.check(principal.sub)
    return principal


def stage_times(request: Request) -> StageTimes:
    """The request's stage timings (started when its token was checked)."""
    times = getattr(request.state, "times", None)
    if times is None:
        times = request.state.times = StageTimes()
    return times


def gateway_settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


User = Annotated[Principal, Depends(current_user)]
Settings = Annotated[GatewaySettings, Depends(gateway_settings)]


def retriever_client(request: Request) -> RetrieverClient:
    client: RetrieverClient = request.app.state.retriever
    return client


def generator_http(request: Request) -> httpx.AsyncClient:
    client: httpx.AsyncClient = request.app.state.generator
    return client


Retriever = Annotated[RetrieverClient, Depends(retriever_client)]
GeneratorHTTP = Annotated[httpx.AsyncClient, Depends(generator_http)]
