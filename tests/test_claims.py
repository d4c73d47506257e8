"""Ingestion claims against the real embedded PostgreSQL: cost, fairness, concurrency, and
when another replica's missing liveness lock is trusted."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ragctl.stack import Stack, free_port
from services.retriever import ingest, schema
from services.retriever.embedder_client import EmbedderClient
from services.retriever.ingest import Ingestor
from services.retriever.settings import RetrieverSettings
from services.retriever.store import (
    CLAIM_ORDER,
    CLAIM_TRIES,
    CLAIM_USER_JOB,
    CLAIMABLE,
    LIVENESS_LOCK,
    Job,
    Store,
    prepare_connection,
)
from tests.test_retriever import as_app_role, create_database

REPLICA = 1001
CAP = 24
GRACE_S = 15.0


@pytest.fixture
def jobs_db(stack: Stack) -> str:
    """A fresh, migrated database of its own: no other test's jobs, no stack workers."""
    url = create_database(stack)
    schema.migrate(url, "m", 3)
    return url


@asynccontextmanager
async def app_store(url: str, connections: int = 2) -> AsyncIterator[Store]:
    """A Store as the service builds it: the application role, no prepared statements."""
    async with AsyncConnectionPool(
        as_app_role(url),
        min_size=connections,
        max_size=connections,
        configure=prepare_connection,
        kwargs={"autocommit": True, "prepare_threshold": None},
    ) as pool:
        yield Store(pool)


def add_jobs(
    url: str,
    user: str,
    count: int,
    age_s: float,
    leased: int = 0,
    replica: int = REPLICA,
) -> list[uuid.UUID]:
    """`count` due jobs of `user`, the oldest age_s old and each 1 ms younger than the one
    before; the oldest `leased` of them in progress on `replica` for another minute."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO documents (id, user_id, title, content_hash, media_type) "
            "SELECT md5(%(user)s || ':' || i)::uuid, %(user)s, 'doc', 'h' || i, 'text/plain' "
            "FROM generate_series(1, %(count)s) i",
            {"user": user, "count": count},
        )
        conn.execute(
            "INSERT INTO ingest_jobs (document_id, user_id, attempts, run_after, leased_by, "
            "replica_key, lease_until) "
            "SELECT md5(%(user)s || ':' || i)::uuid, %(user)s, (i <= %(leased)s)::int, "
            "now() - make_interval(secs => %(age)s) + i * interval '1 ms', "
            "CASE WHEN i <= %(leased)s THEN 'busy-worker' END, "
            "CASE WHEN i <= %(leased)s THEN %(replica)s END, "
            "CASE WHEN i <= %(leased)s THEN now() + interval '1 minute' END "
            "FROM generate_series(1, %(count)s) i",
            {"user": user, "count": count, "age": age_s, "leased": leased, "replica": replica},
        )
        rows = conn.execute(
            "SELECT document_id FROM ingest_jobs WHERE user_id = %s ORDER BY run_after", (user,)
        ).fetchall()
    return [row[0] for row in rows]


async def claim(store: Store, worker: str = "w", grace_s: float | None = GRACE_S) -> Job | None:
    return await store.claim_job(worker, 60.0, REPLICA, CAP, grace_s)


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


async def explain(store: Store, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement, rolled back: its top plan node."""
    async with store.pool.connection() as conn, conn.transaction():
        cur = await conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
        row = await cur.fetchone()
        assert row is not None
        raise psycopg.Rollback  # the transaction block ends here: the claim is undone
    return dict(row[0][0]["Plan"])


