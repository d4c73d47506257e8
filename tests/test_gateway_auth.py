"""Gateway token checks with keys the tests make, key rotation, the JWKS penalty box,
required groups and scopes, and per-user limits.

Two layers. Token checks and limits run in-process with no service behind the gateway:
a request that passes them reaches the (absent) retriever and gets its 503, one that
fails them gets 401, 403 or 429 without reaching it. Streams run against the stack's real
generator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk, jwt

from ragctl.stack import Stack, free_port
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

ISSUER = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_TestPool"
CLIENT = "test-client-id"


class Key:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.public_pem = (
            private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        self.jwk = {
            **jwk.construct(self.public_pem, "RS256").to_dict(),
            "kid": kid,
            "use": "sig",
            "alg": "RS256",
        }

    def sign(self, claims: dict[str, Any], **headers: Any) -> str:
        return jwt.encode(
            claims, self.private_pem, algorithm="RS256", headers={"kid": self.kid, **headers}
        )


class JwksServer:
    """The identity provider's key endpoint, on loopback, counting its fetches."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.fetches += 1
                body = json.dumps({"keys": [k.jwk for k in server.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def key() -> Key:
    return Key("key-1")


@pytest.fixture
def idp(key: Key) -> Iterator[JwksServer]:
    server = JwksServer([key])
    yield server
    server.close()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "sub": f"user-{uuid.uuid4().hex[:8]}",
        "iss": ISSUER,
        "client_id": CLIENT,
        "token_use": "access",
        "iat": now,
        "exp": now + 600,
        "scope": "rag/read",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def gateway_settings(services: Stack | None, idp: JwksServer, **overrides: Any) -> GatewaySettings:
    """A gateway trusting the test identity provider, in front of the stack's services, or
    of none (a port that refuses connections) when services is None."""
    if services is None:
        absent = f"http://127.0.0.1:{free_port()}"
        upstream = {"retriever_url": absent, "generator_url": absent, "service_token": "t" * 32}
    else:
        upstream = {
            "retriever_url": services.url("retriever"),
            "generator_url": services.url("generator"),
            "service_token": services.service_token,
        }
    return GatewaySettings(
        cognito_issuer=ISSUER,
        cognito_jwks_url=idp.url,
        cognito_client_id=CLIENT,
        **upstream,
        **overrides,
    )


PASSED = 503
"""What a request that passes the checks gets from a gateway with no retriever behind it."""


def assert_passed(resp: httpx.Response) -> None:
    assert resp.status_code == PASSED, resp.text
    assert resp.json()["error"]["code"] == "retriever_unavailable"


@asynccontextmanager
async def gateway(idp: JwksServer, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app in-process (ASGI transport, with its lifespan), no services behind it."""
    settings = gateway_settings(None, idp, **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60
        ) as client:
            yield client


@asynccontextmanager
async def served(
    stack: Stack, idp: JwksServer, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app on a real loopback HTTP server (uvicorn), for streaming tests."""
    settings = gateway_settings(stack, idp, **overrides)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "gateway did not start"
        await asyncio.sleep(0.05)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        await task


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256_with(secret: str, kid: str) -> str:
    """The algorithm-confusion attack: HMAC-signed with the RSA public key as the secret
    (python-jose refuses to make one, so it is built by hand)."""
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64(claims())}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def test_a_valid_token_passes_and_every_bad_one_gets_401(idp: JwksServer, key: Key) -> None:
    other = Key("key-unknown")
    good = key.sign(claims())
    header, payload, signature = good.split(".")
    forged_payload = b64(claims(sub="someone-else"))
    now = int(time.time())
    bad_tokens = {
        "expired": key.sign(claims(exp=now - 5, iat=now - 700)),
        "not yet valid": key.sign(claims(nbf=now + 300)),
        "wrong issuer": key.sign(claims(iss="https://cognito-idp.eu-west-1.amazonaws.com/x")),
        "wrong client": key.sign(claims(client_id="another-client")),
        "id token": key.sign(claims(token_use="id", client_id=None, aud=CLIENT)),
        "unknown kid": other.sign(claims()),
        "no kid": jwt.encode(claims(), key.private_pem, algorithm="RS256"),
        "alg none": f"{b64({'alg': 'none', 'kid': key.kid})}.{payload}.",
        "hs256 with the public key": hs256_with(key.public_pem, key.kid),
        "tampered payload": f"{header}.{forged_payload}.{signature}",
        "missing exp": key.sign(claims(exp=None)),
        "missing sub": key.sign(claims(sub=None)),
        "garbage": "a.b.c",
    }
    async with gateway(idp) as client:
        assert_passed(await client.get("/v1/documents", headers=bearer(good)))
        for name, token in bad_tokens.items():
            resp = await client.get("/v1/documents", headers=bearer(token))
            assert resp.status_code == 401, (name, resp.text)
            assert resp.headers["www-authenticate"] == 'Bearer error="invalid_token"', name
            assert resp.json()["error"]["code"] == "invalid_token", name


async def test_key_rotation_needs_no_restart(idp: JwksServer, key: Key) -> None:
    async with gateway(idp, jwks_refresh_penalty_s=0.2) as client:
        assert_passed(await client.get("/v1/documents", headers=bearer(key.sign(claims()))))
        new_key = Key("key-2")
        idp.keys = [new_key]  # the pool rotates its signing key
        await asyncio.sleep(0.3)
        assert_passed(await client.get("/v1/documents", headers=bearer(new_key.sign(claims()))))


async def test_unknown_kids_do_not_flood_the_identity_provider(idp: JwksServer, key: Key) -> None:
    async with gateway(idp, jwks_refresh_penalty_s=60) as client:
        assert_passed(await client.get("/v1/documents", headers=bearer(key.sign(claims()))))
        fetched = idp.fetches
        for i in range(25):
            token = Key.__new__(Key)  # reuse the key material under many made-up kids
            token.kid, token.private_pem = f"made-up-{i}", key.private_pem
            resp = await client.get("/v1/documents", headers=bearer(token.sign(claims())))
            assert resp.status_code == 401
        assert idp.fetches - fetched <= 1


async def test_required_groups_and_scopes_answer_403(idp: JwksServer, key: Key) -> None:
    async with gateway(idp, required_scopes=["rag/admin"]) as client:
        resp = await client.get("/v1/documents", headers=bearer(key.sign(claims())))
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "insufficient_scope"
        resp = await client.get(
            "/v1/documents", headers=bearer(key.sign(claims(scope="rag/read rag/admin")))
        )
        assert_passed(resp)
    async with gateway(idp, required_groups=["staff"]) as client:
        resp = await client.get("/v1/documents", headers=bearer(key.sign(claims())))
        assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"
        resp = await client.get(
            "/v1/documents", headers=bearer(key.sign(claims(**{"cognito:groups": ["staff"]})))
        )
        assert_passed(resp)


async def test_each_user_has_a_rate_limit_of_their_own(idp: JwksServer, key: Key) -> None:
    async with gateway(idp, rate_limit_burst=3, rate_limit_per_minute=6) as client:
        token = key.sign(claims())
        statuses = [
            (await client.get("/v1/documents", headers=bearer(token))).status_code for _ in range(4)
        ]
        assert statuses == [PASSED, PASSED, PASSED, 429]
        limited = await client.get("/v1/documents", headers=bearer(token))
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
        # another user has a bucket of their own
        other = key.sign(claims())
        assert_passed(await client.get("/v1/documents", headers=bearer(other)))


async def test_stream_cap_and_body_cap(stack: Stack, idp: JwksServer, key: Key) -> None:
    # Streams need a real server: the ASGI test transport buffers whole responses.
    async with served(stack, idp, max_concurrent_streams=1, max_body_bytes=2000) as client:
        token = key.sign(claims())
        body = {
            "messages": [{"role": "user", "content": "Write a story."}],
            "stream": True,
            "max_tokens": 200,
            "retrieval": {"enabled": False},
        }
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=bearer(token)
        ) as first:
            assert first.status_code == 200
            second = await client.post("/v1/chat/completions", json=body, headers=bearer(token))
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "too_many_streams"
        # the first stream is closed (client went away): its slot is free again
        for _ in range(50):
            third = await client.post(
                "/v1/chat/completions",
                headers=bearer(token),
                json={**body, "stream": False, "max_tokens": 4},
            )
            if third.status_code != 429:
                break
            await asyncio.sleep(0.1)
        assert third.status_code == 200
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        resp = await client.post("/v1/chat/completions", json=big, headers=bearer(token))
        assert resp.status_code == 413


async def test_max_tokens_over_the_cap_is_400(idp: JwksServer, key: Key) -> None:
    async with gateway(idp, max_tokens_cap=64) as client:
        resp = await client.post(
            "/v1/chat/completions",
            headers=bearer(key.sign(claims())),
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65},
        )
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"


async def test_quiet_streams_get_keep_alive_comments(
    stack: Stack, idp: JwksServer, key: Key
) -> None:
    async with served(stack, idp, sse_keepalive_s=0.001) as client:
        body = {
            "messages": [{"role": "user", "content": "Say hello."}],
            "stream": True,
            "max_tokens": 8,
            "retrieval": {"enabled": False},
        }
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=bearer(key.sign(claims()))
        ) as resp:
            lines = [line async for line in resp.aiter_lines()]
    assert ": keep-alive" in lines
    assert lines[-2] == "data: [DONE]" or "data: [DONE]" in lines
    assert any(line.startswith("data: {") and '"content"' in line for line in lines)


async def test_identity_provider_down_is_503_not_401(key: Key) -> None:
    down = JwksServer([key])
    down.close()  # its port now refuses connections
    async with gateway(down) as client:
        for _ in range(3):  # the first fetch fails, then the penalty window: still 503
            resp = await client.get("/v1/documents", headers=bearer(key.sign(claims())))
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "jwks_unavailable"
            assert int(resp.headers["retry-after"]) >= 1
