"""Ingestion: parse an upload, then chunk, embed and store it in the background."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid

import numpy as np

from services.common.errors import APIError
from services.retriever.chunking import chunk_text
from services.retriever.embedder_client import EmbedderClient, EmbedderUnavailable
from services.retriever.settings import RetrieverSettings
from services.retriever.store import Store

logger = logging.getLogger(__name__)

MEDIA_TYPES = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".txt": "text/plain",
    ".text": "text/plain",
}
SUPPORTED = set(MEDIA_TYPES.values())
EMBED_RETRIES = 5


def media_type_of(filename: str | None, declared: str | None) -> str:
    """The upload's media type, from its file extension first, then its declared type."""
    if filename:
        for ext, media_type in MEDIA_TYPES.items():
            if filename.lower().endswith(ext):
                return media_type
    base = (declared or "").split(";")[0].strip().lower()
    if base in SUPPORTED:
        return base
    raise APIError(
        415,
        f"unsupported document type {base or filename or 'unknown'}; "
        "supported: plain text (.txt) and Markdown (.md)",
        code="unsupported_type",
    )


def decode_text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise APIError(400, "the document is not valid UTF-8 text", code="bad_encoding") from exc
    if "\x00" in text:
        raise APIError(400, "the document contains NUL bytes; is it binary?", code="bad_encoding")
    if not text.strip():
        raise APIError(400, "the document has no text", code="empty_document")
    return text


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Ingestor:
    """A queue of document ids and the workers that process them."""

    def __init__(
        self, store: Store, embedder: EmbedderClient, settings: RetrieverSettings, max_words: int
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.settings = settings
        self.max_words = max_words
        self.queue: asyncio.Queue[uuid.UUID] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for doc_id in await self.store.pending_document_ids():
            self.queue.put_nowait(doc_id)
        self._workers = [
            asyncio.create_task(self._work(), name=f"ingest-{i}")
            for i in range(self.settings.ingest_workers)
        ]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def submit(self, doc_id: uuid.UUID) -> None:
        self.queue.put_nowait(doc_id)

    async def _work(self) -> None:
        while True:
            doc_id = await self.queue.get()
            try:
                await self.process(doc_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("ingestion of %s failed", doc_id)
                try:
                    await self.store.fail_document(doc_id, "internal error during ingestion")
                except Exception:  # the database is away too: the document stays pending
                    logger.exception("could not mark %s failed", doc_id)
            finally:
                self.queue.task_done()

    async def process(self, doc_id: uuid.UUID) -> None:
        doc = await self.store.claim_document(doc_id)
        if doc is None or doc["body"] is None:
            return
        chunks = chunk_text(doc["body"], self.max_words, self.settings.chunk_overlap_words)
        if not chunks:
            await self.store.fail_document(doc_id, "the document has no text")
            return
        texts = [chunk.text for chunk in chunks]
        batches = []
        for start in range(0, len(texts), self.settings.embed_batch_size):
            batch = texts[start : start + self.settings.embed_batch_size]
            vectors = await self._embed_with_retry(batch)
            if vectors is None:
                await self.store.fail_document(doc_id, "the embedder is unavailable")
                return
            batches.append(vectors)
        await self.store.finish_document(doc_id, doc["user_id"], chunks, np.concatenate(batches))
        logger.info("document %s ready with %d chunks", doc_id, len(chunks))

    async def _embed_with_retry(self, texts: list[str]) -> np.ndarray | None:
        delay = 1.0
        for attempt in range(1, EMBED_RETRIES + 1):
            try:
                return await self.embedder.embed(texts)
            except EmbedderUnavailable as exc:
                logger.warning("embedding attempt %d failed: %s", attempt, exc)
                if attempt == EMBED_RETRIES:
                    return None
                await asyncio.sleep(delay)
                delay *= 2
        return None
