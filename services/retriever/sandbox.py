"""Parsing in worker processes with hard limits, shared fairly across users.

A document is parsed in a separate process (services/retriever/parse_worker.py) under an
address-space limit and a CPU-time limit, and is killed when it runs past a wall-clock limit
that starts when its parse starts (not while it waits for a process). A bounded number of
processes run per replica; waiting parses are served round-robin across users, and no user
holds more than all but one of them, so one user's files delay another's by at most the time
a free process takes to start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.retriever.parse_worker import _LENGTH
from services.retriever.parsing import Block, ParseError

logger = logging.getLogger(__name__)

RECYCLE_AFTER_PARSES = 500
RECYCLE_ABOVE_RSS_KB = 512 * 1024  # a worker that grew this large is replaced after its parse
_WORKER_ENV = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where `services` can be imported
LOAD_CPU_SHARE = 0.5  # a parse past its wall time that used less CPU than this share was starved


def _blocks_of(answer: object) -> list[Block] | None:
    """The blocks of a worker's answer, None for an error answer; ParseInterrupted if the
    answer is not one a worker writes."""
    if not isinstance(answer, dict):
        raise ParseInterrupted("the parser answered garbage")
    blocks = answer.get("blocks")
    if blocks is None:
        if isinstance(answer.get("kind"), str):
            return None
        raise ParseInterrupted("the parser answered garbage")
    if not isinstance(blocks, list) or not all(
        isinstance(b, list)
        and len(b) == 3
        and isinstance(b[0], str)
        and (b[1] is None or isinstance(b[1], str))
        and (b[2] is None or (isinstance(b[2], int) and not isinstance(b[2], bool)))
        for b in blocks
    ):
        raise ParseInterrupted("the parser answered garbage")
    return [Block(text, heading, page) for text, heading, page in blocks]


class ParseInterrupted(Exception):
    """The parse was cut short by something other than the file (load, a crash): try later."""


@dataclass(frozen=True)
class ParseLimits:
    memory_mb: int = 1024  # address space a parse may add to its process
    cpu_s: float = 120.0  # CPU seconds one parse may use
    wall_s: float = 300.0  # wall-clock seconds one parse may take, from its start


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.cpu = 0.0  # CPU seconds it had used when it last answered
        self.parses = 0

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def reap(self) -> int | None:
        self.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 5)
        return self.proc.returncode

    def cpu_now(self) -> float | None:
        """CPU seconds the process has used so far (Linux /proc), or None."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None


