"""`ragctl bench chat`: the streaming chat endpoint under load, one step of concurrency at a
time, as a client sees it (time to first token, inter-token latency, end-to-end latency,
requests and output tokens per second, errors, 429s and 503s), with the gateway's own
breakdown of where the time to first token went (the last event's `server_timing`).

A local stack is started for the run unless a URL is given. Each step runs `concurrency`
clients for `step_s` seconds (each sends its next chat when the previous one ends; chats
under way at the deadline finish and count), then the next step begins. The report goes to
a folder: chat.json (every step's figures), chat-latency.png and chat-throughput.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from ragctl.evaluation import percentile, progress_bar
from services.common.timing import parse_server_timing

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
STREAMS_PER_USER = 4  # the gateway's default GATEWAY_MAX_CONCURRENT_STREAMS
SHED_STATUSES = (429, 503)
STAGE_ORDER = (
    "auth",
    "limits",
    "rewrite",
    "retrieve",
    "embed",
    "vector",
    "text",
    "rerank",
    "prompt",
    "generator_wait",
    "prefill",
    "first_token",
    "ttft",
    "total",
)
# Questions about the bundled sample documents (ragctl/samples), which the run uploads.
SAMPLE_QUESTIONS = (
    "When is the diesel generator tested at Zephyr Station?",
    "How often should I clean the Lumen C3 burrs?",
    "How long does the Blue Comet sourdough bulk ferment?",
    "Who keeps the medical store key at Zephyr Station?",
    "Which grind setting of the Lumen C3 is for espresso?",
    "How much cardamom goes into a batch of Saturn rings?",
    "How many people staff Zephyr Station through the winter?",
    "What does the Lumen C3 warranty cover?",
    "How much water does the Zephyr Station desalination unit produce a day?",
    "At what temperature is the Blue Comet sourdough baked?",
    "Where is the emergency muster point at Zephyr Station?",
)


class BenchError(RuntimeError):
    """The run cannot go on (no stack, no token, a refused upload): said to the user."""


@dataclass
class ChatSample:
    """One chat as the client saw it."""

    started_s: float  # since the step began
    status: int  # the HTTP status (0: no answer at all)
    e2e_s: float  # to the end of the stream, or of the error answer
    ttft_s: float | None = None  # to the first content token
    itl_s: list[float] = field(default_factory=list)  # between consecutive content tokens
    output_tokens: int = 0
    error: str | None = None  # what went wrong, in a few words (status, error event, ...)
    retry_after_ms: float | None = None  # what a 429/503 asked for
    stages_ms: dict[str, float] = field(default_factory=dict)  # the gateway's server_timing


@dataclass
class ChatBenchConfig:
    url: str | None = None  # None: start a local stack for the run
    tokens: Sequence[str] = ()  # with url: one or more users' access tokens
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY
    step_s: float = 20.0
    max_tokens: int = 64
    questions: Sequence[str] = SAMPLE_QUESTIONS
    upload_samples: bool = True
    output_dir: Path | None = None  # default: bench-results/<timestamp>
    plots: bool = True
    show_progress: bool = True
    stack_env: dict[str, str] = field(default_factory=dict)  # more settings for a local stack
    request_timeout_s: float = 300.0


def summary_of(values: Sequence[float]) -> dict[str, float] | None:
    """p50, p95, p99 and mean, or None when there is nothing to summarise."""
    if not values:
        return None
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values),
    }


# One chat --------------------------------------------------------------------------------


async def stream_chat(
    client: httpx.AsyncClient, token: str, question: str, step_started: float, max_tokens: int
) -> ChatSample:
    """Send one streaming chat and time it from the first byte sent to [DONE]."""
    body = {
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    start = time.perf_counter()
    sample = ChatSample(started_s=start - step_started, status=0, e2e_s=0.0)
    last_token: float | None = None
    try:
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            sample.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                sample.error = _error_of(resp)
                sample.retry_after_ms = _retry_after_ms(resp.headers)
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        sample.error = f"error event: {event['error'].get('code') or 'error'}"
                        continue
                    if isinstance(event.get("server_timing"), dict):
                        sample.stages_ms = event["server_timing"]
                    for choice in event.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            now = time.perf_counter()
                            if last_token is None:
                                sample.ttft_s = now - start
                            else:
                                sample.itl_s.append(now - last_token)
                            last_token = now
                            sample.output_tokens += 1
                if sample.output_tokens == 0 and sample.error is None:
                    sample.error = "no tokens"
    except (httpx.HTTPError, ValueError) as exc:
        sample.error = f"{type(exc).__name__}"
    sample.e2e_s = time.perf_counter() - start
    return sample


async def search_once(
    client: httpx.AsyncClient, token: str, question: str, step_started: float, k: int = 4
) -> ChatSample:
    """Send one search (`POST /v1/search`, hybrid) and time it."""
    start = time.perf_counter()
    sample = ChatSample(started_s=start - step_started, status=0, e2e_s=0.0)
    try:
        resp = await client.post(
            "/v1/search",
            json={"query": question, "k": k},
            headers={"Authorization": f"Bearer {token}"},
        )
        sample.status = resp.status_code
        if resp.status_code != 200:
            sample.error = _error_of(resp)
            sample.retry_after_ms = _retry_after_ms(resp.headers)
        else:
            resp.json()
            sample.stages_ms = parse_server_timing(resp.headers.get("server-timing"))
    except (httpx.HTTPError, ValueError) as exc:
        sample.error = f"{type(exc).__name__}"
    sample.e2e_s = time.perf_counter() - start
    return sample


def _error_of(resp: httpx.Response) -> str:
    try:
        error = resp.json()["error"]
        return f"{resp.status_code} {error.get('code') or error.get('type')}"
    except (ValueError, KeyError, TypeError):
        return str(resp.status_code)


def _retry_after_ms(headers: httpx.Headers) -> float | None:
    """The wait a refusal asks for: retry-after-ms, else Retry-After in seconds."""
    for name, scale in (("retry-after-ms", 1.0), ("retry-after", 1000.0)):
        value = headers.get(name)
        if value is not None:
            with contextlib.suppress(ValueError):
                return float(value) * scale
    return None


# A step ----------------------------------------------------------------------------------


Send = Callable[[httpx.AsyncClient, str, str, float], Awaitable[ChatSample]]
"""One call: (client, token, question, the step's start) -> its sample."""


async def run_step(
    url: str,
    tokens: Sequence[str],
    questions: Sequence[str],
    concurrency: int,
    step_s: float,
    send: Send,
    timeout_s: float = 300.0,
) -> tuple[list[ChatSample], float]:
    """concurrency clients, each calling back to back until step_s has passed; the samples
    and the step's duration (to the end of its last call)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    samples: list[ChatSample] = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()
        deadline = started + step_s

        async def chat_client(number: int) -> None:
            token = tokens[number % len(tokens)]
            turn = number
            while time.perf_counter() < deadline:
                question = questions[turn % len(questions)]
                turn += concurrency
                sample = await send(client, token, question, started)
                samples.append(sample)
                if sample.status in SHED_STATUSES:
                    # A client told to come back later does, but not before the deadline
                    # would let it: the refusals are counted, not hammered.
                    wait_s = min((sample.retry_after_ms or 1000.0) / 1000.0, 1.0)
                    await asyncio.sleep(min(wait_s, max(0.0, deadline - time.perf_counter())))

        await asyncio.gather(*(chat_client(n) for n in range(concurrency)))
        duration = time.perf_counter() - started
    return samples, duration


def step_report(
    concurrency: int, samples: Sequence[ChatSample], duration_s: float
) -> dict[str, Any]:
    """The figures of one step (see the module's docstring)."""
    ok = [s for s in samples if s.status == 200 and s.error is None]
    shed = [s for s in samples if s.status in SHED_STATUSES]
    statuses: dict[str, int] = {}
    for sample in samples:
        statuses[str(sample.status)] = statuses.get(str(sample.status), 0) + 1
    errors: dict[str, int] = {}
    for sample in samples:
        if sample.error is not None:
            errors[sample.error] = errors.get(sample.error, 0) + 1
    output_tokens = sum(s.output_tokens for s in ok)
    stages: dict[str, list[float]] = {}
    for sample in ok:
        for name, ms in sample.stages_ms.items():
            stages.setdefault(name, []).append(float(ms))
    ordered = sorted(stages, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else 99)
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok) - len(shed),
        "rate_limited": sum(s.status == 429 for s in samples),
        "overloaded": sum(s.status == 503 for s in samples),
        "shed_share": len(shed) / len(samples) if samples else 0.0,
        "statuses": statuses,
        "error_kinds": errors,
        "requests_per_s": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_s": summary_of([s.ttft_s for s in ok if s.ttft_s is not None]),
        "itl_s": summary_of([gap for s in ok for gap in s.itl_s]),
        "e2e_s": summary_of([s.e2e_s for s in ok]),
        "shed_s": summary_of([s.e2e_s for s in shed]),
        "shed_retry_after_ms": summary_of(
            [s.retry_after_ms for s in shed if s.retry_after_ms is not None]
        ),
        "stages_ms": {
            name: {"p50": percentile(stages[name], 50), "p95": percentile(stages[name], 95)}
            for name in ordered
        },
    }


