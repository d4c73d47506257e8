"""A lean HTTP/1.1 keep-alive load client on asyncio streams.

The benchmarks share two cores with the server they measure, so the client must cost as
little CPU as possible: no HTTP library, one persistent connection per concurrent worker,
requests pre-encoded. Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any


def encode_post(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    return head + payload


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    concurrency: int,
) -> dict[str, Any]:
    """Send every request once over `concurrency` connections; return timing and statuses."""
    assert host in ("127.0.0.1", "::1", "localhost"), "load goes to loopback only"
    next_index = 0
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def worker() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while next_index < len(requests):
                request = requests[next_index]
                next_index += 1
                start = time.perf_counter()
                writer.write(request)
                status, _ = await _read_response(reader)
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(requests),
        "seconds": elapsed,
        "rps": len(requests) / elapsed,
        "p50_s": latencies[len(latencies) // 2],
        "p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "statuses": statuses,
    }
