"""Through the public API: a document with text the tokenizer cannot bound is still ingested."""

from __future__ import annotations

import random
import string
import uuid

import httpx

from services.retriever.chunking import MAX_CHUNK_CHARS
from tests.conftest import wait_until_ready


def test_a_document_with_a_40000_character_word_becomes_ready_and_searchable(
    client: httpx.Client,
) -> None:
    tag = uuid.uuid4().hex[:8]
    word = "".join(random.Random(11).choices(string.ascii_letters + string.digits, k=40_000))
    text = (
        f"The lighthouse keeper {tag} winds the lamp clockwork every evening.\n\n"
        f"Attached key material: {word}\n\n"
        f"The fog horn at station {tag} is tested on the first Monday of each month."
    )
    resp = client.post("/v1/documents", json={"title": f"Keeper log {tag}", "text": text})
    assert resp.status_code == 202, resp.text
    doc = wait_until_ready(client, resp.json()["id"], timeout_s=120)
    assert doc["status"] == "ready", doc["error"]
    assert doc["chunk_count"] > len(word) // MAX_CHUNK_CHARS  # more than any cap allows in one

    resp = client.post(
        "/v1/search", json={"query": f"When is the fog horn at station {tag} tested?", "k": 5}
    )
    assert resp.status_code == 200, resp.text
    hits = [hit for hit in resp.json()["data"] if hit["document_id"] == doc["id"]]
    assert any("first Monday of each month" in hit["text"] for hit in hits), hits
