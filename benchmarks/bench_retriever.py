"""Retriever: HNSW vs exact search, per-tenant filtered search, hybrid vs vector search,
ingestion vs the embedder.

1. Index: 100k synthetic 384-d vectors (clustered, low intrinsic dimension, like sentence
   embeddings), HNSW at the service's default m / ef_construction / ef_search against an
   exact scan in the same database: recall@10 (against numpy brute force) and QPS ratio.
   Each row carries real text, 3 to 6 SciFact sentences drawn with a fixed seed (generated
   text without ../shared/data), indexed for BM25 as ingestion indexes it.
2. Tenants: the same rows spread over 100 tenants (1% each, interleaved), searched the way
   the service does (application role, row-level security, iterative index scans) against
   the same query forced to an exact scan: recall@10, how often k rows come back, QPS.
3. Hybrid: `vector` vs `text` (BM25) vs `hybrid` (both at once on two pooled connections,
   fused as the search route fuses them) through the same Store methods, SciFact claims as
   the text queries, interleaved query by query: p50/p95 latency, results returned, the
   ratio hybrid / vector p50 (issue 15's target: at most 1.5), BM25's graph against exact
   BM25. Over the 100 tenants, then with all rows in one tenant (BM25's harder case: one
   tenant's statistics and graph span every row). Query vectors are synthetic, so no mode
   includes embedding the query (the route's hybrid overlaps BM25 with it).
4. Ingestion: SciFact abstracts (../shared/data, or generated text without it) uploaded to a
   real retriever + embedder, chunks/s until all are ready, against the embedder's own
   chunks/s on the same chunk texts; rounds alternate. Then HNSW vs exact on those real
   chunk embeddings with SciFact claims as queries.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from ragctl.stack import free_port, wait_ready  # noqa: E402
from services.retriever import schema  # noqa: E402
from services.retriever.embedded_pg import (  # noqa: E402
    start_embedded_postgres,
    stop_embedded_postgres,
)
from services.retriever.settings import RetrieverSettings  # noqa: E402
from services.retriever.store import (  # noqa: E402
    BM25_QUERY,
    Store,
    fuse_rankings,
    fuse_scores,
    prepare_connection,
)

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
DIM = 384
K = 10
ORDER = ("hnsw", "exact", "exact", "hnsw")  # each side twice, alternating
TOKEN = "bench-service-token"


def synthetic_vectors(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 500 cluster centres in a 48-d subspace of 384-d, plus noise."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, 48)))
    centres = np.random.default_rng(1).normal(size=(500, 48))
    latent = centres[rng.integers(0, 500, n)] + rng.normal(scale=0.8, size=(n, 48))
    x = latent @ basis.T + rng.normal(scale=0.08, size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    sims = queries @ data.T
    return [set(np.argpartition(-row, k)[:k].tolist()) for row in sims]


def recall(found: list[set[int]], truth: list[set[int]]) -> float:
    pairs = [(f, t) for f, t in zip(found, truth, strict=True) if t]
    return float(np.mean([len(f & t) / len(t) for f, t in pairs])) if pairs else float("nan")


def compare(
    found: dict[str, list[set[int]]], truth: list[set[int]], seconds: dict[str, float], n: int
) -> dict[str, Any]:
    """Recall and QPS of each side (each ran ORDER.count(side) times), and the QPS ratio."""
    out: dict[str, Any] = {
        side: {"recall_at_10": recall(found[side], truth), "qps": ORDER.count(side) * n / t}
        for side, t in seconds.items()
    }
    out["qps_ratio"] = out["hnsw"]["qps"] / out["exact"]["qps"]
    return out


def sentences() -> list[str]:
    """SciFact's sentences (the generated text without it): realistic term frequencies."""
    docs, _, _ = scifact_docs()
    split = re.compile(r"(?<=[.!?])\s+(?=[A-Za-z0-9(])")
    return [s for d in docs for s in split.split(d["text"]) if len(s.split()) >= 3]


def chunk_texts(n: int, seed: int) -> list[str]:
    """n chunk texts of 3 to 6 sentences drawn at random (about 100 words, a chunk's size)."""
    pool, rng = sentences(), random.Random(seed)
    return [" ".join(rng.choices(pool, k=rng.randint(3, 6))) for _ in range(n)]


