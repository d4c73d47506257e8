"""Per-user limits (a token bucket on requests, a cap on concurrent chat streams) and one
bound across users: chats admitted that the generator has not begun to answer.

The per-user counts live where GATEWAY_LIMITS_STORE says: in this task's memory ("local",
one gateway task), or in the retriever's PostgreSQL database ("shared"), which every gateway
task behind the load balancer asks, so N tasks still allow a user one rate and one cap, not
N of them. No store beyond the database the platform already has: the retriever keeps the
counts (services/retriever/limits.py), since only it reaches the database. When the shared
store fails or is slow, that request is counted by this task alone (and in
gateway_shared_limits_errors_total): the limiter never fails a request on its own account.

The bound on waiting chats stays per task: it protects this task's own capacity (the chats
it holds open while they queue for the generator), which no other task shares.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Counter, Gauge

from services.common.errors import APIError, retry_after_headers
from services.common.protocol import RequestTokenRequest, StreamLeaseRequest
from services.gateway.upstream import RetrieverClient

logger = logging.getLogger(__name__)

CHATS_WAITING = Gauge(
    "gateway_chats_waiting", "Chats admitted that the generator has not begun to answer"
)
WAITING_BOUND = Gauge(
    "gateway_chats_waiting_bound",
    "The bound on waiting chats that the recent queue delay sets (GATEWAY_MAX_QUEUE_WAIT_S)",
)
CHATS_SHED = Counter("gateway_chats_shed_total", "Chats answered 503 because too many were waiting")
SHARED_LIMITS_ERRORS = Counter(
    "gateway_shared_limits_errors_total",
    "Calls to the shared limits store that failed or timed out: a request or stream counted "
    "by this task alone, or a release that leaves its lease to expire",
    ["call"],
)
MIN_RETRY_AFTER_S = 0.1  # the soonest a shed chat is asked to come back
BASELINE_CHATS = 64  # the last chats begun whose least wait is the wait without a queue
BOUND_DECREASE = 0.8  # the waiting-chats bound's cut after a chat delayed too long
WAIT_SMOOTHING = 0.2  # weight of the latest chat in the recent wait for the generator
RELEASE_TIMEOUT_S = 5.0  # a release is off the request path: it may wait longer than a check
RELEASE_ATTEMPTS = 2
SHUTDOWN_WAIT_S = 5.0  # for releases still under way when the task stops

T = TypeVar("T")


class SharedLimitsUnavailable(RuntimeError):
    """The shared store did not answer in time, or answered nonsense."""


def rate_limited(wait_s: float) -> APIError:
    return APIError(
        429, "rate limit exceeded", code="rate_limited", headers=retry_after_headers(wait_s)
    )


def too_many_streams(max_streams: int) -> APIError:
    return APIError(
        429,
        f"at most {max_streams} chat completions at once",
        code="too_many_streams",
        headers=retry_after_headers(1.0),
    )


def overloaded(wait_s: float) -> APIError:
    return APIError(
        503,
        "the service is busy answering other chats; retry shortly",
        code="overloaded",
        headers=retry_after_headers(wait_s),
    )


class SharedLimits:
    """The per-user counts in the retriever's database; a call that fails or takes longer than
    timeout_s raises SharedLimitsUnavailable."""

    def __init__(self, retriever: RetrieverClient, timeout_s: float, lease_s: float) -> None:
        self.retriever = retriever
        self.timeout_s = timeout_s
        self.lease_s = lease_s

    async def _call(self, call: Awaitable[T], timeout_s: float) -> T:
        try:
            async with asyncio.timeout(timeout_s):
                return await call
        except Exception as exc:  # whatever went wrong there, the caller counts locally
            raise SharedLimitsUnavailable(str(exc) or type(exc).__name__) from exc

    async def take_request(self, user: str, per_minute: float, burst: int) -> float | None:
        """None when the user's request is admitted, else the seconds until their next token."""

        async def take() -> float | None:
            body = RequestTokenRequest(per_minute=per_minute, burst=burst)
            result = await self.retriever.take_request_token(user, body)
            return None if result.admitted else result.retry_after_s

        return await self._call(take(), self.timeout_s)

    async def acquire_stream(self, user: str, lease_id: uuid.UUID, max_streams: int) -> bool:
        """Whether the user was under max_streams live leases and now holds lease_id."""

        async def acquire() -> bool:
            body = StreamLeaseRequest(
                lease_id=lease_id, max_streams=max_streams, lease_s=self.lease_s
            )
            return (await self.retriever.acquire_stream_lease(user, body)).admitted

        return await self._call(acquire(), self.timeout_s)

    async def release_stream(self, user: str, lease_id: uuid.UUID) -> None:
        """Give the lease back; holds even if its acquire has not reached the database yet."""
        await self._call(
            self.retriever.release_stream_lease(user, lease_id, self.lease_s), RELEASE_TIMEOUT_S
        )


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Per-user limits, counted in this task or, with shared set, in the shared store (this
    task's counts standing in whenever that fails)."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        max_streams: int,
        max_users: int = 100_000,
        shared: SharedLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.burst = burst
        self.max_streams = max_streams
        self.max_users = max_users
        self.shared = shared
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}
        self._releases: set[asyncio.Task[None]] = set()
        self._store_down = False
        self.clock = clock
        self.waiting_chats = 0
        # When each waiting chat was admitted (by admission number), oldest first.
        self._waiting_since: dict[int, float] = {}
        self._admissions = 0
        # How long admitted chats have lately waited for the generator to begin (a moving
        # average over the chats it began): what a shed chat is asked to wait.
        self.recent_wait_s: float | None = None
        # The waits of the last chats begun: their least is the wait without a queue
        # (retrieval and prefill), so a wait past it is the queue's delay.
        self._recent_waits: deque[float] = deque(maxlen=BASELINE_CHATS)
        # The bound on waiting chats that the queue's delay sets (AIMD, as TCP's window): a
        # chat begun within max_wait_s of delay raises it by 1/bound, one delayed longer
        # cuts it by a fifth. It settles where admitted chats are delayed about max_wait_s,
        # and a burst meets it at once (a count), before the waits have grown.
        self.waiting_bound: float | None = None
        self._last_cut_at = -math.inf
        self._max_wait_s: float | None = None
        self._max_waiting = 0

    async def check(self, user: str) -> None:
        """Take one request's token, or answer 429 saying when the next one comes."""
        if self.shared is not None:
            try:
                wait_s = await self.shared.take_request(user, self.per_minute, self.burst)
            except SharedLimitsUnavailable as exc:
                self._store_failed("request", exc)
            else:
                self._store_answered()
                if wait_s is not None:
                    raise rate_limited(wait_s)
                return
        self._check_local(user)

    def _check_local(self, user: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= self.max_users:  # forget the idlest half
                for key, _ in sorted(self._buckets.items(), key=lambda kv: kv[1].updated)[
                    : self.max_users // 2
                ]:
                    del self._buckets[key]
            bucket = self._buckets[user] = _Bucket(tokens=self.burst, updated=now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            raise rate_limited((1 - bucket.tokens) / self.rate)
        bucket.tokens -= 1

    async def open_stream(self, user: str) -> uuid.UUID | None:
        """Take one of the user's stream slots, or answer 429: a shared lease (its id), or
        this task's count (None) when there is no shared store or it failed."""
        if self.shared is not None:
            lease_id = uuid.uuid4()
            try:
                admitted = await self.shared.acquire_stream(user, lease_id, self.max_streams)
            except SharedLimitsUnavailable as exc:
                self._store_failed("stream", exc)
                self._release_later(user, lease_id)  # in case the acquire lands after all
            except BaseException:
                self._release_later(user, lease_id)  # cancelled: it may have been taken
                raise
            else:
                self._store_answered()
                if not admitted:
                    raise too_many_streams(self.max_streams)
                return lease_id
        if self._streams.get(user, 0) >= self.max_streams:
            raise too_many_streams(self.max_streams)
        self._streams[user] = self._streams.get(user, 0) + 1
        return None

    def close_stream(self, user: str, lease_id: uuid.UUID | None) -> None:
        """Give back what open_stream took (a shared lease goes back in the background)."""
        if lease_id is not None:
            self._release_later(user, lease_id)
            return
        left = self._streams.get(user, 1) - 1
        if left > 0:
            self._streams[user] = left
        else:
            self._streams.pop(user, None)

    def queue_too_long(self, max_waiting: int, max_wait_s: float | None) -> bool:
        """Whether a chat arriving now would be delayed too long by the chats ahead of it:
        max_waiting wait already, or (with max_wait_s) as many as the delay-set bound, or
        the oldest of them is already delayed max_wait_s past the wait without a queue. The
        delay, not a count, is what holds across engines: the same setting suits llama.cpp's
        2 slots on a CPU and vLLM's 16 on a GPU."""
        if self.waiting_chats >= max_waiting:
            return True
        if max_wait_s is None or not self._waiting_since:
            return False  # with nobody waiting, the next chat is the one to measure
        if self.waiting_bound is not None and self.waiting_chats >= self.waiting_bound:
            return True
        oldest = next(iter(self._waiting_since.values()))
        return self.clock() - oldest - self._unqueued_wait_s() >= max_wait_s

    def _unqueued_wait_s(self) -> float:
        return min(self._recent_waits, default=0.0)

    async def admit_chat(
        self,
        user: str,
        max_waiting: int,
        retry_after_s: float,
        max_wait_s: float | None = None,
    ) -> ChatAdmission:
        """Take the user's stream slot and a place among the chats waiting for the generator,
        or answer at once: 429 over the user's own cap, 503 when the queue is too long (see
        queue_too_long). The 503 asks to come back after the recent wait, at most
        retry_after_s."""
        lease_id = await self.open_stream(user)
        self._max_wait_s, self._max_waiting = max_wait_s, max_waiting  # for _began's bound
        if self.queue_too_long(max_waiting, max_wait_s):
            self.close_stream(user, lease_id)
            CHATS_SHED.inc()
            wait_s = retry_after_s if self.recent_wait_s is None else self.recent_wait_s
            raise overloaded(min(max(wait_s, MIN_RETRY_AFTER_S), retry_after_s))
        self.waiting_chats += 1
        self._admissions += 1
        self._waiting_since[self._admissions] = self.clock()
        CHATS_WAITING.set(self.waiting_chats)
        return ChatAdmission(self, user, lease_id, self._admissions)

    def _began(self, admission: int, measured: bool) -> None:
        """A waiting chat is waiting no more. measured: the generator began to answer it,
        and its wait counts; not measured: it was handed over before the engine's queue (a
        chat not streamed) or it ended first (refused, failed, its client gone)."""
        admitted = self._waiting_since.pop(admission)
        self.waiting_chats -= 1
        CHATS_WAITING.set(self.waiting_chats)
        if not measured:
            return
        now = self.clock()
        waited = now - admitted
        previous = self.recent_wait_s
        self.recent_wait_s = (
            waited if previous is None else previous + WAIT_SMOOTHING * (waited - previous)
        )
        self._recent_waits.append(waited)
        if self._max_wait_s is None:
            return
        bound = self.waiting_bound or float(self._max_waiting)
        if waited - self._unqueued_wait_s() > self._max_wait_s:
            # Once per round, as TCP halves its window once per round trip: the chats
            # admitted before the last cut met the queue that cut answered already.
            if admitted >= self._last_cut_at:
                bound = max(1.0, bound * BOUND_DECREASE)
                self._last_cut_at = now
        else:
            bound = min(float(self._max_waiting), bound + 1.0 / bound)
        self.waiting_bound = bound
        WAITING_BOUND.set(bound)

    def _release_later(self, user: str, lease_id: uuid.UUID) -> None:
        task = asyncio.get_running_loop().create_task(self._release(user, lease_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, user: str, lease_id: uuid.UUID) -> None:
        assert self.shared is not None
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            try:
                await self.shared.release_stream(user, lease_id)
                return
            except SharedLimitsUnavailable as exc:
                if attempt == RELEASE_ATTEMPTS:
                    SHARED_LIMITS_ERRORS.labels("release").inc()
                    logger.warning(
                        "a stream lease was not released (%s); it stops counting after "
                        "GATEWAY_STREAM_LEASE_S",
                        exc,
                    )
                    return
                await asyncio.sleep(0.5)

    async def aclose(self) -> None:
        """Let releases under way finish (for a while) before the retriever client closes."""
        if self._releases:
            _, late = await asyncio.wait(set(self._releases), timeout=SHUTDOWN_WAIT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _store_failed(self, call: str, exc: Exception) -> None:
        SHARED_LIMITS_ERRORS.labels(call).inc()
        if not self._store_down:
            self._store_down = True
            logger.warning(
                "the shared limits store failed (%s); counting in this task until it answers",
                exc,
            )

    def _store_answered(self) -> None:
        if self._store_down:
            self._store_down = False
            logger.info("the shared limits store answers again")


class ChatAdmission:
    """One admitted chat: its user's stream slot for as long as it runs, and a place among
    the waiting chats until the generator begins to answer. Each is given back once."""

    def __init__(
        self, limiter: RateLimiter, user: str, lease_id: uuid.UUID | None, number: int
    ) -> None:
        self._limiter, self._user, self._lease_id = limiter, user, lease_id
        self._number = number
        self._waiting = self._open = True

    def answered(self) -> None:
        """The generator began to answer (its first event): the chat no longer waits, and
        how long it waited counts towards the bound."""
        self._stop_waiting(measured=True)

    def sent(self) -> None:
        """A chat not streamed was handed to the generator, whose own bound holds from
        there: it no longer waits here, and its wait (retrieval alone) does not count."""
        self._stop_waiting(measured=False)

    def _stop_waiting(self, measured: bool) -> None:
        if self._waiting:
            self._waiting = False
            self._limiter._began(self._number, measured)

    def release(self) -> None:
        """The chat is over, however it ended: give back its place and the user's slot."""
        self._stop_waiting(measured=False)
        if self._open:
            self._open = False
            self._limiter.close_stream(self._user, self._lease_id)
