"""RAG chat completions: retrieve, prompt, generate (streamed), cite."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Histogram
from pydantic import ValidationError

from services.common.errors import APIError, error_body, upstream_error
from services.common.protocol import (
    SEARCH_QUERY_MAX_CHARS,
    ChatRequest,
    Citation,
    SearchHit,
    SearchRequest,
)
from services.common.relay import (
    CLIENT_CLOSED_REQUEST,
    ClientGone,
    ClosingStreamingResponse,
    EngineClient,
    EngineResponse,
    EngineUnavailable,
    unless_client_leaves,
)
from services.common.timing import StageTimes
from services.gateway import rag
from services.gateway.auth import Principal
from services.gateway.deps import stage_times
from services.gateway.limits import ChatAdmission, RateLimiter
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import RetrieverClient, generator_models, unavailable

logger = logging.getLogger(__name__)

REWRITE_MAX_CHARS = 500  # of a rewritten question, kept in front of the question itself
KEEP_ALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
GENERATOR_SENT = "generator_sent"  # the instant the prompt went to the generator
GENERATOR_ANSWERED = "generator_answered"  # the instant its response headers came

CHAT_STAGE_SECONDS = Histogram(
    "gateway_chat_stage_seconds",
    "Time of each stage of a chat answered in full: auth, limits, rewrite, retrieve (embed, "
    "vector, text, rerank: the retriever's), prompt, generator_wait, prefill (the engine's, "
    "when it says), first_token, ttft, generate (not streamed), total",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def observe_stages(times: StageTimes) -> None:
    """The chat's stages into gateway_chat_stage_seconds."""
    for name, ms in times.ms.items():
        CHAT_STAGE_SECONDS.labels(name).observe(ms / 1000.0)


def citations_json(cites: list[Citation]) -> list[dict[str, Any]]:
    """Citations as they go into a completion or the last streamed event."""
    return [cite.model_dump(mode="json") for cite in cites]


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
    # Before any work: a user over their own cap (429), or a gateway whose chats already
    # queue for the generator (503), costs nothing but that answer.
    with stage_times(request).stage("limits"):
        admission = await limiter.admit_chat(
            user.sub,
            settings.max_waiting_chats,
            settings.overloaded_retry_after_s,
            settings.max_queue_wait_s or None,
        )
    if body.stream:
        return await _stream_reply(request, body, user, settings, max_tokens, admission)
    # Not streamed: the engine answers only once the whole answer is done, so the chat stops
    # counting as waiting when it is handed to the generator, whose own bound (429) then
    # holds; a stream counts until its first event.
    answering = asyncio.create_task(
        _complete(request, body, user, settings, max_tokens, admission.sent)
    )
    try:
        await unless_client_leaves(request, answering, None)
        return answering.result()
    except ClientGone:
        admission.release()  # at once: the user's next chat is admitted while this unwinds
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        admission.release()
        await _cancel(answering)


async def _stream_reply(
    request: Request,
    body: ChatRequest,
    user: Principal,
    settings: GatewaySettings,
    max_tokens: int,
    admission: ChatAdmission,
) -> Response:
    """The SSE answer. A generator error that comes within sse_keepalive_s keeps its HTTP
    status; after that the stream has started (comments while the generator queues the
    chat) and such an error ends it with an error event. The chat counts as waiting for
    the generator until its first event: the engine has scheduled it (vLLM sends headers
    at once, llama.cpp once a slot takes the request)."""
    starting = asyncio.create_task(_start_generation(request, body, user, settings, max_tokens))

    async def close() -> None:
        # However the chat ends (client gone included): give the user's slot back and drop
        # the upstream request or connection, which cancels the generation.
        admission.release()
        await _cancel(starting)
        if not starting.cancelled() and starting.exception() is None:
            await starting.result()[0].aclose()

    try:
        if not await unless_client_leaves(request, starting, settings.sse_keepalive_s):
            # The generator has not taken the chat yet: start the stream, comment meanwhile.
            return ClosingStreamingResponse(
                _stream_once_started(starting, settings, admission.answered, stage_times(request)),
                on_close=close,
            )
        resp, cites = starting.result()
        if resp.status_code != 200:
            raise await _generator_error(resp)
    except ClientGone:
        await close()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except BaseException:
        await close()
        raise
    times = stage_times(request)
    events = _stream_with_citations(
        resp,
        cites,
        settings.sse_keepalive_s,
        settings.generator_timeout_s,
        admission.answered,
        times,
    )
    # The stages so far (to the generator's headers); the last event carries them all.
    return ClosingStreamingResponse(
        events, on_close=close, headers={"Server-Timing": times.header()}
    )


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel task if it still runs and wait until it has unwound."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: a failure there has been answered already


