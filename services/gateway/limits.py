"""Per-user limits: a token bucket on requests and a cap on concurrent chat streams.

Kept in this gateway task's memory: with N gateway tasks behind the load balancer a user
gets up to N times the rate. A shared store (ElastiCache) is the step up when that matters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from services.common.errors import APIError


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
