"""Schema migrations, run on start, safe to run twice; the application role and its grants."""

from __future__ import annotations

import contextlib
import logging
import time

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

MIN_SERVER_VERSION = 150000
ADVISORY_LOCK = 727274
HNSW_INDEX = "chunks_embedding_hnsw"

# Each migration runs once, in one transaction, recorded in schema_migrations.
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
    # Durable ingestion jobs, raw uploads kept until parsed, row-level security.
    """
    ALTER TABLE documents ADD COLUMN source bytea;
    UPDATE documents SET source = convert_to(body, 'UTF8') WHERE body IS NOT NULL;
    ALTER TABLE documents DROP COLUMN body;
    ALTER TABLE documents ADD CONSTRAINT documents_user_id_set CHECK (user_id <> '');
    ALTER TABLE chunks ADD CONSTRAINT chunks_user_id_set CHECK (user_id <> '');
    CREATE INDEX documents_metadata ON documents USING gin (metadata jsonb_path_ops);

    -- One job per document still to ingest. It names the document and its tenant and
    -- holds no content, so workers can claim across tenants without seeing documents.
    CREATE TABLE ingest_jobs (
        document_id uuid PRIMARY KEY REFERENCES documents (id) ON DELETE CASCADE,
        user_id text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        retries integer NOT NULL DEFAULT 0,
        run_after timestamptz NOT NULL DEFAULT now(),
        leased_by text,
        lease_until timestamptz,
        last_error text,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX ingest_jobs_due ON ingest_jobs (run_after);
    INSERT INTO ingest_jobs (document_id, user_id)
        SELECT id, user_id FROM documents WHERE status IN ('pending', 'processing');
    UPDATE documents SET status = 'pending' WHERE status = 'processing';

    ALTER TABLE documents ENABLE ROW LEVEL SECURITY;
    ALTER TABLE documents FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON documents
        USING (user_id = current_setting('app.user_id', true))
        WITH CHECK (user_id = current_setting('app.user_id', true));
    ALTER TABLE chunks ENABLE ROW LEVEL SECURITY;
    ALTER TABLE chunks FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON chunks
        USING (user_id = current_setting('app.user_id', true))
        WITH CHECK (user_id = current_setting('app.user_id', true));
    """,
    # Jobs remember which replica leased them (its liveness lock, see store.LIVENESS_LOCK),
    # so a dead replica's jobs are taken back at once and per-user shares can be counted.
    # Chunk ids are drawn at random below 2**53 (exact in JSON everywhere), not from a
    # sequence whose growth would show one tenant the others' ingestion.
    """
    ALTER TABLE ingest_jobs ADD COLUMN replica_key integer;
    CREATE INDEX ingest_jobs_leased ON ingest_jobs (replica_key, user_id)
        WHERE lease_until IS NOT NULL;
    ALTER TABLE chunks ALTER COLUMN id
        SET DEFAULT (floor(random() * 9007199254740990))::bigint + 1;
    """,
    # Claims choose the user first (fewest jobs in progress on the claiming replica), then
    # that user's oldest due job: the users with jobs are listed by a loose index scan, and
    # each user's due jobs are read in run_after order, never the capped users' backlogs.
    # ingest_jobs_due stays for replicas of the previous version during a rolling deploy.
    """
    CREATE INDEX ingest_jobs_user_due ON ingest_jobs (user_id, run_after);
    """,
]


class ModelMismatchError(RuntimeError):
    pass


class UnsupportedDatabaseError(RuntimeError):
    pass


def migrate(
    url: str,
    model: str,
    dimension: int,
    app_role: str = "rag_app",
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
    owner_sets_role: bool = False,
) -> None:
    """Apply pending migrations under an advisory lock, check the embedding model, set up
    the application role and the HNSW index options. Safe to run concurrently and twice."""
    with psycopg.connect(url, autocommit=True) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        if version is None or int(version[0]) < MIN_SERVER_VERSION:
            raise UnsupportedDatabaseError("the retriever needs PostgreSQL 15 or later")
        _lock(conn)
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
            current = int(row[0]) if row else 0
            for version_no, text in enumerate(MIGRATIONS, start=1):
                if version_no <= current:
                    continue
                with conn.transaction():
                    conn.execute(text.replace("{dim}", str(int(dimension))))
                    conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (version_no,)
                    )
                logger.info("applied schema migration %d", version_no)
            _check_embedding_config(conn, model, dimension)
            _grant_app_role(conn, app_role, owner_sets_role)
            _set_hnsw_options(conn, hnsw_m, hnsw_ef_construction)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK,))


