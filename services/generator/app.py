"""Generator app factory: the engine's lifecycle and the routes in front of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.errors import install_error_handlers
from services.common.observability import install_observability
from services.common.relay import EngineClient
from services.generator.cloudwatch import QueueMetricsPublisher
from services.generator.engines import make_engine
from services.generator.routes import router
from services.generator.serving import EngineSlots
from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)


def create_app(settings: GeneratorSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        app.state.engine_ready = False
        app.state.engine_error = None
        app.state.slots = EngineSlots(
            settings.engine_concurrency + settings.max_queued_requests,
            settings.overloaded_retry_after_s,
        )
        app.state.client = EngineClient("127.0.0.1", engine.port)

        async def start_engine() -> None:
            try:
                await asyncio.to_thread(engine.start)
            except Exception:
                logger.exception("the inference engine failed to start")
                app.state.engine_error = "engine failed to start"
                return
            app.state.engine_ready = True

        starting = asyncio.create_task(start_engine())
        publishing = None
        if settings.cloudwatch_metrics_interval_s > 0:
            publisher = QueueMetricsPublisher(
                settings, engine.base_url, app.state.slots, lambda: app.state.engine_ready
            )
            publishing = asyncio.create_task(publisher.run())
        try:
            yield
        finally:
            if publishing is not None:
                publishing.cancel()
                await asyncio.wait([publishing])
            await app.state.client.aclose()
            if not starting.done():
                await asyncio.wait([starting])
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="RAG generator", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)

    async def engine_ready() -> str | None:
        if app.state.engine_ready:
            return None
        return app.state.engine_error or "model loading"

    install_observability(app, "generator", {"engine": engine_ready})
    app.include_router(router)
    return app
