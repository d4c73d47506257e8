"""Per-user limits that hold across gateway tasks (GATEWAY_LIMITS_STORE=shared).

Two gateways built in-process (ASGI transport) share the stack's real retriever and its
PostgreSQL, as several gateway tasks behind a load balancer do: together they admit a
user's burst once, not once each, and cap the user's chats in progress together; a lease
left behind by a task that died stops counting after its lease time; with the retriever
unreachable or silent each gateway counts on its own and still answers. A small server on
loopback stands in for a busy generator; tokens, the retriever and the database are real.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from ragctl.stack import Stack, free_port
from services.gateway.app import create_app
from tests.conftest import stack_gateway_settings
from tests.test_gateway_streams import StandInGenerator, answer, bearer, chat, new_user, until

DEADLINE_S = 30.0  # for what happens in the background (a release, a lease's expiry)


@asynccontextmanager
async def gateway(stack: Stack, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway app in-process (ASGI transport, with its lifespan) in front of the stack's
    retriever, counting per-user limits in its database."""
    # A roomy rate unless a test sets one: the polls for a stream slot must not run out.
    given = {"limits_store": "shared", "rate_limit_burst": 1000, **overrides}
    settings = stack_gateway_settings(stack, **given)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60
        ) as client,
    ):
        yield client


async def admitted_once_free(client: httpx.AsyncClient, token: str) -> httpx.Response:
    """A plain chat, sent again while the user's stream slots are all taken (a slot given
    back elsewhere returns in the background)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        resp = await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers=bearer(token)
        )
        if resp.status_code != 429:
            return resp
        assert resp.json()["error"]["code"] == "too_many_streams", resp.text
        assert time.monotonic() < deadline, "the stream slot did not come back"
        await asyncio.sleep(0.05)


def assert_too_many_streams(resp: httpx.Response, cap: int) -> None:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "too_many_streams" and error["type"] == "rate_limit_error"
    assert error["message"] == f"at most {cap} chat completions at once"
    assert resp.headers["retry-after"] == "1"


def assert_rate_limited(resp: httpx.Response, per_minute: float) -> None:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert error["message"] == "rate limit exceeded"
    assert 1 <= int(resp.headers["retry-after"]) <= 60 / per_minute


def shared_limit_errors(call: str) -> float:
    value = REGISTRY.get_sample_value("gateway_shared_limits_errors_total", {"call": call})
    return value or 0.0


async def test_a_users_requests_across_two_gateways_get_one_burst(stack: Stack) -> None:
    token, other = new_user(stack), new_user(stack)
    errors = shared_limit_errors("request")
    # One token a minute: none comes back while the test runs.
    limits = {"rate_limit_burst": 5, "rate_limit_per_minute": 1}
    async with gateway(stack, **limits) as first, gateway(stack, **limits) as second:
        sent = [
            client.get("/v1/documents", headers=bearer(token))
            for _ in range(6)
            for client in (first, second)
        ]
        answers = await asyncio.gather(*sent)  # at once, half through each gateway
        assert sorted(resp.status_code for resp in answers) == [200] * 5 + [429] * 7
        for resp in answers:
            if resp.status_code == 429:
                assert_rate_limited(resp, 1)
        assert_rate_limited(await first.get("/v1/documents", headers=bearer(token)), 1)
        # another user has a bucket of their own, in either gateway
        for client in (first, second):
            resp = await client.get("/v1/documents", headers=bearer(other))
            assert resp.status_code == 200, resp.text
    assert shared_limit_errors("request") == errors  # all counted in the database


async def test_a_users_chats_in_progress_are_capped_across_two_gateways(stack: Stack) -> None:
    token, other = new_user(stack), new_user(stack)
    async with (
        StandInGenerator(answer("Hello there.")) as generator,
        gateway(stack, generator_url=generator.url, max_concurrent_streams=1) as first,
        gateway(stack, generator_url=generator.url, max_concurrent_streams=1) as second,
    ):
        held = asyncio.create_task(
            first.post("/v1/chat/completions", json=chat(), headers=bearer(token))
        )
        await until(lambda: len(generator.requests) == 1)  # in progress through the first
        for client in (second, first):
            refused = await client.post(
                "/v1/chat/completions", json=chat(stream=False), headers=bearer(token)
            )
            assert_too_many_streams(refused, 1)
        assert len(generator.requests) == 1  # refused before any upstream call
        # another user's chat is admitted meanwhile
        others = asyncio.create_task(
            second.post("/v1/chat/completions", json=chat(), headers=bearer(other))
        )
        await until(lambda: len(generator.requests) == 2)
        generator.answering.set()
        for resp in await asyncio.gather(held, others):
            assert resp.status_code == 200, resp.text
            assert "Hello" in resp.text
        # the slot the first gateway gave back is usable from the second
        resp = await admitted_once_free(second, token)
        assert resp.status_code == 200, resp.text
        assert "Hello" in resp.text


async def test_a_lease_older_than_its_lease_time_stops_counting(stack: Stack) -> None:
    """A gateway task that dies mid-chat never gives its lease back: another task admits the
    user's next chat once the lease's time has passed."""
    token = new_user(stack)
    async with (
        StandInGenerator(answer("Hello there.")) as generator,
        gateway(
            stack, generator_url=generator.url, max_concurrent_streams=1, stream_lease_s=3.0
        ) as crashing,
        gateway(stack, generator_url=generator.url, max_concurrent_streams=1) as other_task,
    ):
        held = asyncio.create_task(
            crashing.post("/v1/chat/completions", json=chat(), headers=bearer(token))
        )
        await until(lambda: len(generator.requests) == 1)
        refused = await other_task.post(
            "/v1/chat/completions", json=chat(stream=False), headers=bearer(token)
        )
        assert_too_many_streams(refused, 1)  # the lease counts (for its 3 s)
        admitted = asyncio.create_task(admitted_once_free(other_task, token))
        await until(lambda: len(generator.requests) == 2, DEADLINE_S)  # while the first runs
        assert not held.done()
        generator.answering.set()
        for resp in await asyncio.gather(held, admitted):
            assert resp.status_code == 200, resp.text


async def test_the_retriever_keeps_leases_per_user_under_the_service_token(stack: Stack) -> None:
    user = f"limits-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(
        base_url=stack.url("retriever"),
        timeout=10,
        headers={"Authorization": f"Bearer {stack.service_token}", "X-Tenant-Id": user},
    ) as retriever:

        async def acquire(lease_id: uuid.UUID, lease_s: float = 600) -> bool:
            resp = await retriever.post(
                "/limits/streams",
                json={"lease_id": str(lease_id), "max_streams": 2, "lease_s": lease_s},
            )
            assert resp.status_code == 200, resp.text
            return bool(resp.json()["admitted"])

        async def release(lease_id: uuid.UUID) -> None:
            resp = await retriever.delete(f"/limits/streams/{lease_id}", params={"lease_s": 600})
            assert resp.status_code == 204, resp.text

        held, short, late = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        assert await acquire(held)
        assert await acquire(short, lease_s=1.0)
        assert not await acquire(uuid.uuid4())  # two live leases: the cap
        deadline = time.monotonic() + DEADLINE_S
        while not await acquire(late):  # the short lease expires
            assert time.monotonic() < deadline, "an expired lease still counts"
            await asyncio.sleep(0.1)
        # A release that overtakes its acquire (the gateway stopped waiting) holds.
        overtaken = uuid.uuid4()
        await release(overtaken)
        await release(held)
        assert await acquire(overtaken)  # under the cap, but the lease stays released
        assert await acquire(uuid.uuid4())  # so one slot is still free
        assert not await acquire(uuid.uuid4())

        denied = await retriever.post(
            "/limits/requests",
            json={"per_minute": 1, "burst": 1},
            headers={"Authorization": "Bearer wrong"},
        )
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_service_token"
        taken = [
            (await retriever.post("/limits/requests", json={"per_minute": 1, "burst": 2})).json()
            for _ in range(3)
        ]
        assert [t["admitted"] for t in taken] == [True, True, False]
        assert 0 < taken[2]["retry_after_s"] <= 60


class SilentServer:
    """A retriever that takes connections and requests and never answers."""

    async def __aenter__(self) -> SilentServer:
        self._writers: list[asyncio.StreamWriter] = []
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        while await reader.read(65536):
            pass

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and drop the connections held (the requests on them fail)."""
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


