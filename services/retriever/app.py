"""Retriever app: the internal documents and search API, called by the gateway."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from psycopg import AsyncConnection, sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field, ValidationError

from services.common.errors import ERROR_RESPONSES, APIError, install_error_handlers
from services.common.http import read_capped_body
from services.common.observability import install_observability
from services.retriever import schema
from services.retriever.embedded_pg import start_embedded_postgres, stop_embedded_postgres
from services.retriever.embedder_client import EmbedderClient, EmbedderUnavailable
from services.retriever.ingest import Ingestor, content_hash
from services.retriever.parsing import ParseError, check_upload, media_type_of
from services.retriever.settings import RetrieverSettings
from services.retriever.store import Store, fuse_rankings, prepare_connection
from services.retriever.validation import (
    check_storable,
    decode_cursor,
    encode_cursor,
    json_object,
    media_type_of_request,
    parse_json,
)

logger = logging.getLogger(__name__)


class DocumentIn(BaseModel):
    title: str = Field(min_length=1, max_length=500)
    text: str
    media_type: Literal["text/plain", "text/markdown", "text/html"] = "text/plain"
    metadata: dict[str, Any] = Field(default_factory=dict)


class Document(BaseModel):
    id: uuid.UUID
    title: str
    media_type: str
    status: Literal["pending", "processing", "ready", "failed"]
    error: str | None
    chunk_count: int
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    duplicate: bool = False


class DocumentList(BaseModel):
    data: list[Document]
    next_cursor: str | None


class SearchFilters(BaseModel):
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    k: int = Field(10, ge=1, le=100)
    mode: Literal["hybrid", "vector", "text"] = "hybrid"
    document_ids: list[uuid.UUID] = Field(default_factory=list)
    filters: SearchFilters = Field(default_factory=SearchFilters)


class SearchHit(BaseModel):
    document_id: uuid.UUID
    title: str
    chunk_id: int
    text: str
    score: float
    metadata: dict[str, Any]
    position: dict[str, Any]


class SearchResponse(BaseModel):
    data: list[SearchHit]


def _document_in(body: bytes) -> DocumentIn:
    """A JSON document upload, each field checked before it can reach PostgreSQL."""
    value = parse_json(body, None, "the body")
    if not isinstance(value, dict):
        raise APIError(400, "body must be a JSON object with title, text and metadata")
    try:
        doc_in = DocumentIn.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(
            400, f"{param or 'body'}: {first['msg']}", code="invalid_value", param=param
        ) from exc
    check_storable(doc_in.text, "text")
    return doc_in


def tenant(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_tenant_id: Annotated[str | None, Header()] = None,
) -> str:
    """The caller must hold the service token; the tenant is the gateway's verified user."""
    expected = request.app.state.settings.service_token.encode()
    supplied = (authorization or "").removeprefix("Bearer ").encode()
    if not hmac.compare_digest(supplied, expected):
        raise APIError(401, "invalid service token", code="invalid_service_token")
    if not x_tenant_id or len(x_tenant_id) > 256:
        raise APIError(400, "X-Tenant-Id header is required", param="X-Tenant-Id")
    return x_tenant_id


def get_store(request: Request) -> Store:
    return request.app.state.store


