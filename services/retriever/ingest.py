"""Ingestion workers: claim durable jobs from PostgreSQL, parse, chunk, embed, store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
import uuid

import httpx
from psycopg import AsyncConnection

from services.retriever.chunking import ChunkingError, chunk_blocks
from services.retriever.coalesce import Coalescer
from services.retriever.embedder_client import EmbedderClient, EmbedderUnavailable
from services.retriever.parsing import ParseError
from services.retriever.sandbox import ParseInterrupted, ParseLimits, ParsePool
from services.retriever.settings import RetrieverSettings
from services.retriever.store import LIVENESS_LOCK, Job, LeaseLost, Store
from services.retriever.tokens import LocalTokenCounter, local_counter

logger = logging.getLogger(__name__)

EMBED_REQUESTS_IN_FLIGHT = 2  # per kind (embeddings, token counts): one runs, one waits
COUNT_BATCH = 2048
LIVENESS_CHECK_S = 1.0  # how soon a lost liveness lock is noticed and taken again
LIVENESS_CONNECT_TIMEOUT_S = 10  # connecting for the liveness lock (libpq: whole seconds)
LIVENESS_QUERY_TIMEOUT_S = 5.0  # a liveness query slower than this drops the connection
LIVENESS_START_TIMEOUT_S = 60.0  # start() fails if the lock cannot be taken within this
# After a database restart or failover every replica's lock is gone at once, and each takes
# its own again within this (notice, reconnect, lock): until then a missing lock does not
# mean a dead replica, and leases alone decide.
MISSING_LOCK_GRACE_S = 2 * LIVENESS_CHECK_S + LIVENESS_QUERY_TIMEOUT_S + LIVENESS_CONNECT_TIMEOUT_S


def content_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class Ingestor:
    """Workers that lease jobs (FOR UPDATE SKIP LOCKED), so any number of replicas can run
    them; a job whose worker dies is taken again when its lease runs out."""

    def __init__(
        self,
        store: Store,
        embedder: EmbedderClient,
        settings: RetrieverSettings,
        max_seq_length: int,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.settings = settings
        self.max_seq_length = max_seq_length
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.replica_key = secrets.randbelow(2**31 - 1) + 1
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._liveness: asyncio.Task[None] | None = None
        self._held = asyncio.Event()  # the liveness lock is held: claiming is safe
        self._liveness_error: str | None = None  # why the lock was last not taken or lost
        # Retaken after a loss (time.monotonic()): until then, a missing lock of another
        # replica is not trusted, whatever the server's uptime says (a failover).
        self._trust_missing_locks_at = 0.0
        self._overhead: int | None = None
        # Jobs share embedder requests: many small documents make few, full requests.
        self._embed = Coalescer(
            embedder.embed_rows,
            settings.embed_batch_size,
            EMBED_REQUESTS_IN_FLIGHT,
            transient=(EmbedderUnavailable,),
        )
        self._local: LocalTokenCounter | None = None
        # Parsing runs in worker processes under hard limits, shared fairly across users.
        self._parsers = ParsePool(
            settings.parse_processes,
            ParseLimits(settings.parse_memory_mb, settings.parse_cpu_s, settings.parse_timeout_s),
        )
        self._count = Coalescer(
            embedder.count_tokens,
            COUNT_BATCH,
            EMBED_REQUESTS_IN_FLIGHT,
            transient=(EmbedderUnavailable,),
        )

    async def start(self) -> None:
        self._local = await local_counter(self.embedder)
        await self._parsers.start()
        # Claim nothing while the liveness lock is not held (at start, or after the database
        # restarted): to other replicas our jobs look abandoned then, and taking theirs
        # while they take ours back would churn attempts.
        self._liveness = asyncio.create_task(self._hold_liveness(), name="ingest-liveness")
        try:
            await asyncio.wait_for(self._held.wait(), LIVENESS_START_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise RuntimeError(
                f"could not take the ingestion liveness lock in {LIVENESS_START_TIMEOUT_S:.0f}s: "
                f"{self._liveness_error or 'no answer from the database'}"
            ) from None
        self._workers = [
            asyncio.create_task(self._work(f"{self.worker_id}/{i}"), name=f"ingest-{i}")
            for i in range(self.settings.ingest_workers)
        ]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._liveness is not None:  # after the jobs were handed back
            self._liveness.cancel()
            await asyncio.gather(self._liveness, return_exceptions=True)
        await self._embed.aclose()
        await self._count.aclose()
        await self._parsers.aclose()

    async def _hold_liveness(self) -> None:
        """Hold this replica's liveness lock on a connection of its own, for as long as the
        replica lives; take it again after the database comes back."""
        lost = False
        while True:
            try:
                async with await AsyncConnection.connect(
                    str(self.store.pool.conninfo),  # the pool is built from a URL
                    autocommit=True,
                    connect_timeout=LIVENESS_CONNECT_TIMEOUT_S,
                ) as conn:
                    await self._take_liveness_lock(conn)
                    if lost:
                        self._trust_missing_locks_at = time.monotonic() + MISSING_LOCK_GRACE_S
                        logger.info("took the ingestion liveness lock again")
                    lost, self._liveness_error = False, None
                    self._held.set()
                    while True:
                        await asyncio.sleep(LIVENESS_CHECK_S)
                        await asyncio.wait_for(conn.execute("SELECT 1"), LIVENESS_QUERY_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._liveness_error = str(exc) or type(exc).__name__
                if self._held.is_set():
                    logger.warning(
                        "lost the ingestion liveness lock (%s); taking it again",
                        self._liveness_error,
                    )
                    lost = True
                else:
                    logger.warning(
                        "could not take the ingestion liveness lock: %s", self._liveness_error
                    )
                self._held.clear()
                await asyncio.sleep(LIVENESS_CHECK_S)

    async def _take_liveness_lock(self, conn: AsyncConnection) -> None:
        started = bool(self._workers)
        while True:
            cur = await asyncio.wait_for(
                conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", (LIVENESS_LOCK, self.replica_key)
                ),
                LIVENESS_QUERY_TIMEOUT_S,
            )
            row = await cur.fetchone()
            if row and row[0]:
                return
            if started:  # ours: a session of ours the server has not yet seen close
                logger.warning(
                    "the ingestion liveness lock is still held by a closed session of ours"
                )
                await asyncio.sleep(LIVENESS_CHECK_S)
            else:  # another live replica drew the same key
                self.replica_key = secrets.randbelow(2**31 - 1) + 1

    def _missing_lock_grace(self) -> float | None:
        """The server uptime after which another replica's missing lock means it died;
        None while this replica has only just taken its own lock again."""
        if time.monotonic() < self._trust_missing_locks_at:
            return None
        return MISSING_LOCK_GRACE_S

    def notify(self) -> None:
        """A job was queued here: wake an idle worker now rather than at the next poll."""
        self._wake.set()

    async def _work(self, worker: str) -> None:
        failing = False
        while True:
            self._wake.clear()  # before the claim: a notify() during it is not lost
            await self._held.wait()
            try:
                job = await self.store.claim_job(
                    worker,
                    self.settings.ingest_lease_s,
                    self.replica_key,
                    self.settings.jobs_per_user,
                    self._missing_lock_grace(),
                )
                if failing:
                    logger.info("%s claims jobs again", worker)
                failing = False
            except Exception:  # the database is away: try again at the next poll
                if not failing:
                    logger.exception("%s could not claim an ingestion job", worker)
                failing, job = True, None
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.ingest_poll_s)
                continue
            await self._run(job, worker)

    async def _run(self, job: Job, worker: str) -> None:
        """Process one job under a lease kept alive until it ends."""
        heartbeat = asyncio.create_task(self._keep_lease(job, worker))
        processing = asyncio.create_task(self.process(job, worker))
        try:
            done, _ = await asyncio.wait(
                {heartbeat, processing}, return_when=asyncio.FIRST_COMPLETED
            )
            if heartbeat in done and processing not in done:
                processing.cancel()  # the lease is gone: someone else has the job now
                logger.warning("lost the lease on %s; dropping it", job.document_id)
            await asyncio.gather(processing, return_exceptions=True)
            if not processing.cancelled() and processing.exception():
                exc = processing.exception()
                if not isinstance(exc, LeaseLost):
                    logger.error("ingestion of %s failed", job.document_id, exc_info=exc)
                    await self._retry(job, worker, "internal error during ingestion", True)
        except asyncio.CancelledError:
            # Shutting down: stop the work and hand the job back for another replica now.
            processing.cancel()
            await asyncio.gather(processing, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self.store.retry_job(job, worker, 0.0, "interrupted by a shutdown", False)
                )
            raise
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _keep_lease(self, job: Job, worker: str) -> None:
        lease = self.settings.ingest_lease_s
        while True:
            await asyncio.sleep(lease / 3)
            try:
                if not await self.store.renew_lease(job, worker, lease):
                    return
            except Exception:  # keep trying until the lease would have run out anyway
                logger.exception("could not renew the lease on %s", job.document_id)

    async def process(self, job: Job, worker: str) -> None:
        if job.attempts > self.settings.ingest_max_attempts:
            reason = f"gave up after {job.attempts - 1} attempts"
            await self.store.fail_job(job, worker, f"{reason}: {job.last_error or 'unknown'}")
            return
        doc = await self.store.start_job(job)
        if doc is None or doc["source"] is None:
            await self.store.fail_job(job, worker, "the upload is missing")
            return
        try:
            blocks = await self._parsers.parse(job.user_id, bytes(doc["source"]), doc["media_type"])
        except ParseError as exc:  # the file's fault: over a limit, or unreadable
            await self.store.fail_job(job, worker, str(exc))
            return
        except ParseInterrupted as exc:  # load or a crash: try again, within max attempts
            await self._retry(job, worker, str(exc), True)
            return
        try:
            limit = await self._chunk_limit()
            overlap = min(self.settings.chunk_overlap_tokens, (limit - 1) // 2)
            chunks = await chunk_blocks(blocks, self._count_tokens, limit, overlap)
            if not chunks:
                await self.store.fail_job(job, worker, "the document has no text")
                return
            vectors = await self._embed([chunk.text for chunk in chunks])
        except ChunkingError as exc:
            await self.store.fail_job(job, worker, str(exc))
            return
        except EmbedderUnavailable as exc:
            await self._retry(job, worker, str(exc), False)
            return
        except httpx.HTTPStatusError as exc:  # the embedder refuses this text for good
            status = exc.response.status_code
            await self.store.fail_job(job, worker, f"the embedder refused the text ({status})")
            return
        await self.store.finish_job(job, worker, chunks, vectors)
        logger.info("document %s ready with %d chunks", job.document_id, len(chunks))

    async def _retry(self, job: Job, worker: str, reason: str, counted: bool) -> None:
        """Try the job again later. Outages (counted=False) do not use up its attempts."""
        delay = min(self.settings.ingest_backoff_max_s, 2.0**job.retries)
        logger.warning("ingestion of %s will retry in %.0fs: %s", job.document_id, delay, reason)
        try:
            await self.store.retry_job(job, worker, delay, reason, counted)
        except LeaseLost:
            pass
        except Exception:  # the database is away: the lease runs out and the job comes back
            logger.exception("could not reschedule %s", job.document_id)

    async def _count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text beyond the fixed overhead every input carries."""
        overhead = await self._token_overhead()
        return [n - overhead for n in await self._raw_counts(texts)]

    async def _raw_counts(self, texts: list[str]) -> list[int]:
        if self._local is not None:
            return await asyncio.to_thread(self._local.count, texts)
        return await self._count(texts)

    async def _token_overhead(self) -> int:
        if self._overhead is None:
            self._overhead = (await self._raw_counts([""]))[0]
        return self._overhead

    async def _chunk_limit(self) -> int:
        return min(self.settings.chunk_tokens, self.max_seq_length - await self._token_overhead())