def run_summary(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run in a few figures: unloaded TTFT, peak throughput, where shedding starts, and
    the stage that grows most from the lightest step to the heaviest (the bottleneck)."""
    served = [s for s in steps if s["ok"]]
    if not served:
        return {"unloaded_ttft_p50_s": None, "peak_output_tokens_per_s": 0.0}
    first, last = served[0], served[-1]
    # the step that served most: by output tokens (chat), by requests (search)
    peak = max(served, key=lambda s: (s["output_tokens_per_s"], s["requests_per_s"]))
    shedding = [s["concurrency"] for s in steps if s["rate_limited"] + s["overloaded"] > 0]
    growth = {
        name: last["stages_ms"][name]["p50"] - first["stages_ms"].get(name, {"p50": 0.0})["p50"]
        for name in last["stages_ms"]
        if name not in ("ttft", "total")
    }
    return {
        "unloaded_ttft_p50_s": first["ttft_s"]["p50"] if first["ttft_s"] else None,
        "peak_output_tokens_per_s": peak["output_tokens_per_s"],
        "peak_at_concurrency": peak["concurrency"],
        "peak_requests_per_s": max(s["requests_per_s"] for s in served),
        "shedding_starts_at": shedding[0] if shedding else None,
        "slowest_growing_stage": max(growth, key=lambda n: growth[n]) if growth else None,
        "stage_growth_ms": growth,
    }


# The run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _target(config: ChatBenchConfig, users: int) -> Iterator[tuple[str, list[str], bool]]:
    """The gateway, the tokens of the users the run speaks as, and whether it is a local
    stack started for the run (stopped after it)."""
    if config.url is not None:
        if not config.tokens:
            raise BenchError("--url needs --token, or Cognito credentials to get one")
        yield config.url, list(config.tokens), False
        return
    import tempfile

    from ragctl.stack import Ports, Stack

    with tempfile.TemporaryDirectory(prefix="ragctl-bench-") as home:
        stack = Stack(home=Path(home), ports=Ports.free(), extra_env=dict(config.stack_env))
        print(f"starting a local stack in {home} ...", file=sys.stderr, flush=True)
        stack.start()
        try:
            pool = stack.pool
            assert pool is not None
            # One emulator user per STREAMS_PER_USER clients: the per-user cap on chats at
            # once must not be what the run measures.
            tokens = [pool.user_token(f"bench-{n}@example.com") for n in range(users)]
            yield stack.url("gateway"), tokens, True
        finally:
            stack.stop()


def upload_samples(url: str, tokens: Sequence[str], timeout_s: float = 300.0) -> int:
    """Upload the bundled sample documents as each user (again: answered as duplicates) and
    wait until they are ready; how many documents each user has."""
    from ragctl.cli import sample_paths, upload, wait_ready

    paths = sample_paths()
    for token in dict.fromkeys(tokens):  # each distinct user once
        with httpx.Client(
            base_url=url, timeout=60.0, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            uploaded = [upload(client, path) for path in paths]
            for doc in uploaded:
                doc = wait_ready(client, doc["id"], timeout_s)
                if doc["status"] != "ready":
                    raise BenchError(
                        f"the sample document {doc['title']!r} is {doc['status']}: "
                        f"{doc.get('error') or 'not ready in time'}"
                    )
    return len(paths)


def run_chat_bench(config: ChatBenchConfig, kind: str = "chat") -> tuple[dict[str, Any], Path]:
    """Run every step; write <kind>.json and the plots; the report and its folder. kind
    "search" loads POST /v1/search instead of the chat."""
    send: Send
    if kind == "chat":
        send = functools.partial(stream_chat, max_tokens=config.max_tokens)
    else:
        send = search_once
    steps = sorted(set(config.concurrency))
    if not steps or steps[0] < 1:
        raise BenchError("concurrency steps must be positive integers")
    if not config.questions:
        raise BenchError("no questions to ask")
    users = max(1, math.ceil(steps[-1] / STREAMS_PER_USER))
    started_at = datetime.now(UTC)
    output = config.output_dir or Path("bench-results") / started_at.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {
        "kind": kind,
        "version": 1,
        "started_at": started_at.isoformat().replace("+00:00", "Z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    with _target(config, users) as (url, tokens, local):
        report.update(target=url, local_stack=local, stack_env=dict(config.stack_env))
        documents = upload_samples(url, tokens) if config.upload_samples else 0
        report["config"] = {
            "concurrency": steps,
            "step_s": config.step_s,
            "max_tokens": config.max_tokens,
            "users": len(set(tokens)),
            "questions": len(config.questions),
            "sample_documents_per_user": documents,
        }
        total_ticks = int(config.step_s) * len(steps)
        bar = progress_bar(total_ticks, f"{kind} load", config.show_progress)
        results = []
        try:
            for concurrency in steps:
                samples, duration = asyncio.run(
                    _timed_step(url, tokens, config, concurrency, send, bar.update)
                )
                results.append(step_report(concurrency, samples, duration))
        finally:
            bar.close()
    report["steps"] = results
    report["summary"] = run_summary(results)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{kind}.json").write_text(json.dumps(report, indent=1))
    if config.plots:
        plot_chat(report, output, kind)
    return report, output


async def _timed_step(
    url: str,
    tokens: Sequence[str],
    config: ChatBenchConfig,
    concurrency: int,
    send: Send,
    advance: Callable[[int], Any],
) -> tuple[list[ChatSample], float]:
    """A step, moving the progress bar one tick per second of it (all of its ticks by its
    end, however long the last chats took)."""
    ticks = int(config.step_s)
    done = 0

    async def ticker() -> None:
        nonlocal done
        while done < ticks:
            await asyncio.sleep(1.0)
            done += 1
            advance(1)

    ticking = asyncio.create_task(ticker())
    try:
        return await run_step(
            url,
            tokens,
            config.questions,
            concurrency,
            config.step_s,
            send,
            timeout_s=config.request_timeout_s,
        )
    finally:
        ticking.cancel()
        if done < ticks:
            advance(ticks - done)


# Output ----------------------------------------------------------------------------------


def _ms(summary: dict[str, float] | None, key: str) -> str:
    return f"{summary[key] * 1000:.0f}" if summary else "-"


def format_chat_table(report: dict[str, Any]) -> str:
    """The steps as a fixed-width table (times in milliseconds)."""
    header = (
        f"{'conc':>4} {'reqs':>5} {'ok':>5} {'429':>4} {'503':>4} {'err':>4} {'req/s':>6} "
        f"{'tok/s':>6} {'TTFT50':>7} {'TTFT95':>7} {'TTFT99':>7} {'ITL50':>6} {'ITL95':>6} "
        f"{'E2E50':>7} {'E2E95':>7} {'shed50':>6}"
    )
    lines = [header, "-" * len(header)]
    for step in report["steps"]:
        lines.append(
            f"{step['concurrency']:>4} {step['requests']:>5} {step['ok']:>5} "
            f"{step['rate_limited']:>4} {step['overloaded']:>4} {step['errors']:>4} "
            f"{step['requests_per_s']:>6.2f} {step['output_tokens_per_s']:>6.1f} "
            f"{_ms(step['ttft_s'], 'p50'):>7} {_ms(step['ttft_s'], 'p95'):>7} "
            f"{_ms(step['ttft_s'], 'p99'):>7} {_ms(step['itl_s'], 'p50'):>6} "
            f"{_ms(step['itl_s'], 'p95'):>6} {_ms(step['e2e_s'], 'p50'):>7} "
            f"{_ms(step['e2e_s'], 'p95'):>7} {_ms(step['shed_s'], 'p50'):>6}"
        )
    stages = [
        (step["concurrency"], step["stages_ms"]) for step in report["steps"] if step["stages_ms"]
    ]
    if stages:
        names = [n for n in STAGE_ORDER if any(n in s for _, s in stages)]
        lines += ["", "where the time to first token went (gateway's server_timing, p50 ms):"]
        lines.append(f"{'conc':>4} " + " ".join(f"{n[:14]:>14}" for n in names))
        for concurrency, by_name in stages:
            cells = [f"{by_name[n]['p50']:>14.1f}" if n in by_name else f"{'-':>14}" for n in names]
            lines.append(f"{concurrency:>4} " + " ".join(cells))
    summary = report.get("summary", {})
    if summary.get("unloaded_ttft_p50_s") is not None:
        shed = summary.get("shedding_starts_at")
        lines += [
            "",
            f"unloaded TTFT p50 {summary['unloaded_ttft_p50_s'] * 1000:.0f} ms; peak "
            f"{summary['peak_output_tokens_per_s']:.1f} output tokens/s at concurrency "
            f"{summary['peak_at_concurrency']}; shedding "
            + (f"from concurrency {shed}" if shed else "not reached")
            + f"; the stage that grew most: {summary.get('slowest_growing_stage')}",
        ]
    return "\n".join(lines)


def plot_chat(report: dict[str, Any], output: Path, kind: str = "chat") -> list[Path]:
    """<kind>-latency.png (TTFT, ITL and end-to-end percentiles) and <kind>-throughput.png
    (requests and output tokens per second, and the share shed) against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    x = [s["concurrency"] for s in steps]

    def series(key: str, q: str) -> list[float]:
        return [s[key][q] * 1000 if s[key] else math.nan for s in steps]

    written = []
    fig, (ttft, itl, e2e) = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, key, title in (
        (ttft, "ttft_s", "time to first token"),
        (itl, "itl_s", "inter-token latency"),
        (e2e, "e2e_s", "end-to-end latency"),
    ):
        axis.set(title=title, xlabel="concurrent clients", ylabel="ms", xscale="log")
        axis.set_xticks(x, [str(c) for c in x])
        lines = {q: series(key, q) for q in ("p50", "p95", "p99")}
        if not any(math.isfinite(v) for values in lines.values() for v in values):
            # nothing measured (a search has no tokens; every chat refused)
            axis.text(0.5, 0.5, "not measured", ha="center", transform=axis.transAxes)
            continue
        for q, values in lines.items():
            axis.plot(x, values, marker="o", label=q)
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    fig.suptitle(f"{report['kind']}: {report['target']}")
    fig.tight_layout()
    path = output / f"{kind}-latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    fig, (rate, shed) = plt.subplots(1, 2, figsize=(11, 4.5))
    rate.plot(x, [s["output_tokens_per_s"] for s in steps], marker="o", label="output tokens/s")
    rate.set(title="throughput", xlabel="concurrent clients", ylabel="output tokens/s")
    rate.set_xscale("log")
    rate.set_xticks(x, [str(c) for c in x])
    requests = rate.twinx()
    requests.plot(
        x,
        [s["requests_per_s"] for s in steps],
        marker="s",
        color="tab:orange",
        label="answered/s",
    )
    requests.set_ylabel("answered requests/s")
    rate.legend(loc="upper left")
    requests.legend(loc="lower right")
    rate.grid(True, alpha=0.3)
    shed.bar(
        [str(c) for c in x],
        [100 * s["shed_share"] for s in steps],
        color="tab:red",
        label="429 + 503",
    )
    shed.set(title="refused (429, 503)", xlabel="concurrent clients", ylabel="% of requests")
    shed.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = output / f"{kind}-throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


# The command line ------------------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# `ragctl bench <what>` without --url: the service benchmark of that path, from benchmarks/.
SERVICE_BENCHMARKS = {
    "embed": ("bench_embedder.py", []),
    "search": ("bench_retriever.py", ["--skip-ingestion"]),
    "ingest": ("bench_retriever.py", ["--skip-index"]),
}


def read_questions(path: Path) -> list[str]:
    """Questions from a file: one per line, or a BEIR queries.jsonl (its `text` fields)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if path.suffix == ".jsonl":
        return [str(json.loads(line)["text"]) for line in lines]
    return lines


def tokens_from_args(args: Any) -> list[str]:
    """The access tokens a run against --url speaks with: --token, or Cognito sign-ins."""
    tokens = list(args.token or [])
    if args.username:
        from ragctl.cognito import password_token

        passwords = list(args.password or [])
        if not passwords and os.environ.get("RAG_PASSWORD"):
            passwords = [os.environ["RAG_PASSWORD"]] * len(args.username)
        if not args.cognito_client_id or len(passwords) != len(args.username):
            raise BenchError(
                "--username needs --cognito-client-id and one --password (or RAG_PASSWORD) per user"
            )
        region = args.region or os.environ.get("AWS_REGION") or "us-east-1"
        for username, password in zip(args.username, passwords, strict=True):
            try:
                tokens.append(password_token(region, args.cognito_client_id, username, password))
            except Exception as exc:  # botocore's errors: a wrong password, no such client
                raise BenchError(f"signing in {username} to Cognito failed: {exc}") from exc
    return tokens


def cmd_bench_load(args: Any) -> int:
    """`ragctl bench chat`, and `ragctl bench search --url`."""
    kind = args.what
    if kind != "chat" and args.url is None:
        return run_service_benchmark(kind, args.extra)
    try:
        concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        print("--concurrency takes integers separated by commas", file=sys.stderr)
        return 2
    try:
        config = ChatBenchConfig(
            url=args.url,
            tokens=tokens_from_args(args) if args.url else (),
            concurrency=concurrency,
            step_s=args.step_seconds,
            max_tokens=getattr(args, "max_tokens", 64),
            questions=read_questions(Path(args.questions)) if args.questions else SAMPLE_QUESTIONS,
            upload_samples=not args.no_upload,
            output_dir=Path(args.output_dir) if args.output_dir else None,
            plots=not args.no_plots,
            show_progress=not args.no_progress,
            stack_env=dict(item.split("=", 1) for item in args.stack_env if "=" in item),
        )
        report, output = run_chat_bench(config, kind)
    except (BenchError, RuntimeError, OSError, ValueError, KeyError, httpx.HTTPError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    print(format_chat_table(report))
    print(f"\nreport: {output}/{kind}.json" + ("" if args.no_plots else f" (and {kind}-*.png)"))
    return 0


def run_service_benchmark(what: str, extra: Sequence[str]) -> int:
    """Run the service benchmark of a path (it starts what it measures on free ports)."""
    import subprocess

    if what not in SERVICE_BENCHMARKS:
        print(f"`ragctl bench {what}` measures a deployment only with --url", file=sys.stderr)
        return 2
    script, fixed = SERVICE_BENCHMARKS[what]
    path = BENCHMARKS / script
    if not path.is_file():
        print(
            f"the service benchmarks live in the repository's benchmarks/ folder ({path} is "
            "missing): run ragctl from a clone, or give --url to measure a deployment",
            file=sys.stderr,
        )
        return 1
    extra = [arg for arg in extra if arg != "--"]
    return subprocess.call([sys.executable, str(path), *fixed, *extra])


def cmd_bench_ingest(args: Any) -> int:
    """`ragctl bench ingest`: the service benchmark, or with --url, documents through the
    public API: the time from the first upload until all are ready."""
    if args.url is None:
        return run_service_benchmark("ingest", args.extra)
    try:
        tokens = tokens_from_args(args)
        if not tokens:
            raise BenchError("--url needs --token, or Cognito credentials to get one")
        result = ingest_through_api(args.url, tokens[0], args.documents, args.batch)
    except (BenchError, RuntimeError, httpx.HTTPError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    output = Path(args.output_dir or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S"))
    output.mkdir(parents=True, exist_ok=True)
    (output / "ingest.json").write_text(json.dumps(result, indent=1))
    print(
        f"{result['documents']} documents ({result['chunks']} chunks) ready in "
        f"{result['seconds']:.1f} s: {result['documents_per_s']:.2f} documents/s, "
        f"{result['chunks_per_s']:.1f} chunks/s\nreport: {output}/ingest.json"
    )
    return 0


def ingest_through_api(url: str, token: str, documents: int, batch: int) -> dict[str, Any]:
    """Upload `documents` new documents (the samples' sections, made unique) in batches and
    wait until every one is ready; how long it took. They are deleted afterwards."""
    from ragctl.cli import sample_paths

    sections = [
        part.strip()
        for path in sample_paths()
        for part in path.read_text(encoding="utf-8").split("\n## ")
        if len(part.strip()) > 80
    ]
    run = f"{time.time_ns():x}"
    bodies = [
        {
            "title": f"bench {run} {n}",
            "text": f"{sections[n % len(sections)]}\n\n(load run {run}, document {n})",
            "metadata": {"bench": run},
        }
        for n in range(documents)
    ]
    headers = {"Authorization": f"Bearer {token}"}
    tag = json.dumps({"bench": run})
    with httpx.Client(base_url=url, timeout=120.0, headers=headers) as client:
        started = time.perf_counter()
        ids: list[str] = []
        for first in range(0, len(bodies), batch):
            resp = _call(
                client,
                "POST",
                "/v1/documents/batch",
                202,
                json={"documents": bodies[first : first + batch]},
            )
            ids += [doc["id"] for doc in resp.json()["data"]]
        uploaded_s = time.perf_counter() - started
        # One call a poll, for all of them (a deployment allows a user 120 calls a minute).
        deadline = time.monotonic() + 3600
        while True:
            counts = _call(client, "GET", "/v1/documents/summary", params={"metadata": tag})
            waiting = counts.json()["pending"] + counts.json()["processing"]
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{waiting} documents were not ready within an hour")
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        chunks, failed = 0, counts.json()["failed"]
        cursor: str | None = None
        while True:  # the chunk counts, a page at a time
            params = {"metadata": tag, "limit": 100, **({"cursor": cursor} if cursor else {})}
            page = _call(client, "GET", "/v1/documents", params=params).json()
            chunks += sum(int(doc.get("chunk_count") or 0) for doc in page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                break
        for doc_id in ids:
            _call(client, "DELETE", f"/v1/documents/{doc_id}", 204)
    return {
        "kind": "ingest",
        "target": url,
        "documents": len(ids),
        "failed": failed,
        "chunks": chunks,
        "upload_s": uploaded_s,
        "seconds": seconds,
        "documents_per_s": len(ids) / seconds,
        "chunks_per_s": chunks / seconds,
    }


def _call(
    client: httpx.Client, method: str, path: str, ok: int = 200, **kwargs: Any
) -> httpx.Response:
    """One call to the gateway; a 429 or 503 is waited out as its retry-after says (a few
    times), anything else but `ok` (or 200) stops the run with the gateway's message."""
    for _ in range(20):
        resp = client.request(method, path, **kwargs)
        if resp.status_code not in SHED_STATUSES:
            break
        time.sleep(min((_retry_after_ms(resp.headers) or 1000.0) / 1000.0, 30.0))
    if resp.status_code not in (ok, 200):
        raise BenchError(f"{method} {path} failed: {_error_of(resp)}")
    return resp


def _add_target_args(parser: Any) -> None:
    parser.add_argument(
        "--url", help="a running gateway (a deployment) instead of a local stack for the run"
    )
    parser.add_argument(
        "--token", action="append", help="with --url: an access token (repeat for more users)"
    )
    parser.add_argument(
        "--cognito-client-id", help="with --url: sign in to this Cognito app client"
    )
    parser.add_argument("--region", help="the Cognito pool's region (default: $AWS_REGION)")
    parser.add_argument("--username", action="append", help="a Cognito user (repeatable)")
    parser.add_argument(
        "--password", action="append", help="its password (repeatable; or $RAG_PASSWORD)"
    )
    parser.add_argument("--output-dir", help="default: bench-results/<timestamp>")


def add_bench_parser(sub: Any) -> None:
    """`ragctl bench chat|search|ingest|embed`."""
    bench = sub.add_parser("bench", help="load-test the platform")
    what = bench.add_subparsers(dest="what", required=True)
    for name, help_text in (
        ("chat", "streaming chat at rising concurrency: TTFT, ITL, throughput, shedding"),
        (
            "search",
            "the retriever's benchmark (HNSW vs exact, hybrid vs vector); with --url, "
            "POST /v1/search at rising concurrency",
        ),
    ):
        load = what.add_parser(name, help=help_text, description=help_text)
        _add_target_args(load)
        load.add_argument(
            "--concurrency",
            default=",".join(str(c) for c in DEFAULT_CONCURRENCY),
            help="the steps, comma-separated (default: %(default)s)",
        )
        load.add_argument("--step-seconds", type=float, default=20.0, help="each step's length")
        if name == "chat":
            load.add_argument("--max-tokens", type=int, default=64, help="per answer")
        load.add_argument(
            "--questions", help="a file of questions, one per line, or a BEIR queries.jsonl"
        )
        load.add_argument(
            "--no-upload", action="store_true", help="do not upload the sample documents first"
        )
        load.add_argument(
            "--stack-env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a setting of the local stack started for the run (repeatable), e.g. "
            "GATEWAY_MAX_QUEUE_WAIT_S=0",
        )
        load.add_argument("--no-plots", action="store_true", help="JSON and table only")
        load.add_argument("--no-progress", action="store_true", help="no progress bar")
        load.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        load.set_defaults(func=cmd_bench_load)
    ingest = what.add_parser(
        "ingest",
        help="the ingestion benchmark (retriever + embedder vs the embedder alone); with "
        "--url, documents through the public API until ready",
    )
    _add_target_args(ingest)
    ingest.add_argument("--documents", type=int, default=200, help="with --url: how many")
    ingest.add_argument("--batch", type=int, default=50, help="with --url: per batch upload")
    ingest.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ingest.set_defaults(func=cmd_bench_ingest)
    embed = what.add_parser(
        "embed", help="the embedder server vs in-process sentence-transformers (local only)"
    )
    embed.add_argument("extra", nargs=argparse.REMAINDER, help="passed to bench_embedder.py")
    embed.set_defaults(func=lambda args: run_service_benchmark("embed", args.extra))
