"""Optional reranking of search hits by a cross-encoder (the embedder's POST /v1/rerank).

Off unless RETRIEVER_RERANK is set. The stage may improve a search, never fail it: when the
reranker is unreachable, refuses, answers something unexpected or takes longer than its
timeout, the hits keep their first-stage order and retriever_rerank_failures_total counts
the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from prometheus_client import Counter
from pydantic import ValidationError

from services.common.http import make_client
from services.common.protocol import RerankRequest, RerankResponse
from services.retriever.settings import RetrieverSettings

logger = logging.getLogger(__name__)

# The whole call, connection included: a search waits no longer than this for the optional
# stage. A GPU scores 30 passages in milliseconds; a base-size cross-encoder on a CPU takes
# seconds.
RERANK_TIMEOUT_S = 5.0

RERANK_FAILURES = Counter(
    "retriever_rerank_failures_total",
    "Searches answered in first-stage order because the reranker failed",
    ["reason"],  # unreachable | timeout | status | invalid
)


class RerankFailed(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RerankClient:
    """Keep-alive client for POST /v1/rerank; `depth` is how many first-stage hits a search
    sends to be rescored."""

    def __init__(
        self, base_url: str, *, depth: int = 30, timeout_s: float = RERANK_TIMEOUT_S
    ) -> None:
        self.depth = depth
        self.timeout_s = timeout_s
        self._http = make_client(base_url, timeout=timeout_s, connect_timeout=timeout_s)

    @classmethod
    def from_settings(cls, settings: RetrieverSettings) -> RerankClient | None:
        """The client when RETRIEVER_RERANK is on; None when reranking is off."""
        if not settings.rerank:
            return None
        return cls(settings.rerank_base_url, depth=settings.rerank_depth)

    def candidates(self, k: int) -> int:
        """First-stage hits to fetch for a search of k: the rerank depth, and at least k."""
        return max(k, self.depth)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def rerank(
        self, query: str, documents: list[str], top_n: int | None = None
    ) -> RerankResponse:
        """The reranker's answer, best first; RerankFailed for every way the call can fail."""
        body = RerankRequest(query=query, documents=documents, top_n=top_n)
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self._http.post(
                    "/v1/rerank",
                    content=body.model_dump_json(exclude_none=True),
                    headers={"Content-Type": "application/json"},
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise RerankFailed("timeout", f"no answer within {self.timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise RerankFailed("unreachable", "the reranker is unreachable") from exc
        if resp.status_code != 200:
            raise RerankFailed("status", f"the reranker answered {resp.status_code}")
        try:
            answer = RerankResponse.model_validate_json(resp.content)
        except ValidationError as exc:
            raise RerankFailed("invalid", "the reranker's answer is not a rerank response") from exc
        indices = [result.index for result in answer.results]
        expected = min(top_n or len(documents), len(documents))
        if (
            len(indices) != expected
            or len(set(indices)) != len(indices)
            or any(not 0 <= index < len(documents) for index in indices)
        ):
            raise RerankFailed("invalid", "the reranker's results do not match the documents")
        return answer


def passage_text(hit: dict[str, Any]) -> str:
    """What the cross-encoder reads of a hit: its title with its text (as BM25 counts it)."""
    title = str(hit.get("title") or "").strip()
    text = str(hit["text"])
    return f"{title}\n{text}" if title else text


async def rerank_hits(
    client: RerankClient, query: str, hits: list[dict[str, Any]], k: int
) -> list[dict[str, Any]]:
    """The k best hits in the reranker's order, `score` set to its relevance_score. Only the
    top client.depth hits are rescored; with k above that, the rest follow in their order
    with their first-stage scores. When the reranker fails: hits[:k], as they came."""
    candidates = hits[: client.depth]
    if not candidates:
        return hits[:k]
    texts = [passage_text(hit) for hit in candidates]
    try:
        answer = await client.rerank(query, texts, top_n=min(k, len(candidates)))
    except RerankFailed as exc:
        RERANK_FAILURES.labels(exc.reason).inc()
        logger.warning("search answered without reranking: %s", exc)
        return hits[:k]
    reranked = [
        {**candidates[result.index], "score": result.relevance_score} for result in answer.results
    ]
    return (reranked + hits[len(candidates) :])[:k]
