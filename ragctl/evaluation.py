"""Retrieval quality measured through the public API on a BEIR-format folder.

The corpus is loaded with `POST /v1/documents/batch` (each document carries its BEIR `_id`
and the evaluation's tag in its metadata), ingestion is awaited with
`GET /v1/documents/summary`, then every judged query of the split goes through
`POST /v1/search` in each mode. Passages map to their documents, a document ranked where
its first passage is. Metrics are those of BEIR (pytrec_eval): nDCG@10 with graded gains,
recall@100 and MRR@10, averaged over every judged query (one with no hits counts 0).

Beside the API, and in the same run: references computed in-process on the same corpus and
queries, BM25 (`bm25s`) and exact cosine over the bundled MiniLM's embeddings, so the
services are judged against what the same ranking does without them.

`ragctl eval retrieval` is the command line; `run_evaluation` the same from Python.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

MODES = ("vector", "text", "hybrid")
SEARCH_K = 100  # passages asked per query: the depth recall@100 is measured at
NDCG_K = 10
MRR_K = 10
BATCH_DOCUMENTS = 100  # the gateway's default GATEWAY_MAX_BATCH_DOCUMENTS
EVAL_USER = "retrieval-eval@example.com"  # the tenant of an evaluation on the local stack
QUERY_MAX_CHARS = 4000  # SEARCH_QUERY_MAX_CHARS of the public API
MAX_ATTEMPTS = 20  # per API call, for 429 and 503 answers (waiting their Retry-After)
# The gateway's per-user limits on the stack an evaluation starts: every query of a large
# split goes through at once, and the limits are not what is measured.
UNTHROTTLED_ENV = {
    "GATEWAY_RATE_LIMIT_PER_MINUTE": "1000000",
    "GATEWAY_RATE_LIMIT_BURST": "100000",
}
BM25_SETTINGS = {"k1": 1.2, "b": 0.75, "method": "lucene", "stemmer": "english", "stopwords": "en"}
REFERENCE_BM25 = "reference: BM25"
REFERENCE_DENSE = "reference: MiniLM exact"

Ranking = list[tuple[str, float]]  # (document id, score), best first
Runs = dict[str, Ranking]  # per query id


class EvalError(RuntimeError):
    """The evaluation cannot go on (an API error, ingestion that does not finish)."""


# BEIR folders ------------------------------------------------------------------------


@dataclass
class BeirData:
    name: str
    corpus: dict[str, tuple[str, str]]  # id -> (title, text), in file order
    queries: dict[str, str]  # the split's judged queries, in file order
    qrels: dict[str, dict[str, int]]  # query id -> document id -> grade

    def limit_queries(self, max_queries: int | None) -> BeirData:
        """The first max_queries judged queries (file order), with their judgments."""
        if max_queries is None:
            return self
        kept = dict(list(self.queries.items())[:max_queries])
        qrels = {qid: self.qrels[qid] for qid in kept}
        return BeirData(self.name, self.corpus, kept, qrels)


def read_beir(folder: Path, split: str) -> BeirData:
    """corpus.jsonl, queries.jsonl and qrels/<split>.tsv of a BEIR folder; only the queries
    the split judges (one with no grade above 0 too: it scores 0, as in BEIR)."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not path.is_file():
            raise EvalError(f"not a BEIR folder: {path} is missing")
    corpus: dict[str, tuple[str, str]] = {}
    for row in _jsonl(folder / "corpus.jsonl"):
        corpus[str(row["_id"])] = (str(row.get("title") or ""), str(row.get("text") or ""))
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3 or (number == 0 and not _is_int(fields[-1])):
                continue  # the header, a blank line
            qid, doc_id, grade = fields[0], fields[-2], int(fields[-1])
            qrels.setdefault(qid, {})[doc_id] = grade
    queries = {
        str(row["_id"]): str(row["text"])
        for row in _jsonl(folder / "queries.jsonl")
        if str(row["_id"]) in qrels
    }
    missing = set(qrels) - set(queries)
    if missing:
        raise EvalError(f"{len(missing)} judged queries are not in queries.jsonl")
    return BeirData(folder.name, corpus, queries, {qid: qrels[qid] for qid in queries})


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


# Metrics (pytrec_eval's definitions) -----------------------------------------------------


def rank_by_score(scores: Mapping[str, float]) -> list[str]:
    """Document ids best first; equal scores in trec_eval's order (document id descending),
    so a scored run ranks as pytrec_eval ranks it."""
    by_id = sorted(scores, reverse=True)
    return sorted(by_id, key=lambda doc_id: scores[doc_id], reverse=True)