def query_texts(n: int) -> list[str]:
    """n search queries: SciFact claims (generated questions without it), cycled."""
    _, queries, _ = scifact_docs()
    return [queries[i % len(queries)] for i in range(n)]


CHUNKS_PER_DOCUMENT = 10
# Indexes built after the load (faster than maintained row by row): the embeddings' graph
# (build_index), and these, rebuilt from their own definitions.
REBUILT_AFTER_LOAD = ("chunks_bm25_hnsw", "chunks_tsv")
# The staged rows into chunks as INSERT_STAGED_CHUNKS writes them (store.py): text indexed
# with the document's title and heading, its BM25 length, and its term weights normalised by
# the tenant's average length, here its final one (the whole load is one statement); these
# chunks have no heading. The statement triggers fill bm25_stats / bm25_terms from it.
INSERT_LOADED = """
    WITH indexed AS MATERIALIZED (
        SELECT s.id, s.document_id, s.user_id, s.ordinal, s.text, s.embedding,
               to_tsvector('english', d.title || ' ' || s.text) AS tsv
        FROM chunk_load s JOIN documents d ON d.id = s.document_id
    ), measured AS MATERIALIZED (
        SELECT *, bm25_length(tsv) AS length FROM indexed
    ), average AS (
        SELECT user_id, avg(length)::double precision AS length FROM measured GROUP BY 1
    )
    INSERT INTO chunks (id, document_id, user_id, ordinal, text, embedding, tsv, bm25_length,
                        bm25)
    SELECT m.id, m.document_id, m.user_id, m.ordinal, m.text, m.embedding, m.tsv, m.length,
           bm25_vector(m.tsv, a.length)
    FROM measured m JOIN average a ON a.user_id = m.user_id
"""


