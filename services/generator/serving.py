"""Forwarding OpenAI requests to the engine's own server, within the bound on requests."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import Gauge

from services.common.errors import APIError, upstream_error
from services.common.relay import (
    CLIENT_CLOSED_REQUEST,
    ClientGone,
    ClosingStreamingResponse,
    EngineClient,
    EngineUnavailable,
    close_if_abandoned,
    unless_client_leaves,
)
from services.generator.settings import GeneratorSettings

IN_FLIGHT = Gauge("generator_requests_in_flight", "Requests at the engine or waiting for it")


class EngineSlot:
    """One request's place at the engine (running or queued there), held until release()."""

    __slots__ = ("client", "_slots", "_released")

    def __init__(self, client: EngineClient, slots: EngineSlots) -> None:
        self.client = client
        self._slots = slots
        self._released = False

    def release(self) -> None:
        """Give the place back; idempotent."""
        if not self._released:
            self._released = True
            self._slots.in_use -= 1
            IN_FLIGHT.set(self._slots.in_use)


class EngineSlots:
    """Requests at the engine or waiting for it, up to limit; past it, 429."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_use = 0

    def take(self, client: EngineClient) -> EngineSlot:
        """A place for one more request; counted at once (no await), so bursts keep the bound."""
        if self.in_use >= self.limit:
            raise APIError(
                429,
                f"{self.limit} requests are in progress or queued; retry shortly",
                code="overloaded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.in_use += 1
        IN_FLIGHT.set(self.in_use)
        return EngineSlot(client, self)


async def forward_to_engine(
    request: Request, slot: EngineSlot, settings: GeneratorSettings, path: str
) -> Response:
    """Send the request's JSON body to the engine as our served model; relay its answer,
    streamed or whole. The slot is released when the answer ends, however it ends."""
    try:
        payload: dict[str, Any] = await request.json()
    except ValueError as exc:
        slot.release()
        raise APIError(400, "request body must be JSON") from exc
    if not isinstance(payload, dict):
        slot.release()
        raise APIError(400, "request body must be a JSON object")
    payload["model"] = settings.served_model_name

    # A client that leaves while the engine queues its request (or, not streamed, while
    # it generates) takes its place with it, not when the engine gets to it.
    posting = asyncio.create_task(
        asyncio.wait_for(slot.client.post(path, payload), settings.request_timeout_s)
    )
    try:
        await unless_client_leaves(request, posting)
        resp = posting.result()
    except ClientGone:
        close_if_abandoned(posting)
        slot.release()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except (EngineUnavailable, TimeoutError) as exc:
        slot.release()
        raise APIError(503, "the inference engine is unavailable", code="engine_down") from exc
    except BaseException:  # cancelled (shutting down): the engine must see us leave
        posting.cancel()
        close_if_abandoned(posting)
        slot.release()
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
            slot.release()
        if resp.status_code != 200:
            raise upstream_error(
                resp.status_code,
                body,
                "inference engine",
                peer="engine",
                code_prefix="engine",
                retry_after=str(settings.overloaded_retry_after_s),
            )
        return Response(body, media_type="application/json")

    async def close() -> None:
        # Dropping the upstream connection when the client goes away makes the engine
        # cancel the generation and free its slot.
        await resp.aclose()
        slot.release()

    return ClosingStreamingResponse(resp.aiter_bytes(), on_close=close)
