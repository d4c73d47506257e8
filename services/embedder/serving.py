"""What the embedder's routes do: check a request against the limits, embed or count its
texts, and shape the answer."""

from __future__ import annotations

import base64
import json
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from services.common.errors import APIError, validation_error
from services.common.protocol import (
    EmbeddingItem,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    TokenCount,
    TokenizeRequest,
    TokenizeResponse,
)
from services.embedder.batching import Batcher, InputTooLong, QueueFull
from services.embedder.counting import TokenCounter
from services.embedder.model import LoadedModel
from services.embedder.reranking import Reranker
from services.embedder.settings import EmbedderSettings

RequestBody = TypeVar("RequestBody", bound=BaseModel)

# pydantic words a wrong `input` by each member of its union, and a wrong item of a list by its
# position and type; one sentence per field says it better.
FIELD_MESSAGES = {
    "input": "input must be a string or a list of strings",
    "query": "query must be a string",
    "documents": "documents must be a list of strings",
}


def validate_body(schema: type[RequestBody], raw: bytes) -> RequestBody:
    """Parse a JSON body; a bad `input` or any other field answers 400 in the envelope."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc, field_messages=FIELD_MESSAGES) from exc


def overloaded(settings: EmbedderSettings) -> APIError:
    return APIError(
        429,
        "the embedder is at capacity; retry shortly",
        code="overloaded",
        headers={"Retry-After": str(settings.overloaded_retry_after_s)},
    )


def parse_request(raw: bytes, settings: EmbedderSettings) -> EmbeddingRequest:
    """An embeddings request within the limits on inputs and their length."""
    body = validate_body(EmbeddingRequest, raw)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if len(texts) > settings.max_inputs_per_request:
        raise APIError(
            400,
            f"at most {settings.max_inputs_per_request} inputs per request",
            param="input",
            code="too_many_inputs",
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise APIError(400, f"input[{i}] is empty", param="input")
        if len(text) > settings.max_input_chars:
            raise APIError(
                400,
                f"input[{i}] is longer than {settings.max_input_chars} characters",
                param="input",
                code="input_too_long",
            )
    return body


def parse_tokenize_request(raw: bytes, settings: EmbedderSettings) -> TokenizeRequest:
    """A tokenize request within the limit on inputs ("" is allowed)."""
    body = validate_body(TokenizeRequest, raw)
    if isinstance(body.input, list) and len(body.input) > settings.max_tokenize_inputs:
        raise APIError(
            400,
            f"at most {settings.max_tokenize_inputs} inputs per tokenize request",
            param="input",
            code="too_many_inputs",
        )
    return body


def output_dimensions(requested: int | None, model: LoadedModel, settings: EmbedderSettings) -> int:
    """The vector size to answer: the model's, or a Matryoshka cut it was trained for."""
    if requested is None or requested == model.dimension:
        return model.dimension
    if requested in settings.matryoshka_dims and requested < model.dimension:
        return requested
    allowed = sorted({model.dimension, *settings.matryoshka_dims})
    raise APIError(
        400, f"model {model.name} gives {allowed} dimensions, not {requested}", param="dimensions"
    )


def prompted_texts(texts: str | list[str], model: LoadedModel, input_type: str | None) -> list[str]:
    """The texts as the model reads them: its prompt for input_type in front of each."""
    texts = [texts] if isinstance(texts, str) else texts
    prefix = model.prompt_for(input_type)
    return [prefix + text for text in texts] if prefix else texts


async def embed(
    body: EmbeddingRequest,
    model: LoadedModel,
    batcher: Batcher,
    settings: EmbedderSettings,
) -> EmbeddingResponse:
    """Embed the request's texts in the shared batches; 429 when the queue is full."""
    dims = output_dimensions(body.dimensions, model, settings)
    texts = prompted_texts(body.input, model, body.input_type)
    try:
        vectors, tokens = await batcher.embed(texts, settings.truncate)
    except QueueFull as exc:
        raise overloaded(settings) from exc
    except InputTooLong as exc:
        raise APIError(400, str(exc), param="input", code="input_too_long") from exc
    if dims < model.dimension:
        vectors = vectors[:, :dims]
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return EmbeddingResponse(
        data=[
            EmbeddingItem(
                index=i,
                embedding=base64.b64encode(vec.astype("<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else vec.tolist(),
            )
            for i, vec in enumerate(vectors)
        ],
        model=model.name,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


async def count_tokens(
    body: TokenizeRequest, model: LoadedModel, counter: TokenCounter
) -> TokenizeResponse:
    """Tokens per text as embed() would feed them to the model, untruncated."""
    texts = prompted_texts(body.input, model, body.input_type)
    counts = await counter.count(model, texts) if texts else []
    return TokenizeResponse(
        model=model.name,
        max_tokens=model.max_seq_length,
        data=[TokenCount(index=i, tokens=n) for i, n in enumerate(counts)],
    )


def tokenizer_document(model: LoadedModel) -> str:
    """The model's tokenizer JSON and its prompts, as one JSON document; 404 without one.
    Spliced as text: the tokenizer is megabytes of JSON already, not worth parsing again."""
    if model.tokenizer_json is None:
        raise APIError(404, "this model's tokenizer cannot be exported; use /tokenize")
    prompts = {kind: model.prompt_for(kind) for kind in ("query", "passage")}
    return (
        f'{{"model": {json.dumps(model.name)}, "max_tokens": {model.max_seq_length}, '
        f'"prompts": {json.dumps(prompts)}, "tokenizer": {model.tokenizer_json}}}'
    )


def parse_rerank_request(raw: bytes, settings: EmbedderSettings) -> RerankRequest:
    """A rerank request within the limits on documents and their length."""
    body = validate_body(RerankRequest, raw)
    if not body.query.strip():
        raise APIError(400, "query is empty", param="query")
    if len(body.query) > settings.max_input_chars:
        raise APIError(
            400,
            f"query is longer than {settings.max_input_chars} characters",
            param="query",
            code="input_too_long",
        )
    if not body.documents:
        raise APIError(400, "documents must not be empty", param="documents")
    if len(body.documents) > settings.rerank_max_documents:
        raise APIError(
            400,
            f"at most {settings.rerank_max_documents} documents per request",
            param="documents",
            code="too_many_documents",
        )
    for i, document in enumerate(body.documents):
        if len(document) > settings.max_input_chars:
            raise APIError(
                400,
                f"documents[{i}] is longer than {settings.max_input_chars} characters",
                param="documents",
                code="input_too_long",
            )
    return body


async def rerank(
    body: RerankRequest, reranker: Reranker, settings: EmbedderSettings
) -> RerankResponse:
    """The documents' relevance scores, best first; 429 when the queue is full. Each
    query-document pair is truncated to the model's window (the longer side first)."""
    assert reranker.model is not None
    try:
        scores, tokens = await reranker.rerank(body.query, body.documents)
    except QueueFull as exc:
        raise overloaded(settings) from exc
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return RerankResponse(
        model=reranker.model.name,
        results=[
            RerankResult(index=i, relevance_score=float(scores[i])) for i in order[: body.top_n]
        ],
        usage=RerankUsage(total_tokens=tokens),
    )
