"""Gateway wire hygiene: a retriever connection the peer closed, upload media types, and
request bodies that never arrive. The gateway runs on a real loopback HTTP server (uvicorn)
with the stack's real Cognito tokens."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from ragctl.stack import Stack, free_port
from services.gateway.app import create_app
from tests.conftest import stack_gateway_settings

BODY_IDLE_TIMEOUT_S = 3.0  # small, so a stalled body is answered quickly
RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP reset


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Seen:
    """A request as the stand-in retriever read it."""

    method: str
    path: str
    tenant: str


@dataclass
class ClosingRetriever:
    """A retriever stand-in on loopback that answers the first request on each connection,
    then closes that kept-alive connection as the next request arrives on it, unanswered: the
    close of an idle connection crossing the gateway's next call on the wire (uvicorn's
    keep-alive timer, or its close after a 500). reset=True closes with a TCP reset."""

    reset: bool
    drop_all: bool = False  # close every connection unanswered, new ones too
    answered: list[Seen] = field(default_factory=list)
    dropped: list[Seen] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            first = True
            while request := await self.read_request(reader):
                if not first or self.drop_all:
                    self.dropped.append(request)
                    if self.reset:
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
                    break
                first = False
                self.answered.append(request)
                body = self.answer_for(request)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        finally:
            writer.close()

    @staticmethod
    async def read_request(reader: asyncio.StreamReader) -> Seen | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines if line)
        }
        await reader.readexactly(int(headers.get("content-length", "0")))
        method, target, _ = request_line.split(" ")
        return Seen(method, target.split("?")[0], headers.get("x-tenant-id", ""))

    @staticmethod
    def answer_for(request: Seen) -> bytes:
        if request.path == "/documents" and request.method == "GET":
            return json.dumps({"data": [], "next_cursor": None}).encode()
        if request.path == "/search":
            return json.dumps({"data": []}).encode()
        return json.dumps(
            {
                "id": str(uuid.uuid4()),
                "title": "t",
                "status": "pending",
                "created_at": "2025-01-01T00:00:00Z",
            }
        ).encode()


@asynccontextmanager
async def closing_retriever(reset: bool) -> AsyncIterator[ClosingRetriever]:
    retriever = ClosingRetriever(reset=reset)
    server = await asyncio.start_server(retriever.serve_connection, "127.0.0.1", 0)
    retriever.port = server.sockets[0].getsockname()[1]
    try:
        yield retriever
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Gateway:
    url: str
    port: int

    def client(self, token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=bearer(token), timeout=60)


@asynccontextmanager
async def served_gateway(stack: Stack, **overrides: Any) -> AsyncIterator[Gateway]:
    """The gateway on a real loopback HTTP server, trusting the stack's Cognito pool."""
    settings = stack_gateway_settings(stack, **overrides)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):  # about 10 s
            if server.started:
                break
            assert not task.done(), "gateway did not start"
            await asyncio.sleep(0.05)
        assert server.started, "gateway did not start"
        yield Gateway(f"http://127.0.0.1:{port}", port)
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_retriever_closing_a_kept_alive_connection_costs_the_next_user_nothing(
    stack: Stack, dev_token: str, other_token: str, reset: bool
) -> None:
    async with (
        closing_retriever(reset) as retriever,
        served_gateway(stack, retriever_url=retriever.url) as gateway,
        gateway.client(dev_token) as first_user,
        gateway.client(other_token) as next_user,
    ):
        warm = await first_user.get("/v1/documents")
        assert warm.status_code == 200, warm.text
        listed = await next_user.get("/v1/documents")
        assert listed.status_code == 200, listed.text
        assert listed.json() == {"data": [], "next_cursor": None}
        searched = await first_user.post("/v1/search", json={"query": "pumps"})
        assert searched.status_code == 200, searched.text
        assert searched.json() == {"data": []}

    answered = [(seen.method, seen.path) for seen in retriever.answered]
    # Each call was processed exactly once: the copy on the closed connection never was.
    assert answered == [("GET", "/documents"), ("GET", "/documents"), ("POST", "/search")]
    assert [(seen.method, seen.path) for seen in retriever.dropped] == answered[1:]
    assert retriever.answered[1].tenant == retriever.dropped[0].tenant != ""
    assert retriever.answered[1].tenant != retriever.answered[0].tenant


