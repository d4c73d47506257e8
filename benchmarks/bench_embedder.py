"""Embedder server vs in-process sentence-transformers, same machine, same model, one run.

- throughput: the server at concurrency 32, one text per request, against in-process
  `SentenceTransformer.encode` over the same texts at its best batch size;
- latency: the server at concurrency 1 against one in-process `encode([text])`.

Texts: SciFact abstracts from ../shared/data when present (first sentences, passage-sized),
else generated sentences. The client asks for base64, as the openai SDK does by default.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from benchmarks.loadclient import encode_post, run_load  # noqa: E402
from ragctl.stack import free_port, wait_ready  # noqa: E402

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"


def load_texts(n: int, seed: int = 7) -> tuple[list[str], str]:
    rng = random.Random(seed)
    if SCIFACT.exists():
        texts = []
        with SCIFACT.open() as fh:
            for line in fh:
                doc = json.loads(line)
                sentences = doc["text"].split(". ")
                texts.append(". ".join(sentences[: rng.randint(1, 3)]))
                if len(texts) >= n:
                    break
        return texts, "scifact"
    words = (
        "protein cell gene expression tumor patients risk trial dose brain signal "
        "response mice increased reduced levels associated study cohort"
    ).split()
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(8, 60))) for _ in range(n)
    ], "synthetic"


def start_server() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "EMBEDDER_PORT": str(port), "EMBEDDER_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "services.embedder"], env=env)
    if not wait_ready(f"http://127.0.0.1:{port}", 180, proc):
        proc.kill()
        raise SystemExit("the embedder did not start")
    return proc, port


def histogram_mean(metrics: str, name: str) -> float:
    values = {}
    for line in metrics.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"{name}{suffix} "):
                values[suffix] = float(line.split()[1])
    return values.get("_sum", 0.0) / max(values.get("_count", 1.0), 1.0)


def run(texts: list[str], concurrency: int, single: int, rounds: int) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from services.embedder.model import resolve_model_path

    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    model.encode(texts[:64], batch_size=32)  # warm-up
    proc, port = start_server()
    try:
        requests = [
            encode_post(
                "127.0.0.1", port, "/v1/embeddings", {"input": t, "encoding_format": "base64"}
            )
            for t in texts
        ]
        asyncio.run(run_load("127.0.0.1", port, requests[:64], concurrency))  # warm-up

        # Throughput, alternating the two sides so both see the same machine state.
        by_batch: dict[int, list[float]] = {}
        server_tps: list[float] = []
        statuses: dict[int, int] = {}
        for _ in range(rounds):
            for bs in (8, 16, 32, 64, 128):
                start = time.perf_counter()
                model.encode(texts, batch_size=bs, normalize_embeddings=True)
                by_batch.setdefault(bs, []).append(len(texts) / (time.perf_counter() - start))
            loaded = asyncio.run(run_load("127.0.0.1", port, requests, concurrency))
            server_tps.append(loaded["rps"])
            for code, n in loaded["statuses"].items():
                statuses[code] = statuses.get(code, 0) + n
        in_process_tps = {bs: statistics.mean(v) for bs, v in by_batch.items()}
        best = max(in_process_tps, key=lambda bs: in_process_tps[bs])

        # Latency at concurrency 1, interleaved request by request.
        conn = http.client.HTTPConnection("127.0.0.1", port)
        server_lat, local_lat = [], []
        for text in texts[:single]:
            body = json.dumps({"input": text, "encoding_format": "base64"})
            start = time.perf_counter()
            conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
            conn.getresponse().read()
            server_lat.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.encode([text], normalize_embeddings=True)
            local_lat.append(time.perf_counter() - start)
        conn.close()
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
    server = {
        "texts_per_s": statistics.mean(server_tps),
        "statuses": statuses,
        "concurrency": concurrency,
        "mean_batch_size": histogram_mean(metrics, "embedder_batch_size"),
        "single_p50_s": statistics.median(server_lat),
    }
    baseline = {
        "texts_per_s_by_batch": in_process_tps,
        "best_batch_size": best,
        "best_texts_per_s": in_process_tps[best],
        "single_p50_s": statistics.median(local_lat),
    }
    return {
        "in_process": baseline,
        "server": server,
        "throughput_ratio_server_vs_in_process": server["texts_per_s"]
        / baseline["best_texts_per_s"],
        "latency_ratio_server_vs_in_process_c1": server["single_p50_s"] / baseline["single_p50_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--single", type=int, default=200, help="requests for the latency test")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    args = parser.parse_args()
    texts, source = load_texts(args.texts)
    result = {
        "texts": len(texts),
        "source": source,
        **run(texts, args.concurrency, args.single, args.rounds),
    }
    report("bench_embedder", result)


if __name__ == "__main__":
    main()
