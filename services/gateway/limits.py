"""Per-user limits (a token bucket on requests, a cap on concurrent chat streams) and one
bound across users: chats admitted that the generator has not begun to answer.

Kept in this gateway task's memory: with N gateway tasks behind the load balancer a user
gets up to N times the rate. A shared store (ElastiCache) is the step up when that matters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from services.common.errors import APIError

CHATS_WAITING = Gauge(
    "gateway_chats_waiting", "Chats admitted that the generator has not begun to answer"
)
CHATS_SHED = Counter("gateway_chats_shed_total", "Chats answered 503 because too many were waiting")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self, per_minute: float, burst: int, max_streams: int, max_users: int = 100_000
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self.max_streams = max_streams
        self.max_users = max_users
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}
        self.waiting_chats = 0

    def check(self, user: str) -> None:
        """Take one request's token, or answer 429 saying when the next one comes."""
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
            wait = math.ceil((1 - bucket.tokens) / self.rate)
            raise APIError(
                429, "rate limit exceeded", code="rate_limited", headers={"Retry-After": str(wait)}
            )
        bucket.tokens -= 1

    def open_stream(self, user: str) -> None:
        if self._streams.get(user, 0) >= self.max_streams:
            raise APIError(
                429,
                f"at most {self.max_streams} chat completions at once",
                code="too_many_streams",
                headers={"Retry-After": "1"},
            )
        self._streams[user] = self._streams.get(user, 0) + 1

    def close_stream(self, user: str) -> None:
        left = self._streams.get(user, 1) - 1
        if left > 0:
            self._streams[user] = left
        else:
            self._streams.pop(user, None)

    def admit_chat(self, user: str, max_waiting: int, retry_after_s: int) -> ChatAdmission:
        """Take the user's stream slot and a place among the chats waiting for the generator,
        or answer at once: 429 over the user's own cap, 503 when max_waiting chats wait."""
        self.open_stream(user)
        if self.waiting_chats >= max_waiting:
            self.close_stream(user)
            CHATS_SHED.inc()
            raise APIError(
                503,
                "the service is busy answering other chats; retry shortly",
                code="overloaded",
                headers={"Retry-After": str(retry_after_s)},
            )
        self.waiting_chats += 1
        CHATS_WAITING.set(self.waiting_chats)
        return ChatAdmission(self, user)


class ChatAdmission:
    """One admitted chat: its user's stream slot for as long as it runs, and a place among
    the waiting chats until the generator begins to answer. Each is given back once."""

    def __init__(self, limiter: RateLimiter, user: str) -> None:
        self._limiter, self._user = limiter, user
        self._waiting = self._open = True

    def answered(self) -> None:
        """The generator began to answer (or never will): the chat no longer waits."""
        if self._waiting:
            self._waiting = False
            self._limiter.waiting_chats -= 1
            CHATS_WAITING.set(self._limiter.waiting_chats)

    def release(self) -> None:
        """The chat is over, however it ended: give back its place and the user's slot."""
        self.answered()
        if self._open:
            self._open = False
            self._limiter.close_stream(self._user)
