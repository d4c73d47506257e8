"""The wire contract: every shape that crosses a service boundary (gateway <-> retriever,
retriever <-> embedder) or the public API.

Field names, limits and defaults are what clients send and receive; change them here only.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictStr,
    model_serializer,
)

SEARCH_QUERY_MAX_CHARS = 4000
SEARCH_K_MAX = 100
CHAT_K_MAX = 20
TITLE_MAX_CHARS = 500

RetrievalMode = Literal["hybrid", "vector", "text"]
DocumentStatus = Literal["pending", "processing", "ready", "failed"]
DocumentMediaType = Literal["text/plain", "text/markdown", "text/html"]
# Models trained with query/passage prompts (e5, bge...) get the right one.
EmbeddingInputType = Literal["query", "passage"]


# Documents


class DocumentIn(BaseModel):
    """A JSON document upload (`POST /v1/documents` with `application/json`)."""

    title: str = Field(min_length=1, max_length=TITLE_MAX_CHARS)
    text: str
    media_type: DocumentMediaType = "text/plain"
    metadata: dict[str, Any] = Field(default_factory=dict)


class Document(BaseModel):
    """A stored document and the state of its ingestion."""

    id: uuid.UUID
    title: str
    media_type: str
    status: DocumentStatus
    error: str | None = Field(description="why ingestion failed (status `failed`)")
    chunk_count: int
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    duplicate: bool = Field(
        False, description="true when the same content was uploaded before (answered with 200)"
    )


class DocumentList(BaseModel):
    """A page of documents, newest first."""

    data: list[Document]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


# Search


class SearchFilters(BaseModel):
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="JSON object the document's metadata must contain"
    )


class RetrievalOptions(BaseModel):
    """How to search the caller's documents: shared by search and a chat's `retrieval`."""

    mode: RetrievalMode = "hybrid"
    document_ids: list[uuid.UUID] = Field(
        default_factory=list, description="search only these documents (all when empty)"
    )
    filters: SearchFilters = Field(default_factory=SearchFilters)


class SearchRequest(RetrievalOptions):
    """`POST /v1/search`: the passages of the caller's documents that best match a query."""

    query: str = Field(min_length=1, max_length=SEARCH_QUERY_MAX_CHARS)
    k: int = Field(10, ge=1, le=SEARCH_K_MAX)


class Position(BaseModel):
    """Where a passage comes from in its document; keys it does not have are left out."""

    model_config = ConfigDict(extra="allow")

    heading: str | None = None
    page: int | None = None
    page_end: int | None = None
    chunk: int | None = Field(None, description="the passage's ordinal in its document")

    # No return annotation: with one, pydantic documents the serializer's return type (an
    # empty or untyped object) instead of the fields.
    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        """Dump the keys the position was given, no others, so stored positions round-trip."""
        data = handler(self)
        return {key: value for key, value in data.items() if key in self.model_fields_set}


class SearchHit(BaseModel):
    document_id: uuid.UUID
    title: str
    chunk_id: int
    text: str
    score: float
    metadata: dict[str, Any]
    position: Position


class SearchResponse(BaseModel):
    data: list[SearchHit]


# Chat


