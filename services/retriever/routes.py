"""The retriever's internal routes: documents and search, under the caller's tenant."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.common.errors import ERROR_RESPONSES, APIError, validation_error
from services.common.http import read_capped_body
from services.common.protocol import (
    BATCH_DOCUMENTS_MAX,
    Document,
    DocumentBatch,
    DocumentIn,
    DocumentList,
    DocumentStatus,
    DocumentSummary,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from services.common.timing import StageTimes
from services.retriever.deps import Embedder, IngestorDep, Settings, StoreDep, Tenant
from services.retriever.embedder_client import EmbedderUnavailable
from services.retriever.ingest import content_hash
from services.retriever.parsing import ParseError, check_upload, media_type_of
from services.retriever.rerank import RerankClient, rerank_hits
from services.retriever.settings import RetrieverSettings
from services.retriever.store import fuse_rankings, fuse_scores
from services.retriever.validation import (
    check_storable,
    decode_cursor,
    encode_cursor,
    json_object,
    media_type_of_request,
    parse_json,
)

UPLOAD_FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the title/metadata fields

router = APIRouter()


@router.post("/documents", status_code=202, response_model=Document, responses=ERROR_RESPONSES)
async def create_document(
    request: Request, user_id: Tenant, db: StoreDep, settings: Settings, ingestor: IngestorDep
) -> JSONResponse:
    limit = settings.max_upload_bytes + UPLOAD_FORM_OVERHEAD_BYTES
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
        ingestor.notify()
    body = Document(**doc, duplicate=not created).model_dump(mode="json")
    return JSONResponse(body, status_code=202 if created else 200)


@router.post(
    "/documents/batch", status_code=202, response_model=DocumentBatch, responses=ERROR_RESPONSES
)
async def create_documents(
    request: Request, user_id: Tenant, db: StoreDep, settings: Settings, ingestor: IngestorDep
) -> JSONResponse:
    """JSON documents stored with their jobs in one transaction; 200 when all were known."""
    content_type, charset = media_type_of_request(request.headers.get("content-type", ""))
    if content_type != "application/json" or charset not in (None, "utf-8", "utf8"):
        raise APIError(415, "send the batch as application/json (UTF-8)")
    # The whole batch within one upload's size: it is stored in one transaction.
    body = await read_capped_body(request, settings.max_upload_bytes + UPLOAD_FORM_OVERHEAD_BYTES)
    items = []
    for index, doc_in in enumerate(_document_batch_in(body)):
        where = f"documents[{index}]"
        raw = doc_in.text.encode()  # checked: no lone surrogates
        if len(raw) > settings.max_upload_bytes:
            raise APIError(
                413, f"{where} is larger than {settings.max_upload_bytes} bytes", param=where
            )
        check_storable(doc_in.title, f"{where}.title")
        check_storable(doc_in.metadata, f"{where}.metadata")
        try:
            check_upload(raw, doc_in.media_type)
        except ParseError as exc:
            raise APIError(
                400, f"{where}: {exc}", code="unreadable_document", param=f"{where}.text"
            ) from exc
        items.append((doc_in.title, doc_in.media_type, doc_in.metadata, raw, content_hash(raw)))
    stored = await db.create_documents(user_id, items)
    any_created = any(created for _, created in stored)
    if any_created:
        ingestor.notify()
    batch = DocumentBatch(data=[Document(**doc, duplicate=not new) for doc, new in stored])
    return JSONResponse(batch.model_dump(mode="json"), status_code=202 if any_created else 200)


@router.get("/documents/summary", response_model=DocumentSummary, responses=ERROR_RESPONSES)
async def summarize_documents(
    user_id: Tenant,
    db: StoreDep,
    metadata: Annotated[str | None, Query(description="JSON object the metadata contains")] = None,
) -> DocumentSummary:
    counts = await db.count_documents_by_status(
        user_id, json_object(metadata, "metadata") if metadata else None
    )
    return DocumentSummary(**counts, total=sum(counts.values()))


@router.get("/documents", response_model=DocumentList, responses=ERROR_RESPONSES)
async def list_documents(
    user_id: Tenant,
    db: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
    status: DocumentStatus | None = None,
    metadata: Annotated[str | None, Query(description="JSON object the metadata contains")] = None,
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


@router.get("/documents/{doc_id}", response_model=Document, responses=ERROR_RESPONSES)
async def get_document(doc_id: uuid.UUID, user_id: Tenant, db: StoreDep) -> Document:
    doc = await db.get_document(user_id, doc_id)
    if doc is None:
        raise APIError(404, "document not found", param="id")
    return Document(**doc)


@router.delete("/documents/{doc_id}", status_code=204, responses=ERROR_RESPONSES)
async def delete_document(doc_id: uuid.UUID, user_id: Tenant, db: StoreDep) -> Response:
    if not await db.delete_document(user_id, doc_id):
        raise APIError(404, "document not found", param="id")
    return Response(status_code=204)


@router.post("/search", response_model=SearchResponse, responses=ERROR_RESPONSES)
async def search(
    request: Request,
    response: Response,
    body: SearchRequest,
    user_id: Tenant,
    db: StoreDep,
    embedder: Embedder,
    settings: Settings,
) -> SearchResponse:
    check_storable(body.query, "query")
    check_storable(body.filters.metadata, "filters.metadata")
    filters = (body.document_ids, body.filters.metadata)
    reranker: RerankClient | None = request.app.state.reranker
    # With the optional reranking stage, the first stage finds its depth of candidates.
    k = reranker.candidates(body.k) if reranker is not None else body.k
    fused_k = max(k, settings.fusion_depth)
    # Where the time goes, for the caller's Server-Timing (hybrid: embed and text overlap).
    times = StageTimes()

    async def by_vector() -> list[dict[str, Any]]:
        try:
            with times.stage("embed"):
                vector = (await embedder.embed([body.query], "query"))[0]
        except EmbedderUnavailable as exc:
            raise APIError(
                503,
                "the embedder is unavailable",
                code="embedder_down",
                headers={"Retry-After": "5"},
            ) from exc
        pool_k = k if body.mode == "vector" else fused_k
        with times.stage("vector"):
            return await db.vector_search(user_id, vector, pool_k, *filters)

    async def by_text() -> list[dict[str, Any]]:
        pool_k = k if body.mode == "text" else fused_k
        with times.stage("text"):
            return await db.text_search(user_id, body.query, pool_k, *filters)

    if body.mode == "vector":
        hits = await by_vector()
    elif body.mode == "text":
        hits = await by_text()
    else:  # both at once, on two connections: BM25 runs while the query is embedded
        try:
            async with asyncio.TaskGroup() as group:  # one failing cancels the other
                vector_hits = group.create_task(by_vector())
                text_hits = group.create_task(by_text())
        except* APIError as errors:
            raise errors.exceptions[0] from None
        rankings = [vector_hits.result(), text_hits.result()]
        if settings.fusion == "score":
            weights = [settings.fusion_vector_weight, 1 - settings.fusion_vector_weight]
            hits = fuse_scores(rankings, k, weights)
        else:
            hits = fuse_rankings(rankings, k, rrf_k=settings.rrf_k)
    if reranker is not None:
        with times.stage("rerank"):
            hits = await rerank_hits(reranker, body.query, hits, body.k)
    times.mark("total")
    response.headers["Server-Timing"] = times.header()
    return SearchResponse(data=[SearchHit(**hit) for hit in hits[: body.k]])


def _document_in(body: bytes) -> DocumentIn:
    """A JSON document upload, each field checked before it can reach PostgreSQL."""
    value = parse_json(body, None, "the body")
    if not isinstance(value, dict):
        raise APIError(400, "body must be a JSON object with title, text and metadata")
    try:
        doc_in = DocumentIn.model_validate(value)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    check_storable(doc_in.text, "text")
    return doc_in


def _document_batch_in(body: bytes) -> list[DocumentIn]:
    """A batch's documents, each checked as a JSON upload is; errors name the item
    (`documents[3].text`)."""
    value = parse_json(body, None, "the body")
    documents = value.get("documents") if isinstance(value, dict) else None
    if not isinstance(documents, list) or not documents:
        raise APIError(
            400, "body must be a JSON object with a non-empty documents list", param="documents"
        )
    if len(documents) > BATCH_DOCUMENTS_MAX:
        raise APIError(
            413, f"at most {BATCH_DOCUMENTS_MAX} documents in a batch", param="documents"
        )
    checked = []
    for index, item in enumerate(documents):
        try:
            doc_in = DocumentIn.model_validate(item)
        except ValidationError as exc:
            raise _item_error(index, exc) from exc
        check_storable(doc_in.text, f"documents[{index}].text")
        checked.append(doc_in)
    return checked


def _item_error(index: int, exc: ValidationError) -> APIError:
    """A 400 naming the batch item and its field as a client writes it: documents[3].text."""
    first = exc.errors()[0]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
    param = f"documents[{index}]{path}"
    return APIError(400, f"{param}: {first['msg']}", code="invalid_value", param=param)


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
