"""Schema migrations, run on start, safe to run twice."""

from __future__ import annotations

import psycopg

MIGRATIONS: list[str] = [
    """
    CREATE EXTENSION IF NOT EXISTS vector;
    CREATE TABLE embedding_config (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        model text NOT NULL,
        dimension integer NOT NULL
    );
    CREATE TABLE documents (
        id uuid PRIMARY KEY,
        user_id text NOT NULL,
        title text NOT NULL,
        content_hash text NOT NULL,
        media_type text NOT NULL,
        metadata jsonb NOT NULL DEFAULT '{}',
        body text,
        status text NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'processing', 'ready', 'failed')),
        error text,
        chunk_count integer NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (user_id, content_hash)
    );
    CREATE INDEX documents_user_created ON documents (user_id, created_at DESC, id DESC);
    CREATE TABLE chunks (
        id bigserial PRIMARY KEY,
        document_id uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
        user_id text NOT NULL,
        ordinal integer NOT NULL,
        text text NOT NULL,
        position jsonb NOT NULL DEFAULT '{}',
        embedding vector({dim}) NOT NULL,
        tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
        UNIQUE (document_id, ordinal)
    );
    CREATE INDEX chunks_user ON chunks (user_id);
    CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops);
    CREATE INDEX chunks_tsv ON chunks USING gin (tsv);
    """,
]


class ModelMismatchError(RuntimeError):
    pass


def migrate(url: str, model: str, dimension: int) -> None:
    """Apply pending migrations under an advisory lock and check the embedding model."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(727274)")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
            current = int(row[0]) if row else 0
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                with conn.transaction():
                    conn.execute(sql.replace("{dim}", str(int(dimension))))
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            _check_embedding_config(conn, model, dimension)
        finally:
            conn.execute("SELECT pg_advisory_unlock(727274)")


def _check_embedding_config(conn: psycopg.Connection, model: str, dimension: int) -> None:
    conn.execute(
        "INSERT INTO embedding_config (model, dimension) VALUES (%s, %s) "
        "ON CONFLICT (singleton) DO NOTHING",
        (model, dimension),
    )
    row = conn.execute("SELECT model, dimension FROM embedding_config").fetchone()
    assert row is not None
    if (row[0], int(row[1])) != (model, dimension):
        raise ModelMismatchError(
            f"this database holds embeddings of {row[0]} ({row[1]} dimensions) but the embedder "
            f"serves {model} ({dimension} dimensions); re-embed into a new database or "
            f"point the embedder at {row[0]}"
        )
