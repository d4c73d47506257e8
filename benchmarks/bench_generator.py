"""The generator launcher vs the same requests sent straight to llama.cpp's own server.

Starts `python -m services.generator` (llamacpp engine) with a known engine port, then at
concurrency 1, 4 and 8 alternates rounds of identical streaming requests between the two
endpoints: time to first token (TTFT) and generated tokens per second, and their ratios.
Every request has its own prompt, so llama.cpp's prompt cache helps neither side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from ragctl.stack import free_port, wait_ready  # noqa: E402

TOPICS = ["a lighthouse", "the sea", "a mountain village", "a clockmaker", "winter", "a river"]


def one_stream(url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(TTFT, end time, tokens) of one streaming chat request."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url, json=body, timeout=120) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                first = first or time.perf_counter()
                tokens += 1
    assert first is not None
    return first - start, time.perf_counter() - start, tokens


def round_of(url: str, concurrency: int, max_tokens: int, ids: count) -> dict[str, float]:
    prompts = [
        f"Request {next(ids)}. Write a short story about {TOPICS[i % len(TOPICS)]}."
        for i in range(concurrency)
    ]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_stream(url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    return {
        "ttft_s": statistics.median(r[0] for r in results),
        "tokens_per_s": sum(r[2] for r in results) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    port, engine_port = free_port(), free_port()
    env = {
        **os.environ,
        "GENERATOR_PORT": str(port),
        "GENERATOR_ENGINE_PORT": str(engine_port),
        "GENERATOR_PARALLEL": "8",
        "GENERATOR_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.generator"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        launcher = f"http://127.0.0.1:{port}"
        if not wait_ready(launcher, 300, proc):
            raise SystemExit("the generator did not start")
        urls = {
            "direct": f"http://127.0.0.1:{engine_port}/v1/chat/completions",
            "launcher": f"{launcher}/v1/chat/completions",
        }
        ids = count()
        round_of(urls["direct"], 2, 8, ids)  # warm-up
        results: dict[str, Any] = {}
        for concurrency in (1, 4, 8):
            samples: dict[str, list[dict[str, float]]] = {"direct": [], "launcher": []}
            for r in range(args.rounds):
                order = ["direct", "launcher"] if r % 2 == 0 else ["launcher", "direct"]
                for side in order:
                    samples[side].append(round_of(urls[side], concurrency, args.max_tokens, ids))
            summary = {
                side: {
                    key: statistics.median(s[key] for s in runs)
                    for key in ("ttft_s", "tokens_per_s")
                }
                for side, runs in samples.items()
            }
            summary["throughput_ratio_launcher_vs_direct"] = (
                summary["launcher"]["tokens_per_s"] / summary["direct"]["tokens_per_s"]
            )
            summary["added_ttft_ms"] = 1000 * (
                summary["launcher"]["ttft_s"] - summary["direct"]["ttft_s"]
            )
            results[f"concurrency_{concurrency}"] = summary
    finally:
        proc.terminate()
        proc.wait(30)
    report("bench_generator", results)


if __name__ == "__main__":
    main()
