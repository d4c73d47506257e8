"""Turn an uploaded document's bytes into paragraphs, each tagged with its heading or page."""

from __future__ import annotations

import codecs
import io
import posixpath
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import IO, Any

from lxml import etree
from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, PyPdfError

from services.common.errors import APIError

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
MEDIA_TYPES = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".txt": "text/plain",
    ".text": "text/plain",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
    ".docx": DOCX,
}
SUPPORTED = set(MEDIA_TYPES.values())
MAX_UNZIPPED_BYTES = 256 * 2**20
_TEXT_TYPES = {"text/markdown", "text/plain", "text/html"}


@dataclass
class Block:
    text: str  # one paragraph, whitespace-normalised, never empty
    heading: str | None  # title of the nearest heading above it
    page: int | None  # 1-based page number for paginated formats (PDF)


class ParseError(Exception):
    """Permanent: this upload can never be parsed. str(exc) is a user-facing reason."""


def media_type_of(filename: str | None, declared: str | None) -> str:
    """The upload's media type, from its file extension first, then its declared type."""
    if filename:
        for ext, media_type in MEDIA_TYPES.items():
            if filename.lower().endswith(ext):
                return media_type
    base = (declared or "").split(";")[0].strip().lower()
    if base in SUPPORTED:
        return base
    raise APIError(
        415,
        f"unsupported document type {base or filename or 'unknown'}; "
        "supported: plain text (.txt), Markdown (.md), HTML (.html), PDF (.pdf) and Word (.docx)",
        code="unsupported_type",
    )


def check_upload(raw: bytes, media_type: str) -> None:
    """Refuse, cheaply and without parsing, an upload that can never be parsed."""
    if not raw:
        raise ParseError("the document is empty")
    if media_type in _TEXT_TYPES:
        _decode(raw, media_type)
    elif media_type == "application/pdf":
        if not raw.startswith(b"%PDF-"):
            raise ParseError("the file is not a PDF (it does not start with %PDF-)")
    elif media_type == DOCX:
        _check_zip(raw)
    else:
        raise ParseError(f"unsupported document type {media_type}")


def _check_zip(raw: bytes) -> None:
    """A zip archive, and not a zip bomb (reads the central directory only)."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            unzipped = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, OSError):  # ValueError, OSError: bad header fields
        raise ParseError(
            "the DOCX file is corrupt or not a Word document: it is not a zip archive"
        ) from None
    if unzipped > MAX_UNZIPPED_BYTES:
        raise ParseError(
            f"the DOCX file unpacks to over {MAX_UNZIPPED_BYTES // 2**20} MiB; is it a zip bomb?"
        )


def parse_document(raw: bytes, media_type: str) -> list[Block]:
    """All the paragraphs of a document, in order; ParseError if it has none or is unreadable."""
    check_upload(raw, media_type)
    if media_type in _TEXT_TYPES:
        blocks = _TEXT_PARSERS[media_type](_decode(raw, media_type))
    else:
        blocks = _BINARY_PARSERS[media_type](raw)
    if not blocks:
        raise ParseError("the document has no text")
    return blocks


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _normalise(text: str) -> str:
    """Single spaces, no control characters, nothing PostgreSQL would refuse to store."""
    text = _CONTROL.sub(" ", text)
    if any("\ud800" <= char <= "\udfff" for char in text):  # lone surrogates, from broken PDFs
        text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join(text.split())


# --- text, Markdown, HTML -------------------------------------------------------------------

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.I)


def _decode(raw: bytes, media_type: str) -> str:
    """The text of a text upload: UTF-8 (a BOM is fine), or HTML in its declared charset."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        declared = _decode_declared(raw) if media_type == "text/html" else None
        if declared is None:
            raise ParseError("the document is not valid UTF-8 text") from None
        text = declared
    if "\x00" in text:
        raise ParseError("the document contains NUL bytes; is it binary?")
    if not text.strip():
        raise ParseError("the document has no text")
    return text


def _decode_declared(raw: bytes) -> str | None:
    """HTML decoded with the charset its <meta> declares, or None."""
    match = _META_CHARSET.search(raw[:4096])
    if not match:
        return None
    try:
        return raw.decode(codecs.lookup(match.group(1).decode("ascii")).name)
    except (LookupError, UnicodeDecodeError):
        return None


def _plain_blocks(text: str) -> list[Block]:
    paragraphs = map(_normalise, re.split(r"\n[ \t\r\f\v]*\n", text))
    return [Block(para, None, None) for para in paragraphs if para]


