"""Generator: the llamacpp engine end to end with the openai SDK, limits, drain, and the
vllm / ray launch paths up to the command and config they build."""

from __future__ import annotations

import asyncio
import json
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
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from ragctl.stack import Stack, free_port, wait_ready
from services.generator.app import create_app
from services.generator.engines import (
    RayServeEngine,
    VllmEngine,
    ray_serve_config,
    vllm_command,
)
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


# vLLM's own parser and Ray Serve LLM's own config classes, in the environment `make install`
# builds for them (vLLM 0.11.0's Python sources, CPU torch, Ray 2.51). vLLM picks a platform
# when it builds its parser (the `--device` default) and its CUDA platform module loads the
# CUDA kernels, so the check stands a CUDA platform in through vLLM's own plugin interface:
# parsing itself is the same on every platform.
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
VLLM_CHECK = """
import json, sys
import vllm.platforms
from vllm.platforms.interface import Platform, PlatformEnum

class CudaForParsing(Platform):
    _enum = PlatformEnum.CUDA
    device_name = device_type = "cuda"

vllm.platforms._current_platform = CudaForParsing()

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils import FlexibleArgumentParser

request = json.load(sys.stdin)
result = {"version": vllm.__version__, "serve": [], "ray": []}
for argv in request["serve"]:
    # What `vllm serve` does: the CLI's parser with the serve subcommand, its validation,
    # the positional model over --model, then the engine arguments and their load config.
    parser = FlexibleArgumentParser(prog="vllm")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(argv)
    serve.validate(args)
    args.model = args.model_tag or args.model
    engine = AsyncEngineArgs.from_cli_args(args)
    load = engine.create_load_config()
    used = {option for option in argv if option.startswith("--")}
    deprecated = sorted(
        option
        for action in FlexibleArgumentParser._deprecated
        for option in action.option_strings
        if option in used
    )
    parsed = {k: v for k, v in vars(args).items() if k != "dispatch_function"}
    parsed["load_ignore_patterns"] = load.ignore_patterns
    parsed["load_download_dir"] = load.download_dir
    result["serve"].append({"args": parsed, "deprecated": deprecated})

from ray.serve.llm import LLMConfig

for raw in request["ray"]:
    config = LLMConfig.model_validate(raw)
    # What Ray hands vLLM: its engine config's keyword arguments, into AsyncEngineArgs.
    kwargs = config.get_engine_config().get_initialization_kwargs()
    engine = AsyncEngineArgs(**kwargs)
    result["ray"].append({"kwargs": kwargs, "load_ignore_patterns": engine.ignore_patterns})
print(json.dumps(result, default=str))
"""


