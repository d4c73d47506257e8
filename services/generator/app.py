"""Generator app: the OpenAI routes, proxied to the engine's own server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Gauge

from services.common.errors import ERROR_RESPONSES, APIError, install_error_handlers
from services.common.observability import install_observability
from services.common.relay import (
    CLIENT_CLOSED_REQUEST,
    ClientGone,
    ClosingStreamingResponse,
    EngineClient,
    EngineUnavailable,
    close_if_abandoned,
    unless_client_leaves,
)
from services.generator.engines import make_engine
from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)

IN_FLIGHT = Gauge("generator_requests_in_flight", "Requests at the engine or waiting for it")


def _upstream_error(status: int, body: bytes) -> APIError:
    """Turn the engine's error into our envelope, keeping its message but not raw internals."""
    message = "generation failed"
    try:
        detail = json.loads(body).get("error", {})
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            message = detail["message"][:500]
    except (ValueError, AttributeError):
        pass
    if status >= 500:
        return APIError(502, "the inference engine failed", code="engine_error")
    if status == 429:
        return APIError(429, message, code="overloaded", headers={"Retry-After": "1"})
    return APIError(status, message, code="engine_rejected")


def create_app(settings: GeneratorSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        app.state.engine_ready = False
        app.state.engine_error = None
        app.state.in_flight = 0
        app.state.client = EngineClient("127.0.0.1", engine.port)

        async def _start() -> None:
            try:
                await asyncio.to_thread(engine.start)
            except Exception:
                logger.exception("the inference engine failed to start")
                app.state.engine_error = "engine failed to start"
                return
            app.state.engine_ready = True

        starting = asyncio.create_task(_start())
        try:
            yield
        finally:
            await app.state.client.aclose()
            if not starting.done():
                await asyncio.wait([starting])
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="RAG generator", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    async def engine_ready() -> str | None:
        if app.state.engine_ready:
            return None
        return app.state.engine_error or "model loading"

    install_observability(app, "generator", {"engine": engine_ready})
    limit = settings.engine_concurrency + settings.max_queued_requests

    def client(request: Request) -> EngineClient:
        if not request.app.state.engine_ready:
            raise APIError(
                503,
                "the model is still loading",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        if request.app.state.in_flight >= limit:
            raise APIError(
                429,
                f"{limit} requests are in progress or queued; retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        return request.app.state.client

    async def _forward(request: Request, path: str) -> Response:
        http = client(request)
        state = request.app.state
        state.in_flight += 1  # counted before any await, so the bound holds under bursts
        IN_FLIGHT.set(state.in_flight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.in_flight -= 1
                IN_FLIGHT.set(state.in_flight)

        try:
            payload: dict[str, Any] = await request.json()
        except ValueError as exc:
            release()
            raise APIError(400, "request body must be JSON") from exc
        if not isinstance(payload, dict):
            release()
            raise APIError(400, "request body must be a JSON object")
        payload["model"] = settings.served_model_name

        # A client that leaves while the engine queues its request (or, not streamed, while
        # it generates) takes its place with it, not when the engine gets to it.
        posting = asyncio.create_task(
            asyncio.wait_for(http.post(path, payload), settings.request_timeout_s)
        )
        try:
            await unless_client_leaves(request, posting)
            resp = posting.result()
        except ClientGone:
            close_if_abandoned(posting)
            release()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except (EngineUnavailable, TimeoutError) as exc:
            release()
            raise APIError(503, "the inference engine is unavailable", code="engine_down") from exc
        except BaseException:  # cancelled (shutting down): the engine must see us leave
            posting.cancel()
            close_if_abandoned(posting)
            release()
            raise
        if resp.status_code != 200 or not payload.get("stream"):
            reading = asyncio.create_task(resp.aread())
            try:
                await unless_client_leaves(request, reading)
                body = reading.result()
            except ClientGone:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            except EngineUnavailable as exc:
                raise APIError(503, "the inference engine failed", code="engine_down") from exc
            finally:
                await resp.aclose()  # unread: the connection is dropped, the engine stops
                release()
            if resp.status_code != 200:
                raise _upstream_error(resp.status_code, body)
            return Response(body, media_type="application/json")

        async def close() -> None:
            # Dropping the upstream connection when the client goes away makes the engine
            # cancel the generation and free its slot.
            await resp.aclose()
            release()

        return ClosingStreamingResponse(resp.aiter_bytes(), on_close=close)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        return await _forward(request, "/v1/chat/completions")

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(request: Request) -> Response:
        return await _forward(request, "/v1/completions")

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": settings.served_model_name,
                        "object": "model",
                        "owned_by": "ragplatform",
                        "context_length": settings.ctx_per_slot
                        if settings.engine == "llamacpp"
                        else settings.max_model_len,
                    }
                ],
            }
        )

    return app
