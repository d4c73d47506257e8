"""Document parsing: real Markdown, text, HTML, PDF and DOCX bytes in, paragraphs out."""

from __future__ import annotations

import io
import random
import zipfile

import pytest

from services.common.errors import APIError
from services.retriever import parsing
from services.retriever.parsing import (
    DOCX,
    MEDIA_TYPES,
    SUPPORTED,
    Block,
    ParseError,
    check_upload,
    media_type_of,
    parse_document,
)
from tests.documents import make_docx, make_encrypted_pdf, make_html, make_pdf

PDF = "application/pdf"


def texts(blocks: list[Block]) -> list[str]:
    return [block.text for block in blocks]


# --- media types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("notes.md", "text/markdown"),
        ("NOTES.MARKDOWN", "text/markdown"),
        ("a.txt", "text/plain"),
        ("a.text", "text/plain"),
        ("page.html", "text/html"),
        ("page.htm", "text/html"),
        ("Report.PDF", PDF),
        ("letter.docx", DOCX),
    ],
)
def test_media_type_from_extension_wins_over_declared(filename: str, expected: str) -> None:
    assert media_type_of(filename, "application/octet-stream") == expected


def test_media_type_from_declared_type_without_parameters() -> None:
    assert media_type_of("upload", "text/HTML; charset=utf-8") == "text/html"
    assert media_type_of(None, "application/pdf") == PDF
    assert media_type_of("blob.bin", DOCX) == DOCX


def test_unsupported_media_type_is_415() -> None:
    with pytest.raises(APIError) as info:
        media_type_of("photo.png", "image/png")
    assert info.value.status_code == 415
    assert info.value.code == "unsupported_type"
    assert "image/png" in info.value.message and "supported:" in info.value.message


def test_media_types_cover_every_format() -> None:
    assert set(MEDIA_TYPES) == {
        ".md",
        ".markdown",
        ".txt",
        ".text",
        ".html",
        ".htm",
        ".pdf",
        ".docx",
    }
    assert SUPPORTED == {"text/markdown", "text/plain", "text/html", PDF, DOCX}


# --- text and Markdown ----------------------------------------------------------------------


def test_markdown_headings_name_the_paragraphs_below_them() -> None:
    markdown = (
        "Preamble  line one\nline two\n\n"
        "# Install\nRun   make.\n\nThen run it.\n"
        "## Learning C#\n"
        "```python\n# a comment, not a heading\n\nprint()\n```\n"
        "### Closed ###\n#hashtag is text\n"
    )
    blocks = parse_document(markdown.encode(), "text/markdown")
    assert [(b.text, b.heading, b.page) for b in blocks] == [
        ("Preamble line one line two", None, None),
        ("Run make.", "Install", None),
        ("Then run it.", "Install", None),
        ("```python # a comment, not a heading print() ```", "Learning C#", None),
        ("#hashtag is text", "Closed", None),
    ]


def test_plain_text_paragraphs_have_no_heading() -> None:
    raw = "\ufeff# not a heading\r\nsame   paragraph\r\n\r\n\tsecond\t one \n \n".encode()
    blocks = parse_document(raw, "text/plain")
    assert blocks == [
        Block("# not a heading same paragraph", None, None),
        Block("second one", None, None),
    ]


@pytest.mark.parametrize("media_type", ["text/plain", "text/markdown", "text/html"])
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b" \n\t\r\n ", "no text"),
        (b"text\x00with NUL", "NUL"),
        ("caf\u00e9 cr\u00e8me".encode("latin-1"), "UTF-8"),
    ],
)
def test_check_upload_refuses_text_that_can_never_parse(
    raw: bytes, reason: str, media_type: str
) -> None:
    with pytest.raises(ParseError, match=reason):
        check_upload(raw, media_type)
    with pytest.raises(ParseError, match=reason):
        parse_document(raw, media_type)


def test_check_upload_accepts_utf8_with_bom() -> None:
    check_upload("\ufeffcaf\u00e9".encode(), "text/plain")


# --- HTML -----------------------------------------------------------------------------------


def test_html_drops_script_style_and_head_and_decodes_entities() -> None:
    raw = make_html(
        [(None, ["Intro & welcome"]), ("Fish & chips", ["Cod < haddock", "Price: 5\u20ac"])]
    )
    blocks = parse_document(raw, "text/html")
    assert [(b.text, b.heading) for b in blocks] == [
        ("Intro & welcome", None),
        ("Cod < haddock", "Fish & chips"),
        ("Price: 5\u20ac", "Fish & chips"),
    ]


def test_html_block_tags_end_paragraphs_and_malformed_html_is_tolerated() -> None:
    raw = (
        b"<html><head><title>Skipped</title><meta name=x>"  # the head is never closed
        b"<body><h1>Main <em>title</em><br>part two</h1>"
        b"<p>one <b>bold</b> &amp; &quot;quoted&quot;<p>two<br>three"
        b"<ul><li>item&nbsp;one<li>item two</ul>"
        b"<table><tr><td>cell a<td>cell b</table>"
        b"<noscript><p>enable JS</p></noscript><template><p>hidden</p></template>"
        b"<div>inline <span>spans</span> join</div></section></p></b>trailing &copy; text"
    )
    blocks = parse_document(raw, "text/html")
    assert {b.heading for b in blocks} == {"Main title part two"}
    assert texts(blocks) == [
        'one bold & "quoted"',
        "two",
        "three",
        "item one",
        "item two",
        "cell a",
        "cell b",
        "inline spans join",
        "trailing \u00a9 text",
    ]


def test_html_in_a_declared_legacy_charset() -> None:
    raw = '<meta charset="windows-1252"><p>Caf\u00e9 \u201cquoted\u201d</p>'.encode("cp1252")
    assert texts(parse_document(raw, "text/html")) == ["Caf\u00e9 \u201cquoted\u201d"]