def load_rows(url: str, vectors: np.ndarray, texts: list[str], tenants: int) -> dict[str, float]:
    """Row i in tenant i % tenants, with row i's text; a tenant's rows in documents of
    CHUNKS_PER_DOCUMENT, each titled like a SciFact abstract (a title is indexed with each of
    its chunks). The indexes built after (the embeddings' by build_index); returns the
    seconds taken."""
    seconds: dict[str, float] = {}
    titles, rng = [d["title"] for d in scifact_docs()[0]], random.Random(17)
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("DROP INDEX chunks_embedding_hnsw")
        rebuilt = [
            (row[0], row[1])
            for row in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'chunks' "
                "AND indexname = ANY(%s)",
                (list(REBUILT_AFTER_LOAD),),
            )
        ]
        for name in REBUILT_AFTER_LOAD:
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        start_t = time.perf_counter()
        per_tenant = -(-len(vectors) // tenants)
        with conn.cursor().copy(
            "COPY documents (id, user_id, title, content_hash, media_type, status) FROM STDIN"
        ) as copy:
            for t in range(tenants):
                for j in range(-(-per_tenant // CHUNKS_PER_DOCUMENT)):
                    doc = (uuid.UUID(int=(t << 32) + j + 1), f"t{t:03d}", rng.choice(titles))
                    copy.write_row((*doc, f"h{t}-{j}", "text/plain", "ready"))
        with conn.transaction():
            conn.execute(
                "CREATE TEMP TABLE chunk_load (id bigint, document_id uuid, user_id text, "
                "ordinal integer, text text, embedding vector) ON COMMIT DROP"
            )
            with conn.cursor().copy(
                "COPY chunk_load (id, document_id, user_id, ordinal, text, embedding) "
                "FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int8", "uuid", "text", "int4", "text", "vector"])
                for i, (vector, text) in enumerate(zip(vectors, texts, strict=True)):
                    t, j = i % tenants, i // tenants  # row i is the tenant's j-th
                    doc_id = uuid.UUID(int=(t << 32) + j // CHUNKS_PER_DOCUMENT + 1)
                    ordinal = j % CHUNKS_PER_DOCUMENT
                    copy.write_row((i, doc_id, f"t{t:03d}", ordinal, text, vector))
            conn.execute("ANALYZE chunk_load")  # else the join to documents is planned blind
            conn.execute(INSERT_LOADED)
        seconds["rows_s"] = time.perf_counter() - start_t
        conn.execute("ANALYZE documents, chunks, bm25_stats, bm25_terms")
        for name, definition in rebuilt:
            start_t = time.perf_counter()
            conn.execute(definition)
            seconds[f"{name}_build_s"] = time.perf_counter() - start_t
    return seconds


def build_index(url: str, settings: RetrieverSettings) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        start = time.perf_counter()
        conn.execute(
            f"CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw "
            f"(embedding vector_cosine_ops) WITH (m = {settings.hnsw_m}, "
            f"ef_construction = {settings.hnsw_ef_construction})"
        )
        return time.perf_counter() - start


def index_side_by_side(
    url: str, queries: np.ndarray, truth: list[set[int]], ef_search: int
) -> dict[str, Any]:
    """The index alone: one ORDER BY over all rows, HNSW vs an exact scan."""
    sqls = {
        "hnsw": "SELECT id FROM chunks ORDER BY embedding <=> %s LIMIT %s",
        # The same order through an expression the index cannot serve.
        "exact": "SELECT id FROM chunks ORDER BY (embedding <=> %s) + 0 LIMIT %s",
    }
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        register_vector(conn)
        conn.execute(f"SET hnsw.ef_search = {ef_search}")
        for side, sql in sqls.items():
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, (queries[0], K)))
            assert ("chunks_embedding_hnsw" in plan) == (side == "hnsw"), plan
        seconds = dict.fromkeys(sqls, 0.0)
        found: dict[str, list[set[int]]] = {}
        for side in ORDER:  # alternating, so neither side always runs on a warmer cache
            found[side], start = [], time.perf_counter()
            for q in queries:
                found[side].append({r[0] for r in conn.execute(sqls[side], (q, K))})
            seconds[side] += time.perf_counter() - start
    return compare(found, truth, seconds, len(queries))


async def tenant_side_by_side(
    app_url: str,
    queries: np.ndarray,
    vectors: np.ndarray,
    tenants: int,
    ef_search: int,
) -> dict[str, Any]:
    """Searches as the service makes them (RLS, iterative scans) vs the same forced exact."""

    async with AsyncConnectionPool(
        app_url,
        min_size=1,
        max_size=1,
        configure=prepare_connection,
        kwargs={"autocommit": True, "prepare_threshold": None},
    ) as pool:
        store = Store(pool, ef_search=ef_search)
        names = [f"t{i % tenants:03d}" for i in range(len(queries))]
        out: dict[str, Any] = {}
        results: dict[str, list[list[dict[str, Any]]]] = {}
        seconds = {"hnsw": 0.0, "exact": 0.0}
        for side in ORDER:
            hits_all, start = [], time.perf_counter()
            for name, q in zip(names, queries, strict=True):
                hits_all.append(
                    await store.vector_search(name, q, K, [], {}, exact=side == "exact")
                )
            seconds[side] += time.perf_counter() - start
            results[side] = hits_all
        for side, hits_all in results.items():
            out[side] = {
                "qps": ORDER.count(side) * len(queries) / seconds[side],
                "k_results_share": float(np.mean([len(h) == K for h in hits_all])),
            }
        # How the planner serves a tenant's search (the HNSW graph, or the tenant's rows).
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT set_config('app.user_id', %s, true), set_config('hnsw.ef_search', %s, "
                "true), set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                (names[0], str(ef_search)),
            )
            cur = await conn.execute(
                "EXPLAIN SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id "
                "WHERE c.user_id = %s AND d.user_id = %s AND d.status = 'ready' "
                "ORDER BY c.embedding <=> %s LIMIT %s",
                (names[0], names[0], queries[0], K),
            )
            plan = "\n".join(row[0] for row in await cur.fetchall())
        out["plan_uses_hnsw"] = "chunks_embedding_hnsw" in plan
    exact_ids = [{h["chunk_id"] for h in hits} for hits in results["exact"]]
    hnsw_ids = [{h["chunk_id"] for h in hits} for hits in results["hnsw"]]
    out["hnsw"]["recall_at_10"] = recall(hnsw_ids, exact_ids)
    # The exact SQL scan agrees with numpy brute force over the tenant's own rows.
    sample = []
    for i, q in enumerate(queries[:20]):
        rows = np.arange(i % tenants, len(vectors), tenants)
        best = rows[np.argsort(-(vectors[rows] @ q))[:K]]
        sample.append(len(set(best.tolist()) & exact_ids[i]) / K)
    out["exact"]["agrees_with_numpy"] = float(np.mean(sample))
    out["qps_ratio"] = out["hnsw"]["qps"] / out["exact"]["qps"]
    return out


def graph_forced(
    app_url: str,
    queries: np.ndarray,
    vectors: np.ndarray,
    tenants: int,
    ef_search: int,
    iterative: bool,
) -> dict[str, Any]:
    """Tenant searches (as rag_app, under row-level security) made to walk the HNSW graph."""
    sql = "SELECT c.id FROM chunks c WHERE c.user_id = %s ORDER BY c.embedding <=> %s LIMIT %s"
    found, truth = [], []
    with psycopg.connect(app_url, autocommit=True, prepare_threshold=None) as conn:
        register_vector(conn)
        start = time.perf_counter()
        for i, q in enumerate(queries):
            tenant = f"t{i % tenants:03d}"
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('app.user_id', %s, true), "
                    "set_config('hnsw.ef_search', %s, true), "
                    "set_config('hnsw.iterative_scan', %s, true), "
                    "set_config('enable_seqscan', 'off', true)",
                    (tenant, str(ef_search), "relaxed_order" if iterative else "off"),
                )
                if i == 0:
                    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, (tenant, q, K)))
                    assert "chunks_embedding_hnsw" in plan, plan
                found.append({r[0] for r in conn.execute(sql, (tenant, q, K))})
        elapsed = time.perf_counter() - start
    for i, q in enumerate(queries):
        rows = np.arange(i % tenants, len(vectors), tenants)
        truth.append(set(rows[np.argsort(-(vectors[rows] @ q))[:K]].tolist()))
    return {
        "recall_at_10": recall(found, truth),
        "k_results_share": float(np.mean([len(f) == K for f in found])),
        "qps": len(queries) / elapsed,
    }


