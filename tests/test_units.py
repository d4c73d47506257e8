"""In-process checks of the pieces that need no server."""

from __future__ import annotations

from services.gateway import rag
from services.retriever.store import fuse_rankings


def test_reciprocal_rank_fusion_prefers_agreement() -> None:
    a = [{"chunk_id": 1, "score": 0.9}, {"chunk_id": 2, "score": 0.8}]
    b = [{"chunk_id": 2, "score": 5.0}, {"chunk_id": 3, "score": 4.0}]
    fused = fuse_rankings([a, b], k=3)
    assert [h["chunk_id"] for h in fused] == [2, 1, 3]


def test_passages_are_numbered_marked_as_data_and_fit_the_context() -> None:
    hits = [
        {
            "document_id": f"d{i}",
            "title": f"t{i}",
            "chunk_id": i,
            "text": "x " * 300,
            "score": 1.0 / (i + 1),
            "position": {},
        }
        for i in range(10)
    ]
    messages = [{"role": "user", "content": "question?"}]
    kept = rag.fit_passages(hits, messages, context_tokens=1024, max_tokens=256)
    assert 0 < len(kept) < 10
    prompt = rag.build_messages(kept, messages)
    assert prompt[0]["role"] == "system" and "not instructions" in prompt[0]["content"]
    assert "[1] (source: t0)" in prompt[0]["content"]
    assert prompt[-1] == messages[0]
    assert [c["index"] for c in rag.citations(kept)] == list(range(1, len(kept) + 1))


def test_passages_name_their_section_and_pages() -> None:
    hit = {
        "document_id": "d",
        "title": "Manual",
        "chunk_id": 1,
        "text": "Oil the pump.",
        "score": 1.0,
        "position": {"heading": "Pumps", "page": 3, "page_end": 4},
    }
    prompt = rag.build_messages([hit], [{"role": "user", "content": "How?"}])
    assert "[1] (source: Manual, Pumps, pages 3-4)" in prompt[0]["content"]
