"""Retriever: HNSW vs exact search, per-tenant filtered search, ingestion vs the embedder.

1. Index: 100k synthetic 384-d vectors (clustered, low intrinsic dimension, like sentence
   embeddings), HNSW at the service's default m / ef_construction / ef_search against an
   exact scan in the same database: recall@10 (against numpy brute force) and QPS ratio.
2. Tenants: the same rows spread over 100 tenants (1% each, interleaved), searched the way
   the service does (application role, row-level security, iterative index scans) against
   the same query forced to an exact scan: recall@10, how often k rows come back, QPS.
3. Ingestion: SciFact abstracts (../shared/data, or generated text without it) uploaded to a
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
from services.retriever.store import Store, prepare_connection  # noqa: E402

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


def load_rows(url: str, vectors: np.ndarray, tenants: int) -> None:
    """Chunks of one document per tenant, row i in tenant i % tenants; index built after."""
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("DROP INDEX chunks_embedding_hnsw")
        docs = []
        for t in range(tenants):
            doc_id = uuid.UUID(int=t + 1)
            docs.append(doc_id)
            conn.execute(
                "INSERT INTO documents (id, user_id, title, content_hash, media_type, status) "
                "VALUES (%s, %s, %s, %s, 'text/plain', 'ready')",
                (doc_id, f"t{t:03d}", f"doc {t}", f"h{t}"),
            )
        with conn.cursor().copy(
            "COPY chunks (id, document_id, user_id, ordinal, text, embedding) "
            "FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "uuid", "text", "int4", "text", "vector"])
            for i, vector in enumerate(vectors):
                t = i % tenants
                copy.write_row((i, docs[t], f"t{t:03d}", i // tenants, f"chunk {i}", vector))
        conn.execute("ANALYZE documents, chunks")


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


def index_and_tenants(url: str, args: argparse.Namespace, settings: RetrieverSettings) -> dict:
    result: dict[str, Any] = {}
    index_url = make_conninfo(url, dbname="bench_index")
    schema.migrate(index_url, "synthetic-384", DIM)
    vectors = synthetic_vectors(args.vectors, seed=11)
    queries = synthetic_vectors(args.queries, seed=12)
    start_t = time.perf_counter()
    load_rows(index_url, vectors, args.tenants)
    result["load_s"] = time.perf_counter() - start_t
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
