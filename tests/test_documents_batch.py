"""Bulk loading through the gateway with real tokens: `POST /v1/documents/batch` stores many
documents in one request (one rate-limit token), `GET /v1/documents/summary` says how their
ingestion stands in one call.

Each test loads as a user of its own (the stack's other tests share the dev user) and
deletes what it stored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ragctl.stack import Stack
from services.gateway.app import create_app
from tests.conftest import stack_gateway_settings

READY_TIMEOUT_S = 120.0


def new_token(stack: Stack) -> str:
    assert stack.pool is not None
    return stack.pool.user_token(f"batch-{uuid.uuid4().hex[:10]}@example.com")


@pytest.fixture
def client(gateway_url: str, stack: Stack) -> Iterator[httpx.Client]:
    """A client of a user of its own; what it stored is deleted after the test."""
    headers = {"Authorization": f"Bearer {new_token(stack)}"}
    with httpx.Client(base_url=gateway_url, timeout=120.0, headers=headers) as c:
        yield c
        for doc in all_documents(c):
            assert c.delete(f"/v1/documents/{doc['id']}").status_code == 204


def all_documents(client: httpx.Client) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = client.get("/v1/documents", params=params).json()
        docs += page["data"]
        if not page["next_cursor"]:
            return docs
        params["cursor"] = page["next_cursor"]


def document(tag: str, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "title": f"Note {n}",
        "text": f"Field note {n} of {tag}: the heron at pond {n} stood still for {n} minutes.",
        "metadata": {"tag": tag, "n": n},
        **extra,
    }


def summary(client: httpx.Client, tag: str | None = None) -> dict[str, int]:
    params = {"metadata": json.dumps({"tag": tag})} if tag else {}
    resp = client.get("/v1/documents/summary", params=params)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def wait_for_summary(client: httpx.Client, tag: str) -> dict[str, int]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        counts = summary(client, tag)
        if counts["pending"] + counts["processing"] == 0:
            return counts
        assert time.monotonic() < deadline, f"still ingesting: {counts}"
        time.sleep(0.3)


def assert_error(resp: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = dict(resp.json()["error"])
    assert error["param"] == param, error
    assert "Traceback" not in resp.text
    return error


def test_a_batch_lands_in_input_order_and_the_summary_reaches_ready(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    sent = [document(tag, n) for n in range(5)]
    resp = client.post("/v1/documents/batch", json={"documents": sent})
    assert resp.status_code == 202, resp.text
    data = resp.json()["data"]
    assert [doc["title"] for doc in data] == [doc["title"] for doc in sent]
    assert [doc["metadata"] for doc in data] == [doc["metadata"] for doc in sent]
    assert {doc["status"] for doc in data} == {"pending"}
    assert not any(doc["duplicate"] for doc in data)
    assert len({doc["id"] for doc in data}) == 5

    assert wait_for_summary(client, tag) == {
        "pending": 0,
        "processing": 0,
        "ready": 5,
        "failed": 0,
        "total": 5,
    }
    for doc in data:  # each one as if uploaded alone
        stored = client.get(f"/v1/documents/{doc['id']}").json()
        assert stored["status"] == "ready" and stored["chunk_count"] >= 1
    hits = client.post(
        "/v1/search", json={"query": f"heron at pond 3 {tag}", "mode": "text", "k": 1}
    ).json()["data"]
    assert hits[0]["metadata"] == {"tag": tag, "n": 3}

    # The summary counts every document of the caller, and a metadata filter a subset.
    assert summary(client)["total"] == 5
    assert summary(client, "another tag")["total"] == 0


def test_duplicates_inside_and_across_batches(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    first, second = document(tag, 1), document(tag, 2)
    again = {**first, "title": "The same text, another title"}
    resp = client.post("/v1/documents/batch", json={"documents": [first, second, again]})
    assert resp.status_code == 202, resp.text
    a, b, a_again = resp.json()["data"]
    assert not a["duplicate"] and not b["duplicate"]
    assert a_again["duplicate"] and a_again["id"] == a["id"] and a_again["title"] == "Note 1"

    # Every item known: 200, the existing documents in input order.
    resp = client.post("/v1/documents/batch", json={"documents": [second, first]})
    assert resp.status_code == 200, resp.text
    assert [(doc["id"], doc["duplicate"]) for doc in resp.json()["data"]] == [
        (b["id"], True),
        (a["id"], True),
    ]
    # One new among known ones: 202.
    resp = client.post("/v1/documents/batch", json={"documents": [first, document(tag, 3)]})
    assert resp.status_code == 202, resp.text
    assert [doc["duplicate"] for doc in resp.json()["data"]] == [True, False]
    # A single upload of batched content is a duplicate too.
    resp = client.post("/v1/documents", json=second)
    assert resp.status_code == 200 and resp.json()["id"] == b["id"]
    assert wait_for_summary(client, tag)["ready"] == 3


def test_an_oversized_batch_is_refused_and_nothing_is_stored(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    resp = client.post(
        "/v1/documents/batch", json={"documents": [document(tag, n) for n in range(101)]}
    )
    error = assert_error(resp, 413, "documents")
    assert error["code"] == "too_many_documents"
    assert error["message"] == (
        "a batch holds at most 100 documents, this one has 101: send the rest in further batches"
    )
    # Past the JSON body limit (1 MiB), however few the documents.
    big = [document(tag, n, text="x" * 600_000 + str(n)) for n in range(2)]
    resp = client.post("/v1/documents/batch", json={"documents": big})
    assert_error(resp, 413, None)
    assert "larger than 1048576 bytes" in resp.json()["error"]["message"]
    assert summary(client, tag)["total"] == 0


def test_a_bad_item_is_named_and_nothing_is_stored(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    good = [document(tag, n) for n in range(3)]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"title": "Nul", "text": "a\x00b", "metadata": {"tag": tag}}, "documents[3].text"),
        ({"title": "", "text": "no title", "metadata": {"tag": tag}}, "documents[3].title"),
        ({"title": "No text", "metadata": {"tag": tag}}, "documents[3].text"),
        ({**document(tag, 9), "media_type": "application/pdf"}, "documents[3].media_type"),
        (
            {**document(tag, 9), "metadata": {"deep": [[1.5, {"x": "\x00"}]]}},
            "documents[3].metadata",
        ),
        ({**document(tag, 9), "metadata": "not an object"}, "documents[3].metadata"),
        ("a string", "documents[3]"),
    ]
    for item, param in cases:
        resp = client.post("/v1/documents/batch", json={"documents": [*good, item]})
        error = assert_error(resp, 400, param)
        assert error["message"].startswith(param), error
    for body, param in (({"documents": []}, "documents"), ({"docs": good}, "documents")):
        assert_error(client.post("/v1/documents/batch", json=body), 400, param)
    resp = client.post(
        "/v1/documents/batch", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(resp, 400, None)
    resp = client.post("/v1/documents/batch", files={"file": ("a.txt", b"text")})
    assert_error(resp, 415, None)
    assert summary(client, tag)["total"] == 0
    assert_error(client.get("/v1/documents/summary", params={"metadata": "[1]"}), 400, "metadata")


def test_a_users_summary_counts_their_own_documents_only(
    client: httpx.Client, gateway_url: str, stack: Stack
) -> None:
    tag = uuid.uuid4().hex
    resp = client.post("/v1/documents/batch", json={"documents": [document(tag, 1)]})
    assert resp.status_code == 202, resp.text
    headers = {"Authorization": f"Bearer {new_token(stack)}"}
    with httpx.Client(base_url=gateway_url, timeout=60.0, headers=headers) as other:
        assert summary(other, tag)["total"] == 0
        assert summary(other) == dict.fromkeys(
            ("pending", "processing", "ready", "failed", "total"), 0
        )
    assert summary(client, tag)["total"] == 1


async def test_a_batch_costs_one_request_against_the_rate_limit(stack: Stack) -> None:
    """With a burst of 3 (and no refill during the test), 3 batches of 10 pass, the 4th
    request is 429."""
    settings = stack_gateway_settings(stack, rate_limit_burst=3, rate_limit_per_minute=1)
    app = create_app(settings)
    token, tag = new_token(stack), uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60
        ) as gateway,
    ):
        for batch in range(3):
            items = [document(tag, 10 * batch + n) for n in range(10)]
            resp = await gateway.post(
                "/v1/documents/batch", json={"documents": items}, headers=headers
            )
            assert resp.status_code == 202, resp.text
        resp = await gateway.post(
            "/v1/documents/batch", json={"documents": [document(tag, 99)]}, headers=headers
        )
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited"
    with httpx.Client(base_url=stack.url("gateway"), timeout=60.0, headers=headers) as client:
        assert summary(client, tag)["total"] == 30
        for doc in all_documents(client):
            assert client.delete(f"/v1/documents/{doc['id']}").status_code == 204
