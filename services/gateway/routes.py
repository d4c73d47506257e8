"""The gateway's public routes: typed, and documented in its OpenAPI."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from services.common.errors import APIError, upstream_error
from services.common.errors import error_responses as common_error_responses
from services.common.http import read_capped_body
from services.common.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Document,
    DocumentBatch,
    DocumentBatchIn,
    DocumentIn,
    DocumentList,
    DocumentStatus,
    DocumentSummary,
    ModelList,
    SearchRequest,
    SearchResponse,
)
from services.common.timing import parse_server_timing
from services.gateway.chat import chat_completion
from services.gateway.deps import GeneratorHTTP, Retriever, Settings, User, stage_times
from services.gateway.upstream import generator_models, relay, unavailable

UPLOAD_MEDIA_TYPES = ("multipart/form-data", "application/json")
UPLOAD_FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the title/metadata fields

ERROR_DESCRIPTIONS = {
    400: "The request is invalid; `param` names the field.",
    401: "The bearer token is missing, invalid or expired.",
    403: "The token's user lacks a group or scope this gateway requires.",
    404: "No such document for this user.",
    408: "The request body stopped arriving.",
    413: "The request body is too large.",
    415: "The body's media type is not accepted here.",
    429: "Over the user's rate or concurrency limit, or the generator is full: see "
    "retry-after-ms (milliseconds) and Retry-After (seconds).",
    502: "A service behind the gateway failed.",
    503: "A service behind the gateway is unavailable, or chats already wait too long for "
    "the generator (`overloaded`): see retry-after-ms and Retry-After.",
}
AUTH_ERRORS = (401, 403, 429, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries: the envelope for each status, those of every authenticated
    route included."""
    return common_error_responses(*statuses, *AUTH_ERRORS, descriptions=ERROR_DESCRIPTIONS)


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads its JSON body itself (capped, idle-timed)."""
    content = {"application/json": {"schema": schema_ref(model)}}
    return {"requestBody": {"required": True, "content": content}}


# Request bodies that routes read themselves: their schemas join the OpenAPI components.
RAW_BODY_MODELS: tuple[type[BaseModel], ...] = (
    ChatRequest,
    DocumentIn,
    DocumentBatchIn,
    SearchRequest,
)

CHAT_DESCRIPTION = """\
OpenAI's chat completion, answered from the caller's documents: the passages retrieved
for the last user message are given to the model, numbered, and the answer cites them as
`[n]`. `retrieval` chooses how to search (or `"enabled": false` to skip it).

Not streamed: a `chat.completion` with `citations`, the passages the answer may cite
(`index` is the `[n]`).

With `"stream": true`: `text/event-stream`. Each event is `data: <chat.completion.chunk>`;
the last one before `data: [DONE]` has empty `choices` and carries `citations`. Lines
starting with `:` are keep-alive comments. An error after the stream started comes as one
event `data: {"error": {...}}` (the error envelope) followed by `data: [DONE]`.
"""

UPLOAD_DESCRIPTION = """\
Store a document and ingest it in the background (202): poll `GET /v1/documents/{id}`
until `status` is `ready` or `failed`. Send `application/json` (`title`, `text`,
`media_type`, `metadata`) or `multipart/form-data` (`file`, optional `title`, optional
`metadata` as a JSON string). The same content again from the same user answers 200 with
the existing document and `"duplicate": true`.
"""

BATCH_DESCRIPTION = """\
Store many JSON documents (`title`, `text`, `media_type`, `metadata` each) in one request, at
most `GATEWAY_MAX_BATCH_DOCUMENTS` (100 by default) within the JSON body limit; each is
ingested in the background as if uploaded alone. Answers 202 with one document per item, in
input order; known content (uploaded before, or earlier in the same batch) is the existing
document with `"duplicate": true`, and when every item is known the answer is 200. An
invalid item fails the whole batch with 400 naming it (`param`: `documents[3].text`);
nothing is stored then.

