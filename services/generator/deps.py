"""What the generator's routes depend on, reached through the app's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.common.errors import APIError
from services.generator.serving import EngineSlot
from services.generator.settings import GeneratorSettings

# A polling hint while the model loads, not a tuning knob: how long loading takes is the
# model's business, and /readyz says when it is done.
LOADING_RETRY_AFTER_S = 5


async def get_settings(request: Request) -> GeneratorSettings:
    settings: GeneratorSettings = request.app.state.settings
    return settings


async def engine_slot(request: Request) -> EngineSlot:
    """A place at the engine for this request: 503 while the model loads, 429 past the
    bound. The route must release it (forward_to_engine does)."""
    state = request.app.state
    if not state.engine_ready:
        raise APIError(
            503,
            "the model is still loading",
            code="model_loading",
            headers={"Retry-After": str(LOADING_RETRY_AFTER_S)},
        )
    slot: EngineSlot = state.slots.take(state.client)
    return slot


SettingsDep = Annotated[GeneratorSettings, Depends(get_settings)]
# Declare it last among a route's dependencies: one that failed after it would leak the slot.
EngineSlotDep = Annotated[EngineSlot, Depends(engine_slot)]
