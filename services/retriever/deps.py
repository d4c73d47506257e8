"""Request dependencies of the retriever."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from services.common.errors import APIError
from services.retriever.embedder_client import EmbedderClient
from services.retriever.ingest import Ingestor
from services.retriever.settings import RetrieverSettings
from services.retriever.store import Store

TENANT_MAX_CHARS = 256


def tenant(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_tenant_id: Annotated[str | None, Header()] = None,
) -> str:
    """The caller must hold the service token; the tenant is the gateway's verified user."""
    expected = request.app.state.settings.service_token.encode()
    supplied = (authorization or "").removeprefix("Bearer ").encode()
    if not hmac.compare_digest(supplied, expected):
        raise APIError(401, "invalid service token", code="invalid_service_token")
    if not x_tenant_id or len(x_tenant_id) > TENANT_MAX_CHARS:
        raise APIError(400, "X-Tenant-Id header is required", param="X-Tenant-Id")
    return x_tenant_id


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_settings(request: Request) -> RetrieverSettings:
    settings: RetrieverSettings = request.app.state.settings
    return settings


def get_ingestor(request: Request) -> Ingestor:
    ingestor: Ingestor = request.app.state.ingestor
    return ingestor


def get_embedder(request: Request) -> EmbedderClient:
    embedder: EmbedderClient = request.app.state.embedder
    return embedder


Tenant = Annotated[str, Depends(tenant)]
StoreDep = Annotated[Store, Depends(get_store)]
Settings = Annotated[RetrieverSettings, Depends(get_settings)]
IngestorDep = Annotated[Ingestor, Depends(get_ingestor)]
Embedder = Annotated[EmbedderClient, Depends(get_embedder)]
