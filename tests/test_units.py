"""In-process checks of the pieces that need no server."""

from __future__ import annotations

import pytest

from services.gateway import rag
from services.retriever.chunking import chunk_text
from services.retriever.store import fuse_rankings


def test_chunks_respect_headings_and_size() -> None:
    words = " ".join(f"word{i}." for i in range(300))
    text = f"# Intro\n\nShort intro.\n\n## Long\n\n{words}\n\n## End\n\nThe end."
    chunks = chunk_text(text, max_words=50, overlap_words=10)
    assert all(len(c.text.split()) <= 50 for c in chunks)
    assert chunks[0].position["heading"] == "Intro" and chunks[0].text == "Short intro."
    assert chunks[-1].position["heading"] == "End"
    long_chunks = [c for c in chunks if c.position["heading"] == "Long"]
    # consecutive chunks of a section overlap, so no sentence is cut off from its context
    assert long_chunks[1].text.split()[0] in long_chunks[0].text.split()
    assert " ".join(c.text for c in long_chunks).count("word299.") >= 1
    assert [c.position["chunk"] for c in chunks] == list(range(len(chunks)))


def test_chunking_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        chunk_text("x", max_words=10, overlap_words=10)


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
