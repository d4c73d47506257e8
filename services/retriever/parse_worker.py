"""A parse worker process: reads documents from stdin, writes their blocks to stdout.

Started by services.retriever.sandbox.ParsePool, never by hand. It runs under hard limits set
here at start (address space, no core dumps) and per parse (CPU seconds): a hostile file can
exhaust this process, never the retriever. Frames on both pipes are a 4-byte big-endian length
and that many bytes; a request is two frames (a JSON header, then the raw document), an answer
one JSON frame. JSON, not pickle: the retriever must not trust what a parser that read a
hostile file sends back.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import struct
import sys
from typing import IO, Any

from services.retriever.parsing import ParseError, parse_document

_LENGTH = struct.Struct(">I")
# Text one document may yield (a PDF can unpack to far more text than its upload's 10 MiB).
MAX_TEXT_CHARS = 64 * 2**20
# Sent when even the answer does not fit in memory: built before any parse.
_OUT_OF_MEMORY = json.dumps({"error": "out of memory", "kind": "memory"}).encode()


def read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def write_frame(stream: IO[bytes], data: bytes) -> None:
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)  # not joined: no second copy of a large answer
    stream.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _address_space() -> int:
    """This process's virtual size now, in bytes (0 where /proc is not there)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the retriever died before the line above ran
        os._exit(0)


def _answer(spec: dict[str, Any], raw: bytes) -> dict[str, Any]:
    resource.setrlimit(
        resource.RLIMIT_CPU, (int(cpu_seconds() + float(spec["cpu_s"])) + 1, resource.RLIM_INFINITY)
    )
    try:
        blocks = parse_document(raw, str(spec["media_type"]))
        if sum(len(block.text) for block in blocks) > MAX_TEXT_CHARS:
            raise ParseError(
                f"the document holds over {MAX_TEXT_CHARS // 2**20} million characters of text"
            )
    except ParseError as exc:
        return {"error": str(exc), "kind": "parse"}
    except MemoryError:
        return {"error": "out of memory", "kind": "memory"}
    except Exception as exc:  # a parser bug on this file: the file is unreadable to us
        if "Memory allocation failed" in str(exc):  # libxml2's way of saying MemoryError
            return {"error": "out of memory", "kind": "memory"}
        return {"error": f"the parser failed on this file ({type(exc).__name__})", "kind": "parse"}
    return {"blocks": [[b.text, b.heading, b.page] for b in blocks]}


def main() -> None:
    parent, memory_mb = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the retriever's to handle
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_mb > 0 and (base := _address_space()):
        limit = base + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the answers
    while True:
        header, raw = read_frame(requests), read_frame(requests)
        if header is None or raw is None:
            return  # the retriever closed the pipe: it is done with this worker
        try:
            answer = _answer(json.loads(header), raw)
            del raw
            answer["cpu"] = cpu_seconds()
            answer["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            encoded = json.dumps(answer, ensure_ascii=False).encode()
        except MemoryError:  # the blocks parsed, but their answer does not fit
            answer, encoded = {"kind": "memory"}, _OUT_OF_MEMORY
        write_frame(answers, encoded)
        if answer.get("kind") == "memory":
            return  # what is left of this process after running out is not worth keeping


if __name__ == "__main__":
    main()
