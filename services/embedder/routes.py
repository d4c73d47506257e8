"""The embedder's routes: OpenAI-compatible /v1/embeddings, /tokenize and /tokenizer for
counting tokens as the model does, and what the model is."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from services.common.errors import error_responses
from services.common.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    ModelInfo,
    RerankRequest,
    RerankResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from services.embedder.deps import (
    BatcherDep,
    EmbeddingBody,
    ModelDep,
    RerankBody,
    RerankerDep,
    SettingsDep,
    TokenCounterDep,
    TokenizeBody,
)
from services.embedder.protocol import ModelCard, ModelList
from services.embedder.reranking import LoadedReranker
from services.embedder.serving import count_tokens, embed, rerank, tokenizer_document

router = APIRouter()


def json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting the JSON body of a route that reads its body itself."""
    content = {"application/json": {"schema": schema.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=error_responses(400, 408, 413, 429, 503),
    openapi_extra=json_body(EmbeddingRequest),
)
async def create_embeddings(
    model: ModelDep, body: EmbeddingBody, batcher: BatcherDep, settings: SettingsDep
) -> Response:
    """Embed one text or a list of them, batched with other requests' texts."""
    result = await embed(body, model, batcher, settings)
    return Response(result.model_dump_json(), media_type="application/json")


@router.post(
    "/v1/rerank",
    response_model=RerankResponse,
    responses=error_responses(
        400,
        404,
        408,
        413,
        429,
        503,
        descriptions={
            400: "a bad body, too many documents or one too long",
            404: "no reranker is configured (EMBEDDER_RERANK_MODEL)",
            408: "the body stopped arriving",
            413: "the body is larger than EMBEDDER_MAX_BODY_BYTES",
            429: "the reranker's queue is full; see Retry-After",
            503: "the reranker is loading or failed to load",
        },
    ),
    openapi_extra=json_body(RerankRequest),
)
async def rerank_documents(
    reranker: RerankerDep, body: RerankBody, settings: SettingsDep
) -> Response:
    """Score how relevant each document is to the query with the cross-encoder; the
    results come best first."""
    result = await rerank(body, reranker, settings)
    return Response(result.model_dump_json(), media_type="application/json")


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=error_responses(400, 408, 413, 503),
    openapi_extra=json_body(TokenizeRequest),
)
async def tokenize(model: ModelDep, body: TokenizeBody, counter: TokenCounterDep) -> Response:
    """Tokens per text as /v1/embeddings would feed them to the model (its input_type's
    prompt and special tokens included), untruncated: above max_tokens, the model would
    read only the first max_tokens."""
    result = await count_tokens(body, model, counter)
    return Response(result.model_dump_json(), media_type="application/json")


@router.get("/tokenizer", responses=error_responses(404, 503))
async def tokenizer(model: ModelDep) -> Response:
    """The model's tokenizer (a `tokenizers` JSON document) and its prompts, so a client
    can count tokens as /tokenize does without a request per text."""
    return Response(tokenizer_document(model), media_type="application/json")


@router.get("/v1/models", response_model=ModelList, responses=error_responses(503))
async def list_models(model: ModelDep, request: Request) -> ModelList:
    """The embedding model, and the reranker once it is loaded."""
    cards = [
        ModelCard(id=model.name, dimension=model.dimension, max_input_tokens=model.max_seq_length)
    ]
    reranker: LoadedReranker | None = getattr(request.app.state.reranker, "model", None)
    if reranker is not None:
        cards.append(
            ModelCard(id=reranker.name, task="rerank", max_input_tokens=reranker.max_seq_length)
        )
    return ModelList(data=cards)


@router.get("/info", response_model=ModelInfo, responses=error_responses(503))
async def info(model: ModelDep) -> ModelInfo:
    """What the retriever needs: dimension and the longest input the model reads."""
    return ModelInfo(
        model=model.name,
        dimension=model.dimension,
        max_seq_length=model.max_seq_length,
        device=model.device,
    )
