"""Request dependencies of the gateway."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from services.common.errors import APIError
from services.gateway.auth import CognitoVerifier, Principal, unauthorized


async def current_user(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    if not authorization:
        raise unauthorized("missing bearer token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("authorization must be a bearer token")
    verifier: CognitoVerifier = request.app.state.verifier
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
    request.app.state.limiter.check(principal.sub)
    return principal


User = Annotated[Principal, Depends(current_user)]
