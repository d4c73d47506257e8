"""Generator: the llamacpp engine end to end with the openai SDK, limits, drain, and the
vllm / ray launch paths up to the command and config they build."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from ragctl.stack import Stack, free_port, wait_ready
from services.generator.app import create_app
from services.generator.engines import ray_serve_config, vllm_command
from services.generator.settings import GeneratorSettings

REPO = Path(__file__).resolve().parents[1]
WORDS = ["banana", "rocket", "violin", "glacier"]


@pytest.fixture(scope="module")
def sdk(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.url('generator')}/v1", api_key="unused", max_retries=0)


# Reruns compared token for token must compute the same way: without llama.cpp's prompt
# cache, a rerun does not reuse KV entries from a differently shaped batch.
SAME_WAY = {"extra_body": {"cache_prompt": False}}


def ask(sdk: OpenAI, content: str, **kwargs: object) -> str:
    kwargs = {**SAME_WAY, **kwargs}
    result = sdk.chat.completions.create(
        model="any", messages=[{"role": "user", "content": content}], temperature=0, **kwargs
    )
    return result.choices[0].message.content or ""


def ask_streaming(sdk: OpenAI, content: str, **kwargs: object) -> tuple[str, set[str]]:
    kwargs = {**SAME_WAY, **kwargs}
    text, ids = "", set()
    for chunk in sdk.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": content}],
        temperature=0,
        stream=True,
        **kwargs,
    ):
        ids.add(chunk.id)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text, ids


def test_stream_and_non_stream_agree_and_max_tokens_holds(sdk: OpenAI) -> None:
    full = sdk.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        temperature=0,
        max_tokens=12,
        **SAME_WAY,
    )
    assert full.model == "smollm2-135m-instruct"
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    streamed, _ = ask_streaming(sdk, "Tell me about the sea.", max_tokens=12)
    assert streamed == full.choices[0].message.content


def test_temperature_zero_is_reproducible(sdk: OpenAI) -> None:
    first = ask(sdk, "Describe a lighthouse.", max_tokens=30)
    assert first and ask(sdk, "Describe a lighthouse.", max_tokens=30) == first


def test_stop_sequences_end_the_answer(sdk: OpenAI) -> None:
    free = ask(sdk, "Tell me about the sea.", max_tokens=30)
    stop_word = free.split()[4]
    cut = sdk.chat.completions.create(
        **SAME_WAY,
        model="any",
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        temperature=0,
        max_tokens=30,
        stop=[stop_word],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert stop_word not in cut.choices[0].message.content
    assert free.startswith(cut.choices[0].message.content.rstrip())


def test_concurrent_streams_each_get_their_own_answer(sdk: OpenAI) -> None:
    """Four streams at once, each with its own prompt and its own length: every stream
    carries one id, ends at its own max_tokens, and the answers are not mixed up.
    (Exact text equality with solo runs is not a property of batched float math.)"""
    prompts = [f"Repeat this word exactly once and nothing else: {w}" for w in WORDS]
    lengths = [5, 7, 9, 11]

    def run(i: int) -> tuple[list[str], set[str], str | None]:
        pieces, ids, finish = [], set(), None
        for chunk in sdk.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": prompts[i]}],
            temperature=0,
            stream=True,
            max_tokens=lengths[i],
            extra_body={"ignore_eos": True},
        ):
            ids.add(chunk.id)
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
        return pieces, ids, finish

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(run, range(len(prompts))))
    for (pieces, ids, finish), length in zip(results, lengths, strict=True):
        assert len(ids) == 1 and finish == "length"
        assert len(pieces) == length
    assert len({next(iter(ids)) for _, ids, _ in results}) == len(prompts)
    assert len({"".join(pieces) for pieces, _, _ in results}) == len(prompts)


def test_prompt_over_the_context_is_a_clear_400(sdk: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(sdk, "word " * 5000, max_tokens=5)
    assert err.value.status_code == 400
    assert "context" in err.value.body["message"]


# A stream that holds a slot far longer than any test waits (about 20 s of tokens).
ENDLESS = {
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 1800,
    "stream": True,
    "ignore_eos": True,
}


def test_client_disconnect_frees_the_slot(stack: Stack, sdk: OpenAI) -> None:
    """Both slots busy with endless streams; once their clients hang up, a new request is
    served at once instead of waiting for those generations to run out."""
    url = f"{stack.url('generator')}/v1/chat/completions"
    body = ENDLESS
    streams_started = threading.Barrier(3)

    def hang_up_after_a_few_tokens() -> None:
        with httpx.stream("POST", url, json=body, timeout=30) as resp:
            for n, _ in enumerate(resp.iter_lines()):
                if n == 20:
                    break
        streams_started.wait()

    threads = [threading.Thread(target=hang_up_after_a_few_tokens) for _ in range(2)]
    for thread in threads:
        thread.start()
    streams_started.wait(timeout=60)
    start = time.monotonic()
    assert ask(sdk, "Say hello.", max_tokens=4)
    assert time.monotonic() - start < 10  # 1800 tokens each would take far longer
    for thread in threads:
        thread.join()


def in_flight(stack: Stack) -> float:
    metrics = httpx.get(f"{stack.url('generator')}/metrics", timeout=5).text
    for line in metrics.splitlines():
        if line.startswith("generator_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no generator_requests_in_flight in /metrics")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_while_queued_frees_its_place_at_once(
    stack: Stack, stream: bool
) -> None:
    """Both slots busy with endless streams; a request queued behind them whose client gives
    up before any byte is dropped at once, not when a slot would have taken it."""
    url = f"{stack.url('generator')}/v1/chat/completions"
    endless = ENDLESS
    holding, done = threading.Barrier(3), threading.Event()

    def hold_a_slot() -> None:
        with httpx.stream("POST", url, json=endless, timeout=60) as resp:
            for n, _ in enumerate(resp.iter_lines()):
                if n == 5:
                    holding.wait()
                    done.wait(60)
                    break

    threads = [threading.Thread(target=hold_a_slot) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        holding.wait(timeout=60)
        assert in_flight(stack) == 2
        queued = {**endless, "max_tokens": 4, "stream": stream}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=queued, timeout=httpx.Timeout(60, read=1.0))
        deadline = time.monotonic() + 3  # the held streams run for far longer than this
        while in_flight(stack) > 2:
            assert time.monotonic() < deadline, "the abandoned request still holds its place"
            time.sleep(0.1)
    finally:
        done.set()
        for thread in threads:
            thread.join()


@asynccontextmanager
async def generator_app(**overrides: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GeneratorSettings(**overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gen", timeout=60
        ) as client:
            yield client


async def _wait_ready(client: httpx.AsyncClient) -> None:
    for _ in range(300):
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("generator never became ready")


async def test_not_ready_before_the_model_is_loaded() -> None:
    async with generator_app(parallel=1) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["not_ready"] == {"engine": "model loading"}
        early = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_loading"
        await _wait_ready(client)
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "smollm2-135m-instruct"


async def test_a_model_that_cannot_load_keeps_the_service_unready(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    async with generator_app(model_path=str(bad)) as client:
        for _ in range(100):
            body = (await client.get("/readyz")).json()
            if body.get("not_ready") == {"engine": "engine failed to start"}:
                break
            await asyncio.sleep(0.1)
        assert body["not_ready"] == {"engine": "engine failed to start"}


async def test_requests_beyond_the_queue_bound_get_429() -> None:
    async with generator_app(parallel=1, max_queued_requests=1) as client:
        await _wait_ready(client)
        body = {
            "messages": [{"role": "user", "content": "Write a story."}],
            "max_tokens": 40,
            "ignore_eos": True,
        }
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(5))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 429, 429, 429]
        shed = next(r for r in responses if r.status_code == 429)
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        again = await client.post("/v1/chat/completions", json=body)
        assert again.status_code == 200


async def test_the_retry_after_of_a_429_follows_its_setting() -> None:
    async with generator_app(
        parallel=1, max_queued_requests=0, overloaded_retry_after_s=4
    ) as client:
        await _wait_ready(client)
        body = {
            "messages": [{"role": "user", "content": "Write a story."}],
            "max_tokens": 10,
            "ignore_eos": True,
        }
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(3))
        )
        assert sorted(r.status_code for r in responses) == [200, 429, 429]
        assert {r.headers.get("retry-after") for r in responses if r.status_code == 429} == {"4"}


@pytest.mark.stack  # starts servers of its own
def test_sigterm_lets_in_flight_streams_finish(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "GENERATOR_PORT": str(port), "GENERATOR_DRAIN_TIMEOUT_S": "20"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.generator"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_ready(base, 60, proc)
        body = {
            "messages": [{"role": "user", "content": "Write a story."}],
            "max_tokens": 60,
            "ignore_eos": True,
            "stream": True,
        }
        lines = []
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            for n, line in enumerate(r.iter_lines()):
                if n == 4:
                    proc.send_signal(signal.SIGTERM)
                lines.append(line)
        assert "data: [DONE]" in lines  # the stream ran to its end after SIGTERM
        assert len([line for line in lines if line.startswith("data: {")]) > 40
        # uvicorn exits after the drain, re-raising the signal it caught
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_vllm_command_is_sized_for_mistral_on_an_a10g() -> None:
    cmd = vllm_command(GeneratorSettings(engine="vllm", served_model_name="mistral-7b"), 9000)
    assert cmd[:3] == ["vllm", "serve", "mistralai/Mistral-7B-Instruct-v0.3"]
    args = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert args["--host"] == "127.0.0.1" and args["--port"] == "9000"
    assert args["--served-model-name"] == "mistral-7b"
    assert args["--max-model-len"] == "8192" and args["--max-num-seqs"] == "16"
    assert args["--gpu-memory-utilization"] == "0.9" and args["--dtype"] == "float16"
    assert "--enable-prefix-caching" in cmd and "--enable-chunked-prefill" in cmd
    assert "--quantization" not in cmd
    awq = vllm_command(
        GeneratorSettings(
            engine="vllm", quantization="awq", model="TheBloke/Mistral-7B-Instruct-v0.2-AWQ"
        ),
        9000,
    )
    assert awq[2] == "TheBloke/Mistral-7B-Instruct-v0.2-AWQ"
    assert awq[awq.index("--quantization") + 1] == "awq"


def test_ray_serve_configs_validate_and_match() -> None:
    from ray.serve.schema import ServeDeploySchema

    built = ray_serve_config(
        GeneratorSettings(engine="ray", served_model_name="mistral-7b-instruct"), 8003
    )
    ServeDeploySchema.model_validate(built)
    shipped = yaml.safe_load((REPO / "deploy" / "ray" / "generator.yaml").read_text())
    ServeDeploySchema.model_validate(shipped)
    assert shipped["applications"][0]["args"] == built["applications"][0]["args"]
    assert built["applications"][0]["import_path"] == "ray.serve.llm:build_openai_app"
    embedder = yaml.safe_load((REPO / "deploy" / "ray" / "embedder.yaml").read_text())
    ServeDeploySchema.model_validate(embedder)


async def test_engine_client_reports_a_dead_engine_as_unavailable() -> None:
    from services.common.relay import EngineClient, EngineUnavailable

    client = EngineClient("127.0.0.1", free_port())  # nothing listens there
    with pytest.raises(EngineUnavailable):
        await client.post("/v1/chat/completions", {"messages": []})


def test_legacy_completions_route(sdk: OpenAI) -> None:
    result = sdk.completions.create(
        model="any", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert result.choices[0].text and result.usage.completion_tokens == 5
