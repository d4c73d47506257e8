"""Streaming chat through the gateway vs the same prompt straight to the generator.

Starts a local stack on free ports, ingests the sample documents, then alternates the two
paths for each question so both see the same machine state. Reports time to first token
(TTFT), decode throughput and their ratios, and the retrieval call on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from ragctl.bench import SAMPLE_QUESTIONS  # noqa: E402
from ragctl.cli import ingest_paths, sample_paths  # noqa: E402
from ragctl.stack import Ports, Stack  # noqa: E402
from services.gateway import rag  # noqa: E402

QUESTIONS = SAMPLE_QUESTIONS[:4]


def stream(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one streaming request; return TTFT, token count and decode time."""
    start = time.perf_counter()
    first = last = None
    tokens = 0
    citations: list[dict[str, Any]] = []
    with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            citations = event.get("citations", citations)
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
    assert first is not None and last is not None, "no tokens streamed"
    decode_s = max(last - first, 1e-9)
    return {
        "ttft_s": first - start,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / decode_s if tokens > 1 else 0.0,
        "citations": citations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the questions")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        stack = Stack(home=Path(home), ports=Ports.free())
        stack.start()
        try:
            results = run(stack, args.rounds, args.max_tokens)
        finally:
            stack.stop()
    report("bench_chat", results)


def run(stack: Stack, rounds: int, max_tokens: int) -> dict[str, Any]:
    token = stack.access_token()
    auth = {"Authorization": f"Bearer {token}"}
    gw = httpx.Client(base_url=stack.url("gateway"), headers=auth, timeout=120)
    gen = httpx.Client(base_url=stack.url("generator"), timeout=120)
    ingest_paths(gw, sample_paths())
    common = {"stream": True, "temperature": 0, "max_tokens": max_tokens}

    samples: dict[str, list[dict[str, Any]]] = {"gateway": [], "direct": [], "search": []}
    for i, question in enumerate(QUESTIONS * rounds):
        messages = [{"role": "user", "content": question}]
        start = time.perf_counter()
        hits = gw.post("/v1/search", json={"query": question, "k": 4}).json()["data"]
        samples["search"].append({"latency_s": time.perf_counter() - start})
        # The exact prompt the gateway builds, sent straight to the generator.
        passages = rag.fit_passages(hits, messages, 2048, max_tokens)
        direct_body = {"messages": rag.build_messages(passages, messages), **common}
        requests = {
            "direct": (gen, direct_body),
            "gateway": (gw, {"messages": messages, **common}),
        }
        # llama.cpp caches the prompt of the previous request, so the second of the pair
        # starts warm: alternate the order, and take TTFT only from the path that went first.
        order = ["direct", "gateway"] if i % 2 == 0 else ["gateway", "direct"]
        for position, path in enumerate(order):
            client, body = requests[path]
            result = stream(client, "/v1/chat/completions", body)
            result["cold"] = position == 0
            samples[path].append(result)

    def med(path: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[path])

    def cold_ttft(path: str) -> float:
        return statistics.median(s["ttft_s"] for s in samples[path] if s["cold"])

    search_s = med("search", "latency_s")
    return {
        "requests_per_path": len(samples["direct"]),
        "ttft_from_cold_requests_per_path": sum(s["cold"] for s in samples["direct"]),
        "direct": {
            "ttft_s": med("direct", "ttft_s"),
            "tokens_per_s": med("direct", "tokens_per_s"),
        },
        "gateway": {
            "ttft_s": med("gateway", "ttft_s"),
            "tokens_per_s": med("gateway", "tokens_per_s"),
        },
        "retrieval_call_s": search_s,
        "added_ttft_excluding_retrieval_s": med("gateway", "ttft_s")
        - med("direct", "ttft_s")
        - search_s,
        "throughput_ratio_gateway_vs_direct": med("gateway", "tokens_per_s")
        / med("direct", "tokens_per_s"),
    }


if __name__ == "__main__":
    main()
