"""Counting the embedding model's tokens, locally with its own tokenizer when it can."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from services.retriever.embedder_client import EmbedderClient

logger = logging.getLogger(__name__)


class LocalTokenCounter:
    """The embedder's tokenizer (from GET /tokenizer), run here: counts equal the embedder's
    /tokenize without a request per document competing with its forward passes."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(json.dumps(spec["tokenizer"]))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.prefix = str(spec.get("prompts", {}).get("passage") or "")

    def count(self, texts: list[str]) -> list[int]:
        encoded = self.tokenizer.encode_batch([self.prefix + text for text in texts])
        return [len(item.ids) for item in encoded]


async def local_counter(embedder: EmbedderClient) -> LocalTokenCounter | None:
    """The embedder's tokenizer, or None (count through /tokenize) if it has none to give."""
    try:
        spec = await embedder.tokenizer_spec()
        return await asyncio.to_thread(LocalTokenCounter, spec) if spec else None
    except Exception:  # an embedder without /tokenizer, or a tokenizer this cannot load
        logger.warning("counting tokens through the embedder's /tokenize", exc_info=True)
        return None
