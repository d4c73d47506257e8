"""Token counts for /tokenize: on one dedicated thread, never the model thread or event loop.

The model thread keeps its tokenizer to itself (HF fast tokenizers are not safe to share
between threads), so counting uses the model's private copy, `counting_tokenizer`, and only
ever from this one worker thread. Embedding latency is unaffected: no forward pass waits
behind a count.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Counter

from services.embedder.model import LoadedModel

TOKENIZE_REQUESTS = Counter("embedder_tokenize_requests", "Requests answered by /tokenize")
TOKENIZE_INPUTS = Counter("embedder_tokenize_inputs", "Texts counted by /tokenize")


class TokenCounter:
    """Runs LoadedModel.count_tokens on a single worker thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-tokenize")

    async def count(self, model: LoadedModel, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens included, untruncated."""
        counts = await asyncio.wrap_future(self._executor.submit(model.count_tokens, texts))
        TOKENIZE_REQUESTS.inc()
        TOKENIZE_INPUTS.inc(len(texts))
        return counts

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