def ndcg_at_k(ranking: Sequence[str], grades: Mapping[str, int], k: int = NDCG_K) -> float:
    """nDCG@k with the grade as the gain (trec_eval's ndcg_cut): DCG over the top k against
    the DCG of the best possible order of the judged grades."""
    dcg = sum(
        max(grades.get(doc_id, 0), 0) / math.log2(rank + 2)
        for rank, doc_id in enumerate(ranking[:k])
    )
    ideal = sorted((grade for grade in grades.values() if grade > 0), reverse=True)[:k]
    idcg = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_k(ranking: Sequence[str], grades: Mapping[str, int], k: int = SEARCH_K) -> float:
    """The share of relevant documents (grade above 0) in the top k."""
    relevant = {doc_id for doc_id, grade in grades.items() if grade > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at_k(ranking: Sequence[str], grades: Mapping[str, int], k: int = MRR_K) -> float:
    """1 / the rank of the first relevant document in the top k; 0 when there is none."""
    for rank, doc_id in enumerate(ranking[:k], start=1):
        if grades.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


def evaluate(
    runs: Mapping[str, Ranking], qrels: Mapping[str, Mapping[str, int]]
) -> dict[str, float]:
    """The metrics averaged over every judged query; a query missing from runs scores 0."""
    totals = {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    for qid, grades in qrels.items():
        ranking = [doc_id for doc_id, _ in runs.get(qid, [])]
        totals["ndcg@10"] += ndcg_at_k(ranking, grades)
        totals["recall@100"] += recall_at_k(ranking, grades)
        totals["mrr@10"] += mrr_at_k(ranking, grades)
    count = max(len(qrels), 1)
    return {name: total / count for name, total in totals.items()}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated between ranks as numpy's default does."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# Progress ----------------------------------------------------------------------------------


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


class _PlainProgress:
    """A progress line on stderr, for where tqdm is not installed."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done, self.shown = total, desc, 0, -1.0
        self.started = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown >= 2.0 or self.done >= self.total:
            self.shown = now
            print(
                f"\r{self.desc}: {self.done}/{self.total} ({now - self.started:.0f}s)",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str, enabled: bool = True) -> Progress:
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return _PlainProgress(total, desc)
    interactive = sys.stderr.isatty()
    bar: Progress = tqdm(
        total=total, desc=desc, file=sys.stderr, mininterval=0.2 if interactive else 10.0
    )
    return bar


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# The public API --------------------------------------------------------------------------


class GatewayClient:
    """Calls to the gateway as any client makes them: a bearer token (asked again once when
    refused, as it may have expired), 429 and 503 waited out as their Retry-After says."""

    def __init__(self, url: str, token_source: Callable[[], str], timeout_s: float = 300.0):
        self.token_source = token_source
        self.http = httpx.Client(base_url=url, timeout=timeout_s)
        self._authorize()

    def _authorize(self) -> None:
        self.http.headers["Authorization"] = f"Bearer {self.token_source()}"

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[Any, float]:
        """The answer's JSON and the seconds its (successful) attempt took."""
        refreshed = False
        for _ in range(MAX_ATTEMPTS):
            started = time.perf_counter()
            resp = self.http.request(method, path, **kwargs)
            elapsed = time.perf_counter() - started
            if resp.status_code in (429, 503):
                time.sleep(float(resp.headers.get("retry-after") or 1))
                continue
            if resp.status_code == 401 and not refreshed:
                refreshed = True
                self._authorize()
                continue
            if resp.status_code >= 400:
                raise EvalError(f"{method} {path}: {resp.status_code} {_message(resp)}")
            return resp.json(), elapsed
        raise EvalError(f"{method} {path}: still refused after {MAX_ATTEMPTS} attempts")


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]


def document_body(doc_id: str, title: str, text: str, tag: str) -> dict[str, Any]:
    """A corpus document as the batch route takes it (a missing title or text borrows the
    other, or the id: the API needs both)."""
    return {
        "title": (title or text or doc_id)[:500],
        "text": text or title or doc_id,
        "metadata": {"beir_id": doc_id, "eval": tag},
    }


def summary(client: GatewayClient, tag: str) -> dict[str, int]:
    body, _ = client.call(
        "GET", "/v1/documents/summary", params={"metadata": json.dumps({"eval": tag})}
    )
    return dict(body)


def ingest_corpus(
    client: GatewayClient,
    data: BeirData,
    tag: str,
    batch_size: int = BATCH_DOCUMENTS,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Upload the corpus in batches (known content answers as a duplicate, so a run that
    stopped halfway picks up where it was); the upload's counts and seconds."""
    items = list(data.corpus.items())
    bar = progress_bar(len(items), "upload", show_progress)
    created = duplicates = 0
    started = time.monotonic()
    try:
        for start in range(0, len(items), batch_size):
            batch = [
                document_body(doc_id, title, text, tag)
                for doc_id, (title, text) in items[start : start + batch_size]
            ]
            body, _ = client.call("POST", "/v1/documents/batch", json={"documents": batch})
            for doc in body["data"]:
                duplicates += bool(doc["duplicate"])
                created += not doc["duplicate"]
            bar.update(len(batch))
    finally:
        bar.close()
    return {"created": created, "duplicates": duplicates, "seconds": time.monotonic() - started}


def wait_for_ingestion(
    client: GatewayClient,
    tag: str,
    expected: int,
    timeout_s: float = 3600.0,
    poll_s: float = 1.0,
    show_progress: bool = True,
) -> dict[str, int]:
    """Poll the summary of the tag's documents until none is pending or processing."""
    deadline = time.monotonic() + timeout_s
    bar = progress_bar(expected, "ingest", show_progress)
    done = 0
    try:
        while True:
            counts = summary(client, tag)
            finished = counts["ready"] + counts["failed"]
            bar.update(max(0, finished - done))
            done = max(done, finished)
            if counts["pending"] + counts["processing"] == 0 and counts["total"] >= expected:
                return counts
            if time.monotonic() > deadline:
                raise EvalError(f"ingestion did not finish in {timeout_s:.0f}s: {counts}")
            time.sleep(poll_s)
    finally:
        bar.close()


def content_groups(data: BeirData) -> dict[str, list[str]]:
    """Each document id -> the ids of every document with the same text, itself first:
    the API stores same content once, under the first id uploaded."""
    by_text: dict[str, list[str]] = {}
    for doc_id, (title, text) in data.corpus.items():
        by_text.setdefault(document_body(doc_id, title, text, "")["text"], []).append(doc_id)
    return {doc_id: ids for ids in by_text.values() for doc_id in ids}


def search_documents(
    client: GatewayClient,
    query: str,
    mode: str,
    tag: str,
    groups: Mapping[str, list[str]],
    filtered: bool = False,
    k: int = SEARCH_K,
) -> tuple[Ranking, float]:
    """One query through POST /v1/search: the documents of its passages, each at its first
    passage's rank and score, and the seconds the call took."""
    body: dict[str, Any] = {"query": query[:QUERY_MAX_CHARS], "k": k, "mode": mode}
    if filtered:
        body["filters"] = {"metadata": {"eval": tag}}
    answer, elapsed = client.call("POST", "/v1/search", json=body)
    ranking: Ranking = []
    seen: set[str] = set()
    for hit in answer["data"]:
        metadata = hit.get("metadata") or {}
        if metadata.get("eval") != tag or "beir_id" not in metadata:
            continue  # another document of the same user
        for doc_id in groups.get(str(metadata["beir_id"]), [str(metadata["beir_id"])]):
            if doc_id not in seen:
                seen.add(doc_id)
                ranking.append((doc_id, float(hit["score"])))
    return ranking, elapsed


def search_mode(
    client: GatewayClient,
    data: BeirData,
    mode: str,
    tag: str,
    filtered: bool = False,
    show_progress: bool = True,
) -> tuple[Runs, list[float]]:
    """Every query in one mode, one at a time: the runs and each call's seconds."""
    groups = content_groups(data)
    runs: Runs = {}
    latencies: list[float] = []
    bar = progress_bar(len(data.queries), f"search {mode}", show_progress)
    try:
        for qid, query in data.queries.items():
            runs[qid], elapsed = search_documents(client, query, mode, tag, groups, filtered)
            latencies.append(elapsed)
            bar.update()
    finally:
        bar.close()
    return runs, latencies


# References, in-process ------------------------------------------------------------------


def _top_k(scores: Mapping[str, float], k: int) -> Ranking:
    return [(doc_id, scores[doc_id]) for doc_id in rank_by_score(scores)[:k]]


def bm25_reference(data: BeirData, k: int = SEARCH_K) -> Runs:
    """BM25 over title + text (bm25s: k1 1.2, b 0.75, Lucene's idf, Snowball English stemmer,
    English stop words); documents sharing no term with the query are not ranked."""
    import bm25s  # type: ignore[import-untyped]
    import Stemmer  # type: ignore[import-not-found]

    stemmer = Stemmer.Stemmer(BM25_SETTINGS["stemmer"])
    ids = list(data.corpus)
    texts = [f"{title} {text}" for title, text in data.corpus.values()]
    # Lower case, words of two or more letters or digits (scikit-learn's pattern).
    tokenizer = bm25s.tokenization.Tokenizer(stemmer=stemmer, stopwords=BM25_SETTINGS["stopwords"])
    corpus_tokens = tokenizer.tokenize(texts, show_progress=False, return_as="ids")
    retriever = bm25s.BM25(
        k1=BM25_SETTINGS["k1"], b=BM25_SETTINGS["b"], method=BM25_SETTINGS["method"]
    )
    retriever.index(corpus_tokens, show_progress=False)
    qids = list(data.queries)
    query_tokens = tokenizer.tokenize(
        [data.queries[qid] for qid in qids],
        update_vocab=False,
        show_progress=False,
        return_as="ids",
    )
    docs, scores = retriever.retrieve(query_tokens, k=min(k, len(ids)), show_progress=False)
    runs: Runs = {}
    for qid, found_docs, found_scores in zip(qids, docs, scores, strict=True):
        found = {
            ids[int(i)]: float(score)
            for i, score in zip(found_docs, found_scores, strict=True)
            if score > 0
        }
        runs[qid] = _top_k(found, k)
    return runs


def dense_reference(data: BeirData, k: int = SEARCH_K, show_progress: bool = True) -> Runs:
    """Exact cosine between the bundled MiniLM's embeddings of each query and of each
    document's title + text (as BEIR embeds a document), in this process."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from services.embedder.model import resolve_model_path
    from services.embedder.settings import BUNDLED_MODEL

    model = SentenceTransformer(resolve_model_path(BUNDLED_MODEL), device="cpu")
    ids = list(data.corpus)
    texts = [f"{title} {text}".strip() for title, text in data.corpus.values()]
    corpus = model.encode(
        texts, batch_size=32, normalize_embeddings=True, show_progress_bar=show_progress
    )
    qids = list(data.queries)
    queries = model.encode(
        [data.queries[qid] for qid in qids], batch_size=64, normalize_embeddings=True
    )
    similarity = np.asarray(queries) @ np.asarray(corpus).T
    depth = min(k, len(ids))
    runs: Runs = {}
    for row, qid in enumerate(similarity.argsort(axis=1)[:, ::-1][:, :depth].tolist()):
        runs[qids[row]] = _top_k({ids[i]: float(similarity[row, i]) for i in qid}, k)
    return runs


# The evaluation ----------------------------------------------------------------------------


@dataclass
class EvalConfig:
    data: Path
    split: str
    modes: Sequence[str] = MODES
    max_queries: int | None = None
    url: str | None = None  # None: start a local stack for the run
    token: str | None = None
    token_source: Callable[[], str] | None = None  # instead of token: asked again on a 401
    tag: str | None = None  # the documents' `eval` metadata; default: the dataset's name
    reuse: bool = False
    references: bool = True
    save_runs: bool = False
    filtered: bool = False
    batch_size: int = BATCH_DOCUMENTS
    ingest_timeout_s: float = 3600.0
    show_progress: bool = True
    stack_env: dict[str, str] = field(default_factory=dict)  # more settings for a local stack


@contextlib.contextmanager
def _deployment(config: EvalConfig) -> Iterator[tuple[str, Callable[[], str]]]:
    """The gateway to measure and a source of tokens: the one given, or a local stack
    started for the run (gateway limits raised) and stopped after it."""
    if config.url is not None:
        token_source = config.token_source
        if token_source is None:
            if not config.token:
                raise EvalError("--url needs --token (an access token of the user to load)")
            token = config.token
            token_source = lambda: token  # noqa: E731
        yield config.url, token_source
        return
    from ragctl.stack import Ports, Stack

    with tempfile.TemporaryDirectory(prefix="ragctl-eval-") as home:
        stack = Stack(
            home=Path(home),
            ports=Ports.free(),
            extra_env={**UNTHROTTLED_ENV, **config.stack_env},
        )
        print(f"starting a local stack in {home} ...", file=sys.stderr, flush=True)
        stack.start()
        try:
            pool = stack.pool
            assert pool is not None
            yield stack.url("gateway"), lambda: pool.user_token(EVAL_USER)
        finally:
            stack.stop()


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Load, search and score; the report (see format_table for its rows)."""
    unknown = set(config.modes) - set(MODES)
    if unknown:
        raise EvalError(f"unknown modes {sorted(unknown)}: choose from {', '.join(MODES)}")
    data = read_beir(config.data, config.split).limit_queries(config.max_queries)
    tag = config.tag or data.name
    expected = len({ids[0] for ids in content_groups(data).values()})  # distinct contents
    report: dict[str, Any] = {
        "dataset": data.name,
        "split": config.split,
        "queries": len(data.queries),
        "documents": len(data.corpus),
        "k": SEARCH_K,
        "tag": tag,
        "filtered": config.filtered,
        "modes": {},
        "references": {},
    }
    runs: dict[str, Runs] = {}
    with _deployment(config) as (url, token_source):
        report["url"] = url if config.url is not None else "local stack"
        client = GatewayClient(url, token_source)
        try:
            report["ingestion"] = _load(client, data, tag, expected, config)
            for mode in config.modes:
                started = time.monotonic()
                runs[mode], latencies = search_mode(
                    client, data, mode, tag, config.filtered, config.show_progress
                )
                report["modes"][mode] = {
                    **evaluate(runs[mode], data.qrels),
                    "latency_ms": {
                        "p50": 1000 * percentile(latencies, 50),
                        "p95": 1000 * percentile(latencies, 95),
                    },
                    "seconds": time.monotonic() - started,
                }
        finally:
            client.close()
    if config.references:  # after the stack stopped: it does not share the CPUs with them
        references: list[tuple[str, Callable[[], Runs]]] = [
            (REFERENCE_BM25, lambda: bm25_reference(data)),
            (REFERENCE_DENSE, lambda: dense_reference(data, show_progress=config.show_progress)),
        ]
        for name, reference in references:
            started = time.monotonic()
            runs[name] = reference()
            report["references"][name] = {
                **evaluate(runs[name], data.qrels),
                "seconds": time.monotonic() - started,
            }
        report["references"][REFERENCE_BM25]["settings"] = BM25_SETTINGS
    if config.save_runs:
        report["runs"] = {
            name: {
                qid: [[doc_id, score] for doc_id, score in ranking] for qid, ranking in run.items()
            }
            for name, run in runs.items()
        }
    return report


def _load(
    client: GatewayClient, data: BeirData, tag: str, expected: int, config: EvalConfig
) -> dict[str, Any]:
    """Upload and ingest the corpus, unless reuse finds it all ready already."""
    started = time.monotonic()
    if config.reuse:
        counts = summary(client, tag)
        if counts["ready"] == counts["total"] == expected:
            return {"reused": True, **counts, "seconds": 0.0}
    uploaded = ingest_corpus(client, data, tag, config.batch_size, config.show_progress)
    counts = wait_for_ingestion(
        client, tag, expected, config.ingest_timeout_s, show_progress=config.show_progress
    )
    seconds = time.monotonic() - started
    return {
        "reused": False,
        **counts,
        "created": uploaded["created"],
        "duplicates": uploaded["duplicates"],
        "upload_seconds": uploaded["seconds"],
        "seconds": seconds,
        "documents_per_s": counts["total"] / seconds if seconds else None,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per mode, then the references."""
    lines = [
        f"{report['dataset']} ({report['split']}, {report['queries']} queries, "
        f"{report['documents']} documents)",
        "",
        "| mode | nDCG@10 | recall@100 | MRR@10 | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    for mode, row in report["modes"].items():
        latency = row["latency_ms"]
        lines.append(
            f"| `{mode}` | {row['ndcg@10']:.3f} | {row['recall@100']:.3f} | {row['mrr@10']:.3f} "
            f"| {latency['p50']:.1f} | {latency['p95']:.1f} |"
        )
    for name, row in report["references"].items():
        lines.append(
            f"| {name} | {row['ndcg@10']:.3f} | {row['recall@100']:.3f} | {row['mrr@10']:.3f} | | |"
        )
    ingestion = report.get("ingestion")
    if ingestion:
        how = (
            "reused (all ready)"
            if ingestion["reused"]
            else f"{ingestion['total']} documents in {ingestion['seconds']:.0f}s "
            f"(upload {ingestion['upload_seconds']:.1f}s), {ingestion['failed']} failed"
        )
        lines += ["", f"ingestion: {how}"]
    return "\n".join(lines)
