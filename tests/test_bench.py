"""Load runs and where a chat's time goes.

`ragctl bench chat` runs its steps against a running gateway and writes a report with every
figure a capacity plan reads (TTFT, ITL, end-to-end latency, throughput, refusals, the
gateway's stage breakdown) and its plots; a chat's last streamed event and its
`Server-Timing` header say where its time went; refusals say when to come back, in
milliseconds too. The figures themselves are measured by the bench, not asserted here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragctl.bench import (
    ChatSample,
    _retry_after_ms,
    format_chat_table,
    plot_chat,
    run_summary,
    step_report,
)
from ragctl.stack import Stack
from services.common.errors import APIError
from services.common.timing import StageTimes, parse_server_timing, server_timing_header
from services.gateway.limits import ChatAdmission, RateLimiter, rate_limited, too_many_streams

RAGCTL = str(Path(sys.executable).parent / "ragctl")
STEP_FIELDS = {
    "concurrency",
    "duration_s",
    "requests",
    "ok",
    "errors",
    "rate_limited",
    "overloaded",
    "shed_share",
    "statuses",
    "error_kinds",
    "requests_per_s",
    "output_tokens",
    "output_tokens_per_s",
    "ttft_s",
    "itl_s",
    "e2e_s",
    "shed_s",
    "shed_retry_after_ms",
    "stages_ms",
}
# What the gateway reports for every streamed RAG chat (rewrite only for follow-ups, prefill
# only from an engine that says, rerank only with the reranking stage).
CHAT_STAGES = {
    "auth",
    "limits",
    "retrieve",
    "embed",
    "vector",
    "text",
    "prompt",
    "generator_wait",
    "first_token",
    "ttft",
    "total",
}


# In process: the timing header, the step figures, the refusals -------------------------


def test_server_timing_round_trips_and_ignores_what_it_cannot_read() -> None:
    header = server_timing_header({"embed": 12.5, "vector": 3.25})
    assert header == "embed;dur=12.50, vector;dur=3.25"
    assert parse_server_timing(header) == {"embed": 12.5, "vector": 3.25}
    assert parse_server_timing('db;desc="x";dur=5, cache;desc=hit, bad entry, ;dur=3') == {
        "db": 5.0
    }
    assert parse_server_timing(None) == {}


def test_stage_times_add_up_repeated_stages_and_measure_from_points() -> None:
    times = StageTimes()
    times.add("prompt", 0.002)
    times.add("prompt", 0.003)
    times.update({"embed": 7.0})
    times.point("sent")
    times.since("first_token", "sent")
    times.since("never", "not a point")
    times.mark("total")
    assert times.ms["prompt"] == pytest.approx(5.0)
    assert times.ms["embed"] == 7.0
    assert 0 <= times.ms["first_token"] <= times.ms["total"]
    assert "never" not in times.ms
    assert parse_server_timing(times.header()).keys() == times.ms.keys()


def sample(status: int = 200, ttft: float | None = 0.1, tokens: int = 3, **kw: Any) -> ChatSample:
    return ChatSample(
        started_s=0.0,
        status=status,
        e2e_s=kw.pop("e2e", 0.5),
        ttft_s=ttft if status == 200 else None,
        itl_s=[0.02] * max(0, tokens - 1) if status == 200 else [],
        output_tokens=tokens if status == 200 else 0,
        **kw,
    )


def test_a_step_counts_answers_refusals_and_errors_apart() -> None:
    samples = [
        sample(ttft=0.1, stages_ms={"retrieve": 20.0, "ttft": 100.0}),
        sample(ttft=0.3, stages_ms={"retrieve": 40.0, "ttft": 300.0}),
        sample(status=503, e2e=0.004, error="503 overloaded", retry_after_ms=250.0),
        sample(status=429, e2e=0.002, error="429 too_many_streams", retry_after_ms=1000.0),
        sample(status=200, ttft=None, tokens=0, error="no tokens"),
    ]
    step = step_report(4, samples, duration_s=2.0)
    assert set(step) == STEP_FIELDS
    assert (step["requests"], step["ok"], step["errors"]) == (5, 2, 1)
    assert (step["rate_limited"], step["overloaded"], step["shed_share"]) == (1, 1, 0.4)
    assert step["statuses"] == {"200": 3, "503": 1, "429": 1}
    assert step["requests_per_s"] == 1.0 and step["output_tokens_per_s"] == 3.0
    assert step["ttft_s"]["p50"] == pytest.approx(0.2)
    assert step["itl_s"]["p99"] == pytest.approx(0.02)
    assert step["shed_s"]["p50"] == pytest.approx(0.003)
    assert step["shed_retry_after_ms"]["mean"] == pytest.approx(625.0)
    assert step["stages_ms"]["retrieve"] == {"p50": 30.0, "p95": pytest.approx(39.0)}
    assert list(step["stages_ms"]) == ["retrieve", "ttft"]  # in the order of a chat


def test_the_summary_names_where_shedding_starts_and_the_stage_that_grew() -> None:
    light = step_report(1, [sample(stages_ms={"retrieve": 20.0, "generator_wait": 5.0})], 1.0)
    heavy = step_report(
        8,
        [
            sample(tokens=5, stages_ms={"retrieve": 25.0, "generator_wait": 900.0}),
            sample(status=503, error="503 overloaded"),
        ],
        1.0,
    )
    summary = run_summary([light, heavy])
    assert summary["shedding_starts_at"] == 8
    assert summary["slowest_growing_stage"] == "generator_wait"
    assert summary["peak_at_concurrency"] == 8
    assert summary["unloaded_ttft_p50_s"] == pytest.approx(0.1)
    table = format_chat_table({"steps": [light, heavy], "summary": summary})
    assert "generator_wait" in table and "shedding from concurrency 8" in table


def test_a_run_that_measured_no_tokens_still_gets_its_report_and_plots(tmp_path: Path) -> None:
    refused = [sample(status=503, error="503 overloaded", e2e=0.01) for _ in range(3)]
    steps = [step_report(c, refused, 1.0) for c in (1, 2)]
    report = {"kind": "chat", "target": "t", "steps": steps, "summary": run_summary(steps)}
    assert report["summary"]["unloaded_ttft_p50_s"] is None
    assert "shed50" in format_chat_table(report)
    written = plot_chat(report, tmp_path)
    assert [path.name for path in written] == ["chat-latency.png", "chat-throughput.png"]


def test_the_wait_a_refusal_asks_for_is_read_in_milliseconds_or_seconds() -> None:
    assert _retry_after_ms(httpx.Headers({"retry-after-ms": "250", "retry-after": "1"})) == 250
    assert _retry_after_ms(httpx.Headers({"retry-after": "2"})) == 2000  # a proxy's, an engine's
    assert _retry_after_ms(httpx.Headers({"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"})) is None
    assert _retry_after_ms(httpx.Headers()) is None


def test_refusals_say_when_to_come_back_in_seconds_and_in_milliseconds() -> None:
    limited = rate_limited(0.25)
    assert limited.headers == {"Retry-After": "1", "retry-after-ms": "250"}
    assert too_many_streams(4).headers == {"Retry-After": "1", "retry-after-ms": "1000"}
    assert rate_limited(61.2).headers == {"Retry-After": "62", "retry-after-ms": "61200"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def admit(limiter: RateLimiter) -> ChatAdmission:
    return await limiter.admit_chat("u", max_waiting=16, retry_after_s=2.0, max_wait_s=1.0)


async def wait_each(limiter: RateLimiter, clock: Clock, chats: int, seconds: float) -> None:
    """chats admitted together, each begun after waiting seconds."""
    admitted = [await admit(limiter) for _ in range(chats)]
    clock.now += seconds
    for admission in admitted:
        admission.answered()
        admission.release()


async def test_a_chat_is_shed_once_the_oldest_waiting_one_is_delayed_past_the_bound() -> None:
    clock = Clock()
    limiter = RateLimiter(600, 100, max_streams=100, clock=clock)
    first = await admit(limiter)
    clock.now += 0.5
    second = await admit(limiter)  # the oldest has waited 0.5 s: room for more
    clock.now += 0.5
    with pytest.raises(APIError) as shed:  # the oldest has waited 1 s
        await admit(limiter)
    assert shed.value.status_code == 503 and shed.value.code == "overloaded"
    # no chat has begun yet: come back after GATEWAY_OVERLOADED_RETRY_AFTER_S
    assert shed.value.headers == {"Retry-After": "2", "retry-after-ms": "2000"}
    first.answered()
    second.answered()
    assert limiter.waiting_chats == 0
    assert limiter.recent_wait_s == pytest.approx(0.9)  # 1.0, then 0.5 weighed in by a fifth
    third = await admit(limiter)  # nobody waits: admitted, whatever the recent waits
    clock.now += 1.5  # 1.0 s past the least recent wait (0.5 s), the wait without a queue
    with pytest.raises(APIError) as shed:  # asked to come back after about the recent wait
        await admit(limiter)
    assert shed.value.headers["retry-after-ms"] == str(round(1000 * limiter.recent_wait_s))
    third.release()


async def test_the_bound_on_waiting_chats_follows_the_queue_delay() -> None:
    clock = Clock()
    limiter = RateLimiter(600, 100, max_streams=100, clock=clock)
    await wait_each(limiter, clock, 1, 0.3)  # no queue: 0.3 s is retrieval and prefill
    assert limiter.waiting_bound == 16  # never past GATEWAY_MAX_WAITING_CHATS
    await wait_each(limiter, clock, 3, 2.0)  # three delayed 1.7 s by the same queue
    assert limiter.waiting_bound == pytest.approx(16 * 0.8)  # cut once for that round
    for _ in range(8):
        await wait_each(limiter, clock, 1, 2.0)  # a round each
    assert limiter.waiting_bound == pytest.approx(16 * 0.8**9)  # cut by a fifth 9 times: 2.15
    # A burst meets the bound at once: three wait, the fourth is shed.
    burst = [await admit(limiter) for _ in range(3)]
    with pytest.raises(APIError):
        await admit(limiter)
    clock.now += 0.3
    expected = 16 * 0.8**9
    for admission in burst:
        admission.answered()  # begun without delay: the bound grows again, by 1/bound
        admission.release()
        expected += 1 / expected
    assert limiter.waiting_bound == pytest.approx(expected)  # 3.33
    for _ in range(200):
        await wait_each(limiter, clock, 1, 0.3)
    assert limiter.waiting_bound == 16


async def test_only_chats_the_generator_began_count_towards_the_bound() -> None:
    """A chat not streamed is handed over after retrieval, and a chat that fails or whose
    client leaves never reaches the engine: their short waits are not the wait without a
    queue, so the streamed chats' long prefills are not taken for a queue."""
    clock = Clock()
    limiter = RateLimiter(600, 100, max_streams=100, clock=clock)
    plain = await admit(limiter)
    gone = await admit(limiter)
    clock.now += 0.05
    plain.sent()
    gone.release()
    plain.release()
    for _ in range(5):
        await wait_each(limiter, clock, 1, 2.0)  # streamed: 2 s of prefill each, no queue
    assert limiter.waiting_bound == 16
    assert limiter.waiting_chats == 0 and not limiter._waiting_since