def real_side_by_side(admin_url: str, queries: np.ndarray, ef_search: int) -> dict[str, Any]:
    """The ingested chunks' real embeddings: the graph (forced; the planner would scan this
    few rows) against an exact scan, as rag_app in the documents' tenant."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT id, embedding FROM chunks ORDER BY id").fetchall()
        conn.execute("DROP INDEX chunks_user")
        conn.execute("ALTER TABLE chunks DROP CONSTRAINT chunks_document_id_ordinal_key")
        conn.execute("ANALYZE chunks")
    ids = np.array([r[0] for r in rows])
    data = np.stack([np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows])
    truth = [set(ids[np.argsort(-(data @ q))[:K]].tolist()) for q in queries]
    sqls = {
        "hnsw": "SELECT id FROM chunks WHERE user_id = %s ORDER BY embedding <=> %s LIMIT %s",
        "exact": "SELECT id FROM chunks WHERE user_id = %s ORDER BY (embedding <=> %s) + 0 "
        "LIMIT %s",
    }
    out: dict[str, Any] = {"chunks": len(ids), "queries": len(queries)}
    found: dict[str, list[set[int]]] = {}
    seconds = dict.fromkeys(sqls, 0.0)
    with psycopg.connect(
        make_conninfo(admin_url, user="rag_app"), autocommit=True, prepare_threshold=None
    ) as conn:
        register_vector(conn)
        for side in ORDER:
            found[side], start = [], time.perf_counter()
            for q in queries:
                with conn.transaction():
                    conn.execute(
                        "SELECT set_config('app.user_id', 'scifact', true), "
                        "set_config('hnsw.ef_search', %s, true), "
                        "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
                        "set_config('enable_seqscan', %s, true)",
                        (str(ef_search), "off" if side == "hnsw" else "on"),
                    )
                    found[side].append({r[0] for r in conn.execute(sqls[side], ("scifact", q, K))})
            seconds[side] += time.perf_counter() - start
    return {**out, **compare(found, truth, seconds, len(queries))}


# hybrid ----------------------------------------------------------------------------

# hybrid_sequential: the same two searches one after the other (the route before it ran them
# at once), to show what running them concurrently saves.
MODES = ("vector", "text", "hybrid", "hybrid_sequential")
# text_search's BM25 ranking (store.py), for a plan (ordered by the distance, which the
# BM25 graph can serve) and for the exact top k (`+ 0`: no index orders by it, every row of
# the tenant sharing a term is scored). Parameters: query, user x4, k.
BM25_TOP = (
    f"WITH {BM25_QUERY} SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id "
    "WHERE c.user_id = %s AND d.user_id = %s AND d.status = 'ready' "
    "AND c.bm25 <#> (SELECT weights FROM q) < 0 ORDER BY {order} LIMIT %s"
)
BM25_GRAPH = BM25_TOP.replace("{order}", "c.bm25 <#> (SELECT weights FROM q)")
BM25_EXACT = BM25_TOP.replace("{order}", "(c.bm25 <#> (SELECT weights FROM q)) + 0, c.id")


def fuse(rankings: list[list[dict[str, Any]]], settings: RetrieverSettings) -> list[Any]:
    """The search route's fusion of the two rankings (routes.py `search`, no reranker)."""
    if settings.fusion == "score":
        weights = [settings.fusion_vector_weight, 1 - settings.fusion_vector_weight]
        return fuse_scores(rankings, K, weights)
    return fuse_rankings(rankings, K, rrf_k=settings.rrf_k)