class ParsePool:
    """`await pool.parse(user, raw, media_type)`: the blocks, ParseError (the file's fault,
    permanent) or ParseInterrupted (not the file's fault, try again later)."""

    def __init__(self, processes: int, limits: ParseLimits) -> None:
        self.processes = max(1, processes)
        self.limits = limits
        # A user may hold all processes but one, so another user always finds one free.
        self.per_user = max(1, self.processes - 1)
        self._free = self.processes
        self._idle: list[_Worker] = []
        self._waiting: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = (
            collections.OrderedDict()
        )
        self._running: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- scheduling -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand free slots to waiting parses, users taken in turn."""
        while self._free > 0:
            for user, queue in self._waiting.items():
                while queue and queue[0].done():  # cancelled while waiting
                    queue.popleft()
                if queue and self._running[user] < self.per_user:
                    queue.popleft().set_result(None)
                    self._running[user] += 1
                    self._free -= 1
                    self._waiting.move_to_end(user)  # the next slot goes to someone else
                    break
            else:
                break
        for user in [user for user, queue in self._waiting.items() if not queue]:
            del self._waiting[user]

    def _release(self, user: str) -> None:
        self._running[user] -= 1
        if self._running[user] <= 0:
            del self._running[user]
        self._free += 1
        self._dispatch()

    async def _slot(self, user: str) -> None:
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user, collections.deque()).append(ticket)
        self._dispatch()
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():  # granted as we were leaving
                self._release(user)
            else:
                ticket.cancel()
                self._dispatch()
            raise

    # --- processes ------------------------------------------------------------------------

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.retriever.parse_worker",
            str(os.getpid()),
            str(self.limits.memory_mb),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            # Not the retriever's environment: no database URLs or service token for a parser
            # that a hostile file might take over.
            env={name: os.environ[name] for name in _WORKER_ENV if name in os.environ},
            cwd=_PACKAGE_ROOT,
        )
        return _Worker(proc)

    async def start(self) -> None:
        """Start every process now, so that no parse waits for one to start."""
        for _ in range(self.processes - len(self._idle)):
            self._idle.append(await self._spawn())

    async def _checkout(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
        return await self._spawn()

    async def _replace(self, worker: _Worker) -> None:
        """Reap a spent process and start its successor while nobody waits for it."""
        await worker.reap()
        if not self._closed:
            successor = await self._spawn()
            if self._closed:
                await successor.reap()
            else:
                self._idle.append(successor)

    def _checkin(self, worker: _Worker, rss_kb: int, spent: bool) -> None:
        worker.parses += 1
        if (
            spent
            or self._closed
            or worker.parses >= RECYCLE_AFTER_PARSES
            or rss_kb > RECYCLE_ABOVE_RSS_KB
            or not worker.alive
        ):
            self._background(self._replace(worker))
        else:
            self._idle.append(worker)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- parsing --------------------------------------------------------------------------

    async def parse(self, user: str, raw: bytes, media_type: str) -> list[Block]:
        if self._closed:
            raise ParseInterrupted("the retriever is shutting down")
        await self._slot(user)
        try:
            worker = await self._checkout()
            return await self._parse_in(worker, raw, media_type)
        finally:
            self._release(user)

    async def _parse_in(self, worker: _Worker, raw: bytes, media_type: str) -> list[Block]:
        assert worker.proc.stdin is not None and worker.proc.stdout is not None
        header = json.dumps({"media_type": media_type, "cpu_s": self.limits.cpu_s}).encode()
        try:
            try:
                async with asyncio.timeout(self.limits.wall_s):  # from the parse's start
                    worker.proc.stdin.write(_LENGTH.pack(len(header)) + header)
                    worker.proc.stdin.write(_LENGTH.pack(len(raw)))
                    worker.proc.stdin.write(raw)
                    await worker.proc.stdin.drain()
                    size = _LENGTH.unpack(await worker.proc.stdout.readexactly(_LENGTH.size))[0]
                    data = await worker.proc.stdout.readexactly(size)
            except TimeoutError:
                raise self._overran(worker) from None
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
                raise await self._died(worker) from None
            # Large answers are decoded off the event loop; any answer is checked, as a
            # process that read a hostile file is not trusted to say what it should.
            answer = await asyncio.to_thread(json.loads, data) if size > 2**20 else json.loads(data)
            blocks = _blocks_of(answer)
        except BaseException:  # over a limit, crashed, cancelled or garbled: this one is done
            await worker.reap()
            self._background(self._replace(worker))
            raise
        worker.cpu = float(answer.get("cpu", worker.cpu))
        spent = answer.get("kind") == "memory"  # it exits after saying so
        self._checkin(worker, int(answer.get("rss_kb", 0)), spent)
        if blocks is not None:
            return blocks
        if spent:
            raise ParseError(
                f"the document needs more than {self.limits.memory_mb} MiB of memory to read"
            )
        raise ParseError(str(answer.get("error") or "the document could not be read")[:300])

    def _overran(self, worker: _Worker) -> Exception:
        """Past the wall-clock limit: the file's fault if it kept the CPU busy, else load's."""
        now = worker.cpu_now()
        worker.kill()
        used = None if now is None else now - worker.cpu
        # A parse that had its share of a CPU meets the CPU limit first (SIGXCPU) unless the
        # wall limit is the lower one: compare with the lower.
        busy = LOAD_CPU_SHARE * min(self.limits.cpu_s, self.limits.wall_s)
        if used is not None and used < busy:
            logger.warning(
                "a parse ran past %gs using %.1fs of CPU; the host is overloaded",
                self.limits.wall_s,
                used,
            )
            return ParseInterrupted(
                f"the parse was cut short after {self.limits.wall_s:g}s by load on the server"
            )
        return ParseError(f"the document took over {self.limits.wall_s:g}s to read")

    async def _died(self, worker: _Worker) -> Exception:
        # Wait before killing: a kill polls the process first and would take its exit status
        # away from asyncio's child watcher.
        try:
            code: int | None = await asyncio.wait_for(worker.proc.wait(), 5)
        except TimeoutError:
            code = await worker.reap()
        if code == -signal.SIGXCPU:
            return ParseError(
                f"the document needs more than {self.limits.cpu_s:g}s of CPU time to read"
            )
        logger.error("a parse worker died with code %s", code)
        return ParseInterrupted(f"the parser stopped unexpectedly (exit code {code})")

    async def aclose(self) -> None:
        self._closed = True
        await asyncio.gather(*self._tasks, return_exceptions=True)
        idle, self._idle = self._idle, []
        await asyncio.gather(*(worker.reap() for worker in idle), return_exceptions=True)
