"""The generator's queue metric for ECS autoscaling: the engine's /metrics read, the
CloudWatch embedded metric format (EMF) line it becomes, and the real llama.cpp engine
publishing it on stdout while requests run and wait."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragctl.stack import free_port, wait_ready
from services.generator.cloudwatch import (
    DEFAULT_NAMESPACE,
    DIMENSION,
    ENGINE_GAUGES,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    QueueMetricsPublisher,
    QueueSample,
    emf_record,
    parse_engine_metrics,
    slots_sample,
)
from services.generator.serving import EngineSlots
from services.generator.settings import GeneratorSettings

# vLLM 0.11's /metrics (prometheus_client text), trimmed: two models' label sets, and
# neighbours whose names share a prefix with the two gauges.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="mistral-7b"} 16.0
vllm:num_requests_running{engine="0",model_name="mistral-7b-awq"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="mistral-7b"} 3.0
vllm:num_requests_waiting{engine="0",model_name="mistral-7b-awq"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="mistral-7b"} 0.83
vllm:kv_cache_usage_perc{engine="0",model_name="mistral-7b-awq"} 0.21
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="mistral-7b"} 7.0
vllm:num_preemptions_total{engine="0",model_name="mistral-7b-awq"} 0.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="mistral-7b"} 412.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="mistral-7b"} 9.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="mistral-7b"} 301.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="mistral-7b"} 421.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="mistral-7b"} 421.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="mistral-7b"} 61.7
# HELP vllm:num_requests_waiting_by_reason Requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="mistral-7b",reason="capacity"} 3.0
"""

# llama.cpp's server with --metrics, trimmed (as services/generator/engines.py starts it).
LLAMACPP_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1204
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""


def assert_valid_emf(record: dict[str, Any]) -> None:
    """AWS's embedded metric format specification, as CloudWatch Logs applies it."""
    aws = record["_aws"]
    assert set(aws) == {"Timestamp", "CloudWatchMetrics"}
    assert isinstance(aws["Timestamp"], int) and not isinstance(aws["Timestamp"], bool)
    assert abs(aws["Timestamp"] - time.time() * 1000) < 86_400_000  # milliseconds, not s
    for directive in aws["CloudWatchMetrics"]:
        assert set(directive) == {"Namespace", "Dimensions", "Metrics"}
        assert isinstance(directive["Namespace"], str) and directive["Namespace"]
        for dimension_set in directive["Dimensions"]:
            assert 1 <= len(dimension_set) <= 30
            for name in dimension_set:
                assert isinstance(record[name], str) and record[name]
        assert 1 <= len(directive["Metrics"]) <= 100
        for metric in directive["Metrics"]:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            value = record[metric["Name"]]
            assert isinstance(value, int | float) and not isinstance(value, bool)


def test_vllm_queue_gauges_are_summed_over_their_label_sets() -> None:
    waiting, running = ENGINE_GAUGES["vllm"]
    assert parse_engine_metrics(VLLM_METRICS, waiting, running) == QueueSample(5.0, 20.0)
    without_waiting = "\n".join(
        line for line in VLLM_METRICS.splitlines() if "num_requests_waiting{" not in line
    )
    assert parse_engine_metrics(without_waiting, waiting, running) is None


def test_llamacpp_queue_gauges_are_read() -> None:
    waiting, running = ENGINE_GAUGES["llamacpp"]
    assert parse_engine_metrics(LLAMACPP_METRICS, waiting, running) == QueueSample(1.0, 2.0)


def test_ray_falls_back_to_the_generators_own_count() -> None:
    assert slots_sample(0, 16) == QueueSample(0, 0)
    assert slots_sample(5, 16) == QueueSample(0, 5)
    assert slots_sample(20, 16) == QueueSample(4, 16)


