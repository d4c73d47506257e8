"""Fixtures: one real local stack per test session (emulator, PostgreSQL, four services),
and the two layers of the suite.

A stack test needs real services in processes of their own: it uses the `stack` fixture
(directly or through another fixture), or is marked `stack` because it starts servers
itself (ragctl, Ray, a SIGTERM'd server). Every other test is in-process: an app on the
ASGI transport or a loopback server in the test's own process, or plain function calls,
with real models and real parse workers. Each test is marked with its layer, so
`pytest -m inprocess` runs the first layer alone (no stack is started) and
`pytest -m stack` the second; the summary says how long each layer took.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragctl.stack import Ports, Stack
from services.gateway.settings import GatewaySettings

LAYERS = ("inprocess", "stack")
ROOT = Path(__file__).resolve().parents[1]
# Evaluation data (SciFact, BEIR format) for the retrieval quality guard: beside the clone in
# CI (../shared/data), anywhere with RAG_EVAL_DATA. Not part of the product: without it the
# guard is not collected, and the summary says so; RAG_REQUIRE_EVAL_DATA=1 (CI) makes that
# an error.
EVAL_DATA = Path(os.environ.get("RAG_EVAL_DATA") or ROOT.parent / "shared" / "data" / "scifact")
QUALITY_GUARD = "test_retrieval_quality.py"


def eval_data_folder() -> Path:
    return EVAL_DATA


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name != QUALITY_GUARD or (EVAL_DATA / "corpus.jsonl").is_file():
        return None
    if os.environ.get("RAG_REQUIRE_EVAL_DATA") == "1":
        raise pytest.UsageError(
            f"RAG_REQUIRE_EVAL_DATA=1 but {EVAL_DATA} holds no BEIR corpus: the retrieval "
            "quality guard cannot run"
        )
    return True


_layer_of: dict[str, str] = {}
_layer_seconds: dict[str, float] = dict.fromkeys(LAYERS, 0.0)
_layer_tests: dict[str, int] = dict.fromkeys(LAYERS, 0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "inprocess: needs no service in another process")
    config.addinivalue_line("markers", "compose: builds the images and runs docker compose")
    config.addinivalue_line(
        "markers", "stack: needs real services in processes of their own (the session's stack)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("compose"):
            continue  # its own target: make test-compose
        needs_stack = "stack" in getattr(item, "fixturenames", ())
        layer = "stack" if needs_stack or item.get_closest_marker("stack") else "inprocess"
        if not item.get_closest_marker(layer):
            item.add_marker(layer)
        _layer_of[item.nodeid] = layer


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    layer = _layer_of.get(report.nodeid)
    if layer is None:
        return
    _layer_seconds[layer] += report.duration  # setup (the stack's start too), call, teardown
    if report.when == "call":
        _layer_tests[layer] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not (EVAL_DATA / "corpus.jsonl").is_file():
        terminalreporter.write_line(
            f"retrieval quality guard not run: no evaluation data at {EVAL_DATA} "
            "(set RAG_EVAL_DATA to a SciFact BEIR folder)"
        )
    if not any(_layer_tests.values()):
        return
    terminalreporter.section("layers")
    for layer in LAYERS:
        terminalreporter.write_line(
            f"{layer:>9}: {_layer_tests[layer]} tests, {_layer_seconds[layer]:.1f} s"
        )


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
