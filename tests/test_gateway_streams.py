"""Chat admission under load, and long questions.

A client that leaves before its answer starts frees its stream slot at once; past a global
bound on chats waiting for the generator, a chat gets a fast 503 with Retry-After; a stream
the generator keeps waiting gets keep-alive comments from the start; a question longer than
the search cap is still searched and answered. A small server on loopback stands in for a
busy generator; tokens, the retriever and (for the end-to-end case) the generator are real.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from ragctl.stack import Stack, free_port
from services.gateway.app import create_app
from tests.conftest import stack_gateway_settings, wait_until_ready

OBSERVATORY = """# Quokka Valley Observatory

The main telescope of the Quokka Valley Observatory is named Marisol. Marisol has a
2.4 metre mirror and was installed in 2019. Visitors are welcome on Friday nights.
"""
ASK = "What is the name of the main telescope of the Quokka Valley Observatory?"

Reply = Callable[[dict[str, Any]], bytes]


def http_reply(status: int, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} Reply\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def answer(text: str) -> Reply:
    """The generator's answer: SSE events for a streamed request, one completion otherwise."""

    def reply(request: dict[str, Any]) -> bytes:
        common = {"id": "chatcmpl-standin", "created": 0, "model": "standin"}
        if request.get("stream"):
            events = [
                {
                    **common,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                }
                for word in text.split(" ")
            ]
            sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return http_reply(200, sse.encode(), "text/event-stream")
        completion = {
            **common,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }
        return http_reply(200, json.dumps(completion).encode(), "application/json")

    return reply


def refusal(status: int, code: str, message: str) -> Reply:
    """The generator's error answer, in the envelope."""
    error = {"error": {"message": message, "type": "server_error", "code": code, "param": None}}
    return lambda _: http_reply(status, json.dumps(error).encode(), "application/json")


async def _read_request(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, OSError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (x.partition(":") for x in lines) if k.lower() == "content-length"
    )
    return dict(json.loads(await reader.readexactly(length)))


class StandInGenerator:
    """A generator on loopback that takes chat requests and answers only once told to (a busy
    engine), noting each request and each connection the gateway drops while it waits.
    Like llama.cpp it holds the whole response; with headers_first, like vLLM, it sends the
    headers at once and holds the body."""

    def __init__(self, reply: Reply, headers_first: bool = False) -> None:
        self.reply = reply
        self.headers_first = headers_first
        self.requests: list[dict[str, Any]] = []
        self.dropped = 0
        self.answering = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> StandInGenerator:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while (request := await _read_request(reader)) is not None:
                self.requests.append(request)
                unsent = self.reply(request)
                if self.headers_first:
                    body_at = unsent.index(b"\r\n\r\n") + 4
                    writer.write(unsent[:body_at])
                    unsent = unsent[body_at:]
                hung_up = asyncio.ensure_future(reader.read(1))
                told = asyncio.ensure_future(self.answering.wait())
                await asyncio.wait({hung_up, told}, return_when=asyncio.FIRST_COMPLETED)
                told.cancel()
                if hung_up.done():  # the gateway closed the connection while it waited
                    self.dropped += 1
                    return
                hung_up.cancel()
                writer.write(unsent)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            self._handlers.discard(handler)


@asynccontextmanager
async def served_gateway(stack: Stack, **overrides: Any) -> AsyncIterator[str]:
    """A gateway on a loopback port (uvicorn) that trusts the stack's Cognito pool and uses its
    retriever; yields its URL."""
    settings = stack_gateway_settings(stack, **overrides)
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "gateway did not start"
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def chat(stream: bool = True, question: str = "Say hello.") -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": question}],
        "stream": stream,
        "max_tokens": 8,
        "retrieval": {"enabled": False},
    }


def new_user(stack: Stack) -> str:
    """An access token of a new user of the stack's pool."""
    assert stack.pool is not None
    name = f"streams-{uuid.uuid4().hex[:10]}@example.com"
    return stack.pool.access_token(name, stack.pool.create_user(name))


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> list[str]:
    return [new_user(stack) for _ in range(3)]


