"""Real test documents (PDF, DOCX, HTML), built as bytes without extra dependencies."""

from __future__ import annotations

import html
import io
import struct
import textwrap
import zipfile
import zlib

import docx
from pypdf import PdfReader, PdfWriter

_PAGE_WIDTH, _PAGE_HEIGHT = 612, 792  # US Letter, in points
_MARGIN, _FONT_SIZE, _LEADING = 72, 11, 14
_WRAP_CHARS = 90


def _pdf_string(text: str) -> bytes:
    """A PDF literal string in WinAnsi (cp1252), with ( ) and \\ escaped."""
    raw = text.encode("cp1252")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _page_content(text: str) -> bytes:
    """A content stream drawing text top-down, one line per line, long lines wrapped.

    A blank line in text leaves a blank line on the page. Plain lines are drawn with Tj,
    wrapped lines with TJ, so both operators are exercised.
    """
    lines = text.split("\n")
    if not any(line.strip() for line in lines):
        return b""
    ops = [
        b"BT",
        b"/F1 %d Tf" % _FONT_SIZE,
        b"%d TL" % _LEADING,
        b"%d %d Td" % (_MARGIN, _PAGE_HEIGHT - _MARGIN),
    ]
    for line in lines:
        wrapped = textwrap.wrap(line, _WRAP_CHARS) or [""]
        for piece in wrapped:
            if len(wrapped) > 1:
                words = piece.split(" ")
                strings = [_pdf_string(word + " ") for word in words[:-1]]
                strings.append(_pdf_string(words[-1]))
                # In TJ a number shifts the next glyph left (negative: right) by 1/1000 em.
                ops.append(b"[" + b" -20 ".join(strings) + b"] TJ T*")
            else:
                ops.append(_pdf_string(piece) + b" Tj T*")
    ops.append(b"ET")
    return b"\n".join(ops) + b"\n"


def make_pdf(pages: list[str]) -> bytes:
    """A PDF with one page per string, in Helvetica; an empty string gives a page with no text."""
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"",  # the page tree, filled in once the page numbers are known
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    kids: list[bytes] = []
    for text in pages:
        content = _page_content(text)
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"endstream")
        content_ref = len(objects)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>"
            % (_PAGE_WIDTH, _PAGE_HEIGHT, content_ref)
        )
        kids.append(b"%d 0 R" % len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(kids))
    return _pdf_file(objects)


def _pdf_file(objects: list[bytes]) -> bytes:
    """A PDF file of these objects, numbered from 1 (the first is the catalog)."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: list[int] = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1)
    out += b"startxref\n%d\n%%%%EOF\n" % xref_at
    return bytes(out)


def make_encrypted_pdf(pages: list[str], password: str) -> bytes:
    """make_pdf's document, AES-128 encrypted; an empty password opens without asking."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(pages))))
    writer.encrypt(user_password=password, owner_password="owner-secret", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx(paragraphs: list[tuple[str, str]], table: list[list[str]] | None = None) -> bytes:
    """A Word document of (style, text) paragraphs, e.g. ("Heading 1", "Intro"), ("Normal", "...").

    With table, a table of those rows follows the paragraphs.
    """
    document = docx.Document()
    for style, text in paragraphs:
        document.add_paragraph(text, style=style)
    if table:
        grid = document.add_table(rows=len(table), cols=max(len(row) for row in table))
        for row, values in zip(grid.rows, table, strict=False):
            for cell, value in zip(row.cells, values, strict=False):
                cell.text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_html(sections: list[tuple[str | None, list[str]]], title: str = "Test page") -> bytes:
    """An HTML page of (h2 heading or None, paragraphs) sections, with script and style to skip."""
    body: list[str] = []
    for heading, paragraphs in sections:
        if heading is not None:
            body.append(f"<h2>{html.escape(heading)}</h2>")
        body.extend(f"<p>{html.escape(text)}</p>" for text in paragraphs)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>p { color: red; }</style><script>var hidden = 'not text';</script>"
        "</head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    ).encode()


# --- hostile files --------------------------------------------------------------------------


def make_pdf_with_content(content: bytes) -> bytes:
    """A one-page PDF whose page content stream is `content`, Flate-compressed."""
    stream = zlib.compress(content, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 3 0 R >> >> /Contents 5 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    return _pdf_file(objects)


def make_cpu_bomb_pdf(operators: int = 500_000) -> bytes:
    """A 5 KB PDF whose page holds half a million text operators: about 7 s of CPU (and
    200 MB) for pypdf to read, 14 µs an operator."""
    return make_pdf_with_content(b"BT /F1 11 Tf " + b"(a)Tj " * operators + b"ET")


def make_memory_bomb_pdf(unpacked_bytes: int = 70_000_000) -> bytes:
    """A small PDF whose page content unpacks to `unpacked_bytes` (one huge string), under
    pypdf's own cap on one stream (75 MB), and takes about 900 MB and 20 s of CPU to read."""
    return make_pdf_with_content(b"BT /F1 11 Tf (" + b"a" * unpacked_bytes + b") Tj ET")


def make_docx_with_body(body_xml: bytes) -> bytes:
    """A real Word document whose word/document.xml body is `body_xml`, deflated hard."""
    base = make_docx([("Normal", "placeholder")])
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(base)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target,
    ):
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "word/document.xml":
                head = data.split(b"<w:body>")[0]
                data = head + b"<w:body>" + body_xml + b"</w:body></w:document>"
            target.writestr(info.filename, data)
    return out.getvalue()


def understate_size(raw: bytes, member: str, claimed: int) -> bytes:
    """The archive with `member`'s unpacked size written as `claimed`, in its local header and
    in the central directory (what a zip-bomb check reads)."""
    out = bytearray(raw)
    info = zipfile.ZipFile(io.BytesIO(raw)).getinfo(member)
    struct.pack_into("<I", out, info.header_offset + 22, claimed)
    entry = out.find(b"PK\x01\x02")
    while entry != -1:
        name_length = struct.unpack_from("<H", out, entry + 28)[0]
        if bytes(out[entry + 46 : entry + 46 + name_length]) == member.encode():
            struct.pack_into("<I", out, entry + 24, claimed)
        entry = out.find(b"PK\x01\x02", entry + 4)
    return bytes(out)
