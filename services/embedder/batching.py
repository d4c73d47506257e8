"""Dynamic batching: inputs of concurrent requests share forward passes.

Requests put their texts on a queue and await a future. One model thread owns the model:
it moves queued texts into a pool (tokenized in one call per arrival wave), and for each
forward pass picks the oldest waiting input plus the inputs closest to it in length, up to a
batch size and a padded-token budget. Padding stays small, nothing waits behind an
unrelated long input for more than a pass, and each request is answered as soon as its own
inputs are done. The event loop never tokenizes or runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.embedder.model import LoadedModel

logger = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("embedder_queue_inputs", "Inputs accepted and not yet embedded")
BATCH_SIZE = Histogram(
    "embedder_batch_size", "Inputs per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
BATCH_TOKENS = Histogram(
    "embedder_batch_padded_tokens",
    "Padded tokens per forward pass",
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768),
)
TOKENS = Counter("embedder_tokens_total", "Tokens embedded (rate() gives tokens/s)")
FORWARD_SECONDS = Histogram("embedder_forward_seconds", "Time of one forward pass")


# The fixed cost of one forward pass, in padded tokens: what makes tiny batches wasteful.
PASS_COST_TOKENS = 128


class QueueFull(Exception):
    """max_queued_inputs are waiting already: shed load."""


class InputTooLong(ValueError):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"input[{index}] has {tokens} tokens; the model reads at most {limit}")


@dataclass
class _Job:
    texts: list[str]
    truncate: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[np.ndarray, int]]
    vectors: np.ndarray | None = None
    tokens: int = 0
    remaining: int = 0


@dataclass
class _Item:
    seq: int  # arrival order, oldest first
    job: _Job
    row: int
    ids: list[int]
    extra: dict[str, list[int]] = field(default_factory=dict)


def _resolve(job: _Job, result: tuple[np.ndarray, int] | None, error: Exception | None) -> None:
    def settle() -> None:
        if job.future.done():  # the client went away
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]

    job.loop.call_soon_threadsafe(settle)


class Batcher:
    """Owns the model: one thread loads it, warms it up and runs every forward pass.

    Keeping all torch work on one thread matters on CPU: each thread that calls into torch
    gets its own OpenMP team, and two teams spinning on two cores halve the throughput.
    """

    def __init__(
        self,
        load: Callable[[], LoadedModel],
        *,
        max_batch_size: int,
        max_batch_tokens: int | None,
        max_queued_inputs: int,
        batch_wait_ms: float,
    ) -> None:
        self._load = load
        self.model: LoadedModel | None = None
        self.loaded: Future[LoadedModel] = Future()
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_inputs = max_queued_inputs
        self.batch_wait_s = batch_wait_ms / 1000
        self._arrivals: deque[_Job] = deque()
        self._pending = 0  # inputs accepted and not yet embedded
        self._cond = threading.Condition()
        self._stopped = False
        self._seq = count()
        self._thread = threading.Thread(target=self._run, name="embed-model", daemon=True)
        self._thread.start()

    async def embed(self, texts: list[str], truncate: bool) -> tuple[np.ndarray, int]:
        """Vectors (one row per text, normalized) and the number of tokens read."""
        loop = asyncio.get_running_loop()
        job = _Job(texts=texts, truncate=truncate, loop=loop, future=loop.create_future())
        with self._cond:
            if self._stopped:
                raise QueueFull("the embedder is shutting down")
            if self._pending + len(texts) > self.max_queued_inputs:
                raise QueueFull(f"{self._pending} inputs are waiting")
            self._arrivals.append(job)
            self._pending += len(texts)
            QUEUE_DEPTH.set(self._pending)
            self._cond.notify()
        return await job.future

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # model thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            model = self._load()
        except BaseException as exc:
            self.loaded.set_exception(exc)
            return
        if self.max_batch_tokens is None:  # GPUs like big batches; CPUs like little padding
            self.max_batch_tokens = 16384 if model.device.startswith("cuda") else 2048
        self.model = model
        self.loaded.set_result(model)
        pool: list[_Item] = []
        while True:
            arrivals = self._take(wait=not pool)
            if self._stopped:  # answer whatever is still waiting, then end
                with self._cond:
                    arrivals += list(self._arrivals)
                self._fail(
                    [item.job for item in pool] + arrivals,
                    QueueFull("the embedder is shutting down"),
                )
                return
            try:
                pool.extend(self._tokenize(arrivals))
            except Exception:  # fail these new requests only
                logger.exception("tokenization failed")
                self._fail(arrivals, RuntimeError("embedding failed"))
                self._recount(pool)
                continue
            if not pool:
                continue
            batch = self._pick(pool)
            taken = {id(item) for item in batch}
            pool = [item for item in pool if id(item) not in taken]
            try:
                self._forward(batch)
            except Exception:  # fail the requests in this pass only; the rest go on
                logger.exception("embedding batch failed")
                failed = {id(item.job): item.job for item in batch}
                self._fail(list(failed.values()), RuntimeError("embedding failed"))
                pool = [item for item in pool if id(item.job) not in failed]
                self._recount(pool)

    def _recount(self, pool: list[_Item]) -> None:
        with self._cond:
            self._pending = len(pool) + sum(len(job.texts) for job in self._arrivals)
            QUEUE_DEPTH.set(self._pending)

    @staticmethod
    def _fail(jobs: list[_Job], error: Exception) -> None:
        for job in {id(job): job for job in jobs}.values():
            _resolve(job, None, error)

    def _take(self, wait: bool) -> list[_Job]:
        """New requests; block for one when the pool is empty."""
        with self._cond:
            while wait and not self._arrivals and not self._stopped:
                self._cond.wait()
        if wait and self.batch_wait_s > 0:
            time.sleep(self.batch_wait_s)  # let a burst of concurrent requests arrive
        with self._cond:
            jobs = list(self._arrivals)
            self._arrivals.clear()
        return jobs

    def _pick(self, pool: list[_Item]) -> list[_Item]:
        """The oldest input and the run of inputs of similar length around it that gives the
        most real tokens per unit of work (padded tokens plus a fixed cost per pass)."""
        budget = self.max_batch_tokens or 2048
        ordered = sorted(pool, key=lambda item: (len(item.ids), item.seq))
        anchor = ordered.index(min(pool, key=lambda item: item.seq))
        lengths = [len(item.ids) for item in ordered]
        best, best_score = (anchor, anchor + 1), -1.0
        for lo in range(anchor, -1, -1):
            real = sum(lengths[lo:anchor])
            for hi in range(anchor + 1, len(ordered) + 1):
                width, size = lengths[hi - 1], hi - lo
                if size > self.max_batch_size or (size > 1 and width * size > budget):
                    break
                real += lengths[hi - 1]
                score = real / (width * size + PASS_COST_TOKENS)
                if score > best_score:
                    best, best_score = (lo, hi), score
            if anchor - lo + 1 >= self.max_batch_size:
                break
        return ordered[best[0] : best[1]]

    def _tokenize(self, jobs: list[_Job]) -> list[_Item]:
        if not jobs:
            return []
        model = self.model
        assert model is not None
        texts = [text for job in jobs for text in job.texts]
        encoded = model.tokenize(texts, truncate=False)
        limit = model.max_seq_length
        over = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > limit]
        full_lengths = {i: len(encoded["input_ids"][i]) for i in over}
        if over:  # re-tokenize the few long ones with truncation, keeping special tokens
            cut = model.tokenize([texts[i] for i in over], truncate=True)
            for key in encoded:
                for j, i in enumerate(over):
                    encoded[key][i] = cut[key][j]
        items: list[_Item] = []
        offset = 0
        for job in jobs:
            rows = range(offset, offset + len(job.texts))
            offset += len(job.texts)
            too_long = next((i for i in rows if i in full_lengths), None)
            if too_long is not None and not job.truncate:
                self._done(len(job.texts))
                _resolve(
                    job, None, InputTooLong(too_long - rows.start, full_lengths[too_long], limit)
                )
                continue
            job.vectors = np.empty((len(job.texts), model.dimension), dtype=np.float32)
            job.remaining = len(job.texts)
            for i in rows:
                ids = encoded["input_ids"][i]
                extra = {key: values[i] for key, values in encoded.items() if key != "input_ids"}
                items.append(_Item(next(self._seq), job, i - rows.start, ids, extra))
                job.tokens += len(ids)
        return items

    def _forward(self, batch: list[_Item]) -> None:
        assert self.model is not None
        started = time.perf_counter()
        vectors = self.model.forward_tokens(
            [item.ids for item in batch], [item.extra for item in batch]
        )
        FORWARD_SECONDS.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(batch))
        BATCH_TOKENS.observe(len(batch) * max(len(item.ids) for item in batch))
        TOKENS.inc(sum(len(item.ids) for item in batch))
        self._done(len(batch))
        for item, vector in zip(batch, vectors, strict=True):
            job = item.job
            job.vectors[item.row] = vector  # type: ignore[index]
            job.remaining -= 1
            if job.remaining == 0:
                _resolve(job, (job.vectors, job.tokens), None)  # type: ignore[arg-type]

    def _done(self, inputs: int) -> None:
        with self._cond:
            self._pending -= inputs
            QUEUE_DEPTH.set(self._pending)
