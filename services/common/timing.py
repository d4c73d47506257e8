"""Where a request's time goes: stage durations measured where they happen, sent as a
`Server-Timing` header (W3C: `name;dur=<ms>`), and read back from an upstream's header so
that the gateway can report the retriever's own stages beside its own."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

# A metric name is an HTTP token; dur is milliseconds.
_ENTRY = re.compile(r"^\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*(?:;(.*))?$")
_DUR = re.compile(r"(?:^|;)\s*dur\s*=\s*\"?([0-9]+(?:\.[0-9]+)?)\"?\s*(?:;|$)")


class StageTimes:
    """Milliseconds per named stage of one request, in the order the stages first ran.

    A stage that runs twice adds up; stages may overlap (hybrid search embeds the query while
    BM25 runs), so they need not sum to the request's time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ms: dict[str, float] = {}
        self.points: dict[str, float] = {}  # named instants, for stages that span calls

    def add(self, name: str, seconds: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + seconds * 1000.0

    def mark(self, name: str) -> None:
        """Set name to the time since the request started (ttft, total)."""
        self.ms[name] = (time.perf_counter() - self.started) * 1000.0

    def point(self, name: str) -> None:
        """Remember this instant as name (see since)."""
        self.points[name] = time.perf_counter()

    def since(self, stage: str, point: str) -> None:
        """Set stage to the time since the instant point (nothing if it was not seen)."""
        if point in self.points:
            self.ms[stage] = (time.perf_counter() - self.points[point]) * 1000.0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage name (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def update(self, stages: dict[str, float]) -> None:
        """Take in stages measured elsewhere (milliseconds), e.g. an upstream's header."""
        for name, ms in stages.items():
            self.ms[name] = self.ms.get(name, 0.0) + ms

    def rounded(self) -> dict[str, float]:
        return {name: round(ms, 2) for name, ms in self.ms.items()}

    def header(self) -> str:
        """The stages as a Server-Timing header value."""
        return server_timing_header(self.ms)


def server_timing_header(stages: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in stages.items())


def parse_server_timing(value: str | None) -> dict[str, float]:
    """The `dur` of each metric in a Server-Timing header (milliseconds); metrics without
    one, and anything malformed, are left out."""
    stages: dict[str, float] = {}
    for entry in (value or "").split(","):
        match = _ENTRY.match(entry)
        if match is None:
            continue
        dur = _DUR.search(match.group(2) or "")
        if dur is not None:
            stages[match.group(1)] = float(dur.group(1))
    return stages
