"""The retriever against the real embedded PostgreSQL: formats, durable jobs, isolation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from ragctl.stack import Stack, free_port, wait_ready
from services.retriever import schema
from services.retriever.store import Store, prepare_connection
from tests.conftest import wait_until_ready
from tests.documents import make_docx, make_encrypted_pdf, make_html, make_pdf

SERVICE_TOKEN = "retriever-test-token"


def create_database(stack: Stack) -> str:
    """A fresh database in the embedded cluster; its owner's URL."""
    assert stack.database_url is not None
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return make_conninfo(stack.database_url, dbname=name)


def as_app_role(url: str) -> str:
    return make_conninfo(url, user="rag_app")


@contextmanager
def retriever_process(
    stack: Stack, database_url: str, embedder_url: str, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A second retriever on its own port and database, e.g. to be killed mid-job."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.retriever"],
        env={
            **os.environ,
            "RETRIEVER_HOST": "127.0.0.1",
            "RETRIEVER_PORT": str(port),
            "RETRIEVER_DATABASE_URL": database_url,
            "RETRIEVER_APP_DATABASE_URL": as_app_role(database_url),
            "RETRIEVER_EMBEDDER_URL": embedder_url,
            "RETRIEVER_SERVICE_TOKEN": SERVICE_TOKEN,
            "RETRIEVER_EMBEDDER_WAIT_S": "30",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


class FaultyEmbedder:
    """A proxy in front of the real embedder that can stall or refuse embedding calls."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.mode = "forward"  # or "stall", "refuse"
        self.embed_calls = 0
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _relay(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path.startswith("/v1/embeddings"):
                    proxy.embed_calls += 1
                    if proxy.mode == "stall":
                        proxy.release.wait(60)
                        return
                    if proxy.mode == "refuse":
                        self.send_response(503)
                        self.send_header("content-length", "0")
                        self.end_headers()
                        return
                resp = httpx.request(
                    method,
                    proxy.target + self.path,
                    content=body or None,
                    headers={"content-type": "application/json"},
                    timeout=60,
                )
                self.send_response(resp.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            def do_GET(self) -> None:  # noqa: N802
                self._relay("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._relay("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_embedder(stack: Stack) -> Iterator[FaultyEmbedder]:
    proxy = FaultyEmbedder(stack.url("embedder"))
    try:
        yield proxy
    finally:
        proxy.close()


def upload(client: httpx.Client, name: str, raw: bytes, media_type: str, **meta: str) -> dict:
    resp = client.post(
        "/v1/documents",
        files={"file": (name, raw, media_type)},
        data={"metadata": json.dumps(meta)} if meta else None,
    )
    assert resp.status_code in (200, 202), resp.text
    return dict(resp.json())


def search(client: httpx.Client, query: str, **body: object) -> list[dict]:
    resp = client.post("/v1/search", json={"query": query, **body})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["data"])


def test_every_format_ingests_with_its_positions(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    uploads = {
        "pdf": (
            "manual.pdf",
            make_pdf([f"Page one covers setup {tag}.", f"The pump model {tag} is the Kestrel 9."]),
            "application/pdf",
        ),
        "docx": (
            "handbook.docx",
            make_docx([("Heading 1", "Holidays"), ("Normal", f"Staff {tag} get 31 days off.")]),
            docx,
        ),
        "html": (
            "page.html",
            make_html([("Opening hours", [f"The depot {tag} opens at 07:30 on weekdays."])]),
            "text/html",
        ),
        "md": ("notes.md", f"# Tides\n\nHigh tide at harbour {tag} is at 14:10.".encode(), ""),
        "txt": ("plain.txt", f"The locker code at site {tag} is 4471.".encode(), "text/plain"),
    }
    docs = {kind: upload(client, *spec, kind=kind) for kind, spec in uploads.items()}
    for kind, doc in docs.items():
        ready = wait_until_ready(client, doc["id"])
        assert ready["status"] == "ready", (kind, ready)
    checks = {
        "pdf": ("Which pump model?", "Kestrel 9", {"page": 1, "page_end": 2}),
        "docx": ("How many days off do staff get?", "31 days", {"heading": "Holidays"}),
        "html": ("When does the depot open?", "07:30", {"heading": "Opening hours"}),
        "md": ("When is high tide?", "14:10", {"heading": "Tides"}),
        "txt": ("What is the locker code?", "4471", {}),
    }
    for kind, (query, expected, position) in checks.items():
        hits = search(client, f"{query} {tag}", k=3, document_ids=[docs[kind]["id"]])
        assert hits and expected in hits[0]["text"], (kind, hits)
        assert position.items() <= hits[0]["position"].items(), (kind, hits[0]["position"])
    listed = client.get("/v1/documents", params={"metadata": json.dumps({"kind": "pdf"})})
    assert docs["pdf"]["id"] in [d["id"] for d in listed.json()["data"]]
    assert all(d["metadata"]["kind"] == "pdf" for d in listed.json()["data"])


def test_unreadable_documents_fail_with_a_reason(client: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    keeper = upload(client, "keeper.md", f"# Keep\n\nThe keeper {tag} stays.".encode(), "")
    pdf = make_pdf([f"Secret plans {tag}."])
    failing = {
        "password-protected": make_encrypted_pdf([f"Locked {tag}."], "hunter2"),
        "corrupt": pdf[: len(pdf) // 2],
        "no text": make_pdf([""]),
    }
    docs = {
        reason: upload(client, f"{reason}.pdf", raw, "application/pdf")
        for reason, raw in failing.items()
    }
    for reason, doc in docs.items():
        done = wait_until_ready(client, doc["id"])
        assert done["status"] == "failed", (reason, done)
        assert reason.split("-")[0] in done["error"].lower(), (reason, done["error"])
    for name, raw, media_type in (
        ("fake.pdf", b"GIF89a not a pdf", "application/pdf"),
        ("fake.docx", b"plain bytes", ""),
    ):
        resp = client.post("/v1/documents", files={"file": (name, raw, media_type)})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["message"]
    assert wait_until_ready(client, keeper["id"])["status"] == "ready"


async def test_chunks_fit_the_embedder_window_and_keep_headings(
    stack: Stack, client: httpx.Client
) -> None:
    alpha_text = " ".join(f"Sentence {i} is about the river at dawn." for i in range(150))
    runon = " ".join(f"word{i} antidisestablishmentarianism" for i in range(400))  # no full stops
    text = f"# Alpha\n\n{alpha_text}\n\n## Beta\n\n{runon}\n\n## Gamma\n\nShort closing line."
    doc = upload(client, f"long-{uuid.uuid4().hex}.md", text.encode(), "text/markdown")
    assert wait_until_ready(client, doc["id"])["status"] == "ready"
    assert stack.database_url is not None
    async with await psycopg.AsyncConnection.connect(stack.database_url) as conn:
        cur = await conn.execute(
            "SELECT ordinal, text, position FROM chunks WHERE document_id = %s ORDER BY ordinal",
            (uuid.UUID(doc["id"]),),
        )
        rows = await cur.fetchall()
    assert [row[0] for row in rows] == list(range(len(rows)))
    counts = httpx.post(
        f"{stack.url('embedder')}/tokenize",
        json={"input": [row[1] for row in rows], "input_type": "passage"},
    ).json()
    assert max(item["tokens"] for item in counts["data"]) <= counts["max_tokens"]
    headings = [row[2].get("heading") for row in rows]
    assert headings[0] == "Alpha" and headings[-1] == "Gamma" and "Beta" in headings
    assert len(rows) >= 6, "a long document is split into several chunks"
    # Consecutive chunks of one section overlap by whole sentences.
    alpha = [row[1] for row in rows if row[2].get("heading") == "Alpha"]
    assert len(alpha) >= 3
    for first, second in zip(alpha, alpha[1:], strict=False):
        opening = second.split(". ")[0] + "."
        assert first.endswith(opening) or f"{opening} " in first, (first[-80:], second[:80])


def test_a_killed_replicas_job_is_taken_back_at_once_and_completes_once(
    stack: Stack, faulty_embedder: FaultyEmbedder
) -> None:
    url = create_database(stack)
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}", "X-Tenant-Id": "tenant-kill"}
    text = "# Lighthouse\n\n" + "The lighthouse keeper logs every passing ship. " * 200
    faulty_embedder.mode = "stall"
    # A 60 s lease: the next replica can only take the job back within seconds because the
    # killed one's liveness lock went with its connections.
    env = {"RETRIEVER_INGEST_LEASE_S": "60", "RETRIEVER_INGEST_POLL_S": "0.2"}
    with retriever_process(stack, url, faulty_embedder.url, **env) as (base, proc):
        assert wait_ready(base, 60, proc), proc.stderr.read().decode() if proc.stderr else ""
        resp = httpx.post(
            f"{base}/documents",
            json={"title": "Lighthouse", "text": text, "media_type": "text/markdown"},
            headers=headers,
        )
        assert resp.status_code == 202, resp.text
        doc_id = resp.json()["id"]
        deadline = time.monotonic() + 30
        while faulty_embedder.embed_calls == 0:  # the worker is now mid-job
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    with psycopg.connect(url) as conn:
        job = conn.execute(
            "SELECT attempts, leased_by IS NOT NULL FROM ingest_jobs WHERE document_id = %s",
            (doc_id,),
        ).fetchone()
        assert job == (1, True)
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
    # The embedder is down for a while when the next replica takes over: it backs off.
    faulty_embedder.mode = "refuse"
    with retriever_process(stack, url, faulty_embedder.url, **env) as (base, proc):
        assert wait_ready(base, 60, proc)
        deadline = time.monotonic() + 20  # well inside the dead replica's 60 s lease
        while True:
            doc = httpx.get(f"{base}/documents/{doc_id}", headers=headers).json()
            if doc["status"] == "pending" and "will retry" in (doc["error"] or ""):
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.2)
        faulty_embedder.mode = "forward"
        deadline = time.monotonic() + 60
        while doc["status"] != "ready":
            assert doc["status"] in ("pending", "processing"), doc
            assert time.monotonic() < deadline, doc
            time.sleep(0.2)
            doc = httpx.get(f"{base}/documents/{doc_id}", headers=headers).json()
        again = httpx.post(
            f"{base}/documents",
            json={"title": "Again", "text": text, "media_type": "text/markdown"},
            headers=headers,
        )
        assert again.status_code == 200 and again.json()["duplicate"] is True
    with psycopg.connect(url) as conn:
        ordinals = [r[0] for r in conn.execute("SELECT ordinal FROM chunks ORDER BY ordinal")]
        assert ordinals == list(range(doc["chunk_count"])) and ordinals
        assert conn.execute("SELECT count(*) FROM ingest_jobs").fetchone() == (0,)


def test_a_different_embedding_model_is_refused(stack: Stack) -> None:
    url = create_database(stack)
    schema.migrate(url, "model-a", 384)
    schema.migrate(url, "model-a", 384)  # twice is fine
    with pytest.raises(schema.ModelMismatchError, match="model-a"):
        schema.migrate(url, "model-b", 384)
    with pytest.raises(schema.ModelMismatchError, match="768"):
        schema.migrate(url, "model-a", 768)
    # The service itself refuses to start on it, and says why.
    with retriever_process(stack, url, stack.url("embedder")) as (base, proc):
        assert proc.wait(timeout=60) != 0
        assert proc.stderr is not None
        assert "holds embeddings of model-a" in proc.stderr.read().decode()


def test_migrations_are_safe_concurrently_and_twice(stack: Stack) -> None:
    url = create_database(stack)
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(schema.migrate, url, "m", 8, hnsw_m=8) for _ in range(3)]
        for run in runs:
            run.result()
    schema.migrate(url, "m", 8, hnsw_m=8, hnsw_ef_construction=40)
    with psycopg.connect(url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
        assert versions == list(range(1, len(schema.MIGRATIONS) + 1))
        options = conn.execute(
            "SELECT reloptions FROM pg_class WHERE relname = 'chunks_embedding_hnsw'"
        ).fetchone()
        assert options is not None and set(options[0]) == {"m=8", "ef_construction=40"}


def test_row_level_security_binds_the_application_role(stack: Stack) -> None:
    url = create_database(stack)
    schema.migrate(url, "m", 3)
    with psycopg.connect(as_app_role(url), autocommit=True) as conn:
        for tenant in ("alice", "bob"):
            with conn.transaction():
                conn.execute("SELECT set_config('app.user_id', %s, true)", (tenant,))
                conn.execute(
                    "INSERT INTO documents (id, user_id, title, content_hash, media_type) "
                    "VALUES (%s, %s, 'doc', 'h', 'text/plain')",
                    (uuid.uuid4(), tenant),
                )
        with conn.transaction():
            conn.execute("SELECT set_config('app.user_id', 'alice', true)")
            # A forged tenant in the SQL parameters reads, changes and writes nothing of bob's.
            assert conn.execute(
                "SELECT count(*) FROM documents WHERE user_id = %s", ("bob",)
            ).fetchone() == (0,)
            cur = conn.execute("UPDATE documents SET title = 'x' WHERE user_id = %s", ("bob",))
            assert cur.rowcount == 0
            assert conn.execute("SELECT count(*) FROM documents").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            with conn.transaction():
                conn.execute("SELECT set_config('app.user_id', 'alice', true)")
                conn.execute(
                    "INSERT INTO documents (id, user_id, title, content_hash, media_type) "
                    "VALUES (%s, 'bob', 'forged', 'h2', 'text/plain')",
                    (uuid.uuid4(),),
                )
        # The tenant ended with its transaction: this connection now sees nobody's rows.
        assert conn.execute("SELECT count(*) FROM documents").fetchone() == (0,)
        for statement in (
            "ALTER TABLE documents DISABLE ROW LEVEL SECURITY",
            "SET ROLE postgres",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        conn.execute("SET row_security = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM documents")


async def test_tenants_never_cross_through_a_shared_pool(stack: Stack) -> None:
    """Two tenants interleaved on one pooled connection each see only their own rows."""
    assert stack.database_url is not None

    async with AsyncConnectionPool(
        as_app_role(stack.database_url),
        min_size=1,
        max_size=1,
        configure=prepare_connection,
        kwargs={"autocommit": True, "prepare_threshold": None},
    ) as pool:
        store = Store(pool)
        tenants = {f"pool-{name}-{uuid.uuid4().hex[:6]}": name for name in ("red", "blue")}
        docs = {}
        for tenant, colour in tenants.items():
            text = "\n\n".join(
                f"The {colour} team stores crate {i} in warehouse {colour.upper()}-{i}."
                for i in range(300)
            )
            doc, created = await store.create_document(
                tenant, f"{colour} inventory", "text/plain", {"colour": colour}, text.encode(), "h"
            )
            assert created
            docs[tenant] = doc["id"]
        # The stack's retriever shares this database: its workers ingest these jobs.
        deadline = time.monotonic() + 60
        for tenant, doc_id in docs.items():
            while (await store.get_document(tenant, doc_id) or {}).get("status") != "ready":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        embedded = httpx.post(
            f"{stack.url('embedder')}/v1/embeddings", json={"input": "where is the crate"}
        )
        vector = np.array(embedded.json()["data"][0]["embedding"], dtype=np.float32)

        async def look(tenant: str) -> set[str]:
            seen: set[str] = set()
            hits = await store.vector_search(tenant, vector, 10, [], {})
            assert len(hits) == 10, "a tenant with enough chunks gets k results"
            hits += await store.text_search(tenant, "crate warehouse", 10, [], {})
            listed = await store.list_documents(tenant, 100, None, None)
            seen |= {str(hit["document_id"]) for hit in hits}
            seen |= {str(doc["id"]) for doc in listed}
            return seen

        tenant_list = list(tenants) * 10
        results = await asyncio.gather(*(look(tenant) for tenant in tenant_list))
        for tenant, seen in zip(tenant_list, results, strict=True):
            assert seen == {str(docs[tenant])}, tenant
        for tenant in tenants:
            other = next(t for t in tenants if t != tenant)
            assert await store.get_document(tenant, docs[other]) is None
            assert not await store.delete_document(tenant, docs[other])
        async with pool.connection() as conn:  # the one pooled connection, no tenant set
            cur = await conn.execute("SELECT count(*) FROM documents")
            assert await cur.fetchone() == (0,)
        for tenant, doc_id in docs.items():
            assert await store.delete_document(tenant, doc_id)
    with psycopg.connect(stack.database_url) as conn:
        left = conn.execute(
            "SELECT (SELECT count(*) FROM chunks WHERE document_id = ANY(%s)) + "
            "(SELECT count(*) FROM ingest_jobs WHERE document_id = ANY(%s))",
            (list(docs.values()), list(docs.values())),
        ).fetchone()
        assert left == (0,), "delete removes the chunks and the job with the document"


async def test_local_token_counts_equal_the_embedders(stack: Stack) -> None:
    """The retriever counts chunk tokens with the embedder's exported tokenizer."""
    from services.retriever.embedder_client import EmbedderClient
    from services.retriever.tokens import local_counter

    texts = ["", "Hello world.", "Ünïcödé façade — naïve café", "x" * 3000, "word " * 400]
    client = EmbedderClient(stack.url("embedder"))
    try:
        counter = await local_counter(client)
        assert counter is not None
        assert counter.count(texts) == await client.count_tokens(texts)
    finally:
        await client.aclose()


def test_shutdown_hands_jobs_back_and_delete_during_processing_is_total(
    stack: Stack, faulty_embedder: FaultyEmbedder
) -> None:
    url = create_database(stack)
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}", "X-Tenant-Id": "tenant-stop"}
    faulty_embedder.mode = "stall"
    doc_id = None

    def wait_for_embedding(calls: int) -> None:
        deadline = time.monotonic() + 30
        while faulty_embedder.embed_calls < calls:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    with retriever_process(stack, url, faulty_embedder.url) as (base, proc):
        assert wait_ready(base, 60, proc)
        resp = httpx.post(
            f"{base}/documents",
            json={"title": "Tides", "text": "High tide at 14:10."},
            headers=headers,
        )
        doc_id = resp.json()["id"]
        wait_for_embedding(1)
        proc.terminate()  # SIGTERM: a graceful stop
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM
    with psycopg.connect(url) as conn:
        job = conn.execute(
            "SELECT leased_by, attempts, run_after <= now() FROM ingest_jobs "
            "WHERE document_id = %s",
            (doc_id,),
        ).fetchone()
        assert job == (None, 0, True), "handed back at once, the attempt not spent"
    with retriever_process(stack, url, faulty_embedder.url) as (base, proc):
        assert wait_ready(base, 60, proc)
        wait_for_embedding(2)  # taken again at once, and mid-job again
        assert httpx.delete(f"{base}/documents/{doc_id}", headers=headers).status_code == 204
        faulty_embedder.mode = "forward"
        faulty_embedder.release.set()  # the stalled call ends; the worker finds the doc gone
        time.sleep(1.0)
        assert httpx.get(f"{base}/documents/{doc_id}", headers=headers).status_code == 404
    with psycopg.connect(url) as conn:
        left = conn.execute(
            "SELECT (SELECT count(*) FROM documents) + (SELECT count(*) FROM chunks) + "
            "(SELECT count(*) FROM ingest_jobs)"
        ).fetchone()
        assert left == (0,)


