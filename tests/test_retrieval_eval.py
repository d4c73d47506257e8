"""The retrieval evaluation (ragctl/evaluation.py): its metrics against values worked out by
hand, its BEIR reader, and a small run through the session's stack (real tokens, the public
API) on a BEIR folder written here, with the in-process references beside it."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

from ragctl.evaluation import (
    MODES,
    REFERENCE_BM25,
    REFERENCE_DENSE,
    EvalConfig,
    EvalError,
    bm25_reference,
    evaluate,
    format_table,
    mrr_at_k,
    ndcg_at_k,
    percentile,
    rank_by_score,
    read_beir,
    recall_at_k,
    run_evaluation,
)
from ragctl.stack import Stack

DOCS = {
    "d1": ("Honeybee navigation", "Honeybees find their hive by the angle of the sun."),
    "d2": ("Volcanic soils", "Basalt weathers into fertile volcanic soil rich in minerals."),
    "d3": ("Glacier retreat", "Alpine glaciers have lost much of their ice since 1850."),
    "d4": ("Coral bleaching", "Warm seas make corals expel the algae that feed them."),
    "d5": ("Tidal energy", "Turbines under the sea turn tidal currents into electricity."),
    "d6": ("Sourdough baking", "A sourdough starter leavens bread with wild yeast."),
    "d7": ("Chess openings", "The Sicilian defence answers the king's pawn opening."),
    "d8": ("Comet tails", "A comet's tail points away from the sun, pushed by solar wind."),
    "d9": ("Bird migration", "Arctic terns fly from pole to pole every year."),
    "d10": ("Violin making", "Violin makers carve spruce tops and maple backs."),
}
QUERIES = {
    "q1": "how do honeybees find the hive",
    "q2": "why are glaciers losing ice",
    "q3": "what makes corals bleach",
    "q4": "how does a sourdough starter leaven bread",
    "q5": "which way does a comet tail point",
    "q6": "a query nobody judged",
}
QRELS = [("q1", "d1", 2), ("q2", "d3", 1), ("q3", "d4", 2), ("q3", "d5", 0), ("q4", "d6", 1)]
QRELS += [("q5", "d8", 1), ("q5", "d9", 1)]


def write_beir(folder: Path, split: str = "test") -> Path:
    """A BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (with its header)."""
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as fh:
        for doc_id, (title, text) in DOCS.items():
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as fh:
        for qid, text in QUERIES.items():
            fh.write(json.dumps({"_id": qid, "text": text, "metadata": {}}) + "\n")
    lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t{g}" for q, d, g in QRELS)]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_ndcg_uses_the_grade_as_gain_against_the_ideal_order() -> None:
    grades = {"a": 2, "b": 1, "c": 0}
    assert ndcg_at_k(["a", "b", "x"], grades) == pytest.approx(1.0)
    # b first, a second: (1 + 2/log2 3) / (2 + 1/log2 3)
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert ndcg_at_k(["b", "a"], grades) == pytest.approx(expected)
    # a judged-irrelevant document (grade 0) gains nothing; past k counts nothing
    assert ndcg_at_k(["c", "x", "a"], grades, k=2) == 0.0
    assert ndcg_at_k(["x", "a"], grades, k=2) == pytest.approx(
        (2 / math.log2(3)) / (2 + 1 / math.log2(3))
    )
    assert ndcg_at_k(["a"], {"a": 0}) == 0.0  # nothing relevant to find


def test_recall_and_mrr_count_only_grades_above_zero() -> None:
    grades = {"a": 1, "b": 3, "c": 0, "d": 1}
    assert recall_at_k(["c", "b", "x", "a"], grades) == pytest.approx(2 / 3)
    assert recall_at_k(["c", "b", "x", "a"], grades, k=2) == pytest.approx(1 / 3)
    assert recall_at_k([], grades) == 0.0
    assert mrr_at_k(["c", "x", "d", "a"], grades) == pytest.approx(1 / 3)
    assert mrr_at_k(["c"] + ["x"] * 10 + ["a"], grades) == 0.0  # past rank 10
    assert mrr_at_k(["b"], grades) == 1.0


def test_ties_are_ranked_as_trec_eval_ranks_them() -> None:
    """Equal scores: document id descending (trec_eval's order), whatever the input order."""
    scores = {"d1": 0.5, "d3": 0.9, "d2": 0.5, "d10": 0.5}
    assert rank_by_score(scores) == ["d3", "d2", "d10", "d1"]
    grades = {"d1": 1}
    ranking = rank_by_score(scores)
    assert mrr_at_k(ranking, grades) == pytest.approx(1 / 4)
    assert ndcg_at_k(ranking, grades) == pytest.approx(1 / math.log2(5))


def test_evaluate_averages_over_every_judged_query() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}}
    runs = {"q1": [("a", 3.0)], "q2": [("x", 2.0), ("b", 1.0)]}  # q3: no hits, counts 0
    metrics = evaluate(runs, qrels)
    assert metrics["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["recall@100"] == pytest.approx(2 / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


def test_the_beir_reader_keeps_the_judged_queries_in_file_order(tmp_path: Path) -> None:
    data = read_beir(write_beir(tmp_path / "toy"), "test")
    assert data.name == "toy"
    assert list(data.corpus) == list(DOCS) and data.corpus["d2"] == DOCS["d2"]
    assert list(data.queries) == ["q1", "q2", "q3", "q4", "q5"]  # q6 is judged by none
    assert data.qrels["q3"] == {"d4": 2, "d5": 0}
    assert list(data.limit_queries(2).queries) == ["q1", "q2"]
    assert set(data.limit_queries(2).qrels) == {"q1", "q2"}
    with pytest.raises(EvalError, match="train.tsv is missing"):
        read_beir(tmp_path / "toy", "train")


def test_the_bm25_reference_ranks_the_document_that_shares_the_words(tmp_path: Path) -> None:
    data = read_beir(write_beir(tmp_path / "toy"), "test")
    runs = bm25_reference(data)
    assert [ranking[0][0] for ranking in runs.values()] == ["d1", "d3", "d4", "d6", "d8"]
    # stemmed ("leavens" ~ "leaven"), stop words dropped: only matching documents are ranked
    assert all(score > 0 for ranking in runs.values() for _, score in ranking)
    assert evaluate(runs, data.qrels)["mrr@10"] == 1.0


def test_an_evaluation_through_the_stack_reports_every_mode(stack: Stack, tmp_path: Path) -> None:
    """Load the toy corpus as a user of its own, search it in every mode through the
    gateway, and score it beside the in-process references."""
    assert stack.pool is not None
    pool = stack.pool
    user = f"eval-{uuid.uuid4().hex[:10]}@example.com"
    config = EvalConfig(
        data=write_beir(tmp_path / "toy"),
        split="test",
        url=stack.url("gateway"),
        token_source=lambda: pool.user_token(user),
        batch_size=4,  # three batches
        ingest_timeout_s=120,
        save_runs=True,
        show_progress=False,
    )
    report = run_evaluation(config)
    assert report["queries"] == 5 and report["documents"] == 10
    ingestion = report["ingestion"]
    assert (ingestion["ready"], ingestion["failed"], ingestion["created"]) == (10, 0, 10)
    assert set(report["modes"]) == set(MODES)
    for row in [*report["modes"].values(), *report["references"].values()]:
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            assert 0.0 <= row[metric] <= 1.0, row
    for row in report["modes"].values():
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p95"]
    assert set(report["references"]) == {REFERENCE_BM25, REFERENCE_DENSE}
    assert report["references"][REFERENCE_DENSE]["mrr@10"] == 1.0  # the toy queries are easy
    # Saved runs: per query, documents with scores, best first.
    for name in (*MODES, REFERENCE_BM25):
        ranking = report["runs"][name]["q1"]
        assert all(isinstance(doc, str) and isinstance(score, float) for doc, score in ranking)
    table = format_table(report)
    for row_name in ("`vector`", "`text`", "`hybrid`", REFERENCE_BM25, REFERENCE_DENSE):
        assert row_name in table

    # Again with reuse: every document is ready, nothing is uploaded.
    again = run_evaluation(
        EvalConfig(**{**config.__dict__, "reuse": True, "references": False, "modes": ["text"]})
    )
    assert again["ingestion"]["reused"] and set(again["modes"]) == {"text"}
    assert again["modes"]["text"]["ndcg@10"] == pytest.approx(report["modes"]["text"]["ndcg@10"])
