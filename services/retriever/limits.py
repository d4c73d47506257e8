"""Per-user limits the gateway tasks share: a request token bucket and chat stream leases.

They live in this database because it is the one store every gateway task reaches (through
this service). They are not tenant data: the tables sit outside row-level security and are
reached only through these service-token routes, the user being the X-Tenant-Id. The SQL
functions are in schema.MIGRATIONS; the numbers (rate, burst, cap, lease time) are the
gateway's settings, sent with each call.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from services.common.errors import error_responses
from services.common.protocol import (
    RequestTokenRequest,
    RequestTokenResult,
    StreamLeaseRequest,
    StreamLeaseResult,
)
from services.retriever.deps import StoreDep, Tenant

POOL_WAIT_S = 2.0  # the gateway stops waiting long before; no use piling up late work

router = APIRouter(prefix="/limits", tags=["limits"])
LIMIT_ERRORS = error_responses(400, 401, 500)  # 500: the database failed or is busy


@router.post("/requests", response_model=RequestTokenResult, responses=LIMIT_ERRORS)
async def take_request_token(
    body: RequestTokenRequest, user_id: Tenant, db: StoreDep
) -> RequestTokenResult:
    """Take one token from the user's bucket, or say how long until the next one."""
    async with db.pool.connection(timeout=POOL_WAIT_S) as conn:
        cur = await conn.execute(
            "SELECT limits_take_request(%s, %s, %s)",
            (user_id, body.per_minute / 60.0, float(body.burst)),
        )
        row = await cur.fetchone()
    assert row is not None
    wait_s = float(row[0])
    return RequestTokenResult(admitted=wait_s <= 0, retry_after_s=max(wait_s, 0.0))


@router.post("/streams", response_model=StreamLeaseResult, responses=LIMIT_ERRORS)
async def acquire_stream_lease(
    body: StreamLeaseRequest, user_id: Tenant, db: StoreDep
) -> StreamLeaseResult:
    """Take a stream lease while the user's live leases are under max_streams."""
    async with db.pool.connection(timeout=POOL_WAIT_S) as conn:
        cur = await conn.execute(
            "SELECT limits_acquire_stream(%s, %s, %s, %s)",
            (user_id, body.lease_id, body.max_streams, body.lease_s),
        )
        row = await cur.fetchone()
    assert row is not None
    return StreamLeaseResult(admitted=bool(row[0]))


@router.delete("/streams/{lease_id}", status_code=204, responses=LIMIT_ERRORS)
async def release_stream_lease(
    lease_id: uuid.UUID,
    user_id: Tenant,
    db: StoreDep,
    lease_s: Annotated[float, Query(gt=0, le=86_400)],
) -> Response:
    """Give the lease back (204 whether or not it was still held: releasing is idempotent)."""
    async with db.pool.connection(timeout=POOL_WAIT_S) as conn:
        await conn.execute("SELECT limits_release_stream(%s, %s, %s)", (user_id, lease_id, lease_s))
    return Response(status_code=204)
