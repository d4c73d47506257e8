"""Merge concurrent calls of a batch function into fewer, larger calls."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """Callers hand over lists of items; at most max_in_flight calls of `fn` run at once,
    each on up to max_items of the waiting items, oldest first. A lone caller is sent at
    once; under load, items of many callers share a call.

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
        self._waiting: deque[tuple[Item, asyncio.Future[Result], int]] = deque()
        self._in_flight = 0
        self._callers = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, items: Sequence[Item]) -> list[Result]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        self._callers += 1
        caller = self._callers
        futures: list[asyncio.Future[Result]] = [loop.create_future() for _ in items]
        self._waiting.extend(
            (item, future, caller) for item, future in zip(items, futures, strict=True)
        )
        self._dispatch()
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()  # no-op when done; drops our items if we were cancelled

    async def aclose(self) -> None:
        """Cancel the calls in flight (their callers get CancelledError)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, future, _ in self._waiting:
            future.cancel()
        self._waiting.clear()

    def _dispatch(self) -> None:
        # A partial batch goes only when nothing is in flight (a lone caller waits for
        # nobody); while a call runs, items gather into full batches.
        while self._waiting and (
            self._in_flight == 0
            or (self._in_flight < self.max_in_flight and len(self._waiting) >= self.max_items)
        ):
            batch: list[tuple[Item, asyncio.Future[Result], int]] = []
            while self._waiting and len(batch) < self.max_items:
                entry = self._waiting.popleft()
                if not entry[1].done():  # its caller has gone
                    batch.append(entry)
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result], int]]) -> None:
        try:
            await self._call(batch)
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _call(self, batch: list[tuple[Item, asyncio.Future[Result], int]]) -> None:
        try:
            results = await self.fn([item for item, _, _ in batch])
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