A batch counts as one request against the caller's rate limit. That is fair to other
users: the ingestion work it queues is shared out per user by the retriever's workers (a
cap on each user's jobs in progress, the user with the fewest in progress served first), so
another user's upload is claimed ahead of a large batch's backlog, which waits mostly on
itself. Watch progress with `GET /v1/documents/summary`.
"""

SUMMARY_DESCRIPTION = """\
How many of the caller's documents are `pending`, `processing`, `ready` and `failed`, and
their `total`, counted in one query: wait for a batch with this call instead of one status
call per document. `metadata` (a JSON object the metadata must contain) counts a subset,
e.g. the documents of one load tagged alike.
"""

# One server-sent event of a streamed chat (keep-alive comments are not events).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {
            "type": "string",
            "description": "a `chat.completion.chunk` as JSON (ChatCompletionChunk), the error "
            "envelope as JSON, or `[DONE]`",
        },
    },
}

# Where the request's time went (W3C Server-Timing): milliseconds per stage.
SERVER_TIMING_HEADER: dict[str, Any] = {
    "Server-Timing": {
        "description": "Milliseconds per stage, as `name;dur=ms`: auth, limits, the "
        "retriever's embed, vector, text and rerank; a chat also retrieve, prompt and "
        "generator_wait (a stream: the stages before its answer began; its last event's "
        "`server_timing` has them all).",
        "schema": {"type": "string"},
    }
}

router = APIRouter(prefix="/v1")


async def read_body(request: Request, settings: Settings, limit: int) -> bytes:
    """The request body: 413 past limit bytes, 408 once it stops arriving."""
    return await read_capped_body(request, limit, idle_timeout_s=settings.body_idle_timeout_s)


def media_type(content_type: str) -> str:
    """A Content-Type's type/subtype: before any parameters, lower case."""
    return content_type.split(";", 1)[0].strip().lower()


@router.post(
    "/chat/completions",
    summary="Answer a chat from the caller's documents, with citations",
    description=CHAT_DESCRIPTION,
    response_model=ChatCompletion,
    responses={
        200: {
            "description": "The completion; with `stream: true`, server-sent events.",
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
            "headers": SERVER_TIMING_HEADER,
        },
        **error_responses(400, 408, 413, 502),
    },
    openapi_extra=json_body(ChatRequest),
)
async def create_chat_completion(request: Request, user: User, settings: Settings) -> Response:
    raw = await read_body(request, settings, settings.max_body_bytes)
    try:
        body = ChatRequest.model_validate_json(raw)
    except ValueError as exc:
        errors: list[Any] = getattr(exc, "errors", lambda: [])()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
        where = where or None  # an error of the whole body (e.g. invalid Unicode) has no field
        raise APIError(
            400, f"invalid chat request{f' at {where}' if where else ''}", param=where
        ) from exc
    return await chat_completion(request, body, user, settings)


@router.post(
    "/documents",
    status_code=202,
    summary="Upload a document",
    description=UPLOAD_DESCRIPTION,
    response_model=Document,
    responses={
        200: {"model": Document, "description": "The same content was uploaded before."},
        **error_responses(400, 408, 413, 415, 502),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema_ref(DocumentIn)},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "title": {"type": "string"},
                            "metadata": {
                                "type": "string",
                                "description": "a JSON object, as a string",
                            },
                        },
                    }
                },
            },
        }
    },
)
async def create_document(
    request: Request, user: User, settings: Settings, retriever: Retriever
) -> Response:
    # Multipart passes through as sent: the retriever parses the form (one file, ten fields).
    content_type = request.headers.get("content-type", "")
    if media_type(content_type) not in UPLOAD_MEDIA_TYPES:
        raise APIError(415, "send multipart/form-data (file) or application/json (text)")
    raw = await read_body(request, settings, settings.max_upload_bytes + UPLOAD_FORM_OVERHEAD_BYTES)
    resp = await retriever.request(
        "POST", "/documents", user.sub, content=raw, headers={"Content-Type": content_type}
    )
    return relay(resp)


@router.post(
    "/documents/batch",
    status_code=202,
    summary="Upload many JSON documents in one request",
    description=BATCH_DESCRIPTION,
    response_model=DocumentBatch,
    responses={
        200: {"model": DocumentBatch, "description": "Every document was uploaded before."},
        **error_responses(400, 408, 413, 415, 502),
    },
    openapi_extra=json_body(DocumentBatchIn),
)
async def create_documents(
    request: Request, user: User, settings: Settings, retriever: Retriever
) -> Response:
    # The retriever validates each item (and names it); the gateway enforces its own count.
    content_type = request.headers.get("content-type", "")
    if media_type(content_type) != "application/json":
        raise APIError(415, "send the batch as application/json")
    raw = await read_body(request, settings, settings.max_body_bytes)
    count = batch_size(raw)
    if count > settings.max_batch_documents:
        raise APIError(
            413,
            f"a batch holds at most {settings.max_batch_documents} documents, this one has "
            f"{count}: send the rest in further batches",
            code="too_many_documents",
            param="documents",
        )
    resp = await retriever.request(
        "POST", "/documents/batch", user.sub, content=raw, headers={"Content-Type": content_type}
    )
    return relay(resp)


