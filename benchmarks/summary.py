"""One table of every benchmark's ratios and figures, read from benchmarks/results.

`make bench` runs the benchmarks, then `ragctl bench chat --output-dir
benchmarks/results/bench-chat-steps`, then this. Each row is one figure: the benchmark, what
is measured, the candidate, its baseline, and their ratio (or the figure alone). A result
file that is missing gives a "not run" row and one that cannot be read an "unreadable" row:
the table always prints. Rows from files written before `--since` (the start of `make
bench`) say "earlier run", so a benchmark that failed this time cannot pass for a fresh one.

Prints the table as fixed-width text and writes it as Markdown to <results>/summary.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
HEADERS = ("benchmark", "measured", "candidate", "baseline", "ratio / figure")


@dataclass(frozen=True)
class Row:
    benchmark: str
    measured: str
    candidate: str = ""
    baseline: str = ""
    ratio: str = ""  # candidate / baseline, or the figure itself when there is no baseline

    def cells(self) -> tuple[str, str, str, str, str]:
        return (self.benchmark, self.measured, self.candidate, self.baseline, self.ratio)


# Formatting: three significant figures, durations in ms below a second.


def num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:#.3g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{num(seconds * 1000)} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


def signed_ms(ms: float) -> str:
    return f"{ms:+.1f} ms"


def ratio(candidate: float, baseline: float) -> str:
    if baseline == 0:
        return "-"
    x = candidate / baseline
    return f"{x:.2f}×" if abs(x) < 10 else f"{num(x)}×"


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.3g}%" if whole else "-"


# One function per result file: the figures that matter, as rows (benchmark label first).


def embedder_rows(name: str, d: dict[str, Any]) -> list[Row]:
    local, server = d["in_process"], d["server"]
    return [
        Row(
            name,
            f"texts/s: server c{server['concurrency']} vs in-process "
            f"(batch {local['best_batch_size']})",
            f"{num(server['texts_per_s'])} texts/s",
            f"{num(local['best_texts_per_s'])} texts/s",
            ratio(server["texts_per_s"], local["best_texts_per_s"]),
        ),
        Row(
            name,
            "p50, one text at c1: server vs in-process",
            duration(server["single_p50_s"]),
            duration(local["single_p50_s"]),
            ratio(server["single_p50_s"], local["single_p50_s"]),
        ),
    ]


def generator_rows(name: str, d: dict[str, Any]) -> list[Row]:
    rows = []
    levels = sorted((int(key.split("_")[-1]), key) for key in d if key.startswith("concurrency_"))
    for level, key in levels:
        launcher, direct = d[key]["launcher"], d[key]["direct"]
        added_ms = 1000 * (launcher["ttft_s"] - direct["ttft_s"])
        rows += [
            Row(
                name,
                f"TTFT c{level}: launcher vs llama.cpp direct",
                duration(launcher["ttft_s"]),
                duration(direct["ttft_s"]),
                f"{ratio(launcher['ttft_s'], direct['ttft_s'])} ({signed_ms(added_ms)})",
            ),
            Row(
                name,
                f"tokens/s c{level}: launcher vs llama.cpp direct",
                f"{num(launcher['tokens_per_s'])} tok/s",
                f"{num(direct['tokens_per_s'])} tok/s",
                ratio(launcher["tokens_per_s"], direct["tokens_per_s"]),
            ),
        ]
    if not rows:
        raise KeyError("concurrency_*")
    return rows


def chat_rows(name: str, d: dict[str, Any]) -> list[Row]:
    gateway, direct = d["gateway"], d["direct"]
    added_ms = 1000 * (gateway["ttft_s"] - direct["ttft_s"])
    return [
        Row(
            name,
            "TTFT: gateway (RAG) vs same prompt direct",
            duration(gateway["ttft_s"]),
            duration(direct["ttft_s"]),
            f"{ratio(gateway['ttft_s'], direct['ttft_s'])} ({signed_ms(added_ms)})",
        ),
        Row(
            name,
            "  of which retrieval (POST /v1/search)",
            ratio=duration(d["retrieval_call_s"]),
        ),
        Row(
            name,
            "  added TTFT, retrieval excluded",
            ratio=signed_ms(1000 * d["added_ttft_excluding_retrieval_s"]),
        ),
        Row(
            name,
            "tokens/s per stream: gateway vs direct",
            f"{num(gateway['tokens_per_s'])} tok/s",
            f"{num(direct['tokens_per_s'])} tok/s",
            ratio(gateway["tokens_per_s"], direct["tokens_per_s"]),
        ),
    ]


def index_rows(name: str, d: dict[str, Any]) -> list[Row]:
    hnsw, exact = d["index"]["hnsw"], d["index"]["exact"]
    size = f"{d['vectors']:,} × {d['dimension']}-d"
    rows = [
        Row(
            name,
            f"QPS: HNSW vs exact, {size}",
            num(hnsw["qps"]),
            num(exact["qps"]),
            ratio(hnsw["qps"], exact["qps"]),
        ),
        Row(
            name,
            "  recall@10",
            f"{hnsw['recall_at_10']:.3f}",
            f"{exact['recall_at_10']:.3f}",
            ratio(hnsw["recall_at_10"], exact["recall_at_10"]),
        ),
    ]
    if "tenants" in d:
        tenants = d["tenants"]
        rows.append(
            Row(
                name,
                f"QPS: {tenants['selectivity']:.0%} tenant, service plan vs exact",
                num(tenants["hnsw"]["qps"]),
                num(tenants["exact"]["qps"]),
                ratio(tenants["hnsw"]["qps"], tenants["exact"]["qps"]),
            )
        )
    for scenario, h in d.get("hybrid", {}).items():
        tenants_n = scenario.split("_")[0]
        where = f"{tenants_n} tenant{'s' if tenants_n != '1' else ''} × "
        where += f"{h['chunks_per_tenant']:,} chunks"
        rows.append(
            Row(
                name,
                f"p50: hybrid vs vector, {where}",
                f"{num(h['hybrid']['p50_ms'])} ms",
                f"{num(h['vector']['p50_ms'])} ms",
                ratio(h["hybrid"]["p50_ms"], h["vector"]["p50_ms"]),
            )
        )
        if "recall_at_10_vs_exact_bm25" in h.get("text", {}):
            rows.append(
                Row(
                    name,
                    "  BM25 graph recall@10 vs exact BM25",
                    ratio=f"{h['text']['recall_at_10_vs_exact_bm25']:.3f}",
                )
            )
    return rows


def ingestion_rows(name: str, d: dict[str, Any]) -> list[Row]:
    ingestion = d["ingestion"]
    ingest = statistics.median(ingestion["ingest_chunks_per_s"])
    embed = statistics.median(ingestion["embedder_chunks_per_s"])
    rows = [
        Row(
            name,
            "chunks/s: ingestion vs embedder alone",
            f"{num(ingest)} chunks/s",
            f"{num(embed)} chunks/s",
            ratio(ingest, embed),
        )
    ]
    real = ingestion.get("real_embeddings")
    if real:
        rows += [
            Row(
                name,
                f"QPS: HNSW vs exact, {real['chunks']:,} SciFact chunks",
                num(real["hnsw"]["qps"]),
                num(real["exact"]["qps"]),
                ratio(real["hnsw"]["qps"], real["exact"]["qps"]),
            ),
            Row(name, "  HNSW recall@10", ratio=f"{real['hnsw']['recall_at_10']:.3f}"),
        ]
    return rows


def limits_rows(name: str, d: dict[str, Any]) -> list[Row]:
    scenarios = d["scenarios"]

    def label(scenario: str) -> str:
        s = scenarios[scenario]
        return f"c{s['workers']}/{s['users']} user{'s' if s['users'] != 1 else ''}"

    rows = []
    for scenario, side in d["end_to_end_get_documents"].items():
        shared, local = side["shared"]["p50_ms"], side["local"]["p50_ms"]
        rows.append(
            Row(
                name,
                f"p50 GET /v1/documents: shared vs local, {label(scenario)}",
                f"{num(shared)} ms",
                f"{num(local)} ms",
                f"{ratio(shared, local)} ({signed_ms(shared - local)})",
            )
        )
    for scenario, side in d.get("limiter_alone", {}).get("chat_admission", {}).items():
        rows.append(
            Row(
                name,
                f"  chat admission alone: added p50 / p95, {label(scenario)}",
                ratio=f"{signed_ms(side['added_p50_ms'])} / {signed_ms(side['added_p95_ms'])}",
            )
        )
    return rows


def chat_steps_rows(name: str, d: dict[str, Any]) -> list[Row]:
    steps = sorted(d["steps"], key=lambda s: s["concurrency"])
    if not steps:
        raise KeyError("steps")
    unloaded = steps[0]
    base = d.get("summary", {}).get("unloaded_ttft_p50_s") or (unloaded["ttft_s"] or {}).get("p50")
    rows = []
    for step in steps:
        c, ttft, itl = step["concurrency"], step["ttft_s"] or {}, step["itl_s"] or {}
        p50 = ttft.get("p50")
        figures = [
            f"ITL {duration(itl.get('p50'))}",
            f"{num(step['requests_per_s'])} req/s",
            f"{num(step['output_tokens_per_s'])} tok/s",
            f"429 {share(step['rate_limited'], step['requests'])}",
            f"503 {share(step['overloaded'], step['requests'])}",
        ]
        if step.get("shed_s") and step["rate_limited"] + step["overloaded"]:
            figures.append(f"shed in {duration(step['shed_s']['p50'])}")
        if step["errors"]:
            figures.append(f"errors {step['errors']}")
        rows += [
            Row(
                name,
                f"c{c}: TTFT p50 / p95 vs unloaded p50",
                f"{duration(p50)} / {duration(ttft.get('p95'))}",
                duration(base),
                ratio(p50, base) if p50 is not None and base else "-",
            ),
            Row(name, f"c{c}: ITL p50 · ok req/s · tok/s · 429 · 503", ratio=" · ".join(figures)),
        ]
    summary = d.get("summary", {})
    if summary.get("peak_at_concurrency") is not None:
        rows.append(
            Row(
                name,
                "peak output tokens/s",
                ratio=f"{num(summary['peak_output_tokens_per_s'])} tok/s at "
                f"c{summary['peak_at_concurrency']}",
            )
        )
    if "shedding_starts_at" in summary:
        starts = summary["shedding_starts_at"]
        highest = steps[-1]["concurrency"]
        rows.append(
            Row(
                name,
                "shedding (429/503) starts at",
                ratio=f"c{starts}" if starts is not None else f"not reached up to c{highest}",
            )
        )
    slowest = summary.get("slowest_growing_stage")
    if slowest:
        growth = summary.get("stage_growth_ms", {}).get(slowest)
        grew = f" ({signed_ms(growth)} p50)" if growth is not None else ""
        rows.append(
            Row(
                name,
                f"stage growing most, c{steps[0]['concurrency']} to c{steps[-1]['concurrency']}",
                ratio=f"{slowest}{grew}",
            )
        )
    # Where the time goes: the gateway's stages, unloaded and at the highest concurrency.
    for step in dict.fromkeys([steps[0]["concurrency"], steps[-1]["concurrency"]]):
        stages = next(s for s in steps if s["concurrency"] == step).get("stages_ms") or {}
        parts = [
            f"{k} {num(v['p50'])}" for k, v in stages.items() if v and v.get("p50") is not None
        ]
        if parts:
            rows.append(Row(name, f"c{step}: TTFT stages p50 (ms)", ratio=" · ".join(parts)))
    return rows


@dataclass(frozen=True)
class Source:
    name: str  # the benchmark, as the table shows it
    patterns: tuple[str, ...]  # result files, relative to the results folder; newest wins
    rows: Callable[[str, dict[str, Any]], list[Row]]
    needs: str | None = None  # a key the file must hold (bench_retriever's variants)


SOURCES = (
    Source("bench_embedder", ("bench_embedder.json",), embedder_rows),
    Source("bench_generator", ("bench_generator.json",), generator_rows),
    Source("bench_chat", ("bench_chat.json",), chat_rows),
    # A plain run (make bench) writes both parts to bench_retriever.json; --skip-ingestion
    # and --skip-index write bench_retriever-index.json and bench_retriever-ingestion.json.
    Source(
        "bench_retriever index",
        ("bench_retriever.json", "bench_retriever-index.json"),
        index_rows,
        needs="index",
    ),
    Source(
        "bench_retriever ingestion",
        ("bench_retriever.json", "bench_retriever-ingestion.json"),
        ingestion_rows,
        needs="ingestion",
    ),
    Source("bench_limits", ("bench_limits.json",), limits_rows),
    # --output-dir writes chat.json there; without it, ragctl adds a <timestamp> folder.
    Source(
        "chat steps",
        ("bench-chat-steps/chat.json", "bench-chat-steps/*/chat.json"),
        chat_steps_rows,
    ),
)


@dataclass(frozen=True)
class Found:
    path: Path
    data: dict[str, Any] | None
    problem: str | None = None


def find(results: Path, source: Source) -> Found | None:
    """The newest of the source's files that holds what it needs; failing that, a file that
    is not JSON (reported as unreadable); None when there is neither."""
    paths = {p for pattern in source.patterns for p in results.glob(pattern) if p.is_file()}
    broken = None
    for path in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            broken = broken or Found(path, None, f"not JSON ({type(exc).__name__})")
            continue
        if not isinstance(data, dict):
            broken = broken or Found(path, None, "not a JSON object")
        elif source.needs is None or source.needs in data:
            return Found(path, data)
    return broken


def summary_rows(results: Path, since: float | None = None) -> tuple[list[Row], list[str]]:
    """The table's rows, and one line per file read (its path and when it was written)."""
    rows: list[Row] = []
    notes: list[str] = []
    for source in SOURCES:
        found = find(results, source)
        if found is None:
            wanted = " or ".join(source.patterns)
            rows.append(Row(source.name, "not run", ratio=f"no {wanted}"))
            continue
        mtime = found.path.stat().st_mtime
        earlier = since is not None and mtime < since
        label = f"{source.name} (earlier run)" if earlier else source.name
        rel = found.path.relative_to(results)
        if found.data is None:
            rows.append(Row(label, "unreadable", ratio=f"{rel}: {found.problem}"))
            continue
        try:
            rows += source.rows(label, found.data)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
            what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else type(exc).__name__
            rows.append(Row(label, "unreadable", ratio=f"{rel}: {what}"))
            continue
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))
        note = f"{rel}: written {written}" + (", before this run" if earlier else "")
        if source.name == "chat steps":
            config = found.data.get("config", {})
            where = "the local stack" if found.data.get("local_stack") else found.data.get("target")
            note += (
                f"; against {where}, {config.get('step_s')} s per step, "
                f"max_tokens {config.get('max_tokens')}, users {config.get('users')}"
            )
        notes.append(note)
    return rows, notes


def grouped(rows: Sequence[Row]) -> list[tuple[str, str, str, str, str]]:
    """Cells, with a benchmark's name on its first row only."""
    out = []
    previous = None
    for row in rows:
        cells = row.cells()
        out.append(("" if cells[0] == previous else cells[0], *cells[1:]))
        previous = cells[0]
    return out


def render_text(rows: Sequence[Row], notes: Sequence[str]) -> str:
    table = [HEADERS, *grouped(rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(HEADERS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *notes]) + "\n"


def render_markdown(rows: Sequence[Row], notes: Sequence[str]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(HEADERS), line(["---"] * len(HEADERS)), *(line(c) for c in grouped(rows))]
    return "\n".join([*lines, "", *(f"- {n}" for n in notes)]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    parser.add_argument(
        "--since",
        type=float,
        help="Unix time this run started: rows from files written before it say so",
    )
    args = parser.parse_args(argv)
    rows, notes = summary_rows(args.results, args.since)
    print(render_text(rows, notes), end="")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "summary.md").write_text(render_markdown(rows, notes), encoding="utf-8")
    print(f"\n(also written to {args.results / 'summary.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
