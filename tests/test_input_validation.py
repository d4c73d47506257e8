"""Bad request fields get a 400 before PostgreSQL sees them; errors keep connections alive."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families

from ragctl.stack import Stack, free_port
from services.common.errors import install_error_handlers
from services.common.observability import install_observability

LONE_SURROGATE = "\\ud800"  # a JSON escape: Python reads it, PostgreSQL cannot store it


def nested_object(depth: int) -> str:
    """A JSON object nested depth levels deep."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


def make_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


@pytest.fixture
def fresh_client(stack: Stack, gateway_url: str) -> Iterator[httpx.Client]:
    """A client for a user of its own, whose document list starts empty."""
    assert stack.pool is not None
    name = f"validation-{uuid.uuid4().hex[:8]}@example.com"
    token = stack.pool.access_token(name, stack.pool.create_user(name))
    with httpx.Client(
        base_url=gateway_url, timeout=120.0, headers={"Authorization": f"Bearer {token}"}
    ) as c:
        yield c


def assert_error(resp: httpx.Response, status: int, param: str | None, case: object) -> None:
    assert resp.status_code == status, (case, resp.status_code, resp.text)
    error = resp.json()["error"]
    assert error["message"] and error["param"] == param, (case, error)
    assert error["type"] == ("unsupported_media_type" if status == 415 else "invalid_request_error")
    assert "Traceback" not in resp.text


def listed_ids(client: httpx.Client) -> list[str]:
    resp = client.get("/v1/documents", params={"limit": 100})
    assert resp.status_code == 200, resp.text
    return [doc["id"] for doc in resp.json()["data"]]


def test_unstorable_or_too_deep_document_fields_get_400_naming_them_and_store_nothing(
    fresh_client: httpx.Client,
) -> None:
    as_json = {"Content-Type": "application/json"}
    json_cases = [
        (f'{{"title": "bad {LONE_SURROGATE}", "text": "x"}}', "title"),
        (f'{{"title": "t", "text": "text {LONE_SURROGATE}"}}', "text"),
        (f'{{"title": "t", "text": "x", "metadata": {{"k": "{LONE_SURROGATE}"}}}}', "metadata"),
        (f'{{"title": "t", "text": "x", "metadata": {{"{LONE_SURROGATE}": 1}}}}', "metadata"),
        (f'{{"title": "t", "text": "x", "metadata": {nested_object(33)}}}', "metadata"),
        (
            f'{{"title": "t", "text": "x", "metadata": {{"k": [[[[[[{nested_object(30)}]]]]]]}}}}',
            "metadata",
        ),
        (f'{{"title": "t", "text": "x", "metadata": {nested_object(5000)}}}', None),
        ("[" * 5000 + "]" * 5000, None),
    ]
    for body, param in json_cases:
        resp = fresh_client.post("/v1/documents", content=body, headers=as_json)
        assert_error(resp, 400, param, body[:80])

    form_cases = [
        f'{{"k": "{LONE_SURROGATE}"}}',
        f'{{"{LONE_SURROGATE}": "v"}}',
        nested_object(33),
        nested_object(1000),
        nested_object(5000),
    ]
    for metadata in form_cases:
        resp = fresh_client.post(
            "/v1/documents",
            files={"file": ("note.txt", b"a small note", "text/plain")},
            data={"metadata": metadata},
        )
        assert_error(resp, 400, "metadata", metadata[:80])
    assert listed_ids(fresh_client) == []

    deepest_allowed = json.loads(nested_object(32))
    resp = fresh_client.post(
        "/v1/documents",
        json={"title": "deep", "text": "deep metadata", "metadata": deepest_allowed},
    )
    assert resp.status_code == 202, resp.text
    found = fresh_client.get("/v1/documents", params={"metadata": nested_object(32)}).json()
    assert [doc["id"] for doc in found["data"]] == [resp.json()["id"]]
    assert found["data"][0]["metadata"] == deepest_allowed


def test_unstorable_or_too_deep_search_and_list_filters_get_400_naming_them(
    fresh_client: httpx.Client,
) -> None:
    as_json = {"Content-Type": "application/json"}
    search_cases = [
        (f'{{"query": "q {LONE_SURROGATE}"}}', "query"),
        (
            f'{{"query": "q", "filters": {{"metadata": {{"k": "{LONE_SURROGATE}"}}}}}}',
            "filters.metadata",
        ),
        (
            f'{{"query": "q", "filters": {{"metadata": {{"{LONE_SURROGATE}": 1}}}}}}',
            "filters.metadata",
        ),
        (f'{{"query": "q", "filters": {{"metadata": {nested_object(33)}}}}}', "filters.metadata"),
        (f'{{"query": "q", "filters": {{"metadata": {nested_object(900)}}}}}', "filters.metadata"),
        (f'{{"query": "q", "filters": {{"metadata": {nested_object(5000)}}}}}', None),
    ]
    for body, param in search_cases:
        resp = fresh_client.post("/v1/search", content=body, headers=as_json)
        assert_error(resp, 400, param, body[:80])

    list_cases = [
        f'{{"k": "{LONE_SURROGATE}"}}',
        f'{{"{LONE_SURROGATE}": 1}}',
        nested_object(33),
        "[" * 1500 + "]" * 1500,  # in a URL: deep, yet short enough to send
        "[1, 2]",
    ]
    for metadata in list_cases:
        resp = fresh_client.get("/v1/documents", params={"metadata": metadata})
        assert_error(resp, 400, "metadata", metadata[:80])


