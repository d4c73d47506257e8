"""The generator's own response shapes (chat and completion bodies are the engine's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "ragplatform"
    context_length: int  # tokens one request may hold, prompt and answer together


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
