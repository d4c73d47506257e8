"""Embedder app factory and routes."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel

from services.common.errors import ERROR_RESPONSES, APIError, install_error_handlers
from services.common.observability import install_observability
from services.embedder.model import LoadedModel, load_model
from services.embedder.settings import EmbedderSettings

logger = logging.getLogger(__name__)


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


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


def _validate_inputs(body: EmbeddingRequest, settings: EmbedderSettings) -> list[str]:
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
    return texts


def create_app(settings: EmbedderSettings) -> FastAPI:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.model = None
        loop = asyncio.get_running_loop()
        loading = loop.run_in_executor(
            executor, load_model, settings.model, settings.device, settings.served_model_name
        )

        def _loaded(fut: asyncio.Future[LoadedModel]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                logger.error("embedding model failed to load: %r", fut.exception())
                app.state.load_error = "model failed to load"
            else:
                app.state.model = fut.result()

        app.state.load_error = None
        loading.add_done_callback(_loaded)
        try:
            yield
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

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
                "embedding model is not loaded yet",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        return model

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
        model = current_model(request)
        texts = _validate_inputs(body, settings)
        if body.dimensions is not None and body.dimensions != model.dimension:
            raise APIError(
                400, f"model {model.name} produces {model.dimension} dimensions", param="dimensions"
            )
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(executor, model.encode, texts, settings.batch_size)
        tokens = await loop.run_in_executor(None, model.count_tokens, texts)
        items = [
            EmbeddingItem(
                index=i,
                embedding=base64.b64encode(vec.tobytes()).decode()
                if body.encoding_format == "base64"
                else vec.tolist(),
            )
            for i, vec in enumerate(vectors)
        ]
        return EmbeddingResponse(
            data=items, model=model.name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
        )

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        model = current_model(request)
        return {
            "object": "list",
            "data": [{"id": model.name, "object": "model", "owned_by": "ragplatform"}],
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