def test_the_emf_record_has_exactly_the_specified_shape() -> None:
    assert GeneratorSettings().cloudwatch_namespace == DEFAULT_NAMESPACE
    now_ms = int(time.time() * 1000)
    record = emf_record(QueueSample(5.0, 20.0), "RagPlatform", "rag-prod", now_ms)
    assert record == {
        "_aws": {
            "Timestamp": now_ms,
            "CloudWatchMetrics": [
                {
                    "Namespace": "RagPlatform",
                    "Dimensions": [["Deployment"]],
                    "Metrics": [
                        {"Name": "RequestsWaiting", "Unit": "Count"},
                        {"Name": "RequestsRunning", "Unit": "Count"},
                    ],
                }
            ],
        },
        "Deployment": "rag-prod",
        "RequestsWaiting": 5,
        "RequestsRunning": 20,
    }
    assert_valid_emf(record)
    assert emf_record(QueueSample(0.5, 1), "N", "d", now_ms)[REQUESTS_WAITING] == 0.5


async def test_a_tick_without_a_ready_engine_is_skipped_silently(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = GeneratorSettings(engine="llamacpp", cloudwatch_metrics_interval_s=1)
    ready = False
    nobody = f"http://127.0.0.1:{free_port()}"  # refuses connections
    publisher = QueueMetricsPublisher(settings, nobody, EngineSlots(4, 1), lambda: ready)
    assert await publisher.tick() is False  # still loading
    ready = True
    assert await publisher.tick() is False  # ready, but its /metrics does not answer
    assert capsys.readouterr().out == ""

    ray = GeneratorSettings(engine="ray", max_num_seqs=2, cloudwatch_deployment="rag-ray")
    slots = EngineSlots(8, 1)
    slots.in_use = 3
    fallback = QueueMetricsPublisher(ray, nobody, slots, lambda: True)
    assert await fallback.tick() is True
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert_valid_emf(record)
    assert (record[DIMENSION], record[REQUESTS_WAITING], record[REQUESTS_RUNNING]) == (
        "rag-ray",
        1,
        2,
    )


@pytest.mark.stack  # starts a generator process of its own
def test_the_llamacpp_generator_publishes_its_queue_on_stdout(tmp_path: Path) -> None:
    """Two slots, three long streams: the engine runs two and defers one, and the EMF lines
    on stdout say so while they last. stdout holds nothing but EMF lines."""
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    env = {
        **os.environ,
        "GENERATOR_PORT": str(port),
        "GENERATOR_PARALLEL": "2",
        "GENERATOR_CLOUDWATCH_METRICS_INTERVAL_S": "0.2",
        "GENERATOR_CLOUDWATCH_DEPLOYMENT": "rag-test",
    }
    lines: list[str] = []
    seen_queue = threading.Event()
    done = threading.Event()

    def read_stdout(stream: Any) -> None:
        for raw in stream:
            lines.append(raw.decode())
            record = json.loads(raw)
            if record[REQUESTS_RUNNING] >= 2 and record[REQUESTS_WAITING] >= 1:
                seen_queue.set()

    def stream_until_done(base: str, word: str) -> None:
        body = {
            "messages": [{"role": "user", "content": f"Write a long story about a {word}."}],
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                if done.is_set():
                    break  # leaving closes the connection: the engine frees the slot

    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.generator"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdout is not None
        reader = threading.Thread(target=read_stdout, args=(proc.stdout,), daemon=True)
        reader.start()
        streams: list[threading.Thread] = []
        try:
            base = f"http://127.0.0.1:{port}"
            assert wait_ready(base, 60, proc)
            for word in ("lighthouse", "glacier", "violin"):
                streams.append(threading.Thread(target=stream_until_done, args=(base, word)))
                streams[-1].start()
            assert seen_queue.wait(60), lines[-5:]
            done.set()
            for thread in streams:
                thread.join(60)
            idle_from = len(lines)
            deadline = time.monotonic() + 30
            while not any(json.loads(line)[REQUESTS_RUNNING] == 0 for line in lines[idle_from:]):
                assert time.monotonic() < deadline, lines[-5:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) in (0, -signal.SIGTERM)
        finally:
            done.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
    assert len(lines) >= 3
    for line in lines:
        record = json.loads(line)  # every stdout line is one raw EMF document
        assert_valid_emf(record)
        assert record[DIMENSION] == "rag-test"
        assert record["_aws"]["CloudWatchMetrics"][0]["Namespace"] == DEFAULT_NAMESPACE
    logs = stderr_path.read_text()
    assert "Traceback" not in logs and "queue metrics skipped" not in logs