class ChatRetrieval(RetrievalOptions):
    """A chat's `retrieval`: whether and how to search before answering."""

    enabled: bool = True
    k: int | None = Field(
        None, ge=1, le=CHAT_K_MAX, description="passages to retrieve (the gateway's default)"
    )

    def search_request(self, query: str, default_k: int) -> SearchRequest:
        """The search this chat's retrieval makes for query."""
        return SearchRequest(
            query=query,
            k=self.k or default_k,
            mode=self.mode,
            document_ids=self.document_ids,
            filters=self.filters,
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`: OpenAI's request plus `retrieval`."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    retrieval: ChatRetrieval = Field(default_factory=ChatRetrieval)


class Citation(BaseModel):
    """A passage the answer may cite as [index]."""

    index: int = Field(description="the [n] used in the answer")
    document_id: uuid.UUID
    title: str
    chunk_id: int
    text: str
    score: float
    position: Position

    @classmethod
    def of_hits(cls, hits: list[SearchHit]) -> list[Citation]:
        """The hits given to the model, numbered from 1 as in the prompt."""
        return [
            cls(
                index=index,
                document_id=hit.document_id,
                title=hit.title,
                chunk_id=hit.chunk_id,
                text=hit.text,
                score=hit.score,
                position=hit.position,
            )
            for index, hit in enumerate(hits, start=1)
        ]


class ChatCompletionMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    message: ChatCompletionMessage
    finish_reason: str | None = None


class CompletionUsage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's `chat.completion`, plus the citations of the passages the answer may cite."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage | None = None
    citations: list[Citation]


class ChatCompletionChunk(BaseModel):
    """One streamed event (OpenAI's `chat.completion.chunk`); the last before `[DONE]` has no
    choices and carries `citations` and `server_timing`."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    citations: list[Citation] | None = None
    server_timing: dict[str, float] | None = Field(
        None,
        description="Where the chat's time went, in milliseconds per stage: auth, limits, "
        "rewrite, retrieve (the retriever's embed, vector, text and rerank within it; they "
        "overlap), prompt, generator_wait (to the generator's response headers), prefill (the "
        "engine's, when it says), first_token (from those headers to the first token), ttft "
        "and total (from the token check).",
    )


# Models


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    owned_by: str | None = None
    created: int | None = None


class ModelList(BaseModel):
    """`GET /v1/models`: the model that answers chats."""

    model_config = ConfigDict(extra="allow")

    object: Literal["list"] = "list"
    data: list[ModelCard]


# Embeddings (the retriever calls the embedder: OpenAI's embeddings API plus /tokenize)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # Extension: the prompt for a query or a passage (EmbeddingInputType).
    input_type: EmbeddingInputType | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]  # "" is allowed: it counts the fixed overhead
    input_type: EmbeddingInputType | None = None


class TokenCount(BaseModel):
    index: int
    tokens: int


class TokenizeResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    max_tokens: int  # the model's window: /v1/embeddings truncates (or refuses) longer inputs
    data: list[TokenCount]


class ModelInfo(BaseModel):
    """What the retriever needs: dimension and the longest input the model reads."""

    model: str
    dimension: int
    max_seq_length: int
    device: str


# Per-user limits (gateway -> retriever): the counts live in the database every gateway task
# shares; the numbers are the gateway's settings, sent with each call.


class RequestTokenRequest(BaseModel):
    """Take one request's token from the caller's bucket."""

    per_minute: float = Field(gt=0, allow_inf_nan=False)  # the refill rate
    burst: int = Field(ge=1)  # the bucket's size


class RequestTokenResult(BaseModel):
    admitted: bool
    retry_after_s: float = 0.0  # until the next token, when not admitted


class StreamLeaseRequest(BaseModel):
    """Hold one of the caller's chat stream slots until released or lease_s have passed."""

    # Chosen by the gateway: a release sent when it gave up waiting for this acquire holds
    # even if it reaches the database first.
    lease_id: uuid.UUID
    max_streams: int = Field(ge=1)
    lease_s: float = Field(gt=0, le=86_400, allow_inf_nan=False)


class StreamLeaseResult(BaseModel):
    admitted: bool


# Bulk loading: many documents in one request, and one call that says how ingestion stands.

BATCH_DOCUMENTS_MAX = 1000  # the retriever's own bound; the gateway's setting is lower


class DocumentBatchIn(BaseModel):
    """`POST /v1/documents/batch`: JSON documents stored together, each ingested as if
    uploaded alone."""

    documents: list[DocumentIn] = Field(min_length=1, max_length=BATCH_DOCUMENTS_MAX)


class DocumentBatch(BaseModel):
    """One stored document per item, in input order (`duplicate` for known content)."""

    data: list[Document]


class DocumentSummary(BaseModel):
    """How many of the caller's documents are in each state of ingestion."""

    pending: int
    processing: int
    ready: int
    failed: int
    total: int


# Reranking (the retriever calls the embedder's /v1/rerank): the shape that Cohere-, Jina-
# and text-embeddings-inference-style rerank clients send and read.


class RerankRequest(BaseModel):
    """Score each document's relevance to the query; `model` is accepted and ignored (the
    embedder serves one reranker)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    query: StrictStr
    documents: list[StrictStr]
    top_n: int | None = Field(None, ge=1, description="answer only the best top_n (all if unset)")


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request's `documents`")
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int  # query and document tokens of every pair, as the model read them


class RerankResponse(BaseModel):
    """The results best first (ties in input order)."""

    model: str
    results: list[RerankResult]
    usage: RerankUsage
