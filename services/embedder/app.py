"""Embedder app factory and routes: OpenAI-compatible /v1/embeddings with dynamic batching,
and /tokenize, which counts tokens as the model would read them."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from services.common.errors import ERROR_RESPONSES, APIError, install_error_handlers
from services.common.http import read_capped_body
from services.common.observability import install_observability
from services.embedder.batching import Batcher, InputTooLong, QueueFull
from services.embedder.counting import TokenCounter
from services.embedder.model import LoadedModel, load_model
from services.embedder.settings import EmbedderSettings

logger = logging.getLogger(__name__)

RequestBody = TypeVar("RequestBody", bound=BaseModel)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # Extension: models trained with query/passage prompts (e5, bge...) get the right one.
    input_type: Literal["query", "passage"] | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]  # "" is allowed: it counts the fixed overhead
    input_type: Literal["query", "passage"] | None = None


class TokenCount(BaseModel):
    index: int
    tokens: int


class TokenizeResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    max_tokens: int  # the model's window: /v1/embeddings truncates (or refuses) longer inputs
    data: list[TokenCount]


def validate_body(schema: type[RequestBody], raw: bytes) -> RequestBody:
    """Parse a JSON body; a bad `input` or any other field answers 400 in the envelope."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if param == "input":
            raise APIError(
                400, "input must be a string or a list of strings", param="input"
            ) from exc
        raise APIError(400, f"{param or 'body'}: {first['msg']}", param=param) from exc


def parse_request(raw: bytes, settings: EmbedderSettings) -> EmbeddingRequest:
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
    if requested is None or requested == model.dimension:
        return model.dimension
    if requested in settings.matryoshka_dims and requested < model.dimension:
        return requested
    allowed = sorted({model.dimension, *settings.matryoshka_dims})
    raise APIError(
        400, f"model {model.name} gives {allowed} dimensions, not {requested}", param="dimensions"
    )


def create_app(settings: EmbedderSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.model = None
        app.state.load_error = None
        batcher = Batcher(
            partial(load_model, settings.model, settings.device, settings.served_model_name),
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queued_inputs=settings.max_queued_inputs,
            batch_wait_ms=settings.batch_wait_ms,
        )
        app.state.batcher = batcher
        app.state.token_counter = TokenCounter()

        async def wait_loaded() -> None:
            try:
                app.state.model = await asyncio.wrap_future(batcher.loaded)
            except Exception:
                logger.exception("embedding model failed to load")
                app.state.load_error = "model failed to load"

        loading = asyncio.create_task(wait_loaded())
        try:
            yield
        finally:
            batcher.stop()
            app.state.token_counter.close()
            loading.cancel()

    app = FastAPI(title="RAG embedder", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    async def model_ready() -> str | None:
        if app.state.model is not None:
            return None
        return app.state.load_error or "model loading"

    install_observability(app, "embedder", {"model": model_ready})

    def current_model(request: Request) -> LoadedModel:
        model: LoadedModel | None = request.app.state.model
        if model is None:
            raise APIError(
                503,
                "the embedding model is not loaded yet",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        return model

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
    async def create_embeddings(request: Request) -> Response:
        model = current_model(request)
        body = parse_request(await read_capped_body(request, settings.max_body_bytes), settings)
        texts = [body.input] if isinstance(body.input, str) else body.input
        dims = output_dimensions(body.dimensions, model, settings)
        prefix = model.prompt_for(body.input_type)
        if prefix:
            texts = [prefix + text for text in texts]
        batcher: Batcher = request.app.state.batcher
        try:
            vectors, tokens = await batcher.embed(texts, settings.truncate)
        except QueueFull as exc:
            raise APIError(
                429,
                "the embedder is at capacity; retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
            ) from exc
        except InputTooLong as exc:
            raise APIError(400, str(exc), param="input", code="input_too_long") from exc
        if dims < model.dimension:
            vectors = vectors[:, :dims]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        result = EmbeddingResponse(
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
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
        return Response(result.model_dump_json(), media_type="application/json")

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(request: Request) -> Response:
        """Tokens per text as /v1/embeddings would feed them to the model (its input_type's
        prompt and special tokens included), untruncated: above max_tokens, the model would
        read only the first max_tokens."""
        model = current_model(request)
        body = parse_tokenize_request(
            await read_capped_body(request, settings.max_body_bytes), settings
        )
        texts = [body.input] if isinstance(body.input, str) else body.input
        prefix = model.prompt_for(body.input_type)
        if prefix:
            texts = [prefix + text for text in texts]
        counter: TokenCounter = request.app.state.token_counter
        counts = await counter.count(model, texts) if texts else []
        result = TokenizeResponse(
            model=model.name,
            max_tokens=model.max_seq_length,
            data=[TokenCount(index=i, tokens=n) for i, n in enumerate(counts)],
        )
        return Response(result.model_dump_json(), media_type="application/json")

    @app.get("/tokenizer", responses=ERROR_RESPONSES)
    async def tokenizer(request: Request) -> Response:
        """The model's tokenizer (a `tokenizers` JSON document) and its prompts, so a client
        can count tokens as /tokenize does without a request per text."""
        model = current_model(request)
        if model.tokenizer_json is None:
            raise APIError(404, "this model's tokenizer cannot be exported; use /tokenize")
        prompts = {kind: model.prompt_for(kind) for kind in ("query", "passage")}
        body = (
            f'{{"model": {json.dumps(model.name)}, "max_tokens": {model.max_seq_length}, '
            f'"prompts": {json.dumps(prompts)}, "tokenizer": {model.tokenizer_json}}}'
        )
        return Response(body, media_type="application/json")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        model = current_model(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": model.name,
                    "object": "model",
                    "owned_by": "ragplatform",
                    "dimension": model.dimension,
                    "max_input_tokens": model.max_seq_length,
                }
            ],
        }

    @app.get("/info")
    async def info(request: Request) -> dict:
        """What the retriever needs: dimension and the longest input the model reads."""
        model = current_model(request)
        return {
            "model": model.name,
            "dimension": model.dimension,
            "max_seq_length": model.max_seq_length,
            "device": model.device,
        }

    return app
