"""Request dependencies of the gateway."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

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
    return await verifier.verify(token.strip())


User = Annotated[Principal, Depends(current_user)]
