"""The generator's OpenAI routes: chat and legacy completions go to the engine as they are."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.common.errors import error_responses
from services.generator.deps import EngineSlotDep, SettingsDep
from services.generator.protocol import ModelCard, ModelList
from services.generator.serving import forward_to_engine

router = APIRouter()

# 400: not JSON, or the engine refused it (e.g. a prompt over the context); 502: the engine
# failed; 503: the model is loading or the engine is down.
ENGINE_ERRORS = error_responses(400, 429, 502, 503)


@router.post("/v1/chat/completions", responses=ENGINE_ERRORS)
async def chat_completions(
    request: Request, settings: SettingsDep, slot: EngineSlotDep
) -> Response:
    """OpenAI chat completions; `stream: true` answers server-sent events."""
    return await forward_to_engine(request, slot, settings, "/v1/chat/completions")


@router.post("/v1/completions", responses=ENGINE_ERRORS)
async def completions(request: Request, settings: SettingsDep, slot: EngineSlotDep) -> Response:
    """OpenAI legacy completions."""
    return await forward_to_engine(request, slot, settings, "/v1/completions")


@router.get("/v1/models", response_model=ModelList)
async def list_models(settings: SettingsDep) -> ModelList:
    """The one model served, under its served name."""
    llamacpp = settings.engine == "llamacpp"
    context = settings.ctx_per_slot if llamacpp else settings.max_model_len
    return ModelList(data=[ModelCard(id=settings.served_model_name, context_length=context)])
