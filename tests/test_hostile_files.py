"""Hostile uploads through the public API: they cost their owner a failed document, never
another user's memory, CPU or latency."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ragctl.stack import Stack, wait_ready
from services.gateway.app import create_app
from tests.conftest import stack_gateway_settings, wait_until_ready
from tests.documents import (
    make_cpu_bomb_pdf,
    make_docx_with_body,
    make_memory_bomb_pdf,
    understate_size,
)
from tests.test_retriever import SERVICE_TOKEN, create_database, retriever_process

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def upload_file(client: httpx.Client, name: str, raw: bytes, media_type: str) -> dict[str, Any]:
    resp = client.post("/v1/documents", files={"file": (name, raw, media_type)})
    assert resp.status_code == 202, resp.text
    return dict(resp.json())


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@functools.cache
def lying_docx() -> bytes:
    """300 KB that unpacks to 300 MB while its headers say 5 KB."""
    paragraph = b"<w:p><w:r><w:t>" + b"a" * 4000 + b"</w:t></w:r></w:p>"
    raw = make_docx_with_body(paragraph * 74_000)
    return understate_size(raw, "word/document.xml", 5_000)


def test_a_docx_that_understates_its_size_fails_without_growing_the_retriever(
    stack: Stack, client: httpx.Client
) -> None:
    retriever_pid = stack.procs["retriever"].pid
    before = peak_rss_mb(retriever_pid)
    raw = lying_docx()
    assert len(raw) < 2**20
    doc = upload_file(client, f"liar-{uuid.uuid4().hex}.docx", raw, DOCX)
    done = wait_until_ready(client, doc["id"], timeout_s=30)
    assert done["status"] == "failed"
    assert "corrupt" in done["error"], done["error"]
    assert peak_rss_mb(retriever_pid) - before < 100  # not the 2 GB python-docx took


def test_a_docx_over_the_unpacked_budget_fails_with_the_limit(client: httpx.Client) -> None:
    # 80 MB of XML is under the upload check's 256 MiB for the whole archive (images can be
    # large) but over the 64 MiB any one XML part may unpack to.
    paragraph = b"<w:p><w:r><w:t>" + b"b" * 4000 + b"</w:t></w:r></w:p>"
    raw = make_docx_with_body(paragraph * 20_000)
    doc = upload_file(client, f"big-{uuid.uuid4().hex}.docx", raw, DOCX)
    done = wait_until_ready(client, doc["id"], timeout_s=30)
    assert done["status"] == "failed"
    assert "unpacks to over 64 MiB" in done["error"], done["error"]


def test_a_tiny_docx_of_empty_paragraphs_ends_within_seconds(client: httpx.Client) -> None:
    raw = make_docx_with_body(b"<w:p/>" * 400_000)  # 2.4 MB of XML, 2 KB packed
    started = time.monotonic()
    doc = upload_file(client, f"empty-{uuid.uuid4().hex}.docx", raw, DOCX)
    done = wait_until_ready(client, doc["id"], timeout_s=30)
    assert done["status"] == "failed" and "no text" in done["error"], done
    assert time.monotonic() - started < 10  # it took python-docx about 10 s of CPU


@pytest.fixture(scope="module")
def hostile_retriever(stack: Stack) -> Iterator[str]:
    """A retriever of its own with tight parse limits, so hostile parses end quickly, and 4
    ingestion workers, of which one user may hold 3."""
    env = {
        "RETRIEVER_INGEST_WORKERS": "4",
        "RETRIEVER_PARSE_CPU_S": "2",
        "RETRIEVER_PARSE_MEMORY_MB": "256",
        "RETRIEVER_INGEST_POLL_S": "0.2",
    }
    with retriever_process(stack, create_database(stack), stack.url("embedder"), **env) as (
        base,
        proc,
    ):
        assert wait_ready(base, 60, proc), proc.stderr.read().decode() if proc.stderr else ""
        yield base


async def test_one_users_hostile_files_do_not_delay_anothers_document(
    stack: Stack, hostile_retriever: str, dev_token: str, other_token: str
) -> None:
    settings = stack_gateway_settings(
        stack, retriever_url=hostile_retriever, service_token=SERVICE_TOKEN, rate_limit_burst=1000
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(
                transport=transport, base_url="http://gateway", headers=_bearer(dev_token)
            ) as mallory,
            httpx.AsyncClient(
                transport=transport, base_url="http://gateway", headers=_bearer(other_token)
            ) as alice,
        ):
            hostile = {
                **{f"cpu-{i}.pdf": make_cpu_bomb_pdf(500_000 + i) for i in range(6)},
                "memory.pdf": make_memory_bomb_pdf(),
                "liar.docx": lying_docx(),
                "empty.docx": make_docx_with_body(b"<w:p/>" * 400_000),
            }
            ids = {}
            for name, raw in hostile.items():
                resp = await mallory.post("/v1/documents", files={"file": (name, raw, "")})
                assert resp.status_code == 202, resp.text
                ids[name] = resp.json()["id"]

            started = time.monotonic()
            resp = await alice.post(
                "/v1/documents",
                json={"title": "Kettle", "text": "The kettle is descaled every Friday."},
            )
            assert resp.status_code == 202, resp.text
            ready = await _wait_async(alice, resp.json()["id"], 30)
            waited = time.monotonic() - started
            assert ready["status"] == "ready"
            # Nine files queue ahead of it, six of them 2 s CPU bombs that two processes take
            # in turn: without fair turns it waits for most of them.
            assert waited < 5, waited
            busy = [await _status(mallory, doc_id) for doc_id in ids.values()]
            assert sum(s in ("pending", "processing") for s in busy) >= 3, busy

            outcomes = {
                name: await _wait_async(mallory, doc_id, 120) for name, doc_id in ids.items()
            }
            print(f"\nalice's one-line document was ready {waited:.2f}s after upload")
    errors = {name: (doc["status"], doc["error"]) for name, doc in outcomes.items()}
    for name, (status, error) in errors.items():
        assert status == "failed", errors
        expected = {
            "cpu": "more than 2s of CPU time",
            "memory": "more than 256 MiB of memory",
            "liar": "corrupt",
            "empty": "no text",
        }[name.split("-")[0].split(".")[0]]
        assert expected in error, (name, error)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _status(client: httpx.AsyncClient, doc_id: str) -> str:
    resp = await client.get(f"/v1/documents/{doc_id}")
    assert resp.status_code == 200, resp.text
    return str(resp.json()["status"])


async def _wait_async(client: httpx.AsyncClient, doc_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await client.get(f"/v1/documents/{doc_id}")
        doc = dict(resp.json())
        if doc["status"] in ("ready", "failed"):
            return doc
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(0.1)
