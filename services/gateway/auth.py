"""Amazon Cognito JWT verification, with the checks of AWS's own verifier."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from jose import jwt
from jose.exceptions import ExpiredSignatureError, JOSEError, JWTClaimsError

from services.common.errors import APIError, retry_after_headers

logger = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = ["RS256"]


@dataclass(frozen=True)
class Principal:
    """The verified caller."""

    sub: str
    username: str | None
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = field(default=())


def unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        code="invalid_token",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


class JwksCache:
    """The pool's signing keys by kid, refreshed at most once per penalty period."""

    def __init__(self, url: str, penalty_s: float, http: httpx.AsyncClient) -> None:
        self.url = url
        self.penalty_s = penalty_s
        self._http = http
        self._keys: dict[str, dict[str, Any]] = {}
        self._last_fetch = float("-inf")
        self._last_fetch_failed = False
        self._lock = asyncio.Lock()

    async def _fetch(self) -> None:
        resp = await self._http.get(self.url)
        resp.raise_for_status()
        keys = resp.json().get("keys", [])
        self._keys = {k["kid"]: k for k in keys if isinstance(k, dict) and "kid" in k}
        self._last_fetch = time.monotonic()

    async def get(self, kid: str) -> dict[str, Any] | None:
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if kid in self._keys:
                return self._keys[kid]
            if time.monotonic() - self._last_fetch < self.penalty_s:
                if self._last_fetch_failed:  # we could not check: not the token's fault
                    raise self._unavailable()
                return None  # an unknown kid does not trigger a fetch per request
            try:
                await self._fetch()
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                self._last_fetch = time.monotonic()
                self._last_fetch_failed = True
                logger.warning("JWKS fetch failed: %s", type(exc).__name__)
                raise self._unavailable() from exc
            self._last_fetch_failed = False
            return self._keys.get(kid)

    def _unavailable(self) -> APIError:
        retry = max(1, int(self.penalty_s - (time.monotonic() - self._last_fetch)))
        return APIError(
            503,
            "the identity provider's keys are unavailable",
            code="jwks_unavailable",
            headers=retry_after_headers(retry),
        )


class CognitoVerifier:
    def __init__(self, issuer: str, client_id: str, token_use: str, jwks: JwksCache) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.token_use = token_use
        self.jwks = jwks

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except JOSEError as exc:
            raise unauthorized("malformed token") from exc
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise unauthorized("token algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise unauthorized("token has no key id")
        key = await self.jwks.get(kid)
        if key is None:
            raise unauthorized("token signed by an unknown key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=ALLOWED_ALGORITHMS,
                issuer=self.issuer,
                options={
                    "verify_aud": False,
                    "require_exp": True,
                    "require_iat": False,
                    "require_sub": True,
                    "leeway": 0,
                    # as aws-jwt-verify: at_hash ties an ID token to an access token we lack
                    "verify_at_hash": False,
                },
            )
        except ExpiredSignatureError as exc:
            raise unauthorized("token expired") from exc
        except JWTClaimsError as exc:
            raise unauthorized("token claims are invalid") from exc
        except JOSEError as exc:
            raise unauthorized("token signature is invalid") from exc
        if claims.get("token_use") != self.token_use:
            raise unauthorized(f"an {self.token_use} token is required")
        audience = claims.get("client_id") if self.token_use == "access" else claims.get("aud")
        if audience != self.client_id:
            raise unauthorized("token was issued for another client")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise unauthorized("token has no subject")
        groups = claims.get("cognito:groups") or []
        scopes = (claims.get("scope") or "").split()
        return Principal(
            sub=sub,
            username=claims.get("username") or claims.get("cognito:username"),
            groups=tuple(g for g in groups if isinstance(g, str)),
            scopes=tuple(scopes),
        )