async def _complete(
    request: Request,
    body: ChatRequest,
    user: Principal,
    settings: GatewaySettings,
    max_tokens: int,
    on_sent: Callable[[], None],
) -> JSONResponse:
    """The non-streamed answer, with the citations."""
    resp, cites = await _start_generation(request, body, user, settings, max_tokens, on_sent)
    try:
        raw = await resp.aread()
    except EngineUnavailable as exc:
        raise unavailable("generator") from exc
    finally:
        await resp.aclose()
    if resp.status_code != 200:
        raise upstream_error(resp.status_code, raw, "generator")
    completion = json.loads(raw)
    times = stage_times(request)
    times.since("generate", GENERATOR_SENT)
    _engine_prefill(completion.pop("timings", None), times)
    times.mark("total")
    observe_stages(times)
    completion["citations"] = citations_json(cites)
    return JSONResponse(completion, headers={"Server-Timing": times.header()})


def _engine_prefill(timings: Any, times: StageTimes) -> None:
    """The engine's own prefill time, when it reports one (llama.cpp's `timings.prompt_ms`;
    vLLM reports none): what of generator_wait and first_token was prompt processing."""
    if isinstance(timings, dict) and isinstance(timings.get("prompt_ms"), int | float):
        times.ms["prefill"] = float(timings["prompt_ms"])


async def _generator_error(resp: EngineResponse) -> APIError:
    """The generator's error answer, as the gateway's own."""
    try:
        raw = await resp.aread()
    except EngineUnavailable:
        return unavailable("generator")
    return upstream_error(resp.status_code, raw, "generator")


def search_query(text: str, limit: int = SEARCH_QUERY_MAX_CHARS) -> str:
    """The text as a search query of at most limit characters: a longer text keeps its last
    part (where a long question asks), cut at a word boundary."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    if not text[-limit - 1].isspace():  # the tail starts mid-word: drop the word's end
        boundary = re.search(r"\s", tail)
        if boundary is not None:
            tail = tail[boundary.end() :]
    return tail.lstrip() or tail


async def _start_generation(
    request: Request,
    body: ChatRequest,
    user: Principal,
    settings: GatewaySettings,
    max_tokens: int,
    on_sent: Callable[[], None] | None = None,
) -> tuple[EngineResponse, list[Citation]]:
    """Retrieve, build the prompt, and send it (calling on_sent just before); return the
    generator's response (headers in) and the citations of the passages the prompt holds."""
    times = stage_times(request)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    question = rag.last_user_question(messages)
    passages: list[rag.Passage] = []
    cited: list[SearchHit] = []
    if body.retrieval.enabled and question:
        query = search_query(question)  # the whole question still goes to the generator
        if settings.rewrite_questions and rag.has_history(messages):
            with times.stage("rewrite"):
                query = await _standalone_query(request, messages, question, settings)
        with times.stage("retrieve"):
            hits = await _search(
                request, user, body.retrieval.search_request(query, settings.rag_k)
            )
        with times.stage("prompt"):
            passages = rag.fit_passages(
                [hit.model_dump(mode="json") for hit in hits],
                messages,
                await generator_context_tokens(request, settings),
                max_tokens,
            )
        cited = hits[: len(passages)]  # fit_passages keeps the best hits, in order
    with times.stage("prompt"):
        if body.retrieval.enabled:
            prompt = rag.build_messages(passages, messages)
        else:
            prompt = rag.normalize_messages(messages)  # what every engine's template accepts
        payload = _generator_payload(body, prompt, max_tokens)
    generator: EngineClient = request.app.state.generator_stream
    if on_sent is not None:
        on_sent()
    times.point(GENERATOR_SENT)
    try:
        with times.stage("generator_wait"):  # to its response headers
            resp = await asyncio.wait_for(
                generator.post("/v1/chat/completions", payload), settings.generator_timeout_s
            )
    except (EngineUnavailable, TimeoutError) as exc:
        raise unavailable("generator") from exc
    times.point(GENERATOR_ANSWERED)
    return resp, Citation.of_hits(cited)


FALLBACK_CONTEXT_TOKENS = 2048  # when the generator does not say (the smallest we serve)


async def generator_context_tokens(request: Request, settings: GatewaySettings) -> int:
    """The generator's context in tokens: the setting, else what the generator's /v1/models
    says (asked once, then kept), else FALLBACK_CONTEXT_TOKENS until it answers."""
    if settings.generator_context_tokens is not None:
        return settings.generator_context_tokens
    known: int | None = getattr(request.app.state, "generator_context_tokens", None)
    if known is not None:
        return known
    generator: httpx.AsyncClient = request.app.state.generator
    try:
        models = await generator_models(generator)
        card = models.data[0].model_dump() if models.data else {}
        context = card.get("context_length") or card.get("max_model_len")
        known = int(context) if context else None
    except (httpx.HTTPError, ValidationError, TypeError, ValueError) as exc:
        logger.warning("the generator's context length is unknown yet: %s", exc)
        return FALLBACK_CONTEXT_TOKENS
    if known is None:
        logger.warning(
            "the generator does not say its context length; assuming %d tokens",
            FALLBACK_CONTEXT_TOKENS,
        )
        known = FALLBACK_CONTEXT_TOKENS
    request.app.state.generator_context_tokens = known
    return known


