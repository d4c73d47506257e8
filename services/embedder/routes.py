"""The embedder's routes: OpenAI-compatible /v1/embeddings, /tokenize and /tokenizer for
counting tokens as the model does, and what the model is."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel

from services.common.errors import error_responses
from services.common.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    ModelInfo,
    TokenizeRequest,
    TokenizeResponse,
)
from services.embedder.deps import (
    BatcherDep,
    EmbeddingBody,
    ModelDep,
    SettingsDep,
    TokenCounterDep,
    TokenizeBody,
)
from services.embedder.protocol import ModelCard, ModelList
from services.embedder.serving import count_tokens, embed, tokenizer_document

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
async def list_models(model: ModelDep) -> ModelList:
    """The one model served."""
    card = ModelCard(
        id=model.name, dimension=model.dimension, max_input_tokens=model.max_seq_length
    )
    return ModelList(data=[card])


@router.get("/info", response_model=ModelInfo, responses=error_responses(503))
async def info(model: ModelDep) -> ModelInfo:
    """What the retriever needs: dimension and the longest input the model reads."""
    return ModelInfo(
        model=model.name,
        dimension=model.dimension,
        max_seq_length=model.max_seq_length,
        device=model.device,
    )
