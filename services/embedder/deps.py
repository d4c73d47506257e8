"""What the embedder's routes depend on, reached through the app's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.common.errors import APIError
from services.common.http import read_capped_body
from services.common.protocol import EmbeddingRequest, RerankRequest, TokenizeRequest
from services.embedder.batching import Batcher
from services.embedder.counting import TokenCounter
from services.embedder.model import LoadedModel
from services.embedder.reranking import Reranker
from services.embedder.serving import (
    parse_request,
    parse_rerank_request,
    parse_tokenize_request,
)
from services.embedder.settings import EmbedderSettings

# A polling hint while the model loads, not a tuning knob: how long loading takes is the
# model's business, and /readyz says when it is done.
LOADING_RETRY_AFTER_S = 5


async def get_settings(request: Request) -> EmbedderSettings:
    settings: EmbedderSettings = request.app.state.settings
    return settings


async def current_model(request: Request) -> LoadedModel:
    """The loaded model; 503 until it is loaded and warm."""
    model: LoadedModel | None = request.app.state.model
    if model is None:
        raise APIError(
            503,
            "the embedding model is not loaded yet",
            code="model_loading",
            headers={"Retry-After": str(LOADING_RETRY_AFTER_S)},
        )
    return model


async def current_reranker(request: Request) -> Reranker:
    """The loaded reranker: 404 when none is configured (a deployment's choice, not a
    fault: retrying will not help), 503 while it loads or when it failed to."""
    reranker: Reranker | None = request.app.state.reranker
    if reranker is None:
        raise APIError(
            404,
            "no reranker is configured on this embedder (EMBEDDER_RERANK_MODEL)",
            code="reranker_not_configured",
        )
    if reranker.load_failed:
        raise APIError(503, "the reranker failed to load", code="reranker_unavailable")
    if reranker.model is None:
        raise APIError(
            503,
            "the reranker is not loaded yet",
            code="model_loading",
            headers={"Retry-After": str(LOADING_RETRY_AFTER_S)},
        )
    return reranker


async def get_batcher(request: Request) -> Batcher:
    batcher: Batcher = request.app.state.batcher
    return batcher


async def get_token_counter(request: Request) -> TokenCounter:
    counter: TokenCounter = request.app.state.token_counter
    return counter


SettingsDep = Annotated[EmbedderSettings, Depends(get_settings)]
ModelDep = Annotated[LoadedModel, Depends(current_model)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
RerankerDep = Annotated[Reranker, Depends(current_reranker)]
TokenCounterDep = Annotated[TokenCounter, Depends(get_token_counter)]


async def read_body(request: Request, settings: SettingsDep) -> bytes:
    """The request body: 413 past max_body_bytes, 408 once it stops arriving."""
    return await read_capped_body(
        request, settings.max_body_bytes, idle_timeout_s=settings.body_idle_timeout_s
    )


async def embedding_request(
    raw: Annotated[bytes, Depends(read_body)], settings: SettingsDep
) -> EmbeddingRequest:
    return parse_request(raw, settings)


async def rerank_request(
    raw: Annotated[bytes, Depends(read_body)], settings: SettingsDep
) -> RerankRequest:
    return parse_rerank_request(raw, settings)


async def tokenize_request(
    raw: Annotated[bytes, Depends(read_body)], settings: SettingsDep
) -> TokenizeRequest:
    return parse_tokenize_request(raw, settings)


# Bodies are read here rather than by FastAPI, so the size cap holds while they arrive and
# the JSON is validated in one pass from bytes. List them after ModelDep (or RerankerDep):
# 503 (or 404) comes first.
EmbeddingBody = Annotated[EmbeddingRequest, Depends(embedding_request)]
RerankBody = Annotated[RerankRequest, Depends(rerank_request)]
TokenizeBody = Annotated[TokenizeRequest, Depends(tokenize_request)]
