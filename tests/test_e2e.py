"""End to end through HTTP with real Cognito tokens: upload, ask, stream, cite."""

from __future__ import annotations

import json
import uuid

import httpx
from openai import OpenAI

from tests.conftest import wait_until_ready

OBSERVATORY = """# Quokka Valley Observatory

## Telescope

The main telescope of the Quokka Valley Observatory is named Marisol. Marisol has a
2.4 metre mirror and was installed in 2019.

## Visiting

Visitors are welcome on Friday nights from 20:00. Tickets cost 12 dollars.
"""
QUESTION = "What is the name of the main telescope of the Quokka Valley Observatory?"


def upload_text(client: httpx.Client, name: str, text: str) -> dict:
    resp = client.post(
        "/v1/documents",
        files={"file": (name, text.encode(), "text/markdown")},
        data={"metadata": json.dumps({"team": "astro"})},
    )
    assert resp.status_code in (200, 202), resp.text
    return dict(resp.json())


def stream_chat(client: httpx.Client, question: str, **extra: object) -> tuple[list[str], list]:
    body = {
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "temperature": 0,
        "max_tokens": 48,
        **extra,
    }
    pieces: list[str] = []
    citations: list = []
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[5:]) for line in lines[:-1]]
    for event in events:
        for choice in event["choices"]:
            pieces.append(choice["delta"].get("content") or "")
    assert "citations" in events[-1], "the last event before [DONE] carries the citations"
    citations = events[-1]["citations"]
    return pieces, citations


def test_upload_ask_stream_and_cite(client: httpx.Client) -> None:
    created = upload_text(client, "quokka-observatory.md", OBSERVATORY)
    assert created["status"] == "pending"
    doc = wait_until_ready(client, created["id"])
    assert doc["status"] == "ready" and doc["chunk_count"] >= 1

    pieces, citations = stream_chat(client, QUESTION)
    answer = "".join(pieces)
    assert len([p for p in pieces if p]) > 3, "the answer arrives as many streamed pieces"
    assert "Marisol" in answer, answer
    assert citations[0]["document_id"] == created["id"]
    assert citations[0]["title"] == "quokka-observatory.md"
    assert citations[0]["index"] == 1
    assert "Marisol" in citations[0]["text"]


def test_same_content_twice_is_a_duplicate(client: httpx.Client) -> None:
    text = f"# Note\n\nA unique note {uuid.uuid4()}."
    first = upload_text(client, "note.md", text)
    again = client.post("/v1/documents", files={"file": ("again.md", text.encode())})
    assert again.status_code == 200
    assert again.json()["duplicate"] is True and again.json()["id"] == first["id"]


def test_openai_sdk_streams_a_cited_answer(
    gateway_url: str, dev_token: str, client: httpx.Client
) -> None:
    created = upload_text(client, "quokka-observatory.md", OBSERVATORY)  # duplicate is fine
    wait_until_ready(client, created["id"])
    sdk = OpenAI(base_url=f"{gateway_url}/v1", api_key=dev_token)
    completion = sdk.chat.completions.create(
        model="rag", messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0
    )
    assert completion.choices[0].message.content
    assert completion.model_extra["citations"][0]["document_id"] == created["id"]
    stream = sdk.chat.completions.create(
        model="rag",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].model_extra["citations"][0]["title"] == "quokka-observatory.md"