@pytest.fixture(scope="module")
def reader(stack: Stack, gateway_url: str) -> tuple[str, str]:
    """A user whose only document is the observatory note: their token and its id."""
    token = new_user(stack)
    with httpx.Client(base_url=gateway_url, timeout=60, headers=bearer(token)) as client:
        created = client.post(
            "/v1/documents",
            files={"file": ("observatory.md", OBSERVATORY.encode(), "text/markdown")},
        )
        assert created.status_code == 202, created.text
        assert wait_until_ready(client, created.json()["id"])["status"] == "ready"
    return token, str(created.json()["id"])


def long_question() -> str:
    """Over 5,000 characters of notes pasted before the question, which comes last."""
    notes = " ".join(
        f"Note {n}: the sky over the valley was clear and the visitors stayed late."
        for n in range(80)
    )
    question = f"{notes}\n\nWith all that in mind: {ASK}"
    assert len(question) > 5000
    return question


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not streamed"])
async def test_a_client_that_leaves_before_the_first_byte_frees_its_slot_at_once(
    stack: Stack, tokens: list[str], stream: bool
) -> None:
    async with (
        StandInGenerator(answer("Hello there.")) as generator,
        served_gateway(stack, generator_url=generator.url, max_concurrent_streams=1) as url,
        httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(tokens[0])) as client,
    ):
        leaving = asyncio.create_task(client.post("/v1/chat/completions", json=chat(stream)))
        await until(lambda: len(generator.requests) == 1)  # queued at the busy generator
        leaving.cancel()  # the client gives up before any byte of the answer
        await asyncio.gather(leaving, return_exceptions=True)
        await until(lambda: generator.dropped == 1)  # the gateway drops its queued request
        generator.answering.set()
        # The user's one slot is free: the next chat is admitted (not 429) and answered.
        resp = await client.post("/v1/chat/completions", json=chat(stream))
        assert resp.status_code == 200, resp.text
        assert "Hello" in resp.text
        assert len(generator.requests) == 2


@pytest.mark.parametrize(
    "headers_first", [False, True], ids=["engine holds its headers", "engine sends headers first"]
)
async def test_past_the_global_bound_chats_get_a_fast_503_with_retry_after(
    stack: Stack, tokens: list[str], headers_first: bool
) -> None:
    async with (
        StandInGenerator(answer("Hello there."), headers_first) as generator,
        served_gateway(
            stack, generator_url=generator.url, max_waiting_chats=2, rate_limit_burst=100
        ) as url,
    ):
        first, second, third = (
            httpx.AsyncClient(base_url=url, timeout=5, headers=bearer(token)) for token in tokens
        )
        async with first, second, third:
            waiting = [
                asyncio.create_task(c.post("/v1/chat/completions", json=chat()))
                for c in (first, second)
            ]
            await until(lambda: len(generator.requests) == 2)
            latencies = []
            for n in range(50):  # streamed and not, one user who has no chat running
                began = time.perf_counter()
                shed = await third.post("/v1/chat/completions", json=chat(stream=n % 2 == 0))
                latencies.append(time.perf_counter() - began)
                assert shed.status_code == 503, shed.text
                error = shed.json()["error"]
                assert error["code"] == "overloaded" and error["type"] == "service_unavailable"
                assert error["message"] and error["param"] is None
                assert int(shed.headers["retry-after"]) >= 1
                # in milliseconds too (the openai SDKs read it first): no chat has waited
                # yet, so the longest, GATEWAY_OVERLOADED_RETRY_AFTER_S
                assert int(shed.headers["retry-after-ms"]) == 2000
            assert max(latencies) < 1.0
            assert len(generator.requests) == 2  # shed before retrieval or any upstream call
            p99 = statistics.quantiles(latencies, n=100)[98]
            print(
                f"\nshed at the global bound ({'headers first' if headers_first else 'held'}), "
                f"50 chats: median "
                f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
            )

            for task in waiting:  # the waiting chats' clients leave
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            await until(lambda: generator.dropped == 2)
            generator.answering.set()
            admitted = await third.post("/v1/chat/completions", json=chat())
            assert admitted.status_code == 200, admitted.text
            assert "Hello" in admitted.text


