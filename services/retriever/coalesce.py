"""Merge concurrent calls of a batch function into fewer, larger calls."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
Entry = tuple[Item, "asyncio.Future[Result]", int]


class Coalescer(Generic[Item, Result]):
    """Callers hand over lists of items; at most max_in_flight calls of `fn` run at once,
    each on up to max_items waiting items, taken from the waiting callers in turn (so one
    huge document does not hold up everyone else's). A lone caller is sent at once; while a
    call runs, items gather into full batches.

    Ingestion jobs of small documents each have a few chunks: one request per job costs the
    embedder (HTTP and Python overhead next to its forward passes) far more than the
    retriever's own batching does.
    """

    def __init__(
        self,
        fn: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        max_items: int,
        max_in_flight: int = 2,
        transient: tuple[type[Exception], ...] = (),
    ) -> None:
        self.fn = fn
        self.max_items = max_items
        self.max_in_flight = max_in_flight
        self.transient = transient  # failures that say nothing about the items themselves
        self._waiting: dict[int, deque[tuple[Item, asyncio.Future[Result]]]] = {}
        self._n_waiting = 0
        self._in_flight = 0
        self._callers = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def __call__(self, items: Sequence[Item]) -> list[Result]:
        if self._closed:
            raise RuntimeError("the coalescer is closed")
        if not items:
            return []
        loop = asyncio.get_running_loop()
        caller = next(self._callers)
        futures: list[asyncio.Future[Result]] = [loop.create_future() for _ in items]
        self._waiting[caller] = deque(zip(items, futures, strict=True))
        self._n_waiting += len(items)
        self._dispatch()
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()  # no-op when done; drops our items if we were cancelled

    async def aclose(self) -> None:
        """Refuse new calls and cancel those in flight (their callers get CancelledError)."""
        self._closed = True
        for queue in self._waiting.values():
            for _, future in queue:
                future.cancel()
        self._waiting.clear()
        self._n_waiting = 0
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _take(self) -> list[Entry[Item, Result]]:
        """Up to max_items waiting items, one from each waiting caller in turn."""
        batch: list[Entry[Item, Result]] = []
        while self._waiting and len(batch) < self.max_items:
            for caller in list(self._waiting):
                queue = self._waiting[caller]
                item, future = queue.popleft()
                self._n_waiting -= 1
                if not queue:
                    del self._waiting[caller]
                if not future.done():  # its caller has gone
                    batch.append((item, future, caller))
                if len(batch) >= self.max_items:
                    break
        return batch

    def _dispatch(self) -> None:
        while (
            not self._closed
            and self._waiting
            and (
                self._in_flight == 0
                or (self._in_flight < self.max_in_flight and self._n_waiting >= self.max_items)
            )
        ):
            batch = self._take()
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Entry[Item, Result]]) -> None:
        try:
            await self._call(batch)
        finally:
            # Whatever went wrong (or was cancelled), no caller waits forever.
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(RuntimeError("the batch call ended without a result"))
            self._in_flight -= 1
            self._dispatch()

    async def _call(self, batch: list[Entry[Item, Result]]) -> None:
        try:
            results = await self.fn([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as exc:
            callers = {caller for _, _, caller in batch}
            if len(callers) > 1 and not isinstance(exc, self.transient):
                # Maybe one caller's items are bad: let each caller fail or succeed alone.
                for caller in callers:
                    await self._call([entry for entry in batch if entry[2] == caller])
                return
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future, _), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