async def test_a_slow_engine_alone_is_not_a_queue() -> None:
    """A prefill that always takes 4 s (a long prompt on a CPU) sets the wait without a
    queue: chats that wait only for it are not shed, however long it is."""
    clock = Clock()
    limiter = RateLimiter(600, 100, max_streams=100, clock=clock)
    for _ in range(20):
        await wait_each(limiter, clock, 2, 4.0)
    assert limiter.waiting_bound == 16
    both = [await admit(limiter), await admit(limiter)]
    clock.now += 4.5  # the oldest: 0.5 s past the wait without a queue
    third = await admit(limiter)
    for admission in (*both, third):
        admission.release()


async def test_the_count_of_waiting_chats_still_bounds_a_burst() -> None:
    limiter = RateLimiter(600, 100, max_streams=100, clock=Clock())
    admitted = [await limiter.admit_chat("u", 3, 2.0, max_wait_s=1.0) for _ in range(3)]
    with pytest.raises(APIError):
        await limiter.admit_chat("u", 3, 2.0, max_wait_s=1.0)
    for admission in admitted:
        admission.release()
        admission.release()  # given back once
    assert limiter.waiting_chats == 0


# On the stack: the breakdown in the stream and headers, and a real load run -----------


@pytest.fixture(scope="module")
def bench_token(stack: Stack) -> str:
    """A user of its own, so the run's chats do not meet other tests' stream caps."""
    assert stack.pool is not None
    return stack.pool.user_token("bench-test@example.com")