def test_cursors_other_than_the_ones_the_list_wrote_get_400_invalid_cursor(
    fresh_client: httpx.Client,
) -> None:
    doc_id = str(uuid.uuid4())
    well_formed = make_cursor(["2026-01-02T03:04:05.123456+00:00", doc_id])
    assert fresh_client.get("/v1/documents", params={"cursor": well_formed}).status_code == 200
    bad_cursors = {
        "ISO week date": make_cursor(["2026-W49-3", doc_id]),
        "date only": make_cursor(["2026-01-02", doc_id]),
        "no time zone": make_cursor(["2026-01-02T03:04:05.123456", doc_id]),
        "no microseconds": make_cursor(["2026-01-02T03:04:05+00:00", doc_id]),
        "another zone": make_cursor(["2026-01-02T04:04:05.123456+01:00", doc_id]),
        "uuid in capitals": make_cursor(["2026-01-02T03:04:05.123456+00:00", doc_id.upper()]),
        "nested 5,000 deep": base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode(),
        "over-long": base64.urlsafe_b64encode(
            json.dumps(["2026-01-02T03:04:05.123456+00:00", doc_id]).encode() + b" " * 300
        ).decode(),
        "not a list": make_cursor({"created_at": "2026-01-02T03:04:05.123456+00:00"}),
        "a string": make_cursor("ab"),
        "three items": make_cursor(["2026-01-02T03:04:05.123456+00:00", doc_id, 1]),
        "not base64url": "!!" + well_formed,
        "not JSON": base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    }
    for name, cursor in bad_cursors.items():
        resp = fresh_client.get("/v1/documents", params={"cursor": cursor})
        assert_error(resp, 400, "cursor", name)
        assert resp.json()["error"]["message"] == "invalid cursor"


def test_cursor_pages_visit_every_document_once_and_accept_only_the_cursor_as_written(
    fresh_client: httpx.Client,
) -> None:
    created = []
    for n in range(5):
        resp = fresh_client.post("/v1/documents", json={"title": f"page {n}", "text": f"doc {n}"})
        assert resp.status_code == 202, resp.text
        created.append(resp.json()["id"])
    seen: list[str] = []
    cursors: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    for _ in range(5):  # bounded: 5 documents at 2 a page end on the third page
        page = fresh_client.get("/v1/documents", params=params).json()
        seen += [doc["id"] for doc in page["data"]]
        if page["next_cursor"] is None:
            break
        cursors.append(page["next_cursor"])
        params = {"limit": 2, "cursor": page["next_cursor"]}
    assert len(cursors) == 2
    assert sorted(seen) == sorted(created) and len(seen) == len(set(seen))

    # The same position spelled another way (the same instant in another zone) is refused.
    stamp, doc_id = json.loads(base64.urlsafe_b64decode(cursors[0]))
    elsewhere = datetime.fromisoformat(stamp).astimezone(timezone(timedelta(hours=2)))
    respelled = make_cursor([elsewhere.isoformat(timespec="microseconds"), doc_id])
    resp = fresh_client.get("/v1/documents", params={"limit": 2, "cursor": respelled})
    assert_error(resp, 400, "cursor", respelled)


def test_document_uploads_need_exactly_json_or_multipart(fresh_client: httpx.Client) -> None:
    body = json.dumps({"title": "typed", "text": "content types are exact"}).encode()
    refused = [
        "application/jsonfoo",
        "application/json-seq",
        "application/json; charset=latin-1",
        "multipart/form-dataish; boundary=x",
    ]
    for content_type in refused:
        resp = fresh_client.post(
            "/v1/documents", content=body, headers={"Content-Type": content_type}
        )
        assert_error(resp, 415, None, content_type)
    assert listed_ids(fresh_client) == []

    resp = fresh_client.post(
        "/v1/documents", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert resp.status_code == 202, resp.text
    resp = fresh_client.post(
        "/v1/documents", files={"file": ("typed.txt", b"a multipart upload", "text/plain")}
    )
    assert resp.status_code == 202, resp.text
    assert len(listed_ids(fresh_client)) == 2


def test_a_wrong_method_gets_405_as_an_invalid_request(client: httpx.Client) -> None:
    resp = client.put("/v1/documents", json={})
    assert resp.status_code == 405
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "POST" in resp.headers["allow"]


@pytest.fixture
def served_failing_app() -> Iterator[str]:
    """A small app with the shared error handling on uvicorn, with a route that raises."""
    app = FastAPI()
    install_error_handlers(app)
    install_observability(app, "validation-probe")

    @app.get("/peer")
    async def peer(request: Request) -> dict[str, int]:
        assert request.client is not None
        return {"port": request.client.port}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the probe server did not start within 10 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_an_unhandled_error_answers_500_and_keeps_the_connection(
    served_failing_app: str,
) -> None:
    with httpx.Client(base_url=served_failing_app, timeout=10.0) as http:
        first_port = http.get("/peer").json()["port"]
        resp = http.get("/boom", headers={"X-Request-Id": "probe-request-1"})
        assert resp.status_code == 500
        assert resp.json() == {
            "error": {
                "message": "internal server error",
                "type": "server_error",
                "code": None,
                "param": None,
            }
        }
        assert resp.headers["x-request-id"] == "probe-request-1"
        assert resp.headers.get("connection", "").lower() != "close"
        assert http.get("/peer").json()["port"] == first_port  # the same connection
        metrics = http.get("/metrics").text
    counted = {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "http_requests"
        for sample in family.samples
        if sample.labels.get("service") == "validation-probe" and sample.name.endswith("_total")
    }
    assert counted[("/boom", "500")] == 1
