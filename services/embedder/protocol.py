"""The embedder's own route shapes; what the retriever exchanges with it is in
services/common/protocol.py (embeddings, token counts, model info)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "ragplatform"
    task: Literal["embedding", "rerank"] = "embedding"  # /v1/embeddings or /v1/rerank
    dimension: int | None = None  # an embedding model's vector size
    max_input_tokens: int  # a reranker's: query and document together


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