class RefusingPort:
    """A retriever address where nothing listens."""

    def __init__(self) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"

    async def __aenter__(self) -> RefusingPort:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("kind", ["refused", "silent"])
async def test_without_the_shared_store_each_gateway_counts_on_its_own(
    stack: Stack, kind: str
) -> None:
    token, streamer = new_user(stack), new_user(stack)
    errors = {call: shared_limit_errors(call) for call in ("request", "stream")}
    async with (
        StandInGenerator(answer("Hello there.")) as generator,
        RefusingPort() if kind == "refused" else SilentServer() as retriever,
        gateway(
            stack,
            retriever_url=retriever.url,
            generator_url=generator.url,
            limits_timeout_s=0.2,
            rate_limit_burst=3,
            rate_limit_per_minute=1,
            max_concurrent_streams=1,
        ) as client,
    ):
        # The stream cap, counted here: a second chat of the user's is refused meanwhile.
        held = asyncio.create_task(
            client.post("/v1/chat/completions", json=chat(), headers=bearer(streamer))
        )
        await until(lambda: len(generator.requests) == 1, DEADLINE_S)
        refused = await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers=bearer(streamer)
        )
        assert_too_many_streams(refused, 1)
        generator.answering.set()
        assert (await held).status_code == 200
        assert (await admitted_once_free(client, streamer)).status_code == 200
        # The rate, counted here: the burst, then 429.
        for _ in range(3):
            resp = await client.post(
                "/v1/chat/completions", json=chat(stream=False), headers=bearer(token)
            )
            assert resp.status_code == 200, resp.text
        assert_rate_limited(
            await client.post(
                "/v1/chat/completions", json=chat(stream=False), headers=bearer(token)
            ),
            1,
        )
        await retriever.close()  # the releases still waiting on it fail now, not at their timeout
    assert shared_limit_errors("request") >= errors["request"] + 7
    assert shared_limit_errors("stream") >= errors["stream"] + 6