Tenant = Annotated[str, Depends(tenant)]
StoreDep = Annotated[Store, Depends(get_store)]


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
        embedder = EmbedderClient(settings.embedder_url)
        try:
            info = await embedder.wait_for_info(settings.embedder_wait_s)
            await asyncio.to_thread(
                schema.migrate,
                admin_url,
                info["model"],
                int(info["dimension"]),
                settings.app_role,
                settings.hnsw_m,
                settings.hnsw_ef_construction,
                app_url is None,
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
            store = Store(pool, settings.hnsw_ef_search, iterative_scan)
            ingestor = Ingestor(store, embedder, settings, int(info["max_seq_length"]))
            await ingestor.start()
            app.state.store, app.state.ingestor, app.state.embedder = store, ingestor, embedder
            try:
                yield
            finally:
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

    @app.post("/documents", status_code=202, response_model=Document, responses=ERROR_RESPONSES)
    async def create_document(request: Request, user_id: Tenant, db: StoreDep) -> JSONResponse:
        limit = settings.max_upload_bytes + 64 * 1024  # the document plus form overhead
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"upload is larger than {settings.max_upload_bytes} bytes")
        content_type, charset = media_type_of_request(request.headers.get("content-type", ""))
        if content_type == "multipart/form-data":
            title, media_type, metadata, raw = await _read_multipart(request, settings)
        elif content_type == "application/json" and charset in (None, "utf-8", "utf8"):
            doc_in = _document_in(await read_capped_body(request, limit))
            title, media_type, metadata = doc_in.title, doc_in.media_type, doc_in.metadata
            raw = doc_in.text.encode()  # checked: no lone surrogates
        else:
            raise APIError(415, "send multipart/form-data (file) or application/json (UTF-8 text)")
        if len(raw) > settings.max_upload_bytes:
            raise APIError(413, f"document is larger than {settings.max_upload_bytes} bytes")
        check_storable(title, "title")
        check_storable(metadata, "metadata")
        try:
            check_upload(raw, media_type)
        except ParseError as exc:
            raise APIError(400, str(exc), code="unreadable_document") from exc
        doc, created = await db.create_document(
            user_id, title, media_type, metadata, raw, content_hash(raw)
        )
        if created:
            request.app.state.ingestor.notify()
        body = Document(**doc, duplicate=not created).model_dump(mode="json")
        return JSONResponse(body, status_code=202 if created else 200)

    @app.get("/documents", response_model=DocumentList, responses=ERROR_RESPONSES)
    async def list_documents(
        user_id: Tenant,
        db: StoreDep,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: str | None = None,
        status: Literal["pending", "processing", "ready", "failed"] | None = None,
        metadata: Annotated[
            str | None, Query(description="JSON object the metadata contains")
        ] = None,
    ) -> DocumentList:
        rows = await db.list_documents(
            user_id,
            limit + 1,
            decode_cursor(cursor) if cursor else None,
            status,
            json_object(metadata, "metadata") if metadata else None,
        )
        last = rows[limit - 1] if len(rows) > limit else None
        next_cursor = encode_cursor(last["created_at"], last["id"]) if last else None
        return DocumentList(data=[Document(**row) for row in rows[:limit]], next_cursor=next_cursor)

    @app.get("/documents/{doc_id}", response_model=Document, responses=ERROR_RESPONSES)
    async def get_document(doc_id: uuid.UUID, user_id: Tenant, db: StoreDep) -> Document:
        doc = await db.get_document(user_id, doc_id)
        if doc is None:
            raise APIError(404, "document not found", param="id")
        return Document(**doc)

    @app.delete("/documents/{doc_id}", status_code=204, responses=ERROR_RESPONSES)
    async def delete_document(doc_id: uuid.UUID, user_id: Tenant, db: StoreDep) -> Response:
        if not await db.delete_document(user_id, doc_id):
            raise APIError(404, "document not found", param="id")
        return Response(status_code=204)

    @app.post("/search", response_model=SearchResponse, responses=ERROR_RESPONSES)
    async def search(
        body: SearchRequest, user_id: Tenant, request: Request, db: StoreDep
    ) -> SearchResponse:
        check_storable(body.query, "query")
        check_storable(body.filters.metadata, "filters.metadata")
        filters = (body.document_ids, body.filters.metadata)
        rankings = []
        if body.mode in ("vector", "hybrid"):
            try:
                vector = (await request.app.state.embedder.embed([body.query], "query"))[0]
            except EmbedderUnavailable as exc:
                raise APIError(
                    503,
                    "the embedder is unavailable",
                    code="embedder_down",
                    headers={"Retry-After": "5"},
                ) from exc
            pool_k = body.k if body.mode == "vector" else min(4 * body.k, 100)
            rankings.append(await db.vector_search(user_id, vector, pool_k, *filters))
        if body.mode in ("text", "hybrid"):
            pool_k = body.k if body.mode == "text" else min(4 * body.k, 100)
            rankings.append(await db.text_search(user_id, body.query, pool_k, *filters))
        hits = rankings[0] if len(rankings) == 1 else fuse_rankings(rankings, body.k)
        return SearchResponse(data=[SearchHit(**hit) for hit in hits[: body.k]])

    return app


async def _read_multipart(
    request: Request, settings: RetrieverSettings
) -> tuple[str, str, dict[str, Any], bytes]:
    form = await request.form(max_files=1, max_fields=10)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "multipart upload needs a file field", param="file")
    raw = await upload.read(settings.max_upload_bytes + 1)
    if len(raw) > settings.max_upload_bytes:
        raise APIError(413, f"upload is larger than {settings.max_upload_bytes} bytes")
    media_type = media_type_of(upload.filename, upload.content_type)
    title = form.get("title")
    title = title if isinstance(title, str) and title.strip() else (upload.filename or "untitled")
    metadata_raw = form.get("metadata")
    metadata = (
        json_object(metadata_raw, "metadata")
        if isinstance(metadata_raw, str) and metadata_raw.strip()
        else {}
    )
    return title[:500], media_type, metadata, raw
