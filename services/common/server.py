"""Run a service app with uvicorn."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from services.common.observability import configure_logging
from services.common.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
