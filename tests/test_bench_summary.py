"""benchmarks/summary.py, the table `make bench` ends with: one row per figure from result
files of the benchmarks' real shapes (written here with round numbers, so every ratio is
known), a "not run" row per missing file, and the script as make runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "summary.py"
_spec = importlib.util.spec_from_file_location("bench_summary", SCRIPT)
assert _spec is not None and _spec.loader is not None
summary = importlib.util.module_from_spec(_spec)
sys.modules["bench_summary"] = summary  # dataclasses look their module up by name
_spec.loader.exec_module(summary)

NAMES = [source.name for source in summary.SOURCES]


def side(p50_ms: float, p95_ms: float, rps: float) -> dict[str, float]:
    return {"p50_ms": p50_ms, "p95_ms": p95_ms, "requests_per_s": rps}


def pct(p50: float, p95: float) -> dict[str, float]:
    return {"p50": p50, "p95": p95, "p99": p95, "mean": p50}


EMBEDDER = {
    "texts": 2000,
    "source": "scifact",
    "in_process": {
        "texts_per_s_by_batch": {"8": 125.0, "16": 120.0},
        "best_batch_size": 8,
        "best_texts_per_s": 125.0,
        "single_p50_s": 0.010,
    },
    "server": {
        "texts_per_s": 100.0,
        "statuses": {"200": 4000},
        "concurrency": 32,
        "mean_batch_size": 6.7,
        "single_p50_s": 0.012,
    },
    "throughput_ratio_server_vs_in_process": 0.8,
    "latency_ratio_server_vs_in_process_c1": 1.2,
}
GENERATOR = {
    f"concurrency_{c}": {
        "direct": {"ttft_s": 0.100 * c, "tokens_per_s": 80.0 * c},
        "launcher": {"ttft_s": 0.100 * c + 0.005, "tokens_per_s": 76.0 * c},
        "throughput_ratio_launcher_vs_direct": 0.95,
        "added_ttft_ms": 5.0,
    }
    for c in (1, 4, 8)
}
CHAT = {
    "requests_per_path": 12,
    "ttft_from_cold_requests_per_path": 6,
    "direct": {"ttft_s": 0.020, "tokens_per_s": 80.0},
    "gateway": {"ttft_s": 0.050, "tokens_per_s": 72.0},
    "retrieval_call_s": 0.025,
    "added_ttft_excluding_retrieval_s": 0.005,
    "throughput_ratio_gateway_vs_direct": 0.9,
}
HYBRID = {
    "chunks_per_tenant": 1000,
    "vector": {"p50_ms": 10.0, "p95_ms": 20.0, "mean_results": 10.0, "k_results_share": 1.0},
    "text": {"p50_ms": 12.0, "p95_ms": 25.0, "recall_at_10_vs_exact_bm25": 0.99},
    "hybrid": {"p50_ms": 15.0, "p95_ms": 30.0, "mean_results": 10.0, "k_results_share": 1.0},
    "hybrid_over_vector_p50": 1.5,
}
INDEX = {
    "vectors": 100_000,
    "dimension": 384,
    "hnsw": {"m": 16, "ef_construction": 64, "ef_search": 40},
    "index": {
        "hnsw": {"recall_at_10": 0.99, "qps": 500.0},
        "exact": {"recall_at_10": 1.0, "qps": 4.0},
        "qps_ratio": 125.0,
    },
    "tenants": {
        "hnsw": {"qps": 30.0, "k_results_share": 1.0, "recall_at_10": 1.0},
        "exact": {"qps": 20.0, "k_results_share": 1.0, "agrees_with_numpy": 1.0},
        "plan_uses_hnsw": False,
        "qps_ratio": 1.5,
        "selectivity": 0.01,
    },
    "hybrid": {"100_tenants": HYBRID},
}
INGESTION = {
    "vectors": 100_000,
    "dimension": 384,
    "ingestion": {
        "source": "scifact",
        "abstracts_per_doc": 1,
        "docs_per_round": 300,
        "rounds": 2,
        "ingest_chunks_per_s": [18.0, 22.0],
        "embedder_chunks_per_s": [30.0, 50.0],
        "ratio": 0.5,
        "real_embeddings": {
            "chunks": 1066,
            "queries": 200,
            "hnsw": {"recall_at_10": 0.99, "qps": 900.0},
            "exact": {"recall_at_10": 1.0, "qps": 300.0},
            "qps_ratio": 3.0,
        },
    },
}
LIMITS = {
    "per_round": 400,
    "rounds": 4,
    "scenarios": {"c1": {"workers": 1, "users": 1}, "c16_users": {"workers": 16, "users": 16}},
    "end_to_end_get_documents": {
        "c1": {
            "requests_per_store": 1600,
            "local": side(4.0, 5.0, 250.0),
            "shared": side(6.0, 8.0, 166.0),
            "added_p50_ms": 2.0,
            "added_p95_ms": 3.0,
        },
        "c16_users": {
            "requests_per_store": 1600,
            "local": side(40.0, 80.0, 340.0),
            "shared": side(64.0, 128.0, 220.0),
            "added_p50_ms": 24.0,
            "added_p95_ms": 48.0,
        },
    },
    "limiter_alone": {
        "chat_admission": {
            "c1": {"local": side(0.002, 0.003, 3e5), "shared": side(3.0, 4.5, 280.0)}
            | {"added_p50_ms": 3.0, "added_p95_ms": 4.5},
        }
    },
}


def step(
    c: int, requests: int, ttft_p50: float, rate_limited: int, overloaded: int
) -> dict[str, Any]:
    ok = requests - rate_limited - overloaded
    return {
        "concurrency": c,
        "duration_s": 20.0,
        "requests": requests,
        "ok": ok,
        "errors": 0,
        "rate_limited": rate_limited,
        "overloaded": overloaded,
        "statuses": {"200": ok, "429": rate_limited, "503": overloaded},
        "shed_share": (rate_limited + overloaded) / requests,
        "error_kinds": {},
        "requests_per_s": ok / 20.0,  # accepted chats
        "output_tokens": ok * 60,
        "output_tokens_per_s": ok * 3.0,
        "ttft_s": pct(ttft_p50, 2 * ttft_p50),
        "itl_s": pct(0.012, 0.020),
        "e2e_s": pct(1.0, 2.0),
        "shed_s": pct(0.003, 0.004) if rate_limited + overloaded else None,
        "shed_retry_after_ms": pct(2000.0, 2000.0) if rate_limited + overloaded else None,
        "stages_ms": {"auth": {"p50": 0.5, "p95": 1.0}, "search": {"p50": 20.0, "p95": 40.0}},
    }


CHAT_STEPS = {
    "kind": "chat",
    "version": 1,
    "started_at": "2026-12-04T10:00:00Z",
    "target": "http://127.0.0.1:8000",
    "local_stack": True,
    "config": {"concurrency": [1, 8], "step_s": 20.0, "max_tokens": 64, "users": 2},
    "steps": [step(1, 30, 0.100, 0, 0), step(8, 80, 0.150, 10, 30)],
    "summary": {
        "unloaded_ttft_p50_s": 0.100,
        "peak_output_tokens_per_s": 120.0,
        "peak_at_concurrency": 8,
        "shedding_starts_at": 8,
        "slowest_growing_stage": "search",
        "stage_growth_ms": {"auth": 0.0, "search": 12.5},
    },
}
FILES: dict[str, Any] = {
    "bench_embedder.json": EMBEDDER,
    "bench_generator.json": GENERATOR,
    "bench_chat.json": CHAT,
    "bench_retriever-index.json": INDEX,
    "bench_retriever-ingestion.json": INGESTION,
    "bench_limits.json": LIMITS,
    "bench-chat-steps/chat.json": CHAT_STEPS,
}


def write(folder: Path, files: dict[str, Any]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


def row(rows: list[Any], benchmark: str, measured: str) -> Any:
    """The one row of the benchmark whose 'measured' starts with the given text."""
    found = [r for r in rows if r.benchmark == benchmark and r.measured.startswith(measured)]
    assert len(found) == 1, [r.measured for r in rows if r.benchmark == benchmark]
    return found[0]


def test_every_benchmark_has_rows_and_ratios_come_from_the_results(tmp_path: Path) -> None:
    rows, notes = summary.summary_rows(write(tmp_path, FILES))
    assert [name for name in NAMES if any(r.benchmark == name for r in rows)] == NAMES
    assert not [r for r in rows if r.measured in ("not run", "unreadable")]
    assert len(notes) == len(NAMES)

    embed = row(rows, "bench_embedder", "texts/s")
    assert (embed.candidate, embed.baseline, embed.ratio) == ("100 texts/s", "125 texts/s", "0.80×")
    assert row(rows, "bench_embedder", "p50").ratio == "1.20×"

    ttft4 = row(rows, "bench_generator", "TTFT c4")
    assert (ttft4.candidate, ttft4.baseline) == ("405 ms", "400 ms")
    assert ttft4.ratio == "1.01× (+5.0 ms)"
    assert row(rows, "bench_generator", "tokens/s c8").ratio == "0.95×"

    chat = row(rows, "bench_chat", "TTFT")
    assert (chat.candidate, chat.baseline, chat.ratio) == ("50.0 ms", "20.0 ms", "2.50× (+30.0 ms)")
    assert row(rows, "bench_chat", "  of which retrieval").ratio == "25.0 ms"
    assert row(rows, "bench_chat", "  added TTFT").ratio == "+5.0 ms"
    assert row(rows, "bench_chat", "tokens/s").ratio == "0.90×"

    assert row(rows, "bench_retriever index", "QPS: HNSW").ratio == "125×"
    assert row(rows, "bench_retriever index", "  recall@10").candidate == "0.990"
    assert row(rows, "bench_retriever index", "QPS: 1% tenant").ratio == "1.50×"
    hybrid = row(rows, "bench_retriever index", "p50: hybrid vs vector, 100 tenants × 1,000")
    assert (hybrid.candidate, hybrid.baseline, hybrid.ratio) == ("15.0 ms", "10.0 ms", "1.50×")
    assert row(rows, "bench_retriever index", "  BM25").ratio == "0.990"

    ingest = row(rows, "bench_retriever ingestion", "chunks/s")  # medians: 20 and 40
    assert (ingest.candidate, ingest.baseline, ingest.ratio) == (
        "20.0 chunks/s",
        "40.0 chunks/s",
        "0.50×",
    )
    assert row(rows, "bench_retriever ingestion", "QPS").ratio == "3.00×"

    c16 = row(rows, "bench_limits", "p50 GET /v1/documents: shared vs local, c16/16 users")
    assert c16.ratio == "1.60× (+24.0 ms)"
    assert row(rows, "bench_limits", "  chat admission").ratio == "+3.0 ms / +4.5 ms"


def test_chat_steps_rows(tmp_path: Path) -> None:
    rows, notes = summary.summary_rows(write(tmp_path, FILES))
    loaded = row(rows, "chat steps", "c8: TTFT p50")
    assert (loaded.candidate, loaded.baseline, loaded.ratio) == (
        "150 ms / 300 ms",
        "100 ms",
        "1.50×",
    )
    assert row(rows, "chat steps", "c1: TTFT p50").ratio == "1.00×"
    figures = row(rows, "chat steps", "c8: ITL").ratio.split(" · ")
    # 80 requests: 10 answered 429 and 30 answered 503; 40 ok × 3 tokens/s.
    assert figures == [
        "ITL 12.0 ms",
        "2.00 req/s",
        "120 tok/s",
        "429 12.5%",
        "503 37.5%",
        "shed in 3.00 ms",
    ]
    assert "shed" not in row(rows, "chat steps", "c1: ITL").ratio
    assert row(rows, "chat steps", "peak").ratio == "120 tok/s at c8"
    assert row(rows, "chat steps", "shedding").ratio == "c8"
    assert row(rows, "chat steps", "stage growing most, c1 to c8").ratio == "search (+12.5 ms p50)"
    assert row(rows, "chat steps", "c8: TTFT stages").ratio == "auth 0.500 · search 20.0"
    assert any("against the local stack, 20.0 s per step" in note for note in notes)

    unshed = json.loads(json.dumps(CHAT_STEPS))
    unshed["summary"]["shedding_starts_at"] = None
    rows, _ = summary.summary_rows(write(tmp_path, {"bench-chat-steps/chat.json": unshed}))
    assert row(rows, "chat steps", "shedding").ratio == "not reached up to c8"


def test_missing_and_broken_files_give_rows_not_failures(tmp_path: Path) -> None:
    rows, notes = summary.summary_rows(tmp_path / "absent")
    assert [r.benchmark for r in rows] == NAMES
    assert all(r.measured == "not run" for r in rows)
    assert notes == []

    # Only the ingestion variant of the retriever, a file that is not JSON, one that lacks
    # a key: rows for all of them, and the rest still read.
    files = {
        "bench_retriever-ingestion.json": INGESTION,
        "bench_chat.json": "{not json",
        "bench_embedder.json": {"server": EMBEDDER["server"]},
    }
    rows, _ = summary.summary_rows(write(tmp_path, files))
    assert row(rows, "bench_retriever index", "not run").ratio.startswith("no bench_retriever")
    assert row(rows, "bench_retriever ingestion", "chunks/s").ratio == "0.50×"
    assert (
        row(rows, "bench_chat", "unreadable").ratio == "bench_chat.json: not JSON (JSONDecodeError)"
    )
    assert row(rows, "bench_embedder", "unreadable").ratio == "bench_embedder.json: no 'in_process'"
    assert row(rows, "bench_limits", "not run")


def test_newest_retriever_file_wins_and_earlier_runs_are_marked(tmp_path: Path) -> None:
    """make bench writes bench_retriever.json (both parts); a newer --skip-ingestion run's
    index file replaces its index rows. Files from before --since say so."""
    full = {**INDEX, **INGESTION}
    newer_index = json.loads(json.dumps(INDEX))
    newer_index["index"]["hnsw"]["qps"] = 800.0
    write(tmp_path, {"bench_retriever.json": full, "bench_retriever-index.json": newer_index})
    old = time.time() - 3600
    os.utime(tmp_path / "bench_retriever.json", (old, old))
    rows, notes = summary.summary_rows(tmp_path, since=time.time() - 60)
    assert row(rows, "bench_retriever index", "QPS: HNSW").ratio == "200×"
    earlier = row(rows, "bench_retriever ingestion (earlier run)", "chunks/s")
    assert earlier.ratio == "0.50×"
    assert any(n.startswith("bench_retriever.json") and "before this run" in n for n in notes)


@pytest.mark.parametrize("missing", ["bench_generator.json", "bench-chat-steps/chat.json"])
def test_the_script_prints_the_table_and_writes_markdown(tmp_path: Path, missing: str) -> None:
    write(tmp_path, {name: data for name, data in FILES.items() if name != missing})
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    lines = out.splitlines()
    assert lines[0].split() == [
        "benchmark",
        "measured",
        "candidate",
        "baseline",
        "ratio",
        "/",
        "figure",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert sum("not run" in line for line in lines) == 1
    for name in NAMES:  # each benchmark's name heads its first row
        assert any(line.startswith(name) for line in lines), name

    markdown = (tmp_path / "summary.md").read_text().splitlines()
    assert markdown[0] == "| benchmark | measured | candidate | baseline | ratio / figure |"
    assert markdown[1] == "| --- | --- | --- | --- | --- |"
    table = [line for line in markdown if line.startswith("| ")]
    assert all(line.count(" | ") == 4 for line in table)
    assert len(table) - 2 == len(summary.summary_rows(tmp_path)[0])


def test_a_run_that_served_nothing_still_gives_rows(tmp_path: Path) -> None:
    """Every chat shed (no TTFT, no peak): rows with dashes, not an unreadable file."""
    refused = step(1, 10, 0.1, 0, 10) | {"ttft_s": None, "itl_s": None, "stages_ms": {}}
    run = CHAT_STEPS | {
        "steps": [refused],
        "summary": {"unloaded_ttft_p50_s": None, "peak_output_tokens_per_s": 0.0},
    }
    rows, _ = summary.summary_rows(write(tmp_path, {"bench-chat-steps/chat.json": run}))
    steps = [r for r in rows if r.benchmark == "chat steps"]
    assert [r.measured for r in steps] == [
        "c1: TTFT p50 / p95 vs unloaded p50",
        "c1: ITL p50 · ok req/s · tok/s · 429 · 503",
    ]
    assert (steps[0].candidate, steps[0].ratio) == ("- / -", "-")
    assert "503 100%" in steps[1].ratio


def test_reads_what_ragctl_bench_chat_writes(tmp_path: Path) -> None:
    """The chat steps as ragctl's own step_report and run_summary shape them."""
    from ragctl.bench import ChatSample, run_summary, step_report

    def chats(ttft_s: float, shed: int) -> list[ChatSample]:
        served = [
            ChatSample(
                started_s=i,
                status=200,
                e2e_s=1.0,
                ttft_s=ttft_s,
                itl_s=[0.01, 0.03],
                output_tokens=3,
                stages_ms={"auth": 1.0, "retrieve": 20.0 * ttft_s, "ttft": 1000 * ttft_s},
            )
            for i in range(10)
        ]
        refused = [
            ChatSample(started_s=i, status=503, e2e_s=0.004, retry_after_ms=2000.0)
            for i in range(shed)
        ]
        return served + refused

    steps = [step_report(1, chats(0.1, 0), 10.0), step_report(4, chats(0.3, 10), 10.0)]
    report = {
        "kind": "chat",
        "version": 1,
        "target": "http://127.0.0.1:8000",
        "local_stack": True,
        "config": {"concurrency": [1, 4], "step_s": 10.0, "max_tokens": 64, "users": 1},
        "steps": steps,
        "summary": run_summary(steps),
    }
    rows, _ = summary.summary_rows(write(tmp_path, {"bench-chat-steps/chat.json": report}))
    assert row(rows, "chat steps", "c4: TTFT p50").ratio == "3.00×"
    assert row(rows, "chat steps", "c4: ITL").ratio == (
        "ITL 20.0 ms · 1.00 req/s · 3.00 tok/s · 429 0% · 503 50% · shed in 4.00 ms"
    )
    assert row(rows, "chat steps", "shedding").ratio == "c4"
    assert row(rows, "chat steps", "stage growing most").ratio == "retrieve (+4.0 ms p50)"
    assert (
        row(rows, "chat steps", "c1: TTFT stages").ratio == "auth 1.00 · retrieve 2.00 · ttft 100"
    )
