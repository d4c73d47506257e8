"""Split parsed blocks into overlapping chunks sized in the embedding model's tokens and
bounded in characters, so that every chunk is one the embedder accepts whatever the text."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# After . ! ? and a space, or after CJK full stops, which take no space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")
MAX_REFINE_ROUNDS = 8
MAX_HEADING_CHARS = 200  # a heading is a label for citations, not content
# Token counts alone do not bound a chunk's length: WordPiece reads any word over 100
# characters (a long hash, kana or emoji without spaces) as one [UNK], and drops combining
# marks and runs of spaces. Prose measures about 4.5 characters per token of the bundled
# model (at most 6.5 over SciFact's abstracts), so this bound never cuts ordinary text.
MAX_CHARS_PER_TOKEN = 16
# Half the embedder's default input limit (EMBEDDER_MAX_INPUT_CHARS, 32,768), whatever the
# model's window; a batch of 32 such chunks also stays under its 4 MiB request body.
MAX_CHUNK_CHARS = 16_384


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
    continues_word: bool = False  # starts inside the previous unit's word: joined without a space


def chunk_char_limit(max_tokens: int) -> int:
    """The most characters a chunk of max_tokens tokens holds."""
    return min(max_tokens * MAX_CHARS_PER_TOKEN, MAX_CHUNK_CHARS)


def _sentences(blocks: Sequence[BlockLike]) -> list[_Unit]:
    return [
        _Unit(sentence, index, block.heading, block.page)
        for index, block in enumerate(blocks)
        for sentence in _SENTENCE_END.split(block.text.strip())
        if sentence.strip()
    ]


def _separator(previous: _Unit, unit: _Unit) -> str:
    if unit.block != previous.block:
        return "\n\n"
    return "" if unit.continues_word else " "


def _join(group: list[_Unit]) -> str:
    parts: list[str] = []
    for i, unit in enumerate(group):
        if i:
            parts.append(_separator(group[i - 1], unit))
        parts.append(unit.text)
    return "".join(parts)


async def _split_oversized(
    units: list[_Unit], budget: int, char_budget: int, count: TokenCounter
) -> list[_Unit]:
    """Break units over budget tokens or char_budget characters at word boundaries, and
    over-long words at characters."""
    out: list[_Unit] = []
    for unit in units:
        if unit.tokens <= budget and len(unit.text) <= char_budget:
            out.append(unit)
            continue
        # A word can be a very long token run (a hash, base64) or one [UNK] token of any
        # length: cut it so each piece fits both budgets.
        step = max(1, min(budget // 2, char_budget))
        pieces: list[str] = []
        continues: list[bool] = []
        for word in unit.text.split():
            for start in range(0, len(word), step):
                pieces.append(word[start : start + step])
                continues.append(start > 0)
        piece_tokens = [max(1, n) for n in await count(pieces)]
        texts: list[str] = []
        tokens = chars = 0
        starts_inside = unit.continues_word
        for text, inside, n in zip(pieces, continues, piece_tokens, strict=True):
            glue = "" if inside else " "
            if texts and (tokens + n > budget or chars + len(glue) + len(text) > char_budget):
                out.append(
                    _Unit(
                        "".join(texts), unit.block, unit.heading, unit.page, tokens, starts_inside
                    )
                )
                texts, tokens, chars, starts_inside = [], 0, 0, inside
            if texts:
                texts.append(glue)
                chars += len(glue)
            texts.append(text)
            tokens += n
            chars += len(text)
        if texts:
            out.append(
                _Unit("".join(texts), unit.block, unit.heading, unit.page, tokens, starts_inside)
            )
    return out


def _pack(
    units: list[_Unit], max_tokens: int, overlap_tokens: int, max_chars: int, overlap_chars: int
) -> list[list[_Unit]]:
    """Greedy packing within max_tokens and max_chars; a chunk never spans two sections and
    repeats up to overlap_tokens (and overlap_chars) of the previous chunk's trailing
    sentences when it continues the same section."""
    groups: list[list[_Unit]] = []
    current: list[_Unit] = []
    total = chars = 0
    for unit in units:
        added_chars = len(unit.text) + (len(_separator(current[-1], unit)) if current else 0)
        if current and unit.heading != current[-1].heading:
            groups.append(current)
            current, total, chars = [], 0, 0
        elif current and (total + unit.tokens > max_tokens or chars + added_chars > max_chars):
            groups.append(current)
            carried: list[_Unit] = []
            carried_tokens = 0
            for previous in reversed(current):
                if (
                    carried_tokens + previous.tokens > overlap_tokens
                    or len(_join([previous, *carried])) > overlap_chars
                ):
                    break
                carried.insert(0, previous)
                carried_tokens += previous.tokens
            if (
                carried_tokens + unit.tokens > max_tokens
                or len(_join([*carried, unit])) > max_chars
            ):
                carried, carried_tokens = [], 0
            current, total, chars = carried, carried_tokens, len(_join(carried))
        if current:
            chars += len(_separator(current[-1], unit))
        current.append(unit)
        total += unit.tokens
        chars += len(unit.text)
    if current:
        groups.append(current)
    return groups


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
    blocks: Sequence[BlockLike],
    count: TokenCounter,
    max_tokens: int,
    overlap_tokens: int,
    max_chars: int | None = None,
) -> list[Chunk]:
    """Chunks of at most max_tokens model tokens (counted by `count`) and max_chars
    characters (default: chunk_char_limit(max_tokens)) each, along headings, paragraphs and
    sentences, each with its heading and page for citations."""
    if max_tokens <= 0 or overlap_tokens < 0 or 2 * overlap_tokens >= max_tokens:
        raise ChunkingError("need 0 <= 2 * overlap_tokens < max_tokens")
    if max_chars is None:
        max_chars = chunk_char_limit(max_tokens)
    if max_chars <= 0:
        raise ChunkingError("need max_chars > 0")
    overlap_chars = max_chars * overlap_tokens // max_tokens
    units = _sentences(blocks)
    if not units:
        return []
    for unit, tokens in zip(units, await count([u.text for u in units]), strict=True):
        unit.tokens = max(1, tokens)  # a word can count 0 beside a prompt; never free
    units = await _split_oversized(
        units, max_tokens - overlap_tokens, max_chars - overlap_chars, count
    )
    groups = _pack(units, max_tokens, overlap_tokens, max_chars, overlap_chars)
    # Sums of sentence counts can differ from the count of the joined text (a tokenizer
    # that merges across spaces): count every chunk and split any that is over.
    for _ in range(MAX_REFINE_ROUNDS):
        texts = [_join(group) for group in groups]
        totals = await count(texts)
        over = {
            i
            for i, (text, total) in enumerate(zip(texts, totals, strict=True))
            if total > max_tokens or len(text) > max_chars
        }
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
                    [
                        _Unit(
                            unit.text,
                            unit.block,
                            unit.heading,
                            unit.page,
                            max_tokens + 1,
                            unit.continues_word,
                        )
                    ],
                    max(1, unit.tokens // 2),
                    max(1, min(max_chars - overlap_chars, len(unit.text) // 2)),
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
