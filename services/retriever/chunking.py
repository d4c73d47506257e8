"""Split a document into overlapping chunks along its structure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Chunk:
    text: str
    position: dict[str, object] = field(default_factory=dict)


@dataclass
class _Block:
    text: str
    heading: str | None
    char_start: int


def _blocks(text: str) -> list[_Block]:
    """Paragraphs, each tagged with the markdown heading it sits under."""
    blocks: list[_Block] = []
    heading: str | None = None
    offset = 0
    for para in re.split(r"(\n\s*\n)", text):
        start = offset
        offset += len(para)
        stripped = para.strip()
        if not stripped:
            continue
        lines = stripped.splitlines()
        match = _HEADING.match(lines[0])
        if match:
            heading = match.group(2)
            lines = lines[1:]
            if not lines:
                continue
        blocks.append(_Block(" ".join(line.strip() for line in lines), heading, start))
    return blocks


def _split_long(text: str, max_words: int) -> list[str]:
    """Break a paragraph longer than max_words at sentence ends, then at words."""
    pieces: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        words = sentence.split()
        while len(words) > max_words:
            if current:
                pieces.append(" ".join(current))
                current = []
            pieces.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if len(current) + len(words) > max_words and current:
            pieces.append(" ".join(current))
            current = []
        current.extend(words)
    if current:
        pieces.append(" ".join(current))
    return pieces


def chunk_text(text: str, max_words: int, overlap_words: int) -> list[Chunk]:
    """Pack paragraphs into chunks of at most max_words, carrying overlap_words between them.

    A chunk never spans two headings, so its position names one section.
    """
    if max_words <= 0 or overlap_words < 0 or overlap_words >= max_words:
        raise ValueError("need 0 <= overlap_words < max_words")
    chunks: list[Chunk] = []
    words: list[str] = []
    heading: str | None = None
    start = 0

    def flush(keep_overlap: bool) -> list[str]:
        if words:
            position: dict[str, object] = {"char_start": start}
            if heading:
                position["heading"] = heading
            chunks.append(Chunk(" ".join(words), position))
        return words[-overlap_words:] if keep_overlap and overlap_words else []

    for block in _blocks(text):
        if block.heading != heading and words:
            words = flush(keep_overlap=False)
        if not words:
            start = block.char_start
        heading = block.heading
        for piece in _split_long(block.text, max_words - overlap_words):
            piece_words = piece.split()
            if len(words) + len(piece_words) > max_words:
                words = flush(keep_overlap=True)
                start = block.char_start
            words = words + piece_words
    flush(keep_overlap=False)
    for ordinal, chunk in enumerate(chunks):
        chunk.position["chunk"] = ordinal
    return chunks
