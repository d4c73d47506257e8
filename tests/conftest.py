"""Fixtures: one real local stack per test session (emulator, PostgreSQL, four services)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragctl.stack import Ports, Stack
from services.gateway.settings import GatewaySettings


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    stack = Stack(home=Path(home), ports=Ports.free())
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def gateway_url(stack: Stack) -> str:
    return stack.url("gateway")


@pytest.fixture(scope="session")
def dev_token(stack: Stack) -> str:
    return stack.access_token()


@pytest.fixture(scope="session")
def other_token(stack: Stack) -> str:
    """A second user of the same pool."""
    assert stack.pool is not None
    password = stack.pool.create_user("other@example.com")
    return stack.pool.access_token("other@example.com", password)


@pytest.fixture
def client(gateway_url: str, dev_token: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gateway_url, timeout=120.0, headers={"Authorization": f"Bearer {dev_token}"}
    ) as c:
        yield c


def wait_until_ready(client: httpx.Client, doc_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        doc = client.get(f"/v1/documents/{doc_id}").json()
        if doc["status"] in ("ready", "failed"):
            return dict(doc)
        assert time.monotonic() < deadline, f"document {doc_id} still {doc['status']}"
        time.sleep(0.2)


def stack_gateway_settings(stack: Stack, **overrides: Any) -> GatewaySettings:
    """Settings of a gateway that trusts the stack's Cognito pool and calls its services."""
    assert stack.pool is not None
    given: dict[str, Any] = {
        "cognito_issuer": stack.pool.issuer,
        "cognito_jwks_url": stack.pool.jwks_url,
        "cognito_client_id": stack.pool.client_id,
        "retriever_url": stack.url("retriever"),
        "generator_url": stack.url("generator"),
        "service_token": stack.service_token,
    }
    return GatewaySettings(**{**given, **overrides})