async def test_a_capped_users_backlog_is_not_walked(jobs_db: str) -> None:
    backlog = add_jobs(jobs_db, "A", 20_000, age_s=3600, leased=CAP)  # A: at the cap here
    (b_job,) = add_jobs(jobs_db, "B", 1, age_s=1)  # younger than every one of A's
    with psycopg.connect(jobs_db, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE ingest_jobs")
    params = {
        "worker": "w",
        "replica": REPLICA,
        "lease": 60.0,
        "per_user": CAP,
        "lock": LIVENESS_LOCK,
        "grace": GRACE_S,
        "tries": CLAIM_TRIES,
        "user": "B",
    }
    async with app_store(jobs_db) as store:
        for sql in (CLAIM_ORDER, CLAIM_USER_JOB):
            plan = await explain(store, sql.format(claimable=CLAIMABLE), params)
            scans = [n for n in plan_nodes(plan) if n.get("Relation Name") == "ingest_jobs"]
            assert scans, plan
            # Rows each scan of ingest_jobs read: returned, or read and filtered out.
            read = sum(
                n["Actual Rows"] * n["Actual Loops"] + n.get("Rows Removed by Filter", 0)
                for n in scans
            )
            blocks = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
            # The old claim, ordered by run_after alone, read all 20,001 rows (267 blocks).
            assert read <= 2 * CAP + 10, (read, plan)
            assert blocks <= 100, (blocks, plan)
        job = await claim(store)
        assert job is not None and job.document_id == b_job and job.attempts == 1
        assert await claim(store) is None  # A stays at its cap
    with psycopg.connect(jobs_db) as conn:
        leased = conn.execute(
            "SELECT count(*) FROM ingest_jobs WHERE user_id = 'A' AND leased_by IS NOT NULL"
        ).fetchone()
    assert leased == (CAP,) and len(backlog) == 20_000


async def test_a_user_with_nothing_in_progress_goes_before_a_bulk_users_backlog(
    jobs_db: str,
) -> None:
    add_jobs(jobs_db, "A", 40, age_s=3600, leased=CAP)  # at the cap
    b_jobs = add_jobs(jobs_db, "B", 200, age_s=1800, leased=8)  # busy, with a backlog
    (c_job,) = add_jobs(jobs_db, "C", 1, age_s=5)  # one document, the youngest of all
    async with app_store(jobs_db) as store:
        first = await claim(store)
        second = await claim(store)
    assert first is not None and first.document_id == c_job
    assert second is not None and second.document_id == b_jobs[8]  # B's oldest waiting one


async def test_workers_claiming_at_once_each_get_a_job(jobs_db: str) -> None:
    jobs = add_jobs(jobs_db, "U", 100, age_s=60)
    async with app_store(jobs_db, connections=16) as store:
        claimed = await asyncio.gather(*(claim(store, f"w{i}") for i in range(16)))
    ids = [job.document_id for job in claimed if job is not None]
    assert len(ids) == 16 and len(set(ids)) == 16, claimed
    assert set(ids) <= set(jobs)
    with psycopg.connect(jobs_db) as conn:
        leased = conn.execute(
            "SELECT count(*), count(DISTINCT leased_by), max(attempts) FROM ingest_jobs "
            "WHERE replica_key = %s AND lease_until > now()",
            (REPLICA,),
        ).fetchone()
    assert leased == (16, 16, 1)


async def test_a_missing_lock_is_trusted_only_once_the_server_has_been_up_a_while(
    jobs_db: str,
) -> None:
    other = 2002  # a replica that leased a job and holds no liveness lock
    (job_id,) = add_jobs(jobs_db, "U", 1, age_s=60, leased=1, replica=other)
    with psycopg.connect(jobs_db, autocommit=True) as owner:
        row = owner.execute(
            "SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8"
        ).fetchone()
        assert row is not None
        uptime = float(row[0])
        async with app_store(jobs_db) as store:
            # The server started less than the grace ago: the lease decides.
            assert await claim(store, grace_s=uptime + 3600) is None
            assert await claim(store, grace_s=None) is None  # this replica just relocked
            # Up for longer than the grace, but the replica is alive: its lock is held.
            owner.execute("SELECT pg_advisory_lock(%s, %s)", (LIVENESS_LOCK, other))
            assert await claim(store, grace_s=0) is None
            owner.execute("SELECT pg_advisory_unlock(%s, %s)", (LIVENESS_LOCK, other))
            job = await claim(store, "taker", grace_s=max(0.0, uptime - 1))
    assert job is not None and job.document_id == job_id and job.attempts == 2
    with psycopg.connect(jobs_db) as conn:
        row = conn.execute(
            "SELECT leased_by, replica_key FROM ingest_jobs WHERE document_id = %s", (job_id,)
        ).fetchone()
    assert row == ("taker", REPLICA)


async def test_own_live_jobs_are_never_taken_back_by_the_same_replica(jobs_db: str) -> None:
    add_jobs(jobs_db, "U", 3, age_s=60, leased=3)  # this replica's, no lock in the test
    async with app_store(jobs_db) as store:
        assert await claim(store, grace_s=0) is None


@contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


async def test_start_fails_clearly_when_the_liveness_lock_cannot_be_taken(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ingest, "LIVENESS_CONNECT_TIMEOUT_S", 2)
    monkeypatch.setattr(ingest, "LIVENESS_START_TIMEOUT_S", 5.0)
    settings = RetrieverSettings(ingest_workers=1, parse_processes=1)
    embedder = EmbedderClient(f"http://127.0.0.1:{free_port()}")  # none: counts via /tokenize
    with silent_server() as port:
        pool = AsyncConnectionPool(f"host=127.0.0.1 port={port} dbname=x user=x", open=False)
        ingestor = Ingestor(Store(pool), embedder, settings, 512)
        caplog.set_level(logging.WARNING, logger=ingest.__name__)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"liveness lock in 5s: .*timeout"):
            await ingestor.start()
        assert time.monotonic() - started < 15
    await embedder.aclose()
    failures = [r for r in caplog.records if "could not take the ingestion liveness" in r.message]
    assert failures, "every failed attempt is logged, the first one included"


async def test_a_relocked_replica_does_not_trust_missing_locks_for_a_while(
    jobs_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RetrieverSettings(ingest_workers=0, parse_processes=1)
    embedder = EmbedderClient(f"http://127.0.0.1:{free_port()}")
    caplog.set_level(logging.INFO, logger=ingest.__name__)
    async with app_store(jobs_db) as store:
        ingestor = Ingestor(store, embedder, settings, 512)
        await ingestor.start()
        try:
            assert ingestor._missing_lock_grace() == ingest.MISSING_LOCK_GRACE_S
            with psycopg.connect(jobs_db, autocommit=True) as owner:  # drop its lock's session
                owner.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND classid = %s AND objid = %s AND objsubid = 2",
                    (LIVENESS_LOCK, ingestor.replica_key),
                )
            deadline = time.monotonic() + 10
            while not any(
                "took the ingestion liveness lock again" in r.message for r in caplog.records
            ):
                assert time.monotonic() < deadline, caplog.text
                await asyncio.sleep(0.1)
            assert "lost the ingestion liveness lock" in caplog.text
            assert ingestor._missing_lock_grace() is None
        finally:
            await ingestor.stop()
            await embedder.aclose()