async def _search(request: Request, user: Principal, search: SearchRequest) -> list[SearchHit]:
    """The retriever's hits for search, under the caller's tenant."""
    retriever: RetrieverClient = request.app.state.retriever
    hits, stages = await retriever.search(user.sub, search.model_dump(mode="json"))
    stage_times(request).update(stages)
    try:
        return [SearchHit.model_validate(hit) for hit in hits]
    except ValidationError as exc:
        logger.error("the retriever answered a search with a malformed hit: %s", exc)
        raise APIError(502, "the retriever failed", code="retriever_error") from exc


async def _standalone_query(
    request: Request, messages: list[dict[str, Any]], question: str, settings: GatewaySettings
) -> str:
    """Rewrite a follow-up question from the conversation so retrieval knows what "it" is.
    The question itself stays in the query; if the rewrite fails, the previous user turn
    stands in for it. Either way the query fits the search cap."""
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
        return search_query(rag.fallback_query(messages, question))
    if not rewritten:
        return search_query(rag.fallback_query(messages, question))
    rewritten = rewritten[:REWRITE_MAX_CHARS]
    return f"{rewritten}\n{search_query(question, SEARCH_QUERY_MAX_CHARS - len(rewritten) - 1)}"


def _error_event(exc: APIError) -> bytes:
    """An error as an SSE event, in OpenAI's shape (the envelope)."""
    failure = error_body(
        exc.status_code, exc.message, code=exc.code, param=exc.param, type=exc.type
    )
    return f"data: {json.dumps(failure)}\n\n".encode()


async def _stream_once_started(
    starting: asyncio.Task[tuple[EngineResponse, list[Citation]]],
    settings: GatewaySettings,
    on_first_event: Callable[[], None],
    times: StageTimes,
) -> AsyncGenerator[bytes, None]:
    """A stream started before the generator answered: comments while it has not, then its
    answer, or an error event and [DONE] if it refused or failed."""
    yield KEEP_ALIVE
    while not starting.done():
        await asyncio.wait({starting}, timeout=settings.sse_keepalive_s)
        if not starting.done():
            yield KEEP_ALIVE
    try:
        resp, cites = starting.result()
        if resp.status_code != 200:
            raise await _generator_error(resp)
    except APIError as exc:
        yield _error_event(exc)
        yield DONE
        return
    except Exception:
        logger.exception("chat failed before the generator answered")
        yield _error_event(APIError(500, "internal server error"))
        yield DONE
        return
    answer = _stream_with_citations(
        resp,
        cites,
        settings.sse_keepalive_s,
        settings.generator_timeout_s,
        on_first_event,
        times,
    )
    async with aclosing(answer):
        async for event in answer:
            yield event


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
    cites: list[Citation],
    keepalive_s: float,
    idle_timeout_s: float,
    on_first_event: Callable[[], None],
    times: StageTimes,
) -> AsyncGenerator[bytes, None]:
    """Relay the generator's SSE events; the last event before [DONE] carries the citations
    and where the time went (`server_timing`: milliseconds per stage, ttft and total).
    While the generator is silent (retrieval done, prompt still prefilling), SSE comments
    keep proxies and clients from timing the stream out. If the generator fails or stalls
    mid-stream, an error event (OpenAI's shape) ends the stream instead of a cut."""
    completion_id, model, created = f"chatcmpl-{uuid.uuid4().hex}", "", int(time.time())
    first = True
    content_seen = False
    try:
        async for line in _sse_lines(resp, keepalive_s, idle_timeout_s):
            if line is None:
                yield KEEP_ALIVE
                continue
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            # Relay events as they are; parse only those up to the first token (id, model,
            # time to first token) and the one with the engine's timings (dropped).
            if first:
                on_first_event()
            if not content_seen or b'"timings"' in data:
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    yield b"data: " + data + b"\n\n"
                    continue
                completion_id = event.get("id", completion_id)
                model = event.get("model", model)
                first = False
                if not content_seen and _has_content(event):
                    content_seen = True
                    times.since("first_token", GENERATOR_ANSWERED)
                    times.mark("ttft")
                engine_timings = event.pop("timings", None)
                if engine_timings is not None:
                    _engine_prefill(engine_timings, times)
                    data = json.dumps(event).encode()
            yield b"data: " + data + b"\n\n"
    except EngineUnavailable:
        logger.warning("the generator failed mid-stream")
        yield _error_event(
            APIError(503, "the generator failed during the answer", code="generator_unavailable")
        )
        yield DONE
        return
    times.mark("total")
    observe_stages(times)
    final = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "citations": citations_json(cites),
        "server_timing": times.rounded(),
    }
    yield f"data: {json.dumps(final)}\n\n".encode()
    yield DONE


def _has_content(event: dict[str, Any]) -> bool:
    """Whether a streamed event carries answer text (the first token)."""
    for choice in event.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("content"):
            return True
    return False
