"""Documents, chunks and search in PostgreSQL. Every query is scoped to one tenant."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.retriever.chunking import Chunk

DOC_COLUMNS = "id, title, media_type, metadata, status, error, chunk_count, created_at, updated_at"
RRF_K = 60


class Store:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    # documents -----------------------------------------------------------------

    async def create_document(
        self,
        user_id: str,
        title: str,
        media_type: str,
        metadata: dict[str, Any],
        body: str,
        content_hash: str,
    ) -> tuple[dict[str, Any], bool]:
        """Insert a pending document; return (document, created=False for known content)."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"INSERT INTO documents (id, user_id, title, media_type, metadata, body, "
                f"content_hash) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                f"ON CONFLICT (user_id, content_hash) DO UPDATE SET status = 'pending', "
                f"error = NULL, body = EXCLUDED.body, title = EXCLUDED.title, "
                f"metadata = EXCLUDED.metadata, updated_at = now() "
                f"WHERE documents.status = 'failed' RETURNING {DOC_COLUMNS}",
                (uuid.uuid4(), user_id, title, media_type, Jsonb(metadata), body, content_hash),
            )
            row = await cur.fetchone()
            if row is not None:
                return row, True
            await cur.execute(
                f"SELECT {DOC_COLUMNS} FROM documents WHERE user_id = %s AND content_hash = %s",
                (user_id, content_hash),
            )
            existing = await cur.fetchone()
            assert existing is not None
            return existing, False

    async def get_document(self, user_id: str, doc_id: uuid.UUID) -> dict[str, Any] | None:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT {DOC_COLUMNS} FROM documents WHERE user_id = %s AND id = %s",
                (user_id, doc_id),
            )
            return await cur.fetchone()

    async def list_documents(
        self, user_id: str, limit: int, cursor: tuple[str, str] | None, status: str | None
    ) -> list[dict[str, Any]]:
        clauses = ["user_id = %s"]
        params: list[Any] = [user_id]
        if status:
            clauses.append("status = %s")
            params.append(status)
        if cursor:
            clauses.append("(created_at, id) < (%s::timestamptz, %s::uuid)")
            params.extend(cursor)
        params.append(limit)
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT {DOC_COLUMNS} FROM documents WHERE {' AND '.join(clauses)} "
                "ORDER BY created_at DESC, id DESC LIMIT %s",
                params,
            )
            return await cur.fetchall()

    async def delete_document(self, user_id: str, doc_id: uuid.UUID) -> bool:
        """Delete a document and (by cascade, in the same statement) all its chunks."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM documents WHERE user_id = %s AND id = %s", (user_id, doc_id)
            )
            return cur.rowcount > 0

    # ingestion -----------------------------------------------------------------

    async def pending_document_ids(self) -> list[uuid.UUID]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id FROM documents WHERE status IN ('pending', 'processing') "
                "ORDER BY created_at"
            )
            return [row[0] for row in await cur.fetchall()]

    async def claim_document(self, doc_id: uuid.UUID) -> dict[str, Any] | None:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "UPDATE documents SET status = 'processing', updated_at = now() "
                "WHERE id = %s AND status IN ('pending', 'processing') "
                "RETURNING id, user_id, body",
                (doc_id,),
            )
            return await cur.fetchone()

    async def finish_document(
        self, doc_id: uuid.UUID, user_id: str, chunks: Sequence[Chunk], vectors: np.ndarray
    ) -> None:
        """Write all chunks and mark the document ready, in one transaction."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM chunks WHERE document_id = %s", (doc_id,))
            async with conn.cursor().copy(
                "COPY chunks (document_id, user_id, ordinal, text, position, embedding) FROM STDIN"
            ) as copy:
                for ordinal, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True)):
                    await copy.write_row(
                        (
                            doc_id,
                            user_id,
                            ordinal,
                            chunk.text,
                            json.dumps(chunk.position),
                            "[" + ",".join(f"{x:.7g}" for x in vector) + "]",
                        )
                    )
            await conn.execute(
                "UPDATE documents SET status = 'ready', chunk_count = %s, body = NULL, "
                "error = NULL, updated_at = now() WHERE id = %s",
                (len(chunks), doc_id),
            )

    async def fail_document(self, doc_id: uuid.UUID, reason: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE documents SET status = 'failed', error = %s, body = NULL, "
                "updated_at = now() WHERE id = %s",
                (reason, doc_id),
            )

    # search --------------------------------------------------------------------

    def _filters(
        self, user_id: str, document_ids: list[uuid.UUID], metadata: dict[str, Any]
    ) -> tuple[str, list[Any]]:
        clauses = ["c.user_id = %s", "d.user_id = %s", "d.status = 'ready'"]
        params: list[Any] = [user_id, user_id]
        if document_ids:
            clauses.append("c.document_id = ANY(%s)")
            params.append(document_ids)
        if metadata:
            clauses.append("d.metadata @> %s")
            params.append(Jsonb(metadata))
        return " AND ".join(clauses), params

    async def vector_search(
        self,
        user_id: str,
        vector: np.ndarray,
        k: int,
        document_ids: list[uuid.UUID],
        metadata: dict[str, Any],
    ) -> list[dict[str, Any]]:
        where, params = self._filters(user_id, document_ids, metadata)
        async with self.pool.connection() as conn, conn.transaction():
            # Keep scanning the HNSW graph until k rows pass the tenant/filter clauses.
            await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    "SELECT * FROM (SELECT c.id AS chunk_id, c.document_id, d.title, c.text, "
                    "c.position, d.metadata, 1 - (c.embedding <=> %s) AS score "
                    f"FROM chunks c JOIN documents d ON d.id = c.document_id WHERE {where} "
                    "ORDER BY c.embedding <=> %s LIMIT %s) hits ORDER BY score DESC",
                    [vector, *params, vector, k],
                )
                return await cur.fetchall()

    async def text_search(
        self,
        user_id: str,
        query: str,
        k: int,
        document_ids: list[uuid.UUID],
        metadata: dict[str, Any],
    ) -> list[dict[str, Any]]:
        where, params = self._filters(user_id, document_ids, metadata)
        # Any query term may match (OR), ranked by cover density.
        tsquery = "to_tsquery('english', replace(plainto_tsquery('english', %s)::text, '&', '|'))"
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT c.id AS chunk_id, c.document_id, d.title, c.text, c.position, "
                f"d.metadata, ts_rank_cd(c.tsv, q) AS score "
                f"FROM chunks c JOIN documents d ON d.id = c.document_id, {tsquery} q "
                f"WHERE {where} AND c.tsv @@ q ORDER BY score DESC, c.id LIMIT %s",
                [query, *params, k],
            )
            return await cur.fetchall()


def fuse_rankings(rankings: list[list[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    """Reciprocal rank fusion: score = sum over rankings of 1 / (60 + rank)."""
    fused: dict[int, dict[str, Any]] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            entry = fused.setdefault(hit["chunk_id"], {**hit, "score": 0.0})
            entry["score"] += 1.0 / (RRF_K + rank)
    return sorted(fused.values(), key=lambda hit: hit["score"], reverse=True)[:k]