def check_with_vllm(serve: list[list[str]], ray: list[dict[str, Any]]) -> dict[str, Any]:
    """vLLM's parser on `vllm serve` argument lists, Ray's LLMConfig on llm_configs."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make install` builds it")
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", VLLM_CHECK],
        input=json.dumps({"serve": serve, "ray": ray}),
        capture_output=True,
        text=True,
        timeout=300,
        # Not offline: vLLM's offline mode swaps the model id for its local snapshot. Parsing
        # reaches no network (the model's own config is read only when the engine starts).
        env={**os.environ, "HF_HUB_OFFLINE": "0", "VLLM_NO_USAGE_STATS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    assert result["version"] == "0.11.0"  # services/generator/Dockerfile.vllm
    return result


AWQ_CHECKPOINT = "solidrust/Mistral-7B-Instruct-v0.3-AWQ"


def test_vllm_parses_the_command_sized_for_mistral_on_an_a10g() -> None:
    default = vllm_command(GeneratorSettings(engine="vllm", served_model_name="mistral-7b"), 9000)
    awq = vllm_command(GeneratorSettings(engine="vllm", model=AWQ_CHECKPOINT), 9000)
    cached = vllm_command(GeneratorSettings(engine="vllm", download_dir="/cache/weights"), 9000)
    assert default[:2] == awq[:2] == ["vllm", "serve"]
    plain, quantized, with_dir = check_with_vllm([default[1:], awq[1:], cached[1:]], [])["serve"]

    args = plain["args"]
    assert args["model"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert args["host"] == "127.0.0.1" and args["port"] == 9000
    assert args["served_model_name"] == ["mistral-7b"]
    assert args["max_model_len"] == 8192 and args["max_num_seqs"] == 16
    assert args["max_num_batched_tokens"] == 2048
    assert args["gpu_memory_utilization"] == 0.9 and args["dtype"] == "float16"
    assert args["enable_prefix_caching"] is True and args["enable_chunked_prefill"] is True
    assert args["tensor_parallel_size"] == 1
    # one copy of Mistral's weights: the shards, not consolidated.safetensors as well
    assert "consolidated.safetensors" in args["load_ignore_patterns"]
    assert args["load_download_dir"] is None  # the Hugging Face cache under HF_HOME
    assert args["enable_log_requests"] is False and args["quantization"] is None
    assert plain["deprecated"] == []

    # An AWQ checkpoint: vLLM reads the method from its config (awq_marlin on an A10G).
    assert quantized["args"]["model"] == AWQ_CHECKPOINT
    assert quantized["args"]["quantization"] is None and quantized["deprecated"] == []
    assert with_dir["args"]["load_download_dir"] == "/cache/weights"


def test_vllm_flags_what_it_deprecates() -> None:
    """The check sees a deprecated option (the one this launcher used to pass)."""
    (result,) = check_with_vllm([["serve", "m", "--disable-log-requests"]], [])["serve"]
    assert result["deprecated"] == ["--disable-log-requests"]


def write_checkpoint(path: Path, quantization: dict[str, Any] | None) -> str:
    config: dict[str, Any] = {"architectures": ["MistralForCausalLM"]}
    if quantization:
        config["quantization_config"] = quantization
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_vllm_quantization_setting_only_requires_a_quantized_checkpoint(tmp_path: Path) -> None:
    awq = write_checkpoint(tmp_path / "awq", {"quant_method": "awq", "bits": 4})
    fp16 = write_checkpoint(tmp_path / "fp16", None)
    engine = VllmEngine(GeneratorSettings(engine="vllm", quantization="awq", model=awq))
    assert "--quantization" not in engine.command()
    with pytest.raises(RuntimeError, match="needs an AWQ checkpoint"):
        VllmEngine(GeneratorSettings(engine="vllm", quantization="awq", model=fp16)).command()


def test_ray_serve_configs_validate_with_ray_serve_llm_and_match() -> None:
    from ray.serve.schema import ServeDeploySchema

    built = ray_serve_config(
        GeneratorSettings(engine="ray", served_model_name="mistral-7b-instruct"), 8003
    )
    ServeDeploySchema.parse_obj(built)
    shipped = yaml.safe_load((REPO / "deploy" / "ray" / "generator.yaml").read_text())
    ServeDeploySchema.parse_obj(shipped)
    assert shipped["applications"][0]["args"] == built["applications"][0]["args"]
    assert built["applications"][0]["import_path"] == "ray.serve.llm:build_openai_app"
    embedder = yaml.safe_load((REPO / "deploy" / "ray" / "embedder.yaml").read_text())
    ServeDeploySchema.parse_obj(embedder)

    (llm_config,) = built["applications"][0]["args"]["llm_configs"]
    (checked,) = check_with_vllm([], [llm_config])["ray"]
    kwargs = checked["kwargs"]
    assert kwargs["model"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert kwargs["served_model_name"] == ["mistral-7b-instruct"]
    assert kwargs["max_model_len"] == 8192 and kwargs["max_num_seqs"] == 16
    assert kwargs["enable_chunked_prefill"] and kwargs["enable_prefix_caching"]
    assert "consolidated.safetensors" in checked["load_ignore_patterns"]
    assert "quantization" not in kwargs


def test_the_hugging_face_token_reaches_ray_replicas_through_runtime_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.serve.schema import ServeDeploySchema

    settings = GeneratorSettings(engine="ray")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "runtime_env" not in ray_serve_config(settings, 8003)["applications"][0]
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    built = ray_serve_config(settings, 8003)
    ServeDeploySchema.parse_obj(built)
    assert built["applications"][0]["runtime_env"] == {"env_vars": {"HF_TOKEN": "hf_test_token"}}


def test_ray_engine_launches_serve_run() -> None:
    cmd = RayServeEngine(GeneratorSettings(engine="ray")).command()
    assert cmd[1] == "run" and Path(cmd[2]).is_file()
    help_text = subprocess.run(
        [cmd[0], "run", "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "CONFIG_OR_IMPORT_PATH" in help_text


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