_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _markdown_blocks(text: str) -> list[Block]:
    """Paragraphs split on blank lines; ATX headings name the blocks below them.

    A heading line also ends the paragraph above it. A fenced code block is one block, and
    its lines are never headings (a `# comment` is code).
    """
    blocks: list[Block] = []
    heading: str | None = None
    lines: list[str] = []
    fence: str | None = None

    def flush() -> None:
        para = _normalise(" ".join(lines))
        if para:
            blocks.append(Block(para, heading, None))
        lines.clear()

    for line in text.splitlines():
        fence_match = _FENCE.match(line)
        if fence is None and fence_match:
            flush()
            fence = fence_match.group(1)
            lines.append(line)
        elif fence is not None:
            lines.append(line)
            if fence_match and fence_match.group(1) == fence:
                fence = None
                flush()
        elif match := _HEADING.match(line):
            flush()
            heading = _normalise(match.group(2)) or heading
        elif line.strip():
            lines.append(line)
        else:
            flush()
    flush()
    return blocks


_SKIPPED = {"script", "style", "noscript", "template", "title"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_BREAKS = {
    "p", "li", "div", "td", "th", "tr", "blockquote", "pre", "br", "hr", "section", "article",
    "header", "footer", "main", "nav", "aside", "ul", "ol", "dl", "dt", "dd", "table",
    "caption", "figure", "figcaption", "form", "address", "body",
}  # fmt: skip


class _HTMLBlocks(HTMLParser):
    """Collects paragraphs and the headings above them; tolerant of unclosed and stray tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.heading: str | None = None
        self.in_head = False
        self.in_heading = False
        self.skip_depth = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self.skip_depth += 1
        elif tag == "head":
            self.in_head = True
        elif tag == "br" and self.in_heading:
            self.text.append(" ")
        elif tag in _BREAKS or tag in _HEADINGS:
            self.in_head = False  # </head> is optional: the body's first tag ends the head
            self._end_paragraph()
            self.in_heading = tag in _HEADINGS

    def handle_endtag(self, tag: str) -> None:
        if tag == "br" and self.in_heading:  # <br/> inside a heading: already a space
            return
        if tag in _SKIPPED:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "head":
            self.in_head = False
        elif tag in _BREAKS or tag in _HEADINGS:
            self._end_paragraph()

    def handle_data(self, data: str) -> None:
        if not self.skip_depth and not self.in_head:
            self.text.append(data)

    def close(self) -> None:
        super().close()
        self._end_paragraph()

    def _end_paragraph(self) -> None:
        text = _normalise("".join(self.text))
        self.text.clear()
        if self.in_heading:
            self.heading = text or self.heading
            self.in_heading = False
        elif text:
            self.blocks.append(Block(text, self.heading, None))


def _html_blocks(text: str) -> list[Block]:
    parser = _HTMLBlocks()
    try:
        parser.feed(text)
        parser.close()
    except MemoryError:
        raise
    except Exception as exc:  # html.parser is lenient, but never let bad input escape
        raise ParseError("the HTML could not be parsed") from exc
    return parser.blocks


# --- PDF ------------------------------------------------------------------------------------

_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_ENDS_SENTENCE = re.compile(r"[.!?:][\"'\u201d\u2019)\]]*\s*$")


def _pdf_paragraphs(text: str) -> list[str]:
    """A page's paragraphs: split on blank lines or, as pypdf seldom keeps blank lines, after
    each line that ends a sentence."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if _BLANK_LINE.search(text):
        return [para for para in map(_normalise, _BLANK_LINE.split(text)) if para]
    parts: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        lines.append(line)
        if _ENDS_SENTENCE.search(line):
            parts.append(" ".join(lines))
            lines = []
    parts.append(" ".join(lines))
    return [para for para in map(_normalise, parts) if para]


def _pdf_blocks(raw: bytes) -> list[Block]:
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise ParseError("the PDF is password-protected")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (ParseError, DependencyError, MemoryError):
        raise  # DependencyError: a missing package (cryptography) is our fault, not the file's
    except RecursionError as exc:
        raise ParseError("the PDF is corrupt or unreadable: its objects nest too deeply") from exc
    except Exception as exc:  # pypdf raises many kinds: PdfReadError, ValueError, KeyError...
        # pypdf's own messages describe the file; other exceptions' text is internal detail.
        reason = _short(str(exc)) if isinstance(exc, PyPdfError) else "invalid structure"
        raise ParseError(f"the PDF is corrupt or unreadable: {reason}") from exc
    blocks = [
        Block(para, None, number)
        for number, text in enumerate(pages, start=1)
        for para in _pdf_paragraphs(text)
    ]
    if not blocks:
        raise ParseError("the document has no text: the PDF has no text layer (scanned?)")
    return blocks


# --- DOCX -----------------------------------------------------------------------------------
# Read with lxml straight from the archive, not through python-docx: each XML part is inflated
# in bounded pieces up to a real byte budget (whatever the archive's headers claim), parsed
# incrementally (memory stays flat however many paragraphs there are), and styles are looked up
# in a dict built once (python-docx's per-paragraph lookup made empty-paragraph files cost
# seconds per kilobyte).

MAX_XML_PART_BYTES = 64 * 2**20  # document.xml or styles.xml, unpacked
_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_REL = "{http://schemas.openxmlformats.org/package/2006/relationships}Relationship"
_CT = "{http://schemas.openxmlformats.org/package/2006/content-types}"
_OFFICE_DOCUMENT = "/officeDocument"
_STYLES = "/styles"
_WORD_MAIN = (
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml",
    "application/vnd.ms-word.document.macroEnabled.main+xml",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.template.main+xml",
    "application/vnd.ms-word.template.macroEnabledTemplate.main+xml",
)
_RUN_TEXT = {f"{_W}t": None, f"{_W}tab": "\t", f"{_W}ptab": "\t", f"{_W}br": "\n",
             f"{_W}cr": "\n", f"{_W}noBreakHyphen": "-"}  # fmt: skip


class _DocxError(Exception):
    """A user-facing reason why an archive is not a readable Word document."""


class _BudgetedReader(io.RawIOBase):
    """A zip member read in bounded pieces; fails once it passes `budget` unpacked bytes.

    zipfile stops at the size the headers claim and then fails its CRC check, so a member
    whose headers understate its size ends as corrupt, and one that states it honestly ends
    here: either way at most `budget` bytes are ever unpacked.
    """

    def __init__(self, member: IO[bytes], name: str, budget: int) -> None:
        self.member, self.name, self.left = member, name, budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.member.read(min(len(buffer), 1 << 16))
        self.left -= len(data)
        if self.left < 0:
            raise _DocxError(
                f"{self.name} unpacks to over {MAX_XML_PART_BYTES // 2**20} MiB; is it a zip bomb?"
            )
        buffer[: len(data)] = data
        return len(data)


def _xml_events(
    archive: zipfile.ZipFile, name: str, tags: tuple[str, ...]
) -> Iterator[tuple[str, Any]]:
    """lxml iterparse over one archive member, bounded and without entities or network."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _DocxError(f"There is no item named '{name}' in the archive") from None
    if info.file_size > MAX_XML_PART_BYTES:
        raise _DocxError(
            f"{name} unpacks to over {MAX_XML_PART_BYTES // 2**20} MiB; is it a zip bomb?"
        )
    with archive.open(info) as member:
        reader = io.BufferedReader(_BudgetedReader(member, name, MAX_XML_PART_BYTES))
        yield from etree.iterparse(
            reader,
            events=("end",),
            tag=tags,
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=False,
            remove_comments=True,
        )


def _part_rels(archive: zipfile.ZipFile, part: str) -> dict[str, str]:
    """Relationship type suffix -> target part name, for a part ('' for the package)."""
    folder, _, base = part.rpartition("/")
    rels_name = f"{folder}/_rels/{base}.rels" if folder else f"_rels/{base}.rels"
    if rels_name not in archive.NameToInfo:
        return {}
    targets: dict[str, str] = {}
    for _, rel in _xml_events(archive, rels_name, (_REL,)):
        kind, target = rel.get("Type", ""), rel.get("Target", "")
        if rel.get("TargetMode") == "External" or not target:
            continue
        path = (
            target.lstrip("/")
            if target.startswith("/")
            else posixpath.normpath(posixpath.join(folder, target))
        )
        targets.setdefault(kind[kind.rfind("/") :], path)
        rel.clear()
    return targets


def _main_part(archive: zipfile.ZipFile) -> str:
    """The Word document part the package names, checked against its content type."""
    if "[Content_Types].xml" not in archive.NameToInfo:
        raise _DocxError("There is no item named '[Content_Types].xml' in the archive")
    main = _part_rels(archive, "").get(_OFFICE_DOCUMENT)
    if main is None:
        raise _DocxError("the archive holds no Word document")
    content_type = None
    for _, item in _xml_events(archive, "[Content_Types].xml", (f"{_CT}Override",)):
        if item.get("PartName", "").lstrip("/") == main:
            content_type = item.get("ContentType")
        item.clear()
    if content_type not in _WORD_MAIN:
        raise _DocxError("the archive holds no Word document")
    return main


def _heading_styles(archive: zipfile.ZipFile, main: str) -> tuple[set[str], bool]:
    """Ids of the paragraph styles that are headings (Heading n, Title), and whether the
    default paragraph style is one."""
    styles = _part_rels(archive, main).get(_STYLES)
    if styles is None or styles not in archive.NameToInfo:
        return set(), False
    headings: set[str] = set()
    default_is_heading = False
    for _, style in _xml_events(archive, styles, (f"{_W}style",)):
        name_el = style.find(f"{_W}name")
        name = (name_el.get(f"{_W}val", "") if name_el is not None else "").lower()
        if style.get(f"{_W}type") == "paragraph" and (
            name.startswith("heading") or name == "title"
        ):
            headings.add(style.get(f"{_W}styleId", ""))
            default_is_heading |= style.get(f"{_W}default") in ("1", "true", "on")
        style.clear()
    return headings, default_is_heading


def _paragraph_text(paragraph: Any) -> str:
    parts: list[str] = []
    for node in paragraph.iter(*_RUN_TEXT):
        fixed = _RUN_TEXT[node.tag]
        parts.append(node.text or "" if fixed is None else fixed)
    return "".join(parts)


def _table_cells(table: Any) -> Iterator[str]:
    """Each cell's text, row by row; a vertically merged cell once, nested tables skipped."""
    for row in table.iterchildren(f"{_W}tr"):
        for cell in row.iterchildren(f"{_W}tc"):
            merge = cell.find(f"{_W}tcPr/{_W}vMerge")
            if merge is not None and merge.get(f"{_W}val") != "restart":
                continue  # continues the cell above
            text = _normalise("\n".join(_paragraph_text(p) for p in cell.iterchildren(f"{_W}p")))
            if text:
                yield text


def _docx_blocks(raw: bytes) -> list[Block]:
    blocks: list[Block] = []
    heading: str | None = None
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            main = _main_part(archive)
            heading_ids, default_is_heading = _heading_styles(archive, main)
            body = f"{_W}body"
            for _, element in _xml_events(archive, main, (f"{_W}p", f"{_W}tbl")):
                parent = element.getparent()
                if parent is None or parent.tag != body:
                    continue  # inside a table: read with its table
                if not len(element):
                    pass  # an empty paragraph or table: nothing to read
                elif element.tag == f"{_W}p":
                    style = element.find(f"{_W}pPr/{_W}pStyle")
                    is_heading = (
                        style.get(f"{_W}val") in heading_ids
                        if style is not None
                        else default_is_heading
                    )
                    text = _normalise(_paragraph_text(element))
                    if is_heading:
                        heading = text or heading
                    elif text:
                        blocks.append(Block(text, heading, None))
                else:
                    blocks.extend(Block(text, heading, None) for text in _table_cells(element))
                element.clear()  # keep memory flat: drop what has been read
                while element.getprevious() is not None:
                    del parent[0]
    except MemoryError:
        raise
    except Exception as exc:
        if "Memory allocation failed" in str(exc):  # libxml2's way of saying MemoryError
            raise MemoryError from exc
        reason = _docx_reason(exc)
        raise ParseError(f"the DOCX file is corrupt or not a Word document: {reason}") from exc
    return blocks


def _docx_reason(exc: Exception) -> str:
    if isinstance(exc, _DocxError):
        return _short(str(exc))
    if isinstance(exc, zipfile.BadZipFile):
        return "not a valid zip archive"
    if isinstance(exc, etree.XMLSyntaxError):
        return "its XML is malformed"
    if isinstance(exc, EOFError | zlib.error):
        return "not a valid zip archive"
    return "invalid structure"


def _short(message: str) -> str:
    return " ".join(message.split())[:200]


_TEXT_PARSERS = {
    "text/markdown": _markdown_blocks,
    "text/plain": _plain_blocks,
    "text/html": _html_blocks,
}
_BINARY_PARSERS = {"application/pdf": _pdf_blocks, DOCX: _docx_blocks}
