"""The server every service runs under: SIGTERM drains requests in flight for drain_timeout_s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ragctl.stack import wait_ready
from services.common.ports import free_port

REPO = Path(__file__).resolve().parents[1]

# A service that streams one line every 0.1 s, served by services.common.server.serve as
# every service is (python -m services.<name>), with its settings read from SLOW_*.
SLOW_SERVICE = """
import asyncio

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic_settings import SettingsConfigDict

from services.common.server import serve
from services.common.settings import ServiceSettings


class SlowSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLOW_")


app = FastAPI()


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.get("/lines")
async def lines(count: int) -> StreamingResponse:
    async def body():
        for i in range(count):
            yield f"line {i}\\n"
            await asyncio.sleep(0.1)
        yield "end\\n"

    return StreamingResponse(body(), media_type="text/plain")


serve(app, SlowSettings())
"""

DRAIN_TIMEOUT_S = 3.0


@dataclass
class StreamRecord:
    """What a client got from one stream, and when the stream ended."""

    lines: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    ended_at: float = 0.0


def read_stream(url: str, record: StreamRecord) -> None:
    try:
        with httpx.stream("GET", url, timeout=30) as resp:
            for line in resp.iter_lines():
                record.lines.append(line)
                record.started.set()
    except httpx.HTTPError:
        pass  # the server cut the stream
    record.ended_at = time.monotonic()


@pytest.mark.stack  # starts servers of its own
def test_sigterm_lets_streams_finish_within_drain_timeout_s_and_cuts_longer_ones(
    tmp_path: Path,
) -> None:
    script = tmp_path / "slow_service.py"
    script.write_text(SLOW_SERVICE)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SLOW_PORT": str(port),
        "SLOW_LOG_LEVEL": "warning",
        "SLOW_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
    }
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_ready(base, 30, proc)
        short, endless = StreamRecord(), StreamRecord()
        readers = [
            threading.Thread(target=read_stream, args=(f"{base}/lines?count=10", short)),
            threading.Thread(target=read_stream, args=(f"{base}/lines?count=600", endless)),
        ]
        for reader in readers:
            reader.start()
        assert short.started.wait(10) and endless.started.wait(10)
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(30)
        # About 1 s of lines left at SIGTERM: they all come, within the drain.
        assert short.lines[-1] == "end"
        assert short.ended_at - sigterm_at < DRAIN_TIMEOUT_S
        # A minute of lines left: cut once the drain is over, not before and not much after.
        assert "end" not in endless.lines
        assert DRAIN_TIMEOUT_S - 0.5 < endless.ended_at - sigterm_at < DRAIN_TIMEOUT_S + 4
        assert proc.wait(10) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
