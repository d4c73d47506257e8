"""Calls to the embedder service."""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import time
from array import array
from typing import Any

import httpx
from pgvector import Vector

from services.common.http import make_client
from services.common.protocol import (
    EmbeddingInputType,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelInfo,
    TokenizeRequest,
    TokenizeResponse,
)

logger = logging.getLogger(__name__)


TOKENIZE_BATCH = 2048
TOKENIZE_CHARS = 256 * 1024


class EmbedderUnavailable(RuntimeError):
    pass


class EmbedderClient:
    def __init__(self, base_url: str) -> None:
        self._http = make_client(base_url, timeout=60.0)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def info(self) -> ModelInfo:
        resp = await self._http.get("/info")
        resp.raise_for_status()
        return ModelInfo.model_validate_json(resp.content)

    async def wait_for_info(self, timeout_s: float) -> ModelInfo:
        """Poll the embedder until it reports its model, or give up after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await self.info()
            except httpx.HTTPError as exc:
                if time.monotonic() > deadline:
                    raise EmbedderUnavailable(
                        f"the embedder did not become ready within {timeout_s:.0f}s"
                    ) from exc
                await asyncio.sleep(0.5)

    async def _post(self, path: str, body: EmbeddingRequest | TokenizeRequest) -> bytes:
        """POST and return the answer's body. Outages (unreachable, 429, 5xx) raise
        EmbedderUnavailable; a refusal (4xx) raises httpx.HTTPStatusError."""
        try:
            resp = await self._http.post(
                path,
                content=body.model_dump_json(exclude_none=True),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise EmbedderUnavailable("the embedder is unreachable") from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise EmbedderUnavailable(f"the embedder answered {resp.status_code}")
        resp.raise_for_status()
        return resp.content

    async def tokenizer_spec(self) -> dict[str, Any] | None:
        """The model's tokenizer and prompts (GET /tokenizer); None if it cannot export one."""
        resp = await self._http.get("/tokenizer")
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        spec: dict[str, Any] = resp.json()
        return spec

    async def count_tokens(
        self, texts: list[str], input_type: EmbeddingInputType = "passage"
    ) -> list[int]:
        """How many tokens the model reads for each text (special tokens and prompt included)."""
        counts: list[int] = []
        start = 0
        while start < len(texts):
            # Requests of at most TOKENIZE_BATCH texts and about TOKENIZE_CHARS characters.
            end, chars = start, 0
            while end < len(texts) and end - start < TOKENIZE_BATCH and chars < TOKENIZE_CHARS:
                chars += len(texts[end])
                end += 1
            body = TokenizeRequest(input=texts[start:end], input_type=input_type)
            answer = TokenizeResponse.model_validate_json(await self._post("/tokenize", body))
            counts.extend(item.tokens for item in sorted(answer.data, key=lambda d: d.index))
            start = end
        return counts

    async def embed_rows(self, texts: list[str]) -> list[Vector]:
        """Passage vectors, one per text."""
        return await self.embed(texts)

    async def embed(
        self, texts: list[str], input_type: EmbeddingInputType = "passage"
    ) -> list[Vector]:
        """Vectors for passages (ingestion) or a query (search)."""
        body = EmbeddingRequest(input=texts, encoding_format="base64", input_type=input_type)
        answer = EmbeddingResponse.model_validate_json(await self._post("/v1/embeddings", body))
        vectors = []
        for item in sorted(answer.data, key=lambda item: item.index):
            if not isinstance(item.embedding, str):
                raise EmbedderUnavailable("the embedder answered floats to a base64 request")
            vectors.append(vector_from_base64(item.embedding))
        return vectors


def vector_from_base64(encoded: str) -> Vector:
    """An OpenAI base64 embedding (little-endian float32) as a pgvector Vector; no numpy, so the
    retriever's image carries none."""
    values = array("f")
    values.frombytes(base64.b64decode(encoded))
    if sys.byteorder == "big":
        values.byteswap()
    return Vector(values.tolist())