def test_a_streamed_chat_says_where_its_time_went(stack: Stack, bench_token: str) -> None:
    headers = {"Authorization": f"Bearer {bench_token}"}
    body = {
        "messages": [{"role": "user", "content": "How often should I clean the Lumen burrs?"}],
        "stream": True,
        "max_tokens": 8,
        "temperature": 0,
    }
    with (
        httpx.Client(base_url=stack.url("gateway"), timeout=120, headers=headers) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        early = parse_server_timing(resp.headers["server-timing"])
        events = [
            json.loads(line[5:])
            for line in resp.iter_lines()
            if line.startswith("data:") and line.strip() != "data: [DONE]"
        ]
        search = client.post("/v1/search", json={"query": "burrs", "k": 2})
    # The header: the stages done before the answer began (retrieval included).
    assert {"auth", "limits", "retrieve", "embed", "prompt", "generator_wait"} <= early.keys()
    timing = events[-1]["server_timing"]
    assert CHAT_STAGES <= timing.keys(), timing
    assert all(ms >= 0 for ms in timing.values())
    assert timing["ttft"] <= timing["total"]
    assert timing["retrieve"] >= timing["embed"]  # the retriever's stages are inside its call
    # the stages before the first token lie within it
    before = ("auth", "limits", "retrieve", "prompt", "generator_wait", "first_token")
    assert sum(timing[name] for name in before) <= timing["ttft"] + 1.0
    assert "server_timing" not in {k for e in events[:-1] for k in e}
    assert search.status_code == 200
    assert {"auth", "embed", "vector", "text", "total"} <= parse_server_timing(
        search.headers["server-timing"]
    ).keys()
    metrics = httpx.get(f"{stack.url('gateway')}/metrics").text
    assert 'gateway_chat_stage_seconds_count{stage="first_token"}' in metrics


def test_ragctl_bench_chat_writes_every_figure_and_the_plots(
    stack: Stack, bench_token: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run = subprocess.run(
        [
            RAGCTL,
            "bench",
            "chat",
            "--url",
            stack.url("gateway"),
            "--token",
            bench_token,
            "--concurrency",
            "1,2",
            "--step-seconds",
            "4",
            "--max-tokens",
            "16",
            "--output-dir",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TTFT50" in run.stdout and "where the time to first token went" in run.stdout
    report = json.loads((out / "chat.json").read_text())
    assert report["kind"] == "chat" and report["target"] == stack.url("gateway")
    assert report["config"]["concurrency"] == [1, 2] and report["config"]["max_tokens"] == 16
    assert [step["concurrency"] for step in report["steps"]] == [1, 2]
    for step in report["steps"]:
        assert set(step) == STEP_FIELDS
        assert step["ok"] >= 1 and step["errors"] == 0, step["error_kinds"]
        assert step["requests"] == step["ok"] + step["rate_limited"] + step["overloaded"]
        assert step["duration_s"] >= 4
        assert 0 < step["output_tokens"] <= 16 * step["ok"]
        assert step["requests_per_s"] > 0 and step["output_tokens_per_s"] > 0
        for key in ("ttft_s", "itl_s", "e2e_s"):
            figures = step[key]
            assert figures["p50"] <= figures["p95"] <= figures["p99"]
            assert all(0 < value < 300 and math.isfinite(value) for value in figures.values())
        assert step["ttft_s"]["p50"] <= step["e2e_s"]["p50"]
        assert CHAT_STAGES <= step["stages_ms"].keys()
    summary = report["summary"]
    assert summary["unloaded_ttft_p50_s"] == report["steps"][0]["ttft_s"]["p50"]
    assert summary["peak_output_tokens_per_s"] > 0 and summary["peak_at_concurrency"] in (1, 2)
    for name in ("chat-latency.png", "chat-throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ragctl_bench_search_loads_a_deployment_through_the_api(
    stack: Stack, bench_token: str, tmp_path: Path
) -> None:
    run = subprocess.run(
        [
            RAGCTL,
            "bench",
            "search",
            "--url",
            stack.url("gateway"),
            "--token",
            bench_token,
            "--concurrency",
            "2",
            "--step-seconds",
            "2",
            "--no-upload",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    step = json.loads((tmp_path / "search.json").read_text())["steps"][0]
    assert step["ok"] > 0 and step["errors"] == 0 and step["ttft_s"] is None
    assert step["e2e_s"]["p50"] > 0 and {"embed", "vector", "text"} <= step["stages_ms"].keys()
    for name in ("search-latency.png", "search-throughput.png"):  # TTFT and ITL: not measured
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ragctl_bench_refuses_a_url_without_credentials(stack: Stack) -> None:
    run = subprocess.run(
        [RAGCTL, "bench", "chat", "--url", stack.url("gateway"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "--url needs --token" in run.stderr and "Traceback" not in run.stderr


def test_ragctl_bench_ingest_times_documents_through_the_api_and_cleans_up(
    stack: Stack, bench_token: str, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {bench_token}"}
    before = httpx.get(f"{stack.url('gateway')}/v1/documents/summary", headers=headers).json()
    run = subprocess.run(
        [
            RAGCTL,
            "bench",
            "ingest",
            "--url",
            stack.url("gateway"),
            "--token",
            bench_token,
            "--documents",
            "6",
            "--batch",
            "4",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "ingest.json").read_text())
    assert result["documents"] == 6 and result["chunks"] >= 6
    assert 0 < result["upload_s"] <= result["seconds"]
    assert result["documents_per_s"] == pytest.approx(6 / result["seconds"])
    assert "documents/s" in run.stdout
    after = httpx.get(f"{stack.url('gateway')}/v1/documents/summary", headers=headers).json()
    assert after["total"] == before["total"]  # the run's documents are deleted after it
