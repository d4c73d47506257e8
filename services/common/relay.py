"""A lean HTTP/1.1 client for streaming hops between services (gateway -> generator ->
engine).

Every generated token crosses these hops as one SSE event, so the cost per event matters
on a CPU host where the engine's threads want every core. This client parses responses with
httptools (C) and hands body bytes through as they arrive, where a general-purpose client
adds several layers of Python per event. Connections are kept alive and reused; a response
that is not read to its end (the client went away) closes its connection, which makes the
engine cancel the generation and free its slot. Plain HTTP only: internal hops.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.common.observability import request_id_var


class EngineUnavailable(Exception):
    pass


@dataclass
class _Response:
    status: int = 0
    body: deque[bytes] = field(default_factory=deque)
    headers_done: bool = False
    complete: bool = False

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body.append(bytes(data))

    def on_message_complete(self) -> None:
        self.complete = True


class EngineResponse:
    """A response whose body is read incrementally; call aclose() when done with it."""

    def __init__(
        self,
        client: EngineClient,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: _Response,
        parser: httptools.HttpResponseParser,
    ) -> None:
        self._client, self._reader, self._writer = client, reader, writer
        self._state, self._parser = state, parser
        self.status_code = state.status
        self._closed = False

    async def _fill(self) -> None:
        try:
            data = await self._reader.read(65536)
            if not data:
                raise EngineUnavailable("the engine closed the connection")
            self._parser.feed_data(data)
        except (OSError, httptools.HttpParserError) as exc:
            raise EngineUnavailable(str(exc)) from exc

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while True:
            while self._state.body:
                yield self._state.body.popleft()
            if self._state.complete:
                return
            await self._fill()

    async def aread(self) -> bytes:
        return b"".join([part async for part in self.aiter_bytes()])

    async def aclose(self) -> None:
        """Idempotent: a read-to-the-end response returns its connection to the pool."""
        if self._closed:
            return
        self._closed = True
        if self._state.complete and not self._state.body and self._parser.should_keep_alive():
            self._client._release(self._reader, self._writer)
        else:  # unread body: drop the connection, so the engine stops generating
            self._writer.close()


class EngineClient:
    def __init__(self, host: str, port: int, max_idle: int = 64) -> None:
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._max_idle = max_idle

    def _release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._idle) < self._max_idle and not writer.is_closing():
            self._idle.append((reader, writer))
        else:
            writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise EngineUnavailable(str(exc)) from exc
        return reader, writer, False

    @classmethod
    def from_url(cls, url: str) -> EngineClient:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"need an http://host:port URL, not {url!r}")
        return cls(parts.hostname, parts.port or 80)

    async def post(self, path: str, payload: dict[str, Any]) -> EngineResponse:
        """Send a JSON POST (with the request id); return once the response headers are in."""
        body = json.dumps(payload).encode()
        rid = request_id_var.get()
        extra = f"X-Request-Id: {rid}\r\n" if rid != "-" else ""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        for attempt in range(2):  # a reused keep-alive connection may have been closed
            reader, writer, reused = await self._connect()
            state = _Response()
            parser = httptools.HttpResponseParser(state)
            try:
                writer.write(head.encode() + body)
                while not state.headers_done:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionResetError("closed before the response")
                    parser.feed_data(data)
            except (OSError, httptools.HttpParserError) as exc:
                writer.close()
                if reused and attempt == 0:
                    continue
                raise EngineUnavailable(str(exc)) from exc
            except BaseException:  # cancelled (a timeout): the engine must see us leave
                writer.close()
                raise
            state.status = parser.get_status_code()
            return EngineResponse(self, reader, writer, state, parser)
        raise EngineUnavailable("no connection to the engine")

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


CLIENT_CLOSED_REQUEST = 499  # the status logged for a request whose client left before its answer


class ClientGone(Exception):
    """The client disconnected before its answer started."""


async def _client_disconnected(request: Request) -> None:
    """Return once the client has gone; its body is read, so the next message says when."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(
    request: Request, work: asyncio.Task[Any], timeout_s: float | None = None
) -> bool:
    """Wait up to timeout_s for work (a request's body must be read already); True once it
    is done. If the client disconnects first, cancel work and raise ClientGone: a request
    queued upstream is dropped (EngineClient.post closes its socket) instead of holding a
    place until the engine reaches it."""
    leaving = asyncio.ensure_future(_client_disconnected(request))
    try:
        await asyncio.wait({work, leaving}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
    if work.done():
        return True
    if leaving.done() and not leaving.cancelled():
        leaving.exception()  # a failed receive counts as a disconnect too
        work.cancel()
        raise ClientGone
    return False


def close_if_abandoned(task: asyncio.Task[Any]) -> None:
    """Once task ends, close the EngineResponse it returned: nobody will read it (its caller
    left or was cancelled while it finished), and an open one keeps the engine generating."""

    def close(done: asyncio.Task[Any]) -> None:
        if not done.cancelled() and done.exception() is None:
            resp = done.result()
            if isinstance(resp, EngineResponse):
                asyncio.ensure_future(resp.aclose())

    task.add_done_callback(close)


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that runs `on_close` however it ends, even when the client is
    gone before the body generator ever started (its own `finally` would not run then)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
            **kwargs,
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