def percentiles(ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(ms, n=20, method="inclusive")
    return {"p50_ms": statistics.median(ms), "p95_ms": cuts[18]}


async def hybrid_side_by_side(
    app_url: str,
    texts: list[str],
    vectors: np.ndarray,
    names: list[str],
    settings: RetrieverSettings,
) -> dict[str, Any]:
    """vector vs text vs hybrid, as the search route makes them (routes.py `search`): the
    application role under row-level security, Store methods over a pool, iterative scans;
    hybrid runs both searches at once on two connections for the route's candidate depth and
    fuses them as the route does, with the service's settings. The query vectors are given
    (synthetic), so the embedder's time, which the route's hybrid overlaps with BM25, is in
    no mode. Modes take turns query by query, each one first as often as the others."""
    depth, ef_search = max(K, settings.fusion_depth), settings.hnsw_ef_search
    # Client and server share the machine's cores: hybrid overlaps only what other work
    # leaves free, so say how busy it was.
    busy = {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}
    async with AsyncConnectionPool(
        app_url,
        min_size=2,
        max_size=2,
        configure=prepare_connection,
        check=AsyncConnectionPool.check_connection,  # as the service's pool
        kwargs={"autocommit": True, "prepare_threshold": None},
    ) as pool:
        store = Store(pool, ef_search=ef_search)

        async def search(mode: str, name: str, text: str, vector: Vector) -> list[Any]:
            if mode == "vector":
                return await store.vector_search(name, vector, K, [], {})
            if mode == "text":
                return await store.text_search(name, text, K, [], {})
            if mode == "hybrid_sequential":
                return fuse(
                    [
                        await store.vector_search(name, vector, depth, [], {}),
                        await store.text_search(name, text, depth, [], {}),
                    ],
                    settings,
                )
            async with asyncio.TaskGroup() as group:
                by_vector = group.create_task(store.vector_search(name, vector, depth, [], {}))
                by_text = group.create_task(store.text_search(name, text, depth, [], {}))
            return fuse([by_vector.result(), by_text.result()], settings)

        queries = list(zip(names, texts, map(Vector, vectors), strict=True))
        for name, text, vector in queries[:10]:  # warm-up, not timed
            for mode in MODES:
                await search(mode, name, text, vector)
        ms: dict[str, list[float]] = {mode: [] for mode in MODES}
        counts: dict[str, list[int]] = {mode: [] for mode in MODES}
        text_ids: list[set[int]] = []
        for i, (name, text, vector) in enumerate(queries):
            for mode in MODES[i % len(MODES) :] + MODES[: i % len(MODES)]:
                start_t = time.perf_counter()
                hits = await search(mode, name, text, vector)
                ms[mode].append((time.perf_counter() - start_t) * 1000)
                counts[mode].append(len(hits))
                if mode == "text":
                    text_ids.append({hit["chunk_id"] for hit in hits})
        # The BM25 graph against scoring every row of the tenant, on a sample of the queries.
        exact_ids = []
        async with pool.connection() as conn, conn.transaction():
            for name, text, _ in queries[:50]:
                await conn.execute("SELECT set_config('app.user_id', %s, true)", (name,))
                cur = await conn.execute(BM25_EXACT, (text, *[name] * 4, K))
                exact_ids.append({row[0] for row in await cur.fetchall()})
            await conn.execute(
                "SELECT set_config('app.user_id', %s, true), set_config('hnsw.ef_search', %s, "
                "true), set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                (names[0], str(max(ef_search, K))),
            )
            cur = await conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF) " + BM25_GRAPH, (texts[0], *names[:1] * 4, K)
            )
            plan = [row[0] for row in await cur.fetchall()]
    out: dict[str, Any] = {
        mode: {**percentiles(ms[mode]), "mean_results": float(np.mean(counts[mode]))}
        for mode in MODES
    }
    for mode in MODES:
        out[mode]["k_results_share"] = float(np.mean([n == K for n in counts[mode]]))
    out["text"]["recall_at_10_vs_exact_bm25"] = recall(text_ids[: len(exact_ids)], exact_ids)
    out["text"]["plan_uses_hnsw"] = any("chunks_bm25_hnsw" in line for line in plan)
    out["text"]["plan"] = plan  # of the first query, executed
    out["hybrid_over_vector_p50"] = out["hybrid"]["p50_ms"] / out["vector"]["p50_ms"]
    out["queries"] = len(queries)
    out["fusion"] = {"method": settings.fusion, "depth": depth}
    return {**out, **busy}