def test_html_with_only_markup_has_no_text() -> None:
    raw = b"<html><head><title>Only a title</title></head><body><script>x()</script></body>"
    with pytest.raises(ParseError, match="no text"):
        parse_document(raw, "text/html")


# --- PDF ------------------------------------------------------------------------------------


def test_pdf_pages_are_numbered_and_text_is_exact() -> None:
    raw = make_pdf(
        [
            "Chapter one (draft) costs $5 \\ 10%.\nThis line\ncontinues the paragraph.",
            "",  # a page with no text: it yields no blocks, and later pages keep their number
            "Third page " + "word " * 40 + "ends here.\nA question?\nNo end punctuation",
        ]
    )
    blocks = parse_document(raw, PDF)
    assert [(b.text, b.heading, b.page) for b in blocks] == [
        ("Chapter one (draft) costs $5 \\ 10%.", None, 1),
        ("This line continues the paragraph.", None, 1),
        ("Third page " + "word " * 40 + "ends here.", None, 3),
        ("A question?", None, 3),
        ("No end punctuation", None, 3),
    ]


def test_pdf_with_a_password_is_refused() -> None:
    raw = make_encrypted_pdf(["Secret plans."], password="hunter2")
    check_upload(raw, PDF)
    with pytest.raises(ParseError, match="password-protected"):
        parse_document(raw, PDF)


def test_pdf_encrypted_with_an_empty_password_is_decrypted() -> None:
    raw = make_encrypted_pdf(["Open to all.", "Second page."], password="")
    assert b"/Encrypt" in raw
    assert parse_document(raw, PDF) == [
        Block("Open to all.", None, 1),
        Block("Second page.", None, 2),
    ]


def test_truncated_pdf_is_corrupt() -> None:
    raw = make_pdf(["Some text on page one.", "And on page two."])
    with pytest.raises(ParseError, match="corrupt or unreadable"):
        parse_document(raw[: len(raw) // 2], PDF)


def test_garbage_named_pdf_is_refused() -> None:
    with pytest.raises(ParseError, match="not a PDF"):
        check_upload(b"GIF89a not a pdf at all", PDF)
    with pytest.raises(ParseError, match="corrupt or unreadable"):
        parse_document(b"%PDF-1.7\n" + bytes(range(256)) * 4, PDF)


def test_pdf_without_a_text_layer() -> None:
    with pytest.raises(ParseError, match=r"no text.*no text layer \(scanned\?\)"):
        parse_document(make_pdf(["", ""]), PDF)


def test_damaged_pdfs_raise_only_parse_error() -> None:
    """Whatever the damage, a PDF parses or fails with ParseError, never another exception."""
    original = make_pdf(["First page, with a sentence.", "Second page."])
    rng = random.Random(1234)
    for _ in range(60):
        damaged = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(5, len(damaged))] = rng.randrange(256)
        try:
            blocks = parse_document(bytes(damaged), PDF)
        except ParseError:
            continue
        assert all(block.text and block.page for block in blocks)


# --- DOCX -----------------------------------------------------------------------------------


def test_docx_headings_paragraphs_and_tables() -> None:
    raw = make_docx(
        [
            ("Normal", "Before any heading."),
            ("Title", "Annual report"),
            ("Normal", "Summary   paragraph."),
            ("Heading 1", "Results"),
            ("List Bullet", "Revenue grew."),
            ("Normal", ""),  # empty paragraphs are not blocks
            ("Heading 2", "Table"),
        ],
        table=[["Quarter", "Revenue"], ["Q1", "10"]],
    )
    blocks = parse_document(raw, DOCX)
    assert [(b.text, b.heading, b.page) for b in blocks] == [
        ("Before any heading.", None, None),
        ("Summary paragraph.", "Annual report", None),
        ("Revenue grew.", "Results", None),
        ("Quarter", "Table", None),
        ("Revenue", "Table", None),
        ("Q1", "Table", None),
        ("10", "Table", None),
    ]


def _rezip(raw: bytes, drop: str = "", damage: str = "") -> bytes:
    """The archive again, without one member or with one member cut in half."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename != drop:
                target.writestr(info, data[: len(data) // 2] if info.filename == damage else data)
    return out.getvalue()


def test_corrupt_docx_is_refused() -> None:
    raw = make_docx([("Normal", "Hello.")])
    with pytest.raises(ParseError, match="not a zip archive"):
        check_upload(b"PK\x03\x04 but not really a zip", DOCX)
    for corrupt in (
        raw[: len(raw) // 2],
        _rezip(raw, drop="word/document.xml"),
        _rezip(raw, damage="word/document.xml"),
        _rezip(raw, drop="[Content_Types].xml"),
    ):
        with pytest.raises(ParseError, match="the DOCX file is corrupt"):
            parse_document(corrupt, DOCX)


def test_docx_with_no_text() -> None:
    with pytest.raises(ParseError, match="no text"):
        parse_document(make_docx([("Normal", ""), ("Heading 1", "Only a heading")]), DOCX)


def test_docx_zip_bomb_is_refused_at_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "MAX_UNZIPPED_BYTES", 2**20)  # a 1 MiB limit builds faster
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", b"\0" * (2**20 + 1))
    assert len(out.getvalue()) < 10_000
    with pytest.raises(ParseError, match="zip bomb"):
        check_upload(out.getvalue(), DOCX)


def test_a_line_break_inside_a_heading_keeps_the_heading_whole() -> None:
    blocks = parse_document(b"<h1>Annual<br/>Report</h1><p>Revenue grew.</p>", "text/html")
    assert [(b.heading, b.text) for b in blocks] == [("Annual Report", "Revenue grew.")]
