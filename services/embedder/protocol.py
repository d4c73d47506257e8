"""The embedder's request and response shapes (OpenAI's embeddings API, plus /tokenize)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictStr


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # Extension: models trained with query/passage prompts (e5, bge...) get the right one.
    input_type: Literal["query", "passage"] | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr]  # "" is allowed: it counts the fixed overhead
    input_type: Literal["query", "passage"] | None = None


class TokenCount(BaseModel):
    index: int
    tokens: int


class TokenizeResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    max_tokens: int  # the model's window: /v1/embeddings truncates (or refuses) longer inputs
    data: list[TokenCount]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "ragplatform"
    dimension: int
    max_input_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelInfo(BaseModel):
    """What the retriever needs: dimension and the longest input the model reads."""

    model: str
    dimension: int
    max_seq_length: int
    device: str
