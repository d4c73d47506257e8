"""Chunking along structure, sized by a token counter (here: one token per word)."""

from __future__ import annotations

import re

import pytest

from services.retriever.chunking import chunk_blocks
from services.retriever.parsing import Block


async def words(texts: list[str]) -> list[int]:
    return [len(text.split()) for text in texts]


async def test_chunks_stay_within_the_limit_and_overlap() -> None:
    sentences = [f"Sentence number {i} has exactly seven words." for i in range(40)]
    blocks = [Block(" ".join(sentences[i : i + 5]), "Intro", None) for i in range(0, 40, 5)]
    chunks = await chunk_blocks(blocks, words, max_tokens=50, overlap_tokens=10)
    assert all(len(c.text.split()) <= 50 for c in chunks)
    assert len(chunks) >= 280 // 50
    for first, second in zip(chunks, chunks[1:], strict=False):
        last_sentence = re.split(r"(?<=\.)\s+", first.text)[-1]
        assert second.text.startswith(last_sentence), "one trailing sentence carries over"
    assert [c.position["chunk"] for c in chunks] == list(range(len(chunks)))
    assert all(c.position["heading"] == "Intro" for c in chunks)


async def test_a_chunk_never_spans_two_sections_and_keeps_its_page() -> None:
    blocks = [
        Block("Pumps need oil. They run hot.", "Pumps", 1),
        Block("Check them weekly.", "Pumps", 2),
        Block("Valves stick in winter.", "Valves", 2),
    ]
    chunks = await chunk_blocks(blocks, words, max_tokens=100, overlap_tokens=10)
    assert [c.text for c in chunks] == [
        "Pumps need oil. They run hot.\n\nCheck them weekly.",
        "Valves stick in winter.",
    ]
    assert chunks[0].position == {"heading": "Pumps", "page": 1, "page_end": 2, "chunk": 0}
    assert chunks[1].position == {"heading": "Valves", "page": 2, "chunk": 1}


async def test_over_long_sentences_and_words_are_cut_to_fit() -> None:
    runon = " ".join(f"w{i}" for i in range(500))
    blob = "x" * 400

    async def chars(texts: list[str]) -> list[int]:  # a tokenizer that splits long words
        return [sum(max(1, len(word) // 8) for word in text.split()) for text in texts]

    chunks = await chunk_blocks([Block(f"{runon} {blob}", None, None)], chars, 64, 8)
    counts = await chars([c.text for c in chunks])
    assert max(counts) <= 64
    assert "".join(c.text for c in chunks).count("x") >= 400
    assert (await chunk_blocks([], chars, 64, 8)) == []


async def test_a_counter_that_is_not_additive_is_still_respected() -> None:
    """Whole-text counts above the sum of its sentences' counts force a further split."""

    async def merging(texts: list[str]) -> list[int]:
        return [len(text.split()) + text.count(". ") * 3 for text in texts]

    text = " ".join(f"Item {i} ships today." for i in range(60))
    chunks = await chunk_blocks([Block(text, None, None)], merging, 40, 4)
    assert max(await merging([c.text for c in chunks])) <= 40


async def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        await chunk_blocks([Block("x", None, None)], words, max_tokens=10, overlap_tokens=5)


async def test_cjk_sentences_are_split_without_spaces() -> None:
    async def chars(texts: list[str]) -> list[int]:
        return [len(text.replace(" ", "")) for text in texts]

    text = "今日は晴れです。" * 20
    chunks = await chunk_blocks([Block(text, None, None)], chars, max_tokens=30, overlap_tokens=0)
    assert all(len(c.text) <= 30 for c in chunks) and len(chunks) > 1
    assert all(c.text.endswith("。") for c in chunks)