def test_requests_without_a_valid_token_get_401(gateway_url: str, dev_token: str, stack) -> None:
    header, payload, signature = dev_token.split(".")
    # Flip the payload: same signature, different claims.
    tampered = ".".join(
        [header, payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB"), signature]
    )
    none_alg = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + payload + "."
    id_token = stack.pool.tokens("dev@example.com", stack.password)["IdToken"]
    cases = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {dev_token}"},
        "garbage": {"Authorization": "Bearer not-a-jwt"},
        "tampered": {"Authorization": f"Bearer {tampered}"},
        "alg none": {"Authorization": f"Bearer {none_alg}"},
        "id token": {"Authorization": f"Bearer {id_token}"},
    }
    for name, headers in cases.items():
        for method, path in (("GET", "/v1/documents"), ("POST", "/v1/chat/completions")):
            resp = httpx.request(
                method,
                f"{gateway_url}{path}",
                headers=headers,
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            assert resp.status_code == 401, (name, path, resp.text)
            assert resp.headers["www-authenticate"] == 'Bearer error="invalid_token"'
            error = resp.json()["error"]
            assert error["type"] == "authentication_error" and error["message"], name


def test_users_cannot_reach_each_others_documents(
    client: httpx.Client, gateway_url: str, other_token: str
) -> None:
    mine = upload_text(client, "private.md", f"# Private\n\nThe vault code is {uuid.uuid4()}.")
    wait_until_ready(client, mine["id"])
    with httpx.Client(
        base_url=gateway_url, timeout=60.0, headers={"Authorization": f"Bearer {other_token}"}
    ) as other:
        assert other.get(f"/v1/documents/{mine['id']}").status_code == 404
        assert other.delete(f"/v1/documents/{mine['id']}").status_code == 404
        listed = other.get("/v1/documents").json()["data"]
        assert mine["id"] not in {d["id"] for d in listed}
        hits = other.post(
            "/v1/search", json={"query": "vault code", "k": 10, "document_ids": [mine["id"]]}
        ).json()["data"]
        assert hits == []
        _, citations = stream_chat(
            other, "What is the vault code?", retrieval={"document_ids": [mine["id"]]}
        )
        assert citations == []
    assert client.get(f"/v1/documents/{mine['id']}").status_code == 200


def test_deleted_document_is_never_retrieved_again(client: httpx.Client) -> None:
    doc = upload_text(client, "ephemeral.md", f"# Ephemeral\n\nThe ferry leaves at {uuid.uuid4()}.")
    wait_until_ready(client, doc["id"])
    query = {"query": "when does the ferry leave", "k": 5, "document_ids": [doc["id"]]}
    assert client.post("/v1/search", json=query).json()["data"]
    assert client.delete(f"/v1/documents/{doc['id']}").status_code == 204
    assert client.get(f"/v1/documents/{doc['id']}").status_code == 404
    assert client.post("/v1/search", json=query).json()["data"] == []
    assert client.delete(f"/v1/documents/{doc['id']}").status_code == 404


def test_bad_uploads_get_clear_errors(client: httpx.Client, stack) -> None:
    before = client.get("/v1/documents", params={"limit": 100}).json()["data"]
    cases = [
        (("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"), 415),
        (("empty.md", b"   \n\n", "text/markdown"), 400),
        (("latin1.txt", "caf\xe9".encode("latin-1"), "text/plain"), 400),
    ]
    for file, status in cases:
        resp = client.post("/v1/documents", files={"file": file})
        assert resp.status_code == status, (file[0], resp.text)
        assert resp.json()["error"]["message"]
    too_big = b"a" * (10 * 1024 * 1024 + 100 * 1024)
    resp = client.post("/v1/documents", files={"file": ("big.txt", too_big, "text/plain")})
    assert resp.status_code == 413
    resp = client.post(
        "/v1/documents", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    after = client.get("/v1/documents", params={"limit": 100}).json()["data"]
    assert [d["id"] for d in after] == [d["id"] for d in before]


def test_json_documents_and_metadata_filters(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    resp = client.post(
        "/v1/documents",
        json={
            "title": "Fleet notes",
            "text": f"The red van {tag} needs new tyres in March.",
            "metadata": {"fleet": tag},
        },
    )
    assert resp.status_code == 202
    wait_until_ready(client, resp.json()["id"])
    match = client.post(
        "/v1/search", json={"query": "red van tyres", "filters": {"metadata": {"fleet": tag}}}
    ).json()["data"]
    assert [h["document_id"] for h in match] == [resp.json()["id"]]
    miss = client.post(
        "/v1/search", json={"query": "red van tyres", "filters": {"metadata": {"fleet": "other"}}}
    ).json()["data"]
    assert miss == []


def test_health_readiness_and_metrics(stack) -> None:
    for name in ("gateway", "retriever", "embedder", "generator"):
        assert httpx.get(f"{stack.url(name)}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{stack.url(name)}/readyz").status_code == 200
        assert "http_requests_total" in httpx.get(f"{stack.url(name)}/metrics").text


def test_retriever_rejects_calls_without_the_service_token(stack) -> None:
    resp = httpx.post(
        f"{stack.url('retriever')}/search",
        json={"query": "x"},
        headers={"X-Tenant-Id": "someone", "Authorization": "Bearer wrong"},
    )
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_service_token"


def test_follow_up_questions_retrieve_from_the_conversation(client: httpx.Client) -> None:
    created = upload_text(client, "quokka-observatory.md", OBSERVATORY)
    wait_until_ready(client, created["id"])
    messages = [
        {"role": "user", "content": "Tell me about the Quokka Valley Observatory."},
        {"role": "assistant", "content": "Its main telescope is named Marisol."},
        {"role": "user", "content": "And how much does a ticket cost?"},
    ]
    resp = client.post(
        "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 16, "temperature": 0, "retrieval": {"k": 2}},
    )
    assert resp.status_code == 200, resp.text
    assert created["id"] in [c["document_id"] for c in resp.json()["citations"]]
