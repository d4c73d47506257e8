"""Split parsed blocks into overlapping chunks sized in the embedding model's tokens."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# After . ! ? and a space, or after CJK full stops, which take no space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")
MAX_REFINE_ROUNDS = 8
MAX_HEADING_CHARS = 200  # a heading is a label for citations, not content


class ChunkingError(ValueError):
    """The text cannot be cut into pieces the model reads whole (a permanent failure)."""


# Counts the model's tokens of each text, excluding the fixed overhead (special tokens,
# prompt) that every input carries.
TokenCounter = Callable[[list[str]], Awaitable[list[int]]]


class BlockLike(Protocol):
    text: str
    heading: str | None
    page: int | None


@dataclass
class Chunk:
    text: str
    position: dict[str, object] = field(default_factory=dict)


@dataclass
class _Unit:
    """A sentence (or a piece of an over-long one) and where it sits."""

    text: str
    block: int
    heading: str | None
    page: int | None
    tokens: int = 0


def _sentences(blocks: Sequence[BlockLike]) -> list[_Unit]:
    return [
        _Unit(sentence, index, block.heading, block.page)
        for index, block in enumerate(blocks)
        for sentence in _SENTENCE_END.split(block.text.strip())
        if sentence.strip()
    ]


async def _split_oversized(units: list[_Unit], budget: int, count: TokenCounter) -> list[_Unit]:
    """Break units over budget tokens at word boundaries (and over-long words at characters)."""
    out: list[_Unit] = []
    for unit in units:
        if unit.tokens <= budget:
            out.append(unit)
            continue
        words: list[str] = []
        for word in unit.text.split():
            # A word can be a very long token run (a hash, base64): cut it so each piece fits.
            step = max(1, budget // 2)
            words.extend(word[i : i + step] for i in range(0, len(word), step))
        word_tokens = [max(1, n) for n in await count(words)]
        piece: list[str] = []
        piece_tokens = 0
        for word, tokens in zip(words, word_tokens, strict=True):
            if piece and piece_tokens + tokens > budget:
                out.append(
                    _Unit(" ".join(piece), unit.block, unit.heading, unit.page, piece_tokens)
                )
                piece, piece_tokens = [], 0
            piece.append(word)
            piece_tokens += tokens
        if piece:
            out.append(_Unit(" ".join(piece), unit.block, unit.heading, unit.page, piece_tokens))
    return out


def _pack(units: list[_Unit], max_tokens: int, overlap_tokens: int) -> list[list[_Unit]]:
    """Greedy packing; a chunk never spans two sections and repeats up to overlap_tokens of
    the previous chunk's trailing sentences when it continues the same section."""
    groups: list[list[_Unit]] = []
    current: list[_Unit] = []
    total = 0
    for unit in units:
        if current and unit.heading != current[-1].heading:
            groups.append(current)
            current, total = [], 0
        elif current and total + unit.tokens > max_tokens:
            groups.append(current)
            carried: list[_Unit] = []
            carried_tokens = 0
            for previous in reversed(current):
                if carried_tokens + previous.tokens > overlap_tokens:
                    break
                carried.insert(0, previous)
                carried_tokens += previous.tokens
            if carried_tokens + unit.tokens > max_tokens:
                carried, carried_tokens = [], 0
            current, total = carried, carried_tokens
        current.append(unit)
        total += unit.tokens
    if current:
        groups.append(current)
    return groups


def _join(group: list[_Unit]) -> str:
    parts: list[str] = []
    for i, unit in enumerate(group):
        if i:
            parts.append("\n\n" if unit.block != group[i - 1].block else " ")
        parts.append(unit.text)
    return "".join(parts)


def _chunk(group: list[_Unit]) -> Chunk:
    position: dict[str, object] = {}
    if group[0].heading:
        position["heading"] = group[0].heading[:MAX_HEADING_CHARS]
    if group[0].page is not None:
        position["page"] = group[0].page
        if group[-1].page != group[0].page:
            position["page_end"] = group[-1].page
    return Chunk(_join(group), position)


async def chunk_blocks(
    blocks: Sequence[BlockLike], count: TokenCounter, max_tokens: int, overlap_tokens: int
) -> list[Chunk]:
    """Chunks of at most max_tokens model tokens each (counted by `count`), along headings,
    paragraphs and sentences, each with its heading and page for citations."""
    if max_tokens <= 0 or overlap_tokens < 0 or 2 * overlap_tokens >= max_tokens:
        raise ChunkingError("need 0 <= 2 * overlap_tokens < max_tokens")
    units = _sentences(blocks)
    if not units:
        return []
    for unit, tokens in zip(units, await count([u.text for u in units]), strict=True):
        unit.tokens = max(1, tokens)  # a word can count 0 beside a prompt; never free
    units = await _split_oversized(units, max_tokens - overlap_tokens, count)
    groups = _pack(units, max_tokens, overlap_tokens)
    # Sums of sentence counts can differ from the count of the joined text (a tokenizer
    # that merges across spaces): count every chunk and split any that is over.
    for _ in range(MAX_REFINE_ROUNDS):
        totals = await count([_join(group) for group in groups])
        over = {i for i, total in enumerate(totals) if total > max_tokens}
        if not over:
            break
        refined: list[list[_Unit]] = []
        for i, group in enumerate(groups):
            if i not in over:
                refined.append(group)
            elif len(group) > 1:
                refined.extend([group[: len(group) // 2], group[len(group) // 2 :]])
            else:
                unit = group[0]
                shrunk = await _split_oversized(
                    [_Unit(unit.text, unit.block, unit.heading, unit.page, max_tokens + 1)],
                    max(1, unit.tokens // 2),
                    count,
                )
                refined.extend([piece] for piece in shrunk)
        groups = refined
    else:
        raise ChunkingError("the text cannot be cut into chunks the embedding model reads whole")
    chunks = [_chunk(group) for group in groups]
    for ordinal, chunk in enumerate(chunks):
        chunk.position["chunk"] = ordinal
    return chunks