# ingestion -------------------------------------------------------------------------


def group_docs(docs: list[dict[str, str]], per_doc: int) -> list[dict[str, str]]:
    """Join consecutive abstracts into longer documents, one section each."""
    if per_doc == 1:
        return docs
    return [
        {
            "title": part[0]["title"],
            "text": "\n\n".join(f"# {d['title']}\n\n{d['text']}" for d in part),
            "media_type": "text/markdown",
        }
        for part in (docs[i : i + per_doc] for i in range(0, len(docs), per_doc))
    ]


def scifact_docs() -> tuple[list[dict[str, str]], list[str], str]:
    if (SCIFACT / "corpus.jsonl").exists():
        with (SCIFACT / "corpus.jsonl").open() as fh:
            docs = [json.loads(line) for line in fh]
        with (SCIFACT / "queries.jsonl").open() as fh:
            queries = [json.loads(line)["text"] for line in fh]
        return [{"title": d["title"], "text": d["text"]} for d in docs], queries, "scifact"
    rng = random.Random(3)
    words = "protein cell gene tumour patients risk trial dose brain signal mice levels".split()
    docs = [
        {
            "title": f"doc {i}",
            "text": ". ".join(
                " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
                for _ in range(rng.randint(5, 15))
            ),
        }
        for i in range(2000)
    ]
    return docs, [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)], "synthetic"


def start(module: str, env: dict[str, str], url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        stdout=subprocess.DEVNULL,
    )
    if not wait_ready(url, 300, proc):
        proc.kill()
        raise SystemExit(f"{module} did not start")
    return proc


async def ingest_round(base: str, admin_url: str, docs: list[dict[str, str]]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Tenant-Id": "scifact"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as client:
        start_t = time.perf_counter()
        gate = asyncio.Semaphore(8)

        async def upload(doc: dict[str, str]) -> str:
            async with gate:
                resp = await client.post("/documents", json=doc)
                assert resp.status_code == 202, resp.text
                return str(resp.json()["id"])

        ids = await asyncio.gather(*(upload(d) for d in docs))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('ready', 'failed')), "
                "coalesce(sum(chunk_count), 0) FROM documents WHERE id = ANY(%s)",
                (ids,),
            ).fetchone()
            assert row is not None
            if row[0] == len(ids):
                break
            await asyncio.sleep(0.25)
        elapsed = time.perf_counter() - start_t
        texts = [
            r[0]
            for r in conn.execute(
                "SELECT text FROM chunks WHERE document_id = ANY(%s) ORDER BY document_id, ordinal",
                (ids,),
            )
        ]
    return {"docs": len(ids), "chunks": int(row[1]), "seconds": elapsed, "texts": texts}


