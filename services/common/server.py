"""Run a service app with uvicorn."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from services.common.observability import configure_logging
from services.common.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve until SIGTERM/SIGINT; then requests in flight get settings.drain_timeout_s to
    finish before they are cut."""
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        # uvicorn hands this to asyncio.timeout, which takes fractions of a second too.
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
    )