def test_values_postgres_cannot_store_get_400(client: httpx.Client) -> None:
    as_json = {"Content-Type": "application/json"}
    cases = [
        (
            "POST",
            "/v1/documents",
            {"content": '{"title": "t", "text": "x", "metadata": {"n": NaN}}'},
        ),
        ("POST", "/v1/documents", {"content": '{"title": "nul\\u0000", "text": "x"}'}),
        ("GET", "/v1/documents", {"params": {"metadata": '{"a": "\\u0000"}'}}),
        ("GET", "/v1/documents", {"params": {"metadata": "[1, 2]"}}),
        (
            "POST",
            "/v1/search",
            {"content": '{"query": "q", "filters": {"metadata": {"n": Infinity}}}'},
        ),
    ]
    for method, path, kwargs in cases:
        headers = as_json if "content" in kwargs else {}
        resp = client.request(method, path, headers=headers, **kwargs)
        assert resp.status_code == 400, (path, kwargs, resp.text)
        assert resp.json()["error"]["message"]


def test_a_job_that_keeps_crashing_fails_with_its_last_error(stack: Stack) -> None:
    """A document whose worker died on every attempt ends failed, not retried forever."""
    assert stack.database_url is not None
    tenant = f"crash-{uuid.uuid4().hex[:8]}"
    doc_id = uuid.uuid4()
    with psycopg.connect(stack.database_url) as conn:  # the owner: as if ten crashes happened
        conn.execute(
            "INSERT INTO documents (id, user_id, title, content_hash, media_type, source) "
            "VALUES (%s, %s, 'poison', 'h', 'text/plain', 'text')",
            (doc_id, tenant),
        )
        conn.execute(
            "INSERT INTO ingest_jobs (document_id, user_id, attempts, last_error) "
            "VALUES (%s, %s, 10, 'worker killed mid-job')",
            (doc_id, tenant),
        )
    headers = {"Authorization": f"Bearer {stack.service_token}", "X-Tenant-Id": tenant}
    deadline = time.monotonic() + 30
    while True:
        doc = httpx.get(f"{stack.url('retriever')}/documents/{doc_id}", headers=headers).json()
        if doc["status"] == "failed":
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.2)
    assert doc["error"] == "gave up after 10 attempts: worker killed mid-job"


