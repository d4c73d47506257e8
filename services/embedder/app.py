"""Embedder app factory: the model's lifecycle (loaded and warmed off the event loop) and
the routes in front of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from services.common.errors import install_error_handlers
from services.common.observability import install_observability
from services.embedder.batching import Batcher
from services.embedder.counting import TokenCounter
from services.embedder.model import load_model
from services.embedder.reranking import Reranker, load_reranker
from services.embedder.routes import router
from services.embedder.settings import EmbedderSettings

logger = logging.getLogger(__name__)


def create_app(settings: EmbedderSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.model = None
        app.state.load_error = None
        batcher = Batcher(
            partial(
                load_model,
                settings.model,
                settings.device,
                settings.served_model_name,
                settings.models_dir,
            ),
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queued_inputs=settings.max_queued_inputs,
            batch_wait_ms=settings.batch_wait_ms,
        )
        app.state.batcher = batcher
        app.state.token_counter = TokenCounter()
        app.state.reranker = None
        if settings.rerank_model:
            app.state.reranker = Reranker(
                partial(load_reranker, settings.rerank_model, settings.device, settings.models_dir),
                batch_size=settings.rerank_batch_size,
                max_queued_pairs=settings.rerank_max_queued_pairs,
                after=batcher.loaded,
            )

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
            if app.state.reranker is not None:
                app.state.reranker.close()
            loading.cancel()

    app = FastAPI(title="RAG embedder", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.reranker = None  # set in the lifespan when EMBEDDER_RERANK_MODEL is
    install_error_handlers(app)

    async def model_ready() -> str | None:
        if app.state.model is not None:
            return None
        return app.state.load_error or "model loading"

    async def reranker_ready() -> str | None:
        """Ready once a configured reranker is loaded: a deployment that asks for one is
        not rolled out without it (every search would fall back to first-stage order)."""
        reranker: Reranker | None = app.state.reranker
        if reranker is None or reranker.model is not None:
            return None
        return "reranker failed to load" if reranker.load_failed else "reranker loading"

    install_observability(app, "embedder", {"model": model_ready, "reranker": reranker_ready})
    app.include_router(router)
    return app