async def test_plain_answers_being_generated_do_not_count_against_the_bound(
    stack: Stack, tokens: list[str]
) -> None:
    """A chat that is not streamed stops waiting once it is sent: the generator answers it
    only when done, and its own queue bound (429) holds from there."""
    async with (
        StandInGenerator(answer("Hello there.")) as generator,
        served_gateway(
            stack, generator_url=generator.url, max_waiting_chats=2, rate_limit_burst=100
        ) as url,
    ):
        clients = [httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(t)) for t in tokens]
        try:
            generating = [
                asyncio.create_task(c.post("/v1/chat/completions", json=chat(stream=False)))
                for c in clients[:2]
            ]
            await until(lambda: len(generator.requests) == 2)
            third = asyncio.create_task(
                clients[2].post("/v1/chat/completions", json=chat(stream=False))
            )
            await until(lambda: len(generator.requests) == 3)  # admitted, not shed
            generator.answering.set()
            for resp in await asyncio.gather(*generating, third):
                assert resp.status_code == 200, resp.text
        finally:
            for client in clients:
                await client.aclose()


async def test_a_stream_the_generator_keeps_waiting_gets_keep_alives_then_its_error(
    stack: Stack, tokens: list[str]
) -> None:
    engine_down = refusal(503, "engine_down", "the inference engine is unavailable")
    async with (
        StandInGenerator(engine_down) as generator,
        served_gateway(stack, generator_url=generator.url, sse_keepalive_s=1.0) as url,
        httpx.AsyncClient(base_url=url, timeout=5, headers=bearer(tokens[1])) as client,
    ):
        async with client.stream("POST", "/v1/chat/completions", json=chat()) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = resp.aiter_lines()
            first = [line async for line in _take(lines, 4)]
            assert first == [": keep-alive", "", ": keep-alive", ""]
            assert len(generator.requests) == 1 and not generator.answering.is_set()
            generator.answering.set()  # the generator finally answers: with an error
            rest = [line async for line in lines]
        events = [line[len("data: ") :] for line in rest if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[0])["error"]
        assert error["code"] == "engine_down"
        assert error["message"] == "the inference engine is unavailable"
        assert not any('"choices"' in event for event in events)

        # An error that comes before the stream has started keeps its HTTP status.
        early = await client.post("/v1/chat/completions", json=chat())
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "engine_down"
        assert early.headers["retry-after"]


async def _take(lines: AsyncIterator[str], count: int) -> AsyncIterator[str]:
    for _ in range(count):
        yield await anext(lines)


def test_a_question_longer_than_the_search_cap_is_answered_with_citations(
    gateway_url: str, reader: tuple[str, str]
) -> None:
    token, doc_id = reader
    question = long_question()
    with httpx.Client(base_url=gateway_url, timeout=120, headers=bearer(token)) as client:
        resp = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 16,
                "temperature": 0,
            },
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    citations = resp.json()["citations"]
    assert citations and {c["document_id"] for c in citations} == {doc_id}
    assert "Marisol" in citations[0]["text"]


async def test_a_long_follow_up_is_searched_within_the_cap_and_sent_whole_to_the_generator(
    stack: Stack, reader: tuple[str, str]
) -> None:
    token, doc_id = reader
    question = long_question()
    messages = [
        {"role": "user", "content": "Tell me about the Quokka Valley Observatory."},
        {"role": "assistant", "content": "It is an observatory that welcomes visitors."},
        {"role": "user", "content": question},
    ]
    async with (
        StandInGenerator(answer("Quokka Valley Observatory main telescope name")) as generator,
        served_gateway(stack, generator_url=generator.url) as url,
        httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(token)) as client,
    ):
        generator.answering.set()
        resp = await client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 16}
        )
    assert resp.status_code == 200, resp.text
    assert {c["document_id"] for c in resp.json()["citations"]} == {doc_id}
    rewrite, final = generator.requests  # the follow-up was rewritten, then answered
    assert rewrite["max_tokens"] == 48
    assert final["messages"][-1]["content"] == question  # the whole question, not the query
    assert "Marisol" in final["messages"][0]["content"]  # the passage is in the prompt