async def embedder_round(embedder: str, texts: list[str], batch: int) -> float:
    """The embedder alone on the same chunks, batches as the retriever sends them."""
    async with httpx.AsyncClient(base_url=embedder, timeout=120) as client:
        gate = asyncio.Semaphore(4)

        async def embed(i: int) -> None:
            async with gate:
                body = {"input": texts[i : i + batch], "encoding_format": "base64"}
                resp = await client.post("/v1/embeddings", json={**body, "input_type": "passage"})
                assert resp.status_code == 200, resp.text

        start_t = time.perf_counter()
        await asyncio.gather(*(embed(i) for i in range(0, len(texts), batch)))
        return len(texts) / (time.perf_counter() - start_t)


async def embed_queries(embedder: str, queries: list[str]) -> np.ndarray:
    async with httpx.AsyncClient(base_url=embedder, timeout=120) as client:
        out = []
        for i in range(0, len(queries), 32):
            body = {
                "input": queries[i : i + 32],
                "encoding_format": "base64",
                "input_type": "query",
            }
            data = (await client.post("/v1/embeddings", json=body)).json()["data"]
            out += [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data]
        return np.stack(out)


def ingestion(
    admin_url: str, docs_per_round: int, rounds: int, n_queries: int, per_doc: int = 1
) -> dict[str, Any]:
    docs, queries, source = scifact_docs()
    random.Random(5).shuffle(docs)
    docs = group_docs(docs, per_doc)
    embed_port, retr_port = free_port(), free_port()
    embedder = f"http://127.0.0.1:{embed_port}"
    base = f"http://127.0.0.1:{retr_port}"
    settings = RetrieverSettings()
    embedder_env = {"EMBEDDER_PORT": str(embed_port), "EMBEDDER_LOG_LEVEL": "warning"}
    procs = [start("services.embedder", embedder_env, embedder)]
    try:
        procs.append(
            start(
                "services.retriever",
                {
                    "RETRIEVER_PORT": str(retr_port),
                    "RETRIEVER_DATABASE_URL": admin_url,
                    "RETRIEVER_APP_DATABASE_URL": make_conninfo(admin_url, user="rag_app"),
                    "RETRIEVER_EMBEDDER_URL": embedder,
                    "RETRIEVER_SERVICE_TOKEN": TOKEN,
                    "RETRIEVER_LOG_LEVEL": "warning",
                    "EMBEDDER_LOG_LEVEL": "warning",
                },
                base,
            )
        )
        warm = max(1, 20 // per_doc)
        asyncio.run(ingest_round(base, admin_url, docs[:warm]))  # warm-up
        ingest_rates: list[float] = []
        embed_rates: list[float] = []
        for r in range(rounds):
            batch = docs[warm + r * docs_per_round : warm + (r + 1) * docs_per_round]
            result = asyncio.run(ingest_round(base, admin_url, batch))
            ingest_rates.append(result["chunks"] / result["seconds"])
            embed_rates.append(
                asyncio.run(embedder_round(embedder, result["texts"], settings.embed_batch_size))
            )
            print(
                f"round {r}: ingest {ingest_rates[-1]:.1f} chunks/s, embedder "
                f"{embed_rates[-1]:.1f} chunks/s",
                file=sys.stderr,
            )
        query_vectors = asyncio.run(embed_queries(embedder, queries[:n_queries]))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    real = real_side_by_side(admin_url, query_vectors, settings.hnsw_ef_search)
    ingest_rate, embed_rate = statistics.median(ingest_rates), statistics.median(embed_rates)
    return {
        "source": source,
        "abstracts_per_doc": per_doc,
        "docs_per_round": docs_per_round,
        "rounds": rounds,
        "ingest_chunks_per_s": ingest_rates,
        "embedder_chunks_per_s": embed_rates,
        "ratio": ingest_rate / embed_rate,
        "real_embeddings": real,
    }


def index_and_tenants(
    url: str, args: argparse.Namespace, settings: RetrieverSettings
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    index_url = make_conninfo(url, dbname="bench_index")
    schema.migrate(index_url, "synthetic-384", DIM)
    vectors = synthetic_vectors(args.vectors, seed=11)
    queries = synthetic_vectors(args.queries, seed=12)
    texts, questions = chunk_texts(args.vectors, seed=13), query_texts(args.queries)
    result["load"] = load_rows(index_url, vectors, texts, args.tenants)
    result["index_build_s"] = build_index(index_url, settings)
    truth = exact_top_k(vectors, queries, K)
    result["index"] = index_side_by_side(index_url, queries, truth, settings.hnsw_ef_search)
    print("index", json.dumps(result["index"]), file=sys.stderr)
    app_url = make_conninfo(index_url, user="rag_app")
    ef_search = settings.hnsw_ef_search
    result["tenants"] = asyncio.run(
        tenant_side_by_side(app_url, queries, vectors, args.tenants, ef_search)
    )
    result["tenants"]["selectivity"] = 1 / args.tenants
    print("tenants", json.dumps(result["tenants"]), file=sys.stderr)
    names = [f"t{i % args.tenants:03d}" for i in range(args.queries)]
    hybrid = asyncio.run(hybrid_side_by_side(app_url, questions, queries, names, settings))
    result["hybrid"] = {
        f"{args.tenants}_tenants": {"chunks_per_tenant": len(texts) // args.tenants, **hybrid}
    }
    print("hybrid", json.dumps(hybrid), file=sys.stderr)
    # The planner serves a 1% tenant from its own rows (exact). A tenant search that does
    # go through the HNSW graph (a big tenant, a generic plan) relies on iterative scans to
    # get past the first ef_search candidates, most of them other tenants' rows: force the
    # graph and compare, with and without them.
    with psycopg.connect(index_url, autocommit=True) as conn:  # leave the graph as the way
        conn.execute("DROP INDEX chunks_user")
        conn.execute("ALTER TABLE chunks DROP CONSTRAINT chunks_document_id_ordinal_key")
    for name, iterative in (("graph_iterative", True), ("graph_no_iterative", False)):
        result[name] = graph_forced(app_url, queries, vectors, args.tenants, ef_search, iterative)
        print(name, json.dumps(result[name]), file=sys.stderr)
    # The same rows and queries, all in one tenant: BM25's statistics and graph span them all.
    single_url = make_conninfo(url, dbname="bench_single")
    schema.migrate(single_url, "synthetic-384", DIM)
    loaded = load_rows(single_url, vectors, texts, 1)
    loaded["chunks_embedding_hnsw_build_s"] = build_index(single_url, settings)
    hybrid = asyncio.run(
        hybrid_side_by_side(
            make_conninfo(single_url, user="rag_app"),
            questions,
            queries,
            ["t000"] * len(names),
            settings,
        )
    )
    result["hybrid"]["1_tenant"] = {"chunks_per_tenant": len(texts), **hybrid, "load": loaded}
    print("hybrid one tenant", json.dumps(hybrid), file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--docs-per-round", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument(
        "--abstracts-per-doc", type=int, default=1, help="abstracts joined into one document"
    )
    parser.add_argument("--skip-ingestion", action="store_true")
    args = parser.parse_args()
    settings = RetrieverSettings()
    result: dict[str, Any] = {
        "vectors": args.vectors,
        "dimension": DIM,
        "hnsw": {
            "m": settings.hnsw_m,
            "ef_construction": settings.hnsw_ef_construction,
            "ef_search": settings.hnsw_ef_search,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_embedded_postgres(tmp)
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE DATABASE bench_index")
                conn.execute("CREATE DATABASE bench_single")
                conn.execute("CREATE DATABASE bench_ingest")
            if not args.skip_index:
                result.update(index_and_tenants(url, args, settings))
            if not args.skip_ingestion:
                result["ingestion"] = ingestion(
                    make_conninfo(url, dbname="bench_ingest"),
                    args.docs_per_round,
                    args.rounds,
                    args.queries,
                    args.abstracts_per_doc,
                )
        finally:
            stop_embedded_postgres(server)
    variant = [
        *(["ingestion"] if args.skip_index else []),
        *(["index"] if args.skip_ingestion else []),
        *([f"{args.abstracts_per_doc}-per-doc"] if args.abstracts_per_doc != 1 else []),
    ]
    report("-".join(["bench_retriever", *variant]), result)


if __name__ == "__main__":
    main()