async def test_a_retriever_that_closes_every_connection_unanswered_is_a_503(
    stack: Stack, dev_token: str
) -> None:
    async with (
        closing_retriever(reset=False) as retriever,
        served_gateway(stack, retriever_url=retriever.url) as gateway,
        gateway.client(dev_token) as user,
    ):
        assert (await user.get("/v1/documents")).status_code == 200
        retriever.answered.clear()
        retriever.drop_all = True
        resp = await user.get("/v1/documents")
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "retriever_unavailable"
    # Sent on the kept-alive connection, then once more on a new one: never a third time.
    assert len(retriever.dropped) == 2
    assert retriever.answered == []


async def test_an_upload_media_type_is_matched_exactly(stack: Stack, dev_token: str) -> None:
    async with (
        closing_retriever(reset=False) as retriever,
        served_gateway(stack, retriever_url=retriever.url) as gateway,
        gateway.client(dev_token) as user,
    ):
        body = json.dumps({"title": "t", "text": "Oil the pump."})
        for content_type in ("application/jsonfoo", "application/json-seq", "text/plain"):
            resp = await user.post(
                "/v1/documents", content=body, headers={"Content-Type": content_type}
            )
            assert resp.status_code == 415, (content_type, resp.text)
            assert resp.json()["error"]["message"]
    assert retriever.answered == [], "the gateway forwarded an upload it should refuse"


async def test_json_with_parameters_and_any_case_and_multipart_uploads_are_accepted(
    stack: Stack, dev_token: str
) -> None:
    async with served_gateway(stack) as gateway, gateway.client(dev_token) as user:
        for content_type in ("application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
            text = f"The pump {uuid.uuid4()} needs oil every spring."
            resp = await user.post(
                "/v1/documents",
                content=json.dumps({"title": "Pumps", "text": text}),
                headers={"Content-Type": content_type},
            )
            assert resp.status_code == 202, (content_type, resp.text)
            assert resp.json()["status"] == "pending"
        text = f"The valve {uuid.uuid4()} is checked weekly."
        resp = await user.post(
            "/v1/documents", files={"file": ("valves.txt", text.encode(), "text/plain")}
        )
        assert resp.status_code == 202, resp.text
        assert resp.request.headers["content-type"].startswith("multipart/form-data; boundary=")


async def send_stalled_request(gateway: Gateway, token: str, body_sent: bytes) -> bytes:
    """Send headers announcing a 1000-byte body and then only body_sent; what comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            b"POST /v1/search HTTP/1.1\r\nHost: gateway\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n%s" % (token.encode(), body_sent)
        )
        await writer.drain()
        # Read to the end: the gateway closes the connection after its answer.
        return await asyncio.wait_for(reader.read(), timeout=BODY_IDLE_TIMEOUT_S + 10)
    finally:
        writer.close()


def status_and_error(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


async def test_a_body_that_never_arrives_gets_408_while_others_are_served(
    stack: Stack, dev_token: str, other_token: str
) -> None:
    async with (
        served_gateway(stack, body_idle_timeout_s=BODY_IDLE_TIMEOUT_S) as gateway,
        gateway.client(other_token) as other_user,
    ):
        assert (await other_user.get("/v1/documents")).status_code == 200
        headers_only = asyncio.create_task(send_stalled_request(gateway, dev_token, b""))
        midway = asyncio.create_task(send_stalled_request(gateway, dev_token, b'{"query": "pu'))
        listed = await other_user.get("/v1/documents")
        assert listed.status_code == 200, listed.text
        assert not headers_only.done() and not midway.done(), "answered before the timeout"
        for raw in (await headers_only, await midway):
            status, error = status_and_error(raw)
            assert status == 408, raw
            assert error["code"] == "body_timeout"
            assert error["message"]
