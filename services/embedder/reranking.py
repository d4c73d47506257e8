"""Reranking for POST /v1/rerank: a cross-encoder scores (query, document) pairs.

One worker thread loads the cross-encoder and scores every request, in arrival order, in
passes of rerank_batch_size pairs. The embedder's Batcher is not reused: it packs single
texts of similar length from many requests and returns vectors, while a rerank request is a
batch already (one query and its candidates: the retriever sends its top 30), so pooling
pairs across requests would save little. The event loop never tokenizes or runs the model,
and the model's tokenizer stays on its one thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.embedder.batching import QueueFull
from services.embedder.model import pick_device, resolve_model_path

logger = logging.getLogger(__name__)

RERANK_QUEUE = Gauge("embedder_rerank_queued_pairs", "Pairs accepted and not yet scored")
RERANK_PAIRS = Counter("embedder_rerank_pairs_total", "Query-document pairs scored")
RERANK_SECONDS = Histogram("embedder_rerank_seconds", "Time to score one rerank request")


class NotACrossEncoder(ValueError):
    """The model has no trained scoring head: its scores would be random."""


@dataclass
class LoadedReranker:
    """A loaded cross-encoder and what clients need to know about it."""

    encoder: Any  # sentence_transformers.CrossEncoder; imported lazily
    name: str
    max_seq_length: int  # a pair (query and document together) is truncated to this
    device: str

    def score(self, query: str, documents: list[str], batch_size: int) -> tuple[np.ndarray, int]:
        """One relevance score per document and the tokens read. Worker thread only."""
        pairs = [(query, document) for document in documents]
        scores = self.encoder.predict(
            pairs, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        # Counted with the truncation predict applies (the longer of the two is cut first).
        encoded = self.encoder.tokenizer(
            [query] * len(documents),
            documents,
            truncation=True,
            max_length=self.max_seq_length,
        )
        tokens = sum(len(ids) for ids in encoded["input_ids"])
        return np.asarray(scores, dtype=np.float32).reshape(len(documents)), tokens


def check_scoring_head(path: str, model: str) -> None:
    """Refuse a bare encoder (e.g. an embedding model): CrossEncoder would load it with a
    freshly initialised head and rank at random without complaint."""
    from transformers import AutoConfig

    architectures = list(getattr(AutoConfig.from_pretrained(path), "architectures", None) or [])
    if architectures and all(name.endswith("Model") for name in architectures):
        raise NotACrossEncoder(
            f"EMBEDDER_RERANK_MODEL {model} is a bare encoder ({', '.join(architectures)}) "
            "with no trained scoring head; use a cross-encoder, e.g. BAAI/bge-reranker-base"
        )


def load_reranker(model: str, device: str, models_dir: str | None = None) -> LoadedReranker:
    """Load a cross-encoder as the embedding model is loaded (baked folder, offline; fp16
    on CUDA) and warm it up."""
    from sentence_transformers import CrossEncoder

    path = resolve_model_path(model, models_dir)
    check_scoring_head(path, model)
    chosen = pick_device(device)
    encoder = CrossEncoder(path, device=chosen)
    if encoder.num_labels != 1:
        raise NotACrossEncoder(
            f"EMBEDDER_RERANK_MODEL {model} gives {encoder.num_labels} labels per pair; "
            "a reranker gives one relevance score"
        )
    if chosen.startswith("cuda"):
        encoder.half()
    encoder.eval()
    loaded = LoadedReranker(
        encoder=encoder,
        name=Path(model).name or model,
        max_seq_length=int(encoder.max_seq_length),
        device=chosen,
    )
    loaded.score("warm-up", ["warm-up"] * 4, 4)  # kernels picked before /readyz says ready
    logger.info(
        "reranker %s loaded on %s (window %d tokens)",
        loaded.name,
        chosen,
        loaded.max_seq_length,
    )
    return loaded


class Reranker:
    """Owns the cross-encoder: one worker thread loads it, then scores each request."""

    def __init__(
        self,
        load: Callable[[], LoadedReranker],
        *,
        batch_size: int,
        max_queued_pairs: int,
        after: Future[Any] | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.max_queued_pairs = max_queued_pairs
        self.model: LoadedReranker | None = None
        self._pending = 0  # pairs accepted and not yet scored; event loop only
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-model")
        self.loaded: Future[LoadedReranker] = self._executor.submit(self._load, load, after)

    def _load(
        self, load: Callable[[], LoadedReranker], after: Future[Any] | None
    ) -> LoadedReranker:
        # After the embedding model (`after`): two threads importing and warming torch
        # models at once only compete for the same cores.
        if after is not None:
            wait([after])  # its failure is its own: the reranker loads all the same
        try:
            model = load()
        except Exception:
            logger.exception("reranker failed to load")
            raise
        self.model = model
        return model

    @property
    def load_failed(self) -> bool:
        return self.loaded.done() and self.model is None

    async def rerank(self, query: str, documents: list[str]) -> tuple[np.ndarray, int]:
        """Scores (one per document) and tokens read; QueueFull past max_queued_pairs."""
        model = self.model
        assert model is not None, "rerank() before the reranker loaded"
        if self._closed:
            raise QueueFull("the embedder is shutting down")
        if self._pending + len(documents) > self.max_queued_pairs:
            raise QueueFull(f"{self._pending} pairs are waiting")
        self._pending += len(documents)
        RERANK_QUEUE.set(self._pending)
        try:
            started = time.perf_counter()
            work = self._executor.submit(model.score, query, documents, self.batch_size)
            result = await asyncio.wrap_future(work)
            RERANK_SECONDS.observe(time.perf_counter() - started)
            RERANK_PAIRS.inc(len(documents))
            return result
        finally:
            self._pending -= len(documents)
            RERANK_QUEUE.set(self._pending)

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
