"""benchmarks/locustfile.py run as a user runs it: Locust headless against the session's
stack, a bounded number of tasks under a time cap, read back from its JSON stats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ragctl.stack import Stack, wait_ready
from services.common.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCUST = Path(sys.executable).parent / "locust"
LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"


@dataclass
class Run:
    code: int
    stats: dict[tuple[str, str], dict[str, Any]]  # Locust's JSON stats by (type, name)
    log: str  # its log and error report

    def count(self, key: tuple[str, str], field: str = "num_requests") -> float:
        return float(self.stats[key][field])

    def mean_ms(self, key: tuple[str, str]) -> float:
        return self.count(key, "total_response_time") / self.count(key)

    def mean_size(self, key: tuple[str, str]) -> float:
        return self.count(key, "total_content_length") / self.count(key)


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[str]:
    """A gateway process of the stack's kind that sheds by the count of waiting chats only
    (GATEWAY_MAX_QUEUE_WAIT_S=0): the tests count every task, so the delay-based shedding,
    whose bound the earlier tests' load may have cut, must not refuse one here (it has tests
    of its own, tests/test_bench.py)."""
    _, env = stack.specs["gateway"]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        env={**os.environ, **env, "GATEWAY_PORT": str(port), "GATEWAY_MAX_QUEUE_WAIT_S": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_ready(url, 60.0, proc), "the gateway did not start"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_locust(stack: Stack, host: str, env: dict[str, str], *, users: int, run_time: str) -> Run:
    """Run Locust headless against the gateway at host, at most run_time (then the requests
    in flight finish), and read back its stats."""
    command = [
        str(LOCUST),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        run_time,
        "--stop-timeout",
        "60",
        "--only-summary",
        "--json",  # the stats, on stdout; the log and error report go to stderr
        "--host",
        host,
    ]
    # none of the caller's RAG_* settings (a token, weights): only those the test gives
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**base, "RAGCTL_HOME": str(stack.home), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, log = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, log = proc.communicate()
        pytest.fail(f"locust still running after 300 s:\n{log[-4000:]}")
    try:
        entries = json.loads(out)
    except ValueError:
        pytest.fail(f"locust printed no stats (exit code {proc.returncode}):\n{log[-4000:]}")
    stats = {(entry["method"], entry["name"]): entry for entry in entries}
    return Run(proc.returncode, stats, log)


def test_locust_against_the_stack(stack: Stack, gateway: str) -> None:
    """Three users (each its own emulator user) stream, chat and search without a failure:
    three chats at once are within the gateway's bound, so a 429 or 503 is a real failure."""
    run = run_locust(
        stack,
        gateway,
        # the mix is dealt from a deck: with one card of each kind and three tasks a user,
        # each user runs each kind once, then the run ends
        {
            "RAG_MAX_TOKENS": "16",
            "RAG_WEIGHT_STREAM": "1",
            "RAG_WEIGHT_CHAT": "1",
            "RAG_WEIGHT_SEARCH": "1",
            "RAG_ITERATIONS": "3",
        },
        users=3,
        run_time="180s",
    )
    assert run.code == 0, run.log[-4000:]
    assert "--run-time limit reached" not in run.log  # it ended when the users were done
    expected = {
        ("documents", "ready"): 9,  # three samples for each of the three users
        ("chat-stream", "TTFT"): 3,
        ("chat-stream", "TPOT"): 3,
        ("chat-stream", "total"): 3,
        ("chat", "total"): 3,
        ("search", "k=4"): 3,
    }
    for key, count in expected.items():
        assert key in run.stats, f"no {key} in the stats:\n{run.log[-4000:]}"
        assert run.count(key) == count, key
    kinds = {key for key in run.stats if key[0] != "stage"}  # stages: when the gateway says
    assert kinds == {*expected, ("chat-stream", "ITL")}, sorted(kinds)
    assert not any(entry["num_failures"] for entry in run.stats.values()), run.log[-4000:]

    ttft, total = ("chat-stream", "TTFT"), ("chat-stream", "total")
    assert 0 < run.mean_ms(ttft) < run.mean_ms(total)
    assert run.count(ttft, "max_response_time") < run.count(total, "max_response_time")
    assert 1 < run.mean_size(total) <= 16  # size = output tokens
    itl, tpot = ("chat-stream", "ITL"), ("chat-stream", "TPOT")
    assert run.count(itl) > run.count(total)  # one per gap between two tokens
    assert 0 < run.mean_ms(itl) < run.mean_ms(total)
    assert 0 < run.mean_ms(tpot) < run.mean_ms(total)
    assert 1 <= run.mean_size(("chat", "total")) <= 16
    assert run.mean_size(("search", "k=4")) == 4  # size = hits


def test_locust_reports_a_wrong_token(stack: Stack, gateway: str) -> None:
    """A token the gateway refuses makes every request a failure and Locust exit 1, the 401
    in its error report, rather than a run that looks clean."""
    run = run_locust(
        stack, gateway, {"RAG_TOKEN": "garbage", "RAG_ITERATIONS": "16"}, users=1, run_time="60s"
    )
    assert run.code == 1, run.log[-4000:]
    assert {name for _, name in run.stats} == {"error"}, sorted(run.stats)
    for key in run.stats:
        assert run.count(key) == run.count(key, "num_failures") > 0, key
    assert {kind for kind, _ in run.stats} == {"documents", "chat-stream", "chat", "search"}
    assert "RequestFailed('401 invalid_token" in run.log, run.log[-4000:]


def test_locust_with_a_cognito_password(stack: Stack, gateway: str) -> None:
    """The deployment's way in (a Cognito app client, a username and a password), here
    against the stack's emulator: every user shares that one identity, which uploads the
    samples once."""
    assert stack.pool is not None
    password = stack.pool.create_user("locust-cognito@example.com")
    run = run_locust(
        stack,
        gateway,
        {
            "RAG_COGNITO_CLIENT_ID": stack.pool.client_id,
            "RAG_USERNAME": "locust-cognito@example.com",
            "RAG_PASSWORD": password,
            "AWS_REGION": "us-east-1",
            # boto3 sends the sign-in to the emulator instead of AWS
            "AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER": stack.pool.endpoint,
            "RAG_MAX_TOKENS": "8",
            "RAG_WEIGHT_CHAT": "0",
            "RAG_WEIGHT_STREAM": "1",
            "RAG_WEIGHT_SEARCH": "1",
            "RAG_ITERATIONS": "2",
        },
        users=2,
        run_time="180s",
    )
    assert run.code == 0, run.log[-4000:]
    assert run.count(("documents", "ready")) == 3  # once for the identity, not per user
    assert run.count(("chat-stream", "total")) == 2
    assert run.count(("search", "k=4")) == 2
    assert ("chat", "total") not in run.stats
