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
    # Per-user limits every gateway task shares (services/retriever/limits.py): a request
    # token bucket and chat stream leases per user. Not tenant data: outside row-level
    # security, reached only through the service-token routes. The gateway picks the lease
    # ids, so a release that overtakes its acquire leaves a released row the acquire keeps.
    # Each function commits without waiting for its WAL flush (synchronous_commit off for
    # its transaction): a crash may forget the last few counts, which costs a user nothing
    # worse than a request or a slot more (or a slot held until its lease ends).
    """
    CREATE TABLE rate_buckets (
        user_id text PRIMARY KEY CHECK (user_id <> ''),
        tokens double precision NOT NULL,
        updated_at timestamptz NOT NULL
    );
    CREATE TABLE stream_leases (
        id uuid PRIMARY KEY,
        user_id text NOT NULL CHECK (user_id <> ''),
        expires_at timestamptz NOT NULL,
        released boolean NOT NULL DEFAULT false
    );
    CREATE INDEX stream_leases_user ON stream_leases (user_id, expires_at);
    CREATE INDEX stream_leases_expiry ON stream_leases (expires_at);

    -- Take one token from the user's bucket, refilled by the time elapsed on the database
    -- clock: 0 when taken, else the seconds until the next token. The row lock serializes
    -- one user's requests; other users' rows are never waited on.
    CREATE FUNCTION limits_take_request(
        p_user text, p_per_second double precision, p_burst double precision
    ) RETURNS double precision LANGUAGE plpgsql AS $$
    DECLARE
        v_tokens double precision;
        v_updated timestamptz;
        v_now timestamptz;
    BEGIN
        PERFORM set_config('synchronous_commit', 'off', true);
        SELECT tokens, updated_at INTO v_tokens, v_updated
            FROM rate_buckets WHERE user_id = p_user FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO rate_buckets (user_id, tokens, updated_at)
                VALUES (p_user, p_burst - 1, clock_timestamp())
                ON CONFLICT (user_id) DO NOTHING;
            IF FOUND THEN
                RETURN 0;
            END IF;
            -- A concurrent first request made the row: wait for it like any other.
            SELECT tokens, updated_at INTO v_tokens, v_updated
                FROM rate_buckets WHERE user_id = p_user FOR UPDATE;
        END IF;
        v_now := clock_timestamp();  -- read after the lock: the holder's update is in
        v_tokens := least(p_burst, v_tokens
            + greatest(0, extract(epoch FROM v_now - v_updated)::double precision)
            * p_per_second);
        IF v_tokens < 1 THEN
            RETURN (1 - v_tokens) / p_per_second;  -- unchanged: refilling later is the same
        END IF;
        UPDATE rate_buckets SET tokens = v_tokens - 1, updated_at = v_now
            WHERE user_id = p_user;
        RETURN 0;
    END $$;

    -- Take a stream lease while the user's live leases are under the cap; one acquire per
    -- user at a time (a transaction-scoped advisory lock on the user). A few leases past
    -- their time, anyone's, are deleted on the way.
    CREATE FUNCTION limits_acquire_stream(
        p_user text, p_lease uuid, p_cap integer, p_lease_s double precision
    ) RETURNS boolean LANGUAGE plpgsql AS $$
    DECLARE
        v_live integer;
    BEGIN
        PERFORM set_config('synchronous_commit', 'off', true);
        PERFORM pg_advisory_xact_lock(hashtextextended(p_user, 0));
        SELECT count(*) INTO v_live FROM stream_leases
            WHERE user_id = p_user AND expires_at > clock_timestamp() AND NOT released;
        IF v_live >= p_cap THEN
            RETURN false;
        END IF;
        INSERT INTO stream_leases (id, user_id, expires_at)
            VALUES (p_lease, p_user, clock_timestamp() + make_interval(secs => p_lease_s))
            ON CONFLICT (id) DO NOTHING;
        DELETE FROM stream_leases WHERE id IN (
            SELECT id FROM stream_leases WHERE expires_at < clock_timestamp()
            ORDER BY expires_at LIMIT 16 FOR UPDATE SKIP LOCKED);
        RETURN true;
    END $$;

    -- Give a lease back. One that has not come yet (its acquire still on the way) is
    -- recorded as released until the lease's time, so the late acquire takes nothing.
    CREATE FUNCTION limits_release_stream(
        p_user text, p_lease uuid, p_lease_s double precision
    ) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM set_config('synchronous_commit', 'off', true);
        INSERT INTO stream_leases (id, user_id, expires_at, released)
            VALUES (p_lease, p_user, clock_timestamp() + make_interval(secs => p_lease_s), true)
            ON CONFLICT (id) DO UPDATE SET released = true
            WHERE stream_leases.user_id = EXCLUDED.user_id;
    END $$;
    REVOKE ALL ON FUNCTION limits_take_request(text, double precision, double precision),
        limits_acquire_stream(text, uuid, integer, double precision),
        limits_release_stream(text, uuid, double precision) FROM PUBLIC;
    """,
    # BM25 inside PostgreSQL (docs/retrieval.md). Each chunk's text is indexed with its
    # document's title and its heading, and carries its BM25 term weights as a sparsevec
    # (term frequency saturated and normalised by its length: k1 1.2, b 0.75, the tenant's
    # average length when it was written). A query is a sparsevec of its terms' IDF, read
    # from per-tenant term statistics that triggers keep exact as chunks come and go; the
    # score is the inner product, searched through an HNSW index like the embeddings.
    # Terms map to dimensions by a 29-bit hash of the lexeme.
    """
    CREATE FUNCTION bm25_dim(lexeme text) RETURNS integer
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN (hashtextextended(lexeme, 0) & 536870911)::integer + 1;

    CREATE FUNCTION bm25_length(tsv tsvector) RETURNS integer
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN (SELECT coalesce(sum(coalesce(cardinality(positions), 1)), 0)::integer
                FROM unnest(tsv));

    CREATE FUNCTION bm25_vector(tsv tsvector, avgdl double precision) RETURNS sparsevec
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        WITH terms AS (
            SELECT lexeme, coalesce(cardinality(positions), 1)::double precision AS tf
            FROM unnest(tsv)
        ), length AS (
            SELECT sum(tf) AS dl FROM terms
        ), weights AS (
            SELECT bm25_dim(lexeme) AS dim,
                   sum(tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / greatest(avgdl, 1)))) AS w
            FROM terms, length GROUP BY 1
        )
        SELECT (coalesce('{' || string_agg(dim || ':' || w, ',' ORDER BY dim) || '}', '{}')
                || '/536870912')::sparsevec
        FROM weights
    $$;

    CREATE TABLE bm25_stats (
        user_id text PRIMARY KEY CHECK (user_id <> ''),
        chunks bigint NOT NULL,
        total_length bigint NOT NULL
    );
    CREATE TABLE bm25_terms (
        user_id text NOT NULL CHECK (user_id <> ''),
        term text NOT NULL,
        df integer NOT NULL,
        PRIMARY KEY (user_id, term)
    );

    ALTER TABLE chunks ALTER COLUMN tsv DROP EXPRESSION;
    ALTER TABLE chunks ADD COLUMN bm25_length integer NOT NULL DEFAULT 0,
                       ADD COLUMN bm25 sparsevec(536870912);
    -- The owner backfills what exists; row-level security binds it again below.
    ALTER TABLE chunks NO FORCE ROW LEVEL SECURITY;
    ALTER TABLE documents NO FORCE ROW LEVEL SECURITY;
    UPDATE chunks c SET tsv = to_tsvector('english',
            d.title || ' ' || coalesce(c.position->>'heading', '') || ' ' || c.text)
        FROM documents d WHERE d.id = c.document_id;
    UPDATE chunks SET bm25_length = bm25_length(tsv);
    INSERT INTO bm25_stats (user_id, chunks, total_length)
        SELECT user_id, count(*), sum(bm25_length) FROM chunks GROUP BY user_id;
    INSERT INTO bm25_terms (user_id, term, df)
        SELECT user_id, lexeme, count(*) FROM chunks, unnest(tsv) GROUP BY 1, 2;
    UPDATE chunks c SET bm25 = bm25_vector(c.tsv, s.total_length::double precision / s.chunks)
        FROM bm25_stats s WHERE s.user_id = c.user_id;
    ALTER TABLE chunks FORCE ROW LEVEL SECURITY;
    ALTER TABLE documents FORCE ROW LEVEL SECURITY;
    -- The best chunks by inner product, found like the nearest embeddings: an HNSW graph
    -- over the term weights (sparsevec, at most 1,000 terms a chunk; a chunk holds fewer).
    CREATE INDEX chunks_bm25_hnsw ON chunks USING hnsw (bm25 sparsevec_ip_ops);

    ALTER TABLE bm25_stats ENABLE ROW LEVEL SECURITY;
    ALTER TABLE bm25_stats FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON bm25_stats
        USING (user_id = current_setting('app.user_id', true))
        WITH CHECK (user_id = current_setting('app.user_id', true));
    ALTER TABLE bm25_terms ENABLE ROW LEVEL SECURITY;
    ALTER TABLE bm25_terms FORCE ROW LEVEL SECURITY;
    CREATE POLICY tenant_isolation ON bm25_terms
        USING (user_id = current_setting('app.user_id', true))
        WITH CHECK (user_id = current_setting('app.user_id', true));

    -- The statistics follow every INSERT and DELETE of chunks (a document's cascade too),
    -- one tenant's changes at a time (a transaction-scoped advisory lock on the tenant:
    -- no deadlock between ingestions and deletions touching the same terms).
    CREATE FUNCTION bm25_chunks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM new_chunks) THEN
            RETURN NULL;
        END IF;
        PERFORM pg_advisory_xact_lock(hashtextextended('bm25:' || user_id, 0))
            FROM (SELECT DISTINCT user_id FROM new_chunks ORDER BY 1) u;
        INSERT INTO bm25_terms AS t (user_id, term, df)
            SELECT n.user_id, u.lexeme, count(*) FROM new_chunks n, unnest(n.tsv) u
            GROUP BY 1, 2
            ON CONFLICT (user_id, term) DO UPDATE SET df = t.df + excluded.df;
        INSERT INTO bm25_stats AS s (user_id, chunks, total_length)
            SELECT user_id, count(*), sum(bm25_length) FROM new_chunks GROUP BY 1
            ON CONFLICT (user_id) DO UPDATE SET chunks = s.chunks + excluded.chunks,
                total_length = s.total_length + excluded.total_length;
        RETURN NULL;
    END $$;
    CREATE FUNCTION bm25_chunks_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM old_chunks) THEN
            RETURN NULL;
        END IF;
        PERFORM pg_advisory_xact_lock(hashtextextended('bm25:' || user_id, 0))
            FROM (SELECT DISTINCT user_id FROM old_chunks ORDER BY 1) u;
        WITH gone AS (
            SELECT o.user_id, u.lexeme, count(*) AS n FROM old_chunks o, unnest(o.tsv) u
            GROUP BY 1, 2
        ), left_over AS (
            UPDATE bm25_terms t SET df = t.df - gone.n FROM gone
            WHERE t.user_id = gone.user_id AND t.term = gone.lexeme
            RETURNING t.user_id, t.term, t.df
        )
        DELETE FROM bm25_terms t USING left_over l
            WHERE l.df <= 0 AND t.user_id = l.user_id AND t.term = l.term;
        UPDATE bm25_stats s SET chunks = s.chunks - g.chunks,
                total_length = s.total_length - g.total_length
            FROM (SELECT user_id, count(*) AS chunks, sum(bm25_length) AS total_length
                  FROM old_chunks GROUP BY 1) g
            WHERE s.user_id = g.user_id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER chunks_bm25_inserted AFTER INSERT ON chunks
        REFERENCING NEW TABLE AS new_chunks FOR EACH STATEMENT
        EXECUTE FUNCTION bm25_chunks_inserted();
    CREATE TRIGGER chunks_bm25_deleted AFTER DELETE ON chunks
        REFERENCING OLD TABLE AS old_chunks FOR EACH STATEMENT
        EXECUTE FUNCTION bm25_chunks_deleted();
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
    app_password: str | None = None,
) -> None:
    """Apply pending migrations under an advisory lock, check the embedding model, set up
    the application role (a login with app_password, when given) and the HNSW index
    options. Safe to run concurrently and twice."""
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
            _grant_app_role(conn, app_role, owner_sets_role, app_password)
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


def _grant_app_role(
    conn: psycopg.Connection, app_role: str, owner_sets_role: bool, password: str | None = None
) -> None:
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
    if password is not None:
        _set_login_password(conn, app_role, password)
    database = conn.execute("SELECT current_database()").fetchone()
    assert database is not None
    for statement in (
        "GRANT USAGE ON SCHEMA public TO {role}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON documents, chunks, ingest_jobs, "
        "bm25_stats, bm25_terms TO {role}",
        "GRANT SELECT ON embedding_config, schema_migrations TO {role}",
        "GRANT USAGE ON SEQUENCE chunks_id_seq TO {role}",
        # Per-user limits of the gateway tasks (no tenant data, no row-level security).
        "GRANT SELECT, INSERT, UPDATE, DELETE ON rate_buckets, stream_leases TO {role}",
        "GRANT EXECUTE ON FUNCTION limits_take_request(text, double precision, "
        "double precision), limits_acquire_stream(text, uuid, integer, double precision), "
        "limits_release_stream(text, uuid, double precision) TO {role}",
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


def _set_login_password(conn: psycopg.Connection, app_role: str, password: str) -> None:
    """Make app_role a login with this password (set again on every start: a rotated secret
    takes effect at the next deploy). libpq hashes it here, as psql's \\password does, in
    the server's password_encryption: the statement, which a server may log, carries a salted
    verifier and never the password."""
    verifier = conn.pgconn.encrypt_password(password.encode(), app_role.encode()).decode()
    try:
        conn.execute(
            sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(app_role), sql.Literal(verifier)
            )
        )
    except psycopg.errors.InsufficientPrivilege as exc:
        raise UnsupportedDatabaseError(
            f"the owner's login cannot set the password of {app_role} (it needs CREATEROLE "
            "and, on PostgreSQL 16+, ADMIN OPTION on the role, which the role's creator has); "
            "create the login yourself and set RETRIEVER_APP_DATABASE_URL"
        ) from exc


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