def batch_size(raw: bytes) -> int:
    """The number of items in a batch body; 0 when it has no documents list (the retriever
    says what is wrong with it)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return 0
    documents = value.get("documents") if isinstance(value, dict) else None
    return len(documents) if isinstance(documents, list) else 0


@router.get(
    "/documents/summary",
    summary="Count the caller's documents by ingestion status",
    description=SUMMARY_DESCRIPTION,
    response_model=DocumentSummary,
    responses=error_responses(400, 502),
)
async def summarize_documents(
    user: User,
    retriever: Retriever,
    metadata: Annotated[str | None, Query(description="JSON object the metadata contains")] = None,
) -> Response:
    params = {"metadata": metadata} if metadata is not None else None
    resp = await retriever.request("GET", "/documents/summary", user.sub, params=params)
    return relay(resp)


@router.get(
    "/documents",
    summary="List the caller's documents, newest first",
    response_model=DocumentList,
    responses=error_responses(400, 502),
)
async def list_documents(
    user: User,
    retriever: Retriever,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the last page")] = None,
    status: DocumentStatus | None = None,
    metadata: Annotated[str | None, Query(description="JSON object the metadata contains")] = None,
) -> Response:
    given = {"limit": limit, "cursor": cursor, "status": status, "metadata": metadata}
    params = {k: v for k, v in given.items() if v is not None}
    resp = await retriever.request("GET", "/documents", user.sub, params=params)
    return relay(resp)


@router.get(
    "/documents/{doc_id}",
    summary="A document and the state of its ingestion",
    response_model=Document,
    responses=error_responses(400, 404, 502),
)
async def get_document(doc_id: uuid.UUID, user: User, retriever: Retriever) -> Response:
    resp = await retriever.request("GET", f"/documents/{doc_id}", user.sub)
    return relay(resp)


@router.delete(
    "/documents/{doc_id}",
    status_code=204,
    summary="Delete a document and its passages",
    response_class=Response,
    responses=error_responses(400, 404, 502),
)
async def delete_document(doc_id: uuid.UUID, user: User, retriever: Retriever) -> Response:
    await retriever.request("DELETE", f"/documents/{doc_id}", user.sub)
    return Response(status_code=204)


@router.post(
    "/search",
    summary="Search the caller's documents",
    response_model=SearchResponse,
    responses={
        200: {"description": "The best chunks, best first.", "headers": SERVER_TIMING_HEADER},
        **error_responses(400, 408, 413, 502),
    },
    openapi_extra=json_body(SearchRequest),
)
async def search(
    request: Request, user: User, settings: Settings, retriever: Retriever
) -> Response:
    # The body goes to the retriever as sent, which validates it (SearchRequest).
    raw = await read_body(request, settings, settings.max_body_bytes)
    resp = await retriever.request(
        "POST", "/search", user.sub, content=raw, headers={"Content-Type": "application/json"}
    )
    times = stage_times(request)
    times.update(parse_server_timing(resp.headers.get("server-timing")))
    times.mark("total")
    answer = relay(resp)
    answer.headers["Server-Timing"] = times.header()
    return answer


@router.get(
    "/models",
    summary="The model that answers chats",
    response_model=ModelList,
    responses=error_responses(502),
)
async def list_models(user: User, generator: GeneratorHTTP) -> Response:
    try:
        models = await generator_models(generator)
    except httpx.HTTPError as exc:
        raise unavailable("generator") from exc
    except ValidationError as exc:  # a 200 we cannot read: the generator failed (502)
        raise upstream_error(500, b"", "generator") from exc
    return JSONResponse(models.model_dump(mode="json", exclude_unset=True))


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI, with the schemas of the bodies that routes read themselves."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        _, extra = models_json_schema(
            [(model, "validation") for model in RAW_BODY_MODELS],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # Invalid input is answered 400 with the envelope (install_error_handlers), never 422.
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        for name, model_schema in extra.get("$defs", {}).items():
            components.setdefault(name, model_schema)
        components.setdefault(ChatCompletionChunk.__name__, _chunk_schema())
        app.openapi_schema = schema
    return app.openapi_schema


def _chunk_schema() -> dict[str, Any]:
    """The streamed event's schema, for readers of the chat route's description."""
    schema = ChatCompletionChunk.model_json_schema(
        mode="serialization", ref_template="#/components/schemas/{model}"
    )
    schema.pop("$defs", None)
    return schema
