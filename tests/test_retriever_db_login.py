"""The retriever makes its application role's login itself, as the AWS deployment runs it:
the owner's and the application's passwords are two secrets, injected as env vars, and no
one-off task creates the login. Against the session stack's embedded PostgreSQL."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ragctl.stack import Stack
from services.retriever import schema
from services.retriever.app import create_app
from services.retriever.settings import RetrieverSettings

# Roles are cluster-wide and the stack's own retriever queries as rag_app: a role of our own.
ROLE = "rag_app_login_test"


@pytest.fixture
def login_db(stack: Stack) -> Iterator[str]:
    """A fresh database in the stack's cluster (its owner's URL), dropped after with ROLE."""
    assert stack.database_url is not None
    name = f"t_login_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(stack.database_url, dbname=name)
    finally:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(ROLE)))


def login(url: str, password: str) -> psycopg.Connection:
    return psycopg.connect(make_conninfo(url, user=ROLE, password=password), autocommit=True)


def stored_verifier(owner_url: str) -> tuple[bool, bool, bool, str]:
    """ROLE's LOGIN, SUPERUSER, BYPASSRLS and stored password (the owner is a superuser)."""
    with psycopg.connect(owner_url) as conn:
        row = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolbypassrls, rolpassword FROM pg_authid "
            "WHERE rolname = %s",
            (ROLE,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


@contextmanager
def passwords_checked(owner_url: str) -> Iterator[None]:
    """The embedded server trusts every local connection (pg_hba.conf: trust; it listens on
    no TCP port), so it would take any password. While this is open, a scram-sha-256 line for
    ROLE alone comes first in pg_hba.conf; every other role is matched as before."""
    with psycopg.connect(owner_url, autocommit=True) as conn:
        row = conn.execute("SHOW hba_file").fetchone()
        assert row is not None
        hba = Path(row[0])
        original = hba.read_text()
        hba.write_text(f"local all {ROLE} scram-sha-256\n{original}")
        try:
            conn.execute("SELECT pg_reload_conf()")
            # The postmaster reloads on its signal, shortly after: wait for it.
            deadline = time.monotonic() + 20
            while True:
                try:
                    login(owner_url, "not-the-password").close()
                except psycopg.OperationalError as exc:
                    assert "password authentication failed" in str(exc)
                    break
                assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
                time.sleep(0.05)
            yield
        finally:
            hba.write_text(original)
            conn.execute("SELECT pg_reload_conf()")


def test_migrate_makes_a_password_login_bound_by_rls_and_rotates_it(login_db: str) -> None:
    first = "first 'secret' " + secrets.token_urlsafe(18)
    second = "second " + secrets.token_urlsafe(18)
    schema.migrate(login_db, "m", 3, app_role=ROLE, app_password=first)
    can_login, superuser, bypass_rls, verifier = stored_verifier(login_db)
    assert can_login and not superuser and not bypass_rls
    # Hashed by libpq before it was sent: the server holds (and could log) a verifier only.
    assert verifier.startswith("SCRAM-SHA-256$") and first not in verifier

    with passwords_checked(login_db):
        with login(login_db, first) as conn:
            row = conn.execute(
                "SELECT current_user, pg_has_role(current_user, (SELECT relowner FROM "
                "pg_class WHERE oid = 'public.documents'::regclass), 'MEMBER')"
            ).fetchone()
            assert row == (ROLE, False)
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
                assert conn.execute("SELECT user_id FROM documents").fetchall() == [("alice",)]
            assert conn.execute("SELECT count(*) FROM documents").fetchone() == (0,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("ALTER TABLE documents DISABLE ROW LEVEL SECURITY")

        # A second start with a rotated secret: the old password stops working.
        schema.migrate(login_db, "m", 3, app_role=ROLE, app_password=second)
        assert stored_verifier(login_db)[3] != verifier
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            login(login_db, first).close()
        with login(login_db, second) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (ROLE,)


async def test_the_service_queries_as_the_login_it_made(
    stack: Stack, login_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RETRIEVER_DATABASE_URL (the owner) + RETRIEVER_APP_DATABASE_PASSWORD, no app URL: the
    service makes the login at start, queries as it, and logs neither password."""
    password = secrets.token_urlsafe(24)
    owner_password = secrets.token_urlsafe(24)  # trust takes it; it is only to be kept secret
    settings = RetrieverSettings(
        database_url=login_db,
        database_password=owner_password,
        app_database_password=password,
        app_role=ROLE,
        embedder_url=stack.url("embedder"),
        ingest_workers=0,
    )
    assert settings.app_login_password == password
    caplog.set_level(logging.DEBUG)
    app = create_app(settings)
    with passwords_checked(login_db):
        async with app.router.lifespan_context(app):
            async with app.state.store.pool.connection() as conn:
                cur = await conn.execute("SELECT current_user, session_user")
                assert await cur.fetchone() == (ROLE, ROLE)
    assert stored_verifier(login_db)[0]
    assert password not in caplog.text and owner_password not in caplog.text
