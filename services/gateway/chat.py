"""RAG chat completions: retrieve, prompt, generate (streamed), cite."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import APIError, error_body
from services.common.relay import (
    ClosingStreamingResponse,
    EngineClient,
    EngineResponse,
    EngineUnavailable,
)
from services.gateway import rag
from services.gateway.auth import Principal
from services.gateway.limits import RateLimiter
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import RetrieverClient, passthrough_error, unavailable

logger = logging.getLogger(__name__)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class RetrievalOptions(BaseModel):
    enabled: bool = True
    k: int | None = Field(None, ge=1, le=20)
    mode: Literal["hybrid", "vector", "text"] = "hybrid"
    document_ids: list[uuid.UUID] = Field(default_factory=list)
    filters: dict[str, Any] = Field(default_factory=dict)


class ChatRequest(BaseModel):
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
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)


def _generator_payload(
    body: ChatRequest,
    messages: list[dict[str, Any]],
    max_tokens: int,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": body.stream,
    }
    for name in ("temperature", "top_p", "stop", "seed"):
        value = getattr(body, name)
        if value is not None:
            payload[name] = value
    return payload


async def chat_completion(
    request: Request, body: ChatRequest, user: Principal, settings: GatewaySettings
) -> Response:
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_cap:
        raise APIError(
            400, f"max_tokens must be at most {settings.max_tokens_cap}", param="max_tokens"
        )
    limiter: RateLimiter = request.app.state.limiter
    limiter.open_stream(user.sub)  # before any work: a user over the cap costs nothing
    try:
        resp, cites = await _start_generation(request, body, user, settings, max_tokens)
    except BaseException:
        limiter.close_stream(user.sub)
        raise
    if resp.status_code != 200 or not body.stream:
        try:
            raw = await resp.aread()
        except EngineUnavailable as exc:
            raise unavailable("generator") from exc
        finally:
            await resp.aclose()
            limiter.close_stream(user.sub)
        if resp.status_code != 200:
            raise passthrough_error(resp.status_code, raw, "generator")
        completion = json.loads(raw)
        completion.pop("timings", None)
        completion["citations"] = cites
        return JSONResponse(completion)

    async def close() -> None:
        # However the stream ends (client gone included): drop the upstream connection,
        # which cancels the generation, and give the user's stream slot back.
        await resp.aclose()
        limiter.close_stream(user.sub)

    return ClosingStreamingResponse(
        _stream_with_citations(resp, cites, settings.sse_keepalive_s, settings.generator_timeout_s),
        on_close=close,
    )


async def _start_generation(
    request: Request,
    body: ChatRequest,
    user: Principal,
    settings: GatewaySettings,
    max_tokens: int,
) -> tuple[EngineResponse, list[dict[str, Any]]]:
    """Retrieve, build the prompt, and send it; return the generator's response (headers in)
    and the citations of the passages the prompt holds."""
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    question = rag.last_user_question(messages)
    passages: list[dict[str, Any]] = []
    if body.retrieval.enabled and question:
        retriever: RetrieverClient = request.app.state.retriever
        query = question
        if settings.rewrite_questions and rag.has_history(messages):
            query = await _standalone_query(request, messages, question, settings)
        hits = await retriever.search(
            user.sub,
            {
                "query": query,
                "k": body.retrieval.k or settings.rag_k,
                "mode": body.retrieval.mode,
                "document_ids": [str(d) for d in body.retrieval.document_ids],
                "filters": {"metadata": body.retrieval.filters.get("metadata", {})},
            },
        )
        passages = rag.fit_passages(hits, messages, settings.generator_context_tokens, max_tokens)
    prompt = rag.build_messages(passages, messages) if body.retrieval.enabled else messages
    payload = _generator_payload(body, prompt, max_tokens)
    generator: EngineClient = request.app.state.generator_stream
    try:
        resp = await asyncio.wait_for(
            generator.post("/v1/chat/completions", payload), settings.generator_timeout_s
        )
    except (EngineUnavailable, TimeoutError) as exc:
        raise unavailable("generator") from exc
    return resp, rag.citations(passages)


async def _standalone_query(
    request: Request, messages: list[dict[str, Any]], question: str, settings: GatewaySettings
) -> str:
    """Rewrite a follow-up question from the conversation so retrieval knows what "it" is.
    The question itself stays in the query; if the rewrite fails, the previous user turn
    stands in for it."""
    generator: EngineClient = request.app.state.generator_stream
    payload = {
        "messages": rag.rewrite_messages(messages, question),
        "max_tokens": 48,
        "temperature": 0,
        "stream": False,
    }
    try:
        resp = await asyncio.wait_for(
            generator.post("/v1/chat/completions", payload), settings.rewrite_timeout_s
        )
        try:
            raw = await asyncio.wait_for(resp.aread(), settings.rewrite_timeout_s)
        finally:
            await resp.aclose()
        rewritten = json.loads(raw)["choices"][0]["message"]["content"].strip()
    except (EngineUnavailable, TimeoutError, ValueError, KeyError, IndexError, TypeError):
        logger.warning("question rewrite failed; using the conversation instead")
        return rag.fallback_query(messages, question)
    return f"{rewritten[:500]}\n{question}" if rewritten else rag.fallback_query(messages, question)


async def _sse_lines(
    resp: EngineResponse, keepalive_s: float, idle_timeout_s: float
) -> AsyncIterator[bytes | None]:
    """The upstream's lines as they arrive; None whenever keepalive_s pass without one.
    Raises EngineUnavailable when nothing came for idle_timeout_s (a stalled engine)."""
    chunks = resp.aiter_bytes()
    pending: asyncio.Future[bytes] | None = None
    buffer = b""
    last_data = time.monotonic()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                if time.monotonic() - last_data > idle_timeout_s:
                    raise EngineUnavailable("the generator sent nothing for too long")
                yield None
                continue
            last_data = time.monotonic()
            task, pending = pending, None
            try:
                chunk = task.result()
            except StopAsyncIteration:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line
    finally:
        if pending is not None:
            pending.cancel()


async def _stream_with_citations(
    resp: EngineResponse,
    cites: list[dict[str, Any]],
    keepalive_s: float,
    idle_timeout_s: float,
) -> AsyncIterator[bytes]:
    """Relay the generator's SSE events; the last event before [DONE] carries the citations.
    While the generator is silent (retrieval done, prompt still prefilling), SSE comments
    keep proxies and clients from timing the stream out. If the generator fails or stalls
    mid-stream, an error event (OpenAI's shape) ends the stream instead of a cut."""
    completion_id, model, created = f"chatcmpl-{uuid.uuid4().hex}", "", int(time.time())
    first = True
    try:
        async for line in _sse_lines(resp, keepalive_s, idle_timeout_s):
            if line is None:
                yield b": keep-alive\n\n"
                continue
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            # Relay events as they are; parse only the first (for id and model) and the one
            # with the engine's timings (dropped).
            if first or b'"timings"' in data:
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                completion_id = event.get("id", completion_id)
                model = event.get("model", model)
                first = False
                if event.pop("timings", None) is not None:
                    data = json.dumps(event).encode()
            yield b"data: " + data + b"\n\n"
    except EngineUnavailable:
        logger.warning("the generator failed mid-stream")
        failure = error_body(
            503, "the generator failed during the answer", code="generator_unavailable"
        )
        yield f"data: {json.dumps(failure)}\n\n".encode()
        yield b"data: [DONE]\n\n"
        return
    final = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "citations": cites,
    }
    yield f"data: {json.dumps(final)}\n\n".encode()
    yield b"data: [DONE]\n\n"