def _lock(conn: psycopg.Connection) -> None:
    """Take the migration lock, polling: a session blocked inside a statement would hold a
    snapshot that REINDEX CONCURRENTLY (run by the holder) waits for, a deadlock."""
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK,)).fetchone()
        if row and row[0]:
            return
        time.sleep(0.2)


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


def _grant_app_role(conn: psycopg.Connection, app_role: str, owner_sets_role: bool) -> None:
    """The role the service queries as: not the owner, not a superuser, bound by RLS."""
    role = sql.Identifier(app_role)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app_role,)).fetchone()
    if not exists:
        # LOGIN so that a trust/peer-authenticated local server (the embedded one) lets the
        # service connect as it; elsewhere the operator gives it a password or IAM auth.
        # Roles are cluster-wide: a first start on another database may create it first.
        with contextlib.suppress(psycopg.errors.DuplicateObject):
            conn.execute(
                sql.SQL(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
                ).format(role)
            )
    flags = conn.execute(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", (app_role,)
    ).fetchone()
    assert flags is not None
    if flags[0] or flags[1]:
        raise UnsupportedDatabaseError(
            f"the application role {app_role} is a superuser or bypasses row-level security; "
            "use a plain role so that tenant isolation holds"
        )
    database = conn.execute("SELECT current_database()").fetchone()
    assert database is not None
    for statement in (
        "GRANT USAGE ON SCHEMA public TO {role}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON documents, chunks, ingest_jobs TO {role}",
        "GRANT SELECT ON embedding_config, schema_migrations TO {role}",
        "GRANT USAGE ON SEQUENCE chunks_id_seq TO {role}",
        # Chunks are staged in a temporary table (COPY cannot write under RLS).
        "GRANT TEMPORARY ON DATABASE {database} TO {role}",
    ):
        conn.execute(sql.SQL(statement).format(role=role, database=sql.Identifier(database[0])))
    if owner_sets_role:
        # The owner's login queries under SET ROLE when no login of the role is configured.
        option = "SET" if conn.info.server_version >= 160000 else "MEMBER"
        member = conn.execute(
            "SELECT pg_has_role(current_user, %s, %s)", (app_role, option)
        ).fetchone()
        if member is not None and not member[0]:
            conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(role))


def _set_hnsw_options(conn: psycopg.Connection, m: int, ef_construction: int) -> None:
    """Rebuild the HNSW index when its m / ef_construction differ from the settings.

    The new graph is built beside the old one (CONCURRENTLY: searches and writes go on),
    then swapped in; a rebuild cut short leaves an invalid index, dropped on the next start.
    """
    building = f"{HNSW_INDEX}_next"
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(building)))
    row = conn.execute(
        "SELECT coalesce(c.reloptions, '{}') FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND n.nspname = 'public'",
        (HNSW_INDEX,),
    ).fetchone()
    assert row is not None
    options = dict(option.split("=", 1) for option in row[0])
    current = (int(options.get("m", 16)), int(options.get("ef_construction", 64)))
    if current == (m, ef_construction):
        return
    logger.warning(
        "rebuilding the HNSW index: m %d -> %d, ef_construction %d -> %d",
        current[0],
        m,
        current[1],
        ef_construction,
    )
    conn.execute(
        sql.SQL(
            "CREATE INDEX CONCURRENTLY {} ON chunks USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = {}, ef_construction = {})"
        ).format(sql.Identifier(building), sql.Literal(int(m)), sql.Literal(int(ef_construction)))
    )
    with conn.transaction():
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(HNSW_INDEX)))
        conn.execute(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(building), sql.Identifier(HNSW_INDEX)
            )
        )