def test_chunk_ids_reveal_nothing_of_other_tenants_activity(
    client: httpx.Client, gateway_url: str, other_token: str
) -> None:
    """Ids drawn at random: one tenant cannot count another's chunks from the gaps in its own."""
    tag = uuid.uuid4().hex[:8]
    sections = "\n\n".join(
        f"## Part {i}\n\n" + f"The {tag} ledger records shipment {i} in detail. " * 40
        for i in range(6)
    )
    first = upload(client, f"ledger-{tag}.md", f"# Ledger\n\n{sections}".encode(), "")
    with httpx.Client(
        base_url=gateway_url, timeout=60, headers={"Authorization": f"Bearer {other_token}"}
    ) as other:
        theirs = upload(other, f"theirs-{tag}.md", f"Other tenant {tag} notes.".encode(), "")
        assert wait_until_ready(other, theirs["id"])["status"] == "ready"
    assert wait_until_ready(client, first["id"])["status"] == "ready"
    ids = [hit["chunk_id"] for hit in search(client, f"{tag} ledger", k=20)]
    assert len(ids) >= 6
    assert all(0 < chunk_id < 2**53 for chunk_id in ids)  # exact as JSON numbers everywhere
    assert max(ids) - min(ids) > 2**40  # not a sequence: a gap says nothing
