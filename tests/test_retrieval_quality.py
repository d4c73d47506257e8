"""The retrieval quality guard: a fixed subset of SciFact's training claims searched through
the public API on the session's stack, failing when a mode's nDCG@10 drops below what was
measured (docs/retrieval.md) by more than a small margin, or when hybrid stops beating both
of its sides.

SciFact is evaluation data, not part of the product: it lives in ../shared/data (CI has it
beside the clone; RAG_EVAL_DATA points elsewhere). Without it this module is not collected
and the run's summary says so (tests/conftest.py); CI sets RAG_REQUIRE_EVAL_DATA=1, which
makes a missing dataset an error instead.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

from ragctl.evaluation import EvalConfig, read_beir, run_evaluation
from ragctl.stack import Stack
from tests.conftest import eval_data_folder

CLAIMS = 200  # the first 200 judged training claims
DISTRACTORS = 1000  # other abstracts, drawn with a fixed seed, beside the judged ones
SEED = 15
# Measured on this subset through the API (docs/retrieval.md), and the margin under which a
# change counts as a regression. Hybrid must also stay above both its sides.
# Measured 2026-12-03: 200 claims over 1,153 abstracts (hybrid 0.052 above text).
MEASURED = {"vector": 0.793, "text": 0.809, "hybrid": 0.861}
MARGIN = 0.02
HYBRID_LEAD = 0.03  # the target on the whole split


def subset(source: Path, target: Path) -> Path:
    """A BEIR folder with the first CLAIMS judged claims of the training split, every
    abstract judged for them, and DISTRACTORS other abstracts."""
    data = read_beir(source, "train").limit_queries(CLAIMS)
    judged = {doc for grades in data.qrels.values() for doc in grades}
    others = sorted(set(data.corpus) - judged)
    keep = judged | set(random.Random(SEED).sample(others, DISTRACTORS))
    (target / "qrels").mkdir(parents=True)
    with (target / "corpus.jsonl").open("w", encoding="utf-8") as out:
        for doc_id in sorted(keep):
            title, text = data.corpus[doc_id]
            out.write(json.dumps({"_id": doc_id, "title": title, "text": text}))
            out.write("\n")
    with (target / "queries.jsonl").open("w", encoding="utf-8") as out:
        for query_id in data.qrels:
            out.write(json.dumps({"_id": query_id, "text": data.queries[query_id]}) + "\n")
    with (target / "qrels" / "train.tsv").open("w", encoding="utf-8") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        for query_id, grades in data.qrels.items():
            for doc_id, grade in grades.items():
                out.write(f"{query_id}\t{doc_id}\t{grade}\n")
    return target


def test_retrieval_quality_holds_on_scifact_training_claims(stack: Stack, tmp_path: Path) -> None:
    assert stack.pool is not None
    pool = stack.pool
    user = f"quality-guard-{uuid.uuid4().hex[:8]}@example.com"  # alone with its corpus
    report = run_evaluation(
        EvalConfig(
            data=subset(eval_data_folder(), tmp_path / "scifact-guard"),
            split="train",
            url=stack.url("gateway"),
            token_source=lambda: pool.user_token(user),
            references=False,
            show_progress=False,
            ingest_timeout_s=1200,
        )
    )
    assert report["ingestion"]["failed"] == 0
    ndcg = {mode: row["ndcg@10"] for mode, row in report["modes"].items()}
    print(f"quality guard ({report['queries']} claims, {report['documents']} abstracts): {ndcg}")
    for mode, measured in MEASURED.items():
        assert ndcg[mode] >= measured - MARGIN, (mode, ndcg)
    assert ndcg["hybrid"] >= max(ndcg["vector"], ndcg["text"]) + HYBRID_LEAD, ndcg
