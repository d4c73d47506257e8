"""Embedder: the OpenAI contract, batching across requests, every limit, readiness."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from openai import OpenAI
from prometheus_client import REGISTRY

from ragctl.stack import Stack
from services.embedder.app import create_app
from services.embedder.model import resolve_model_path
from services.embedder.settings import EmbedderSettings

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "Zebras have black and white stripes.",
    "The diesel generator is tested every Tuesday at 09:00.",
    "Mix 500 g of flour with 350 g of water.",
    "Cardamom buns are shaped as rings.",
    "Clean the burrs every two weeks.",
    "Radio contact is scheduled at 18:00 on channel 7.",
]


@pytest.fixture(scope="module")
def reference():
    """In-process sentence-transformers with the same model, for comparison."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, normalize_embeddings=True))

    return encode


@asynccontextmanager
async def embedder(
    wait_ready: bool = True, **overrides: object
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(EmbedderSettings(**overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://embedder") as client:
            if wait_ready:
                for _ in range(600):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
            yield client


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_openai_sdk_embeddings_match_sentence_transformers(stack: Stack, reference) -> None:
    sdk = OpenAI(base_url=f"{stack.url('embedder')}/v1", api_key="unused")
    # The SDK asks for base64 by default and decodes it.
    result = sdk.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    vectors = np.array([item.embedding for item in result.data])
    assert [item.index for item in result.data] == list(range(len(TEXTS)))
    assert vectors.shape == (len(TEXTS), 384)
    assert cosine_rows(vectors, reference(TEXTS)).min() >= 0.999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert result.usage.prompt_tokens > len(TEXTS)
    single = sdk.embeddings.create(model="x", input=TEXTS[0], encoding_format="float")
    assert cosine_rows(np.array([single.data[0].embedding]), reference(TEXTS[:1]))[0] >= 0.999
    assert sdk.models.list().data[0].id == "all-MiniLM-L6-v2"


async def test_concurrent_requests_are_batched_and_answered_with_their_own_vectors(
    reference,
) -> None:
    texts = [f"{TEXTS[i % len(TEXTS)]} Variant {i} of the sentence." for i in range(60)]
    expected = reference(texts)
    passes_before = REGISTRY.get_sample_value("embedder_batch_size_count") or 0.0
    async with embedder() as client:

        async def one(i: int) -> tuple[int, np.ndarray]:
            group = texts[i : i + 3] if i % 2 else [texts[i]]  # single and multi-input requests
            resp = await client.post("/v1/embeddings", json={"input": group})
            assert resp.status_code == 200, resp.text
            return i, np.array([d["embedding"] for d in resp.json()["data"]])

        results = await asyncio.gather(*(one(i) for i in range(0, 57)))
    inputs = 0
    for i, vectors in results:
        want = expected[i : i + len(vectors)]
        assert cosine_rows(vectors, want).min() >= 0.999, f"request {i} got another's vectors"
        inputs += len(vectors)
    passes = (REGISTRY.get_sample_value("embedder_batch_size_count") or 0.0) - passes_before
    assert passes < inputs / 2, f"{inputs} inputs took {passes} forward passes: no batching"


async def test_base64_and_float_give_the_same_vectors() -> None:
    async with embedder() as client:
        as_float = (await client.post("/v1/embeddings", json={"input": TEXTS[:2]})).json()
        as_b64 = (
            await client.post(
                "/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}
            )
        ).json()
    for f, b in zip(as_float["data"], as_b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert np.allclose(decoded, np.array(f["embedding"]), atol=1e-6)


async def test_every_limit_gives_a_clear_error() -> None:
    long_text = "word " * 600  # well past the 256-token window
    async with embedder(
        max_inputs_per_request=4, max_body_bytes=20_000, matryoshka_dims=[128]
    ) as client:
        cases = [
            ({"input": ["a"] * 5}, 400, "too_many_inputs"),
            ({"input": []}, 400, None),
            ({"input": ""}, 400, None),
            ({"input": ["ok", "  "]}, 400, None),
            ({"input": [1, 2, 3]}, 400, None),
            ({"input": [[101, 102]]}, 400, None),
            ({"input": "x", "encoding_format": "hex"}, 400, None),
            ({"input": "x", "dimensions": 100}, 400, None),
            ({"noinput": "x"}, 400, None),
        ]
        for body, status, code in cases:
            resp = await client.post("/v1/embeddings", json=body)
            assert resp.status_code == status, (body, resp.text)
            error = resp.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error"
            if code:
                assert error["code"] == code
        resp = await client.post(
            "/v1/embeddings", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 400
        resp = await client.post("/v1/embeddings", json={"input": "y" * 30_000})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"
        # Truncation (the default): the long input is cut to the model's window.
        resp = await client.post("/v1/embeddings", json={"input": long_text})
        assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == 256
        short = await client.post("/v1/embeddings", json={"input": "x", "dimensions": 128})
        vector = np.array(short.json()["data"][0]["embedding"])
        assert vector.shape == (128,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    async with embedder(truncate=False) as strict:
        resp = await strict.post("/v1/embeddings", json={"input": ["fine", long_text]})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "input_too_long"
        assert "input[1]" in resp.json()["error"]["message"]
        assert (await strict.post("/v1/embeddings", json={"input": "fine"})).status_code == 200


async def test_overload_answers_429_with_retry_after() -> None:
    async with embedder(max_queued_inputs=4) as client:
        bodies = [{"input": [f"{TEXTS[i % 6]} number {i}"] * 2} for i in range(40)]
        responses = await asyncio.gather(
            *(client.post("/v1/embeddings", json=body) for body in bodies)
        )
        statuses = [r.status_code for r in responses]
        assert 429 in statuses and 200 in statuses, statuses
        assert set(statuses) == {200, 429}
        shed = next(r for r in responses if r.status_code == 429)
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["type"] == "rate_limit_error"
        # and once the burst is over, it serves again
        assert (await client.post("/v1/embeddings", json={"input": "again"})).status_code == 200


async def test_overload_retry_after_and_body_idle_timeout_follow_their_settings() -> None:
    async with embedder(
        max_queued_inputs=4, overloaded_retry_after_s=3, body_idle_timeout_s=0.5
    ) as client:
        bodies = [{"input": [f"{TEXTS[i % 6]} number {i}"] * 2} for i in range(40)]
        responses = await asyncio.gather(
            *(client.post("/v1/embeddings", json=body) for body in bodies)
        )
        shed = [r for r in responses if r.status_code == 429]
        assert shed and {r.headers["retry-after"] for r in shed} == {"3"}

        async def stalling_body() -> AsyncIterator[bytes]:
            yield b'{"input": '
            await asyncio.sleep(3)  # far past the 0.5 s the embedder waits for more
            yield b'"late"}'

        resp = await client.post("/v1/embeddings", content=stalling_body())
        assert resp.status_code == 408 and resp.json()["error"]["code"] == "body_timeout"
        assert "0.5 s" in resp.json()["error"]["message"]


async def test_not_ready_until_the_model_is_loaded_and_warm() -> None:
    async with embedder(wait_ready=False) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["not_ready"] == {"model": "model loading"}
        early = await client.post("/v1/embeddings", json={"input": "too early"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_loading"
        early = await client.post("/tokenize", json={"input": "too early"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_loading"
        assert (await client.get("/healthz")).status_code == 200
        for _ in range(600):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.post("/v1/embeddings", json={"input": "now"})).status_code == 200


async def test_a_model_that_cannot_load_keeps_the_service_unready(tmp_path) -> None:
    async with embedder(wait_ready=False, model=str(tmp_path / "no-such-model")) as client:
        for _ in range(100):
            body = (await client.get("/readyz")).json()
            if body.get("not_ready", {}).get("model") == "model failed to load":
                break
            await asyncio.sleep(0.1)
        assert body["not_ready"] == {"model": "model failed to load"}
        resp = await client.post("/v1/embeddings", json={"input": "x"})
        assert resp.status_code == 503


async def test_metrics_expose_queue_batches_latency_and_tokens() -> None:
    async with embedder() as client:
        await client.post("/v1/embeddings", json={"input": TEXTS})
        text = (await client.get("/metrics")).text
    for name in (
        "embedder_queue_inputs",
        "embedder_batch_size_bucket",
        "embedder_tokens_total",
        "embedder_forward_seconds_bucket",
        'http_request_duration_seconds_bucket{le="0.005",route="/v1/embeddings"',
    ):
        assert name in text, name


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled model's own tokenizer, loaded as users of transformers load it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


def test_tokenize_counts_the_tokens_the_model_reads_untruncated(stack: Stack, tokenizer) -> None:
    url = stack.url("embedder")
    long_text = "word " * 600  # well past the 256-token window
    texts = [*TEXTS, "", long_text]
    info = httpx.get(f"{url}/info").json()
    served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    for input_type in (None, "query", "passage"):  # MiniLM has no prompts: the same counts
        resp = httpx.post(f"{url}/tokenize", json={"input": texts, "input_type": input_type})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "list" and body["model"] == served
        assert body["max_tokens"] == info["max_seq_length"] == 256
        assert [d["index"] for d in body["data"]] == list(range(len(texts)))
        counts = [d["tokens"] for d in body["data"]]
        assert counts == [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert counts[len(TEXTS)] == 2  # "": [CLS] [SEP], the fixed overhead
    assert counts[-1] > body["max_tokens"]
    # Within the window, the counts are what /v1/embeddings reads.
    used = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS}).json()["usage"]
    assert sum(counts[: len(TEXTS)]) == used["prompt_tokens"]
    single = httpx.post(f"{url}/tokenize", json={"input": TEXTS[0]}).json()
    assert single["data"] == [{"index": 0, "tokens": counts[0]}]
    assert httpx.post(f"{url}/tokenize", json={"input": []}).json()["data"] == []


def test_tokenize_rejects_bad_input_in_the_error_envelope(stack: Stack) -> None:
    url = f"{stack.url('embedder')}/tokenize"
    cases = [
        ({"input": [1, 2]}, None),
        ({"input": 5}, None),
        ({"input": None}, None),
        ({"input": ["ok", None]}, None),
        ({"input": [["nested"]]}, None),
        ({"noinput": "x"}, None),
        ({"input": "x", "input_type": "document"}, None),
        ({"input": [""] * 4097}, "too_many_inputs"),
    ]
    for body, code in cases:
        resp = httpx.post(url, json=body)
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if code:
            assert error["code"] == code
    resp = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert httpx.post(url, json={"input": [""] * 4096}).status_code == 200
    resp = httpx.post(url, json={"input": "y" * (4 * 1024 * 1024 + 1)})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"


async def test_tokenize_alongside_embedding_neither_fails(stack: Stack, tokenizer) -> None:
    """/tokenize counts on its own thread with its own tokenizer: concurrent embedding
    requests (the model thread switching truncation on its tokenizer) never collide."""
    long_text = "word " * 600
    texts = [f"{TEXTS[i % len(TEXTS)]} Variant {i}." for i in range(40)] + [long_text]
    expected = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    async with httpx.AsyncClient(base_url=stack.url("embedder"), timeout=60) as client:

        async def count() -> None:
            resp = await client.post("/tokenize", json={"input": texts})
            assert resp.status_code == 200, resp.text
            assert [d["tokens"] for d in resp.json()["data"]] == expected

        async def embed(i: int) -> None:
            body = {"input": [texts[i], long_text]}
            resp = await client.post("/v1/embeddings", json=body)
            assert resp.status_code == 200, resp.text

        await asyncio.gather(*(count() for _ in range(20)), *(embed(i) for i in range(20)))
        metrics = (await client.get("/metrics")).text
    assert "embedder_tokenize_requests_total" in metrics
    assert "embedder_tokenize_inputs_total" in metrics


async def test_tokenize_prepends_the_input_types_prompt_as_embeddings_do(
    tmp_path: Path, tokenizer
) -> None:
    """A model trained with prompts (as e5 and gte are): the bundled one plus prompts."""
    source = Path(resolve_model_path("all-MiniLM-L6-v2"))
    for entry in source.iterdir():
        if entry.name != "config_sentence_transformers.json":
            (tmp_path / entry.name).symlink_to(entry)
    prompts = {"query": "query: ", "document": "passage: "}
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    async with embedder(model=str(tmp_path)) as client:
        for input_type, prompt in (("query", "query: "), ("passage", "passage: "), (None, "")):
            body = {"input": ["", *TEXTS], "input_type": input_type}
            resp = await client.post("/tokenize", json=body)
            assert resp.status_code == 200, resp.text
            counts = [d["tokens"] for d in resp.json()["data"]]
            want = [len(ids) for ids in tokenizer([prompt + t for t in body["input"]])["input_ids"]]
            assert counts == want
            assert counts[0] == 2 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            body["input"] = TEXTS
            used = (await client.post("/v1/embeddings", json=body)).json()["usage"]
            assert sum(counts[1:]) == used["prompt_tokens"]


async def test_a_model_baked_into_the_image_loads_from_its_folder_offline(
    tmp_path: Path, reference
) -> None:
    """The GPU image bakes `thenlper/gte-base` into /models/thenlper--gte-base; here the
    bundled MiniLM's files stand in for it under that name."""
    baked = tmp_path / "thenlper--gte-base"
    baked.symlink_to(resolve_model_path("all-MiniLM-L6-v2"), target_is_directory=True)
    assert resolve_model_path("thenlper/gte-base", tmp_path) == str(baked)
    assert resolve_model_path("thenlper/gte-base", tmp_path / "elsewhere") == "thenlper/gte-base"
    async with embedder(model="thenlper/gte-base", models_dir=str(tmp_path)) as client:
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "gte-base"
        text = "The generator is tested on Tuesdays."
        resp = await client.post("/v1/embeddings", json={"input": [text]})
        assert resp.status_code == 200, resp.text
    vector = np.array(resp.json()["data"][0]["embedding"], dtype=np.float32)
    assert float(cosine_rows(vector[None, :], reference([text]))[0]) > 0.999


def test_the_ray_config_and_the_gpu_image_name_the_same_baked_model() -> None:
    ray_config = yaml.safe_load((REPO / "deploy" / "ray" / "embedder.yaml").read_text())
    env = ray_config["applications"][0]["runtime_env"]["env_vars"]
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    build_args = gpu["services"]["embedder"]["build"]["args"]
    assert env["EMBEDDER_MODEL"] == build_args["EMBEDDER_MODEL"] == "thenlper/gte-base"
    assert "ray" in build_args["EXTRAS"].split(",")
    assert "cu" in build_args["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    assert env["HF_HUB_OFFLINE"] == "1" and env["EMBEDDER_DEVICE"] == "cuda"
