"""Retriever app factory: the pool, the ingestor and the embedder client made in the lifespan;
routes in services.retriever.routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from psycopg import AsyncConnection, sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from services.common.errors import install_error_handlers
from services.common.observability import install_observability
from services.retriever import limits, schema
from services.retriever.embedded_pg import start_embedded_postgres, stop_embedded_postgres
from services.retriever.embedder_client import EmbedderClient
from services.retriever.ingest import Ingestor
from services.retriever.rerank import RerankClient
from services.retriever.routes import router
from services.retriever.settings import RetrieverSettings
from services.retriever.store import Store, prepare_connection

logger = logging.getLogger(__name__)


async def check_app_role(pool: AsyncConnectionPool) -> bool:
    """Refuse to serve as a role that row-level security would not bind; report whether
    pgvector has iterative index scans (0.8+)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT current_user, r.rolsuper, r.rolbypassrls, "
            "pg_has_role(current_user, (SELECT relowner FROM pg_class "
            "  WHERE oid = 'public.documents'::regclass), 'MEMBER'), "
            "(SELECT extversion FROM pg_extension WHERE extname = 'vector') "
            "FROM pg_roles r WHERE r.rolname = current_user"
        )
        row = await cur.fetchone()
    assert row is not None
    user, superuser, bypass_rls, owner, version = row
    if superuser or bypass_rls or owner:
        raise schema.UnsupportedDatabaseError(
            f"the retriever queries as {user}, which is a superuser, bypasses row-level "
            "security or owns the tables (or is a member of their owner); point "
            "RETRIEVER_APP_DATABASE_URL at a plain login of RETRIEVER_APP_ROLE"
        )
    pgvector = tuple(int(part) for part in str(version).split(".")[:2])
    if pgvector < (0, 8):
        logger.warning(
            "pgvector %s has no iterative index scans; filtered searches may "
            "return fewer than k results: upgrade to 0.8",
            version,
        )
    return pgvector >= (0, 8)


def create_app(settings: RetrieverSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = None
        admin_url, app_url = settings.database_url, settings.app_database_url
        if not admin_url:
            server, admin_url = start_embedded_postgres(settings.data_dir)
            app_url = make_conninfo(admin_url, user=settings.app_role)
        app_password = settings.app_login_password
        if app_password is not None:
            # migrate makes the login; the rest of the owner's URL (host, TLS) is kept.
            app_url = make_conninfo(admin_url, user=settings.app_role, password=app_password)
        embedder = EmbedderClient(settings.embedder_url)
        try:
            info = await embedder.wait_for_info(settings.embedder_wait_s)
            await asyncio.to_thread(
                schema.migrate,
                admin_url,
                info.model,
                info.dimension,
                settings.app_role,
                settings.hnsw_m,
                settings.hnsw_ef_construction,
                app_url is None,
                app_password,
            )
            if app_url is None:
                logger.warning(
                    "RETRIEVER_APP_DATABASE_URL is not set: querying as the owner's login with "
                    "SET ROLE %s; give the service its own login of that role in production",
                    settings.app_role,
                )

            async def configure(conn: AsyncConnection) -> None:
                if app_url is None:
                    await conn.execute(
                        sql.SQL("SET ROLE {}").format(sql.Identifier(settings.app_role))
                    )
                await prepare_connection(conn)

            pool = AsyncConnectionPool(
                app_url or admin_url,
                min_size=1,
                max_size=settings.pool_max_size,
                configure=configure,
                # A connection the server dropped (a restart, a failover) is replaced before a
                # request gets it, not failed in its hands.
                check=AsyncConnectionPool.check_connection,
                open=False,
                # No server-side prepared statements: a generic plan, made without the
                # tenant's value, would pick one access path for small and big tenants alike.
                kwargs={"autocommit": True, "prepare_threshold": None},
            )
            await pool.open(wait=True, timeout=30)
            iterative_scan = await check_app_role(pool)
            store = Store(
                pool,
                settings.hnsw_ef_search,
                iterative_scan,
                settings.bm25_exact_max_chunks,
                settings.bm25_ef_search,
            )
            ingestor = Ingestor(store, embedder, settings, info.max_seq_length)
            await ingestor.start()
            app.state.store, app.state.ingestor, app.state.embedder = store, ingestor, embedder
            app.state.reranker = RerankClient.from_settings(settings)  # None: off
            try:
                yield
            finally:
                if app.state.reranker is not None:
                    await app.state.reranker.aclose()
                await ingestor.stop()
                await pool.close()
        finally:
            await embedder.aclose()
            if server is not None:
                stop_embedded_postgres(server)

    app = FastAPI(title="RAG retriever (internal)", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)

    async def database_ready() -> str | None:
        async with app.state.store.pool.connection(timeout=2) as conn:
            await conn.execute("SELECT 1")
        return None

    install_observability(app, "retriever", {"database": database_ready})
    app.include_router(router)
    app.include_router(limits.router)
    return app
