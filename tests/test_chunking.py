"""Chunking along structure, sized by a token counter (one token per word, or the model's own),
and bounded in characters whatever the text."""

from __future__ import annotations

import base64
import json
import random
import re
import string
from pathlib import Path

import pytest

from ragctl.cli import sample_paths
from services.embedder.model import resolve_model_path
from services.embedder.settings import BUNDLED_MODEL, EmbedderSettings
from services.retriever.chunking import TokenCounter, chunk_blocks, chunk_char_limit
from services.retriever.parsing import Block
from services.retriever.tokens import LocalTokenCounter


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


# With the embedding model's own tokenizer, as the retriever counts (services/retriever/tokens.py).

MODEL_WINDOW = 256  # all-MiniLM-L6-v2 reads 256 tokens, two of them [CLS] and [SEP]
CHUNK_TOKENS = MODEL_WINDOW - 2  # the retriever's chunk limit for this model
EMBEDDER_MAX_CHARS = EmbedderSettings().max_input_chars  # its /v1/embeddings refuses longer


@pytest.fixture(scope="module")
def model_tokens() -> TokenCounter:
    """The bundled embedding model's token counts, less the overhead every input carries."""
    folder = Path(resolve_model_path(BUNDLED_MODEL))
    counter = LocalTokenCounter({"tokenizer": json.loads((folder / "tokenizer.json").read_text())})
    overhead = counter.count([""])[0]

    async def count(texts: list[str]) -> list[int]:
        return [n - overhead for n in counter.count(texts)]

    return count


def hostile_texts() -> dict[str, str]:
    """Runs of characters the tokenizer reads as few tokens, or as many tokens per character."""
    rng = random.Random(7)
    return {
        "one 40,000-character word": "".join(rng.choices(string.ascii_lowercase, k=40_000)),
        "a base64 blob": base64.b64encode(rng.randbytes(30_000)).decode(),
        "CJK with no spaces or full stops": "".join(
            chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(20_000)
        ),
        "kana with no spaces": "カタカナのもじれつ" * 3_000,
        "a run of emoji": "🙂🚀🎉" * 5_000,
        "combining marks": "e" + "\u0301" * 20_000,
        "a run of spaces": "start" + " " * 40_000 + "end",
    }


async def test_no_chunk_exceeds_the_embedders_limits_whatever_the_text(
    model_tokens: TokenCounter,
) -> None:
    for name, text in hostile_texts().items():
        blocks = [Block(f"The report opens here. {text} The report ends here.", "Data", 1)]
        chunks = await chunk_blocks(blocks, model_tokens, CHUNK_TOKENS, overlap_tokens=0)
        sizes = [len(c.text) for c in chunks]
        assert max(sizes) <= chunk_char_limit(CHUNK_TOKENS) < EMBEDDER_MAX_CHARS, name
        assert max(await model_tokens([c.text for c in chunks])) <= CHUNK_TOKENS, name
        # Nothing is lost, and a cut word is not padded with spaces.
        assert "".join("".join(c.text for c in chunks).split()) == "".join(
            blocks[0].text.split()
        ), name


async def test_a_40000_character_word_is_cut_and_every_piece_of_it_kept(
    model_tokens: TokenCounter,
) -> None:
    word = hostile_texts()["one 40,000-character word"]
    text = f"Valves stick in winter. {word} Pumps need oil weekly."
    chunks = await chunk_blocks([Block(text, None, None)], model_tokens, CHUNK_TOKENS, 32)
    assert max(len(c.text) for c in chunks) <= chunk_char_limit(CHUNK_TOKENS)
    assert max(await model_tokens([c.text for c in chunks])) <= CHUNK_TOKENS
    covered = [False] * len(word)
    for chunk in chunks:
        for piece in chunk.text.split():
            if len(piece) > 20 and (start := word.find(piece)) >= 0:
                covered[start : start + len(piece)] = [True] * len(piece)
    assert all(covered), "every character of the word is in some chunk"
    assert chunks[0].text.startswith("Valves stick in winter.")
    assert chunks[-1].text.endswith("Pumps need oil weekly.")


async def test_ordinary_prose_is_never_cut_by_the_character_bound(
    model_tokens: TokenCounter,
) -> None:
    for sample in sample_paths():
        blocks = [Block(part, None, None) for part in sample.read_text().split("\n\n")]
        bounded = await chunk_blocks(blocks, model_tokens, CHUNK_TOKENS, 32)
        by_tokens_only = await chunk_blocks(blocks, model_tokens, CHUNK_TOKENS, 32, 10**9)
        assert [c.text for c in bounded] == [c.text for c in by_tokens_only], sample.name


async def test_a_smaller_character_limit_is_respected() -> None:
    text = " ".join(["antidisestablishmentarianism"] * 200)
    chunks = await chunk_blocks([Block(text, None, None)], words, 100, 10, max_chars=500)
    assert max(len(c.text) for c in chunks) <= 500
    assert sum(c.text.count("anti") for c in chunks) >= 200
