"""Coalescer: concurrent callers share calls; one caller's bad items fail only that caller."""

from __future__ import annotations

import asyncio

import pytest

from services.retriever.coalesce import Coalescer


class Flaky(Exception):
    pass


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    async def double(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await asyncio.sleep(0.01)
        if any(item < 0 for item in items):
            raise ValueError("negative input")
        if any(item == 999 for item in items):
            raise Flaky("the service is down")
        return [2 * item for item in items]


async def test_concurrent_callers_share_full_calls_and_get_their_own_results() -> None:
    rec = Recorder()
    coalescer = Coalescer(rec.double, max_items=8, max_in_flight=2)
    inputs = [[10 * c + i for i in range(3)] for c in range(10)]
    results = await asyncio.gather(*(coalescer(items) for items in inputs))
    assert results == [[2 * x for x in items] for items in inputs]
    assert len(rec.calls) < 10, "callers share calls"
    assert max(len(call) for call in rec.calls) == 8
    assert sorted(x for call in rec.calls for x in call) == sorted(x for i in inputs for x in i)
    assert await coalescer([]) == []


async def test_a_bad_caller_fails_alone_and_a_transient_failure_fails_the_batch() -> None:
    rec = Recorder()
    coalescer = Coalescer(rec.double, max_items=16, transient=(Flaky,))
    first = asyncio.create_task(coalescer([1]))  # goes alone; the next three share a call
    good, bad, other = await asyncio.gather(
        coalescer([1, 2]), coalescer([-1]), coalescer([3]), return_exceptions=True
    )
    assert await first == [2]
    assert good == [2, 4] and other == [6]
    assert isinstance(bad, ValueError)
    down = await asyncio.gather(
        coalescer([5]), coalescer([6]), coalescer([999]), return_exceptions=True
    )
    assert [type(result) for result in down[1:]] == [Flaky, Flaky], "no split on outages"


async def test_a_cancelled_callers_items_are_not_sent() -> None:
    rec = Recorder()
    coalescer = Coalescer(rec.double, max_items=4, max_in_flight=1)
    running = asyncio.create_task(coalescer([1]))
    await asyncio.sleep(0)
    gone = asyncio.create_task(coalescer([7, 7]))
    await asyncio.sleep(0)
    gone.cancel()
    assert await coalescer([3]) == [6]
    assert await running == [2]
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert all(7 not in call for call in rec.calls)


async def test_one_big_caller_does_not_hold_up_the_others() -> None:
    rec = Recorder()
    coalescer = Coalescer(rec.double, max_items=4, max_in_flight=1)
    running = asyncio.create_task(coalescer([0]))
    await asyncio.sleep(0)
    big = asyncio.create_task(coalescer(list(range(100, 120))))
    await asyncio.sleep(0)
    small = asyncio.create_task(coalescer([1]))
    await asyncio.wait({small})
    assert await small == [2]
    assert not big.done(), "the small caller was served while the big one still had items"
    assert await big == [2 * x for x in range(100, 120)]
    await running
    await coalescer.aclose()
    with pytest.raises(RuntimeError):
        await coalescer([1])
