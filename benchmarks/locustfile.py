"""Locust load test of the platform's public API: streaming chat, plain chat and search.

    locust -f benchmarks/locustfile.py --headless -u 4 -r 2 -t 30s   # against `make up`
    locust -f benchmarks/locustfile.py                               # web UI on :8089

Who the requests are sent as (the first that applies):
  RAG_TOKEN               one access token, used by every Locust user (give --host).
  RAG_COGNITO_CLIENT_ID   with RAG_USERNAME and RAG_PASSWORD (and AWS_REGION, default
                          us-east-1): sign in to a real Cognito pool (USER_PASSWORD_AUTH, the
                          app client deploy/aws creates); every Locust user shares that user.
  otherwise               the local stack whose state folder is RAGCTL_HOME (default .data):
                          each Locust user signs in as its own emulator user
                          (locust-<n>@example.com), so per-user limits do not shape the load,
                          and --host defaults to the stack's gateway.
With one shared identity the gateway's per-user stream cap (GATEWAY_MAX_CONCURRENT_STREAMS)
bounds how many chats run at once, whatever -u says.

Each identity uploads the bundled sample documents once (a re-upload answers 200 duplicate)
and waits until they are ready (RAG_UPLOAD=0 skips that). Then each user loops over:
  RAG_WEIGHT_STREAM (6)   streaming chat: TTFT, ITL, TPOT, total, output tokens
  RAG_WEIGHT_CHAT (1)     non-streaming chat: total, output tokens (usage.completion_tokens)
  RAG_WEIGHT_SEARCH (1)   search only, k=4
RAG_MAX_TOKENS (64) caps each answer (temperature 0). RAG_WAIT_S is the wait between a user's
requests: "0" (default: each user keeps one request in flight, so -u is the concurrency the
gateway sees, the figure TTFT and ITL are judged against) or "MIN-MAX" seconds (think time).
RAG_ITERATIONS (0: no limit) makes each user stop after that many tasks and the run end when
all have (bounded work; -t still bounds the time). RAG_TIMEOUT_S (120) is the read timeout.
RAG_RETRY_AFTER (1) makes a user that was shed (429 or 503) wait what Retry-After says (at
most 10 s), as the OpenAI SDK does; 0 retries at once.

Metrics (Type / Name in Locust's tables; times in ms):
  chat-stream / TTFT      request sent to the first content delta
  chat-stream / ITL       each gap between two content deltas (its req/s is tokens/s)
  chat-stream / TPOT      one per request: the mean of its gaps
  chat-stream / total     request sent to the end of the stream; size = output tokens
  chat / total            non-streaming chat; size = output tokens
  search / k=4            one search
  documents / ready       one sample document, upload to ready
  <type> / shed 429|503   shed requests (the reason is in the failures table); kept apart so
                          that the latencies above are those of accepted requests
  <type> / error          any other failure: a status, an error event in the stream, no tokens
  stage / <name>          when the gateway sends `server_timing` (stage -> ms) in an event
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped]
import requests
from gevent.lock import Semaphore  # type: ignore[import-untyped]
from locust import TaskSet, User, between, constant, events, task
from locust.exception import StopUser
from locust.runners import STATE_RUNNING, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ragctl.bench import SAMPLE_QUESTIONS  # noqa: E402
from ragctl.cli import DEFAULT_HOME, sample_paths  # noqa: E402
from ragctl.cognito import LocalPool, password_token  # noqa: E402

QUESTIONS = SAMPLE_QUESTIONS  # about the bundled samples, which each identity uploads
SHED = (429, 503)  # the statuses the gateway sheds load with
RETRY_AFTER_MAX_S = 10.0
# Cognito access tokens last an hour (deploy/aws and the emulator): sign in again before.
TOKEN_REFRESH_S = 45 * 60
READY_TIMEOUT_S = 180.0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _wait_time() -> Callable[[Any], float]:
    spec = os.environ.get("RAG_WAIT_S") or "0"
    low, _, high = spec.partition("-")
    return between(float(low), float(high)) if high else constant(float(low))


MAX_TOKENS = _env_int("RAG_MAX_TOKENS", 64)
TIMEOUT_S = float(os.environ.get("RAG_TIMEOUT_S") or 120)
HONOR_RETRY_AFTER = os.environ.get("RAG_RETRY_AFTER", "1") != "0"
UPLOAD = os.environ.get("RAG_UPLOAD", "1") != "0"
ITERATIONS = _env_int("RAG_ITERATIONS", 0)
FINISHED_USERS = 0  # users of this process that ran their RAG_ITERATIONS tasks


class RequestFailed(Exception):
    """A failed request, as Locust's failures table shows it."""


@dataclass
class Identity:
    """Who requests are sent as: a token (signed in again before it expires) and whether
    its documents are uploaded. The lock makes one user do each, the others wait."""

    sign_in: Callable[[], str]
    refreshable: bool = True
    token: str = ""
    signed_in_at: float = 0.0
    documents_ready: bool = False
    lock: Semaphore = field(default_factory=Semaphore)

    def bearer(self) -> str:
        with self.lock:
            stale = time.monotonic() - self.signed_in_at > TOKEN_REFRESH_S
            if not self.token or (self.refreshable and stale):
                self.token = self.sign_in()
                self.signed_in_at = time.monotonic()
        return f"Bearer {self.token}"


def _local_state(home: str) -> dict[str, Any]:
    path = Path(home) / "stack.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SystemExit(
            f"no running local stack: {path} is missing or unreadable. Start one with "
            "`make up` (or set RAGCTL_HOME to its folder), or set RAG_TOKEN, or "
            "RAG_COGNITO_CLIENT_ID, RAG_USERNAME and RAG_PASSWORD, and give --host"
        ) from None
    return state


def _shared_identity() -> Identity | None:
    """The identity every user shares (modes 1 and 2), or None for the local stack."""
    if token := os.environ.get("RAG_TOKEN"):
        return Identity(sign_in=lambda: token, refreshable=False)
    if client_id := os.environ.get("RAG_COGNITO_CLIENT_ID"):
        username, password = os.environ.get("RAG_USERNAME"), os.environ.get("RAG_PASSWORD")
        if not (username and password):
            raise SystemExit("RAG_COGNITO_CLIENT_ID needs RAG_USERNAME and RAG_PASSWORD")
        region = os.environ.get("AWS_REGION") or "us-east-1"
        return Identity(sign_in=lambda: password_token(region, client_id, username, password))
    return None


SHARED = _shared_identity()
LOCAL = None if SHARED else _local_state(os.environ.get("RAGCTL_HOME") or DEFAULT_HOME)
USER_NUMBERS = itertools.count(1)  # this process's users, for their emulator user names
SAMPLES = [(path.name, path.read_bytes()) for path in sample_paths()]


def _error_text(resp: requests.Response) -> str:
    """`<status> <code>: <message>` from the error envelope, or the start of the body."""
    try:
        error = resp.json()["error"]
        return f"{resp.status_code} {error.get('code') or error.get('type')}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{resp.status_code}: {resp.text[:120]}"


def _retry_after_s(resp: requests.Response) -> float:
    """The wait a shed response asks for: retry-after-ms (OpenAI's), else Retry-After in
    seconds (RFC 9110); capped, since a load test should keep probing."""
    try:
        if ms := resp.headers.get("retry-after-ms"):
            return min(float(ms) / 1000, RETRY_AFTER_MAX_S)
        return min(float(resp.headers.get("Retry-After") or 0), RETRY_AFTER_MAX_S)
    except ValueError:
        return 0.0


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class Mix(TaskSet):
    """The task mix, dealt from a shuffled deck with each kind in it as often as its weight
    (Locust draws with replacement): every user runs the exact ratio, and a short run with
    few users still runs every kind."""

    user: ChatUser
    deck: list[TaskSet | Callable[..., Any]]
    left = ITERATIONS  # tasks this user still runs, with RAG_ITERATIONS

    @task(_env_int("RAG_WEIGHT_STREAM", 6))
    def chat_stream(self) -> None:
        self.user.chat_stream()

    @task(_env_int("RAG_WEIGHT_CHAT", 1))
    def chat(self) -> None:
        self.user.chat()

    @task(_env_int("RAG_WEIGHT_SEARCH", 1))
    def search(self) -> None:
        self.user.search()

    def get_next_task(self) -> TaskSet | Callable[..., Any]:
        if not self.tasks:
            raise RuntimeError("every RAG_WEIGHT_* is 0: no task to run")
        if ITERATIONS:
            if self.left == 0:
                self._end_when_all_done()
                raise StopUser()
            self.left -= 1
        if not getattr(self, "deck", None):
            self.deck = random.sample(self.tasks, len(self.tasks))
        return self.deck.pop()

    def _end_when_all_done(self) -> None:
        """With RAG_ITERATIONS, end the run when the last user is done: quit a headless run
        (its stats printed as at -t), stop a web-UI one. Workers leave that to the master."""
        global FINISHED_USERS
        FINISHED_USERS += 1
        environment, runner = self.user.environment, self.user.environment.runner
        if runner is None or isinstance(runner, WorkerRunner):
            return
        if runner.state == STATE_RUNNING and FINISHED_USERS >= runner.target_user_count:
            headless = environment.parsed_options and environment.parsed_options.headless
            gevent.spawn(runner.quit if headless else runner.stop)


def _count_afresh(**_kwargs: Any) -> None:
    global FINISHED_USERS
    FINISHED_USERS = 0


# a web UI runs several tests in one process
events.test_start.add_listener(_count_afresh)  # type: ignore[no-untyped-call]


class ChatUser(User):
    """One client of the gateway. A plain User with its own requests session, so that every
    metric is one this file fires: Locust's HttpUser would also report each stream at the
    time of its headers. (FastHttpUser's reads wait for a full buffer, which would delay
    the SSE events and spoil TTFT and ITL.)"""

    host = LOCAL["gateway_url"] if LOCAL else None
    wait_time = _wait_time()
    tasks = [Mix]

    def on_start(self) -> None:
        if not self.host:
            raise RuntimeError("give the gateway's URL with --host (https://...)")
        self.base = self.host.rstrip("/")
        self.session = requests.Session()
        self.identity = SHARED or self._local_identity()
        if UPLOAD:
            self._upload_documents()

    def on_stop(self) -> None:
        self.session.close()

    def _local_identity(self) -> Identity:
        assert LOCAL is not None
        pool = LocalPool(**LOCAL["cognito"])
        runner = self.environment.runner
        worker = f"w{runner.worker_index}-" if isinstance(runner, WorkerRunner) else ""
        username = f"locust-{worker}{next(USER_NUMBERS)}@example.com"
        return Identity(sign_in=lambda: pool.user_token(username))

    # -- reporting ------------------------------------------------------------------------

    def _fire(
        self,
        request_type: str,
        name: str,
        response_time_ms: float,
        response_length: int = 0,
        exception: Exception | None = None,
    ) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=response_time_ms,
            response_length=response_length,
            exception=exception,
            context=self.context(),
        )

    def _fail(
        self, request_type: str, start: float, resp: requests.Response | None, why: str
    ) -> None:
        """Report a failure; a shed one under its own name, after which the user waits."""
        elapsed = _ms(time.perf_counter() - start)
        if resp is not None and resp.status_code in SHED:
            self._fire(request_type, f"shed {resp.status_code}", elapsed, 0, RequestFailed(why))
            if HONOR_RETRY_AFTER:
                gevent.sleep(_retry_after_s(resp))
            return
        self._fire(request_type, "error", elapsed, 0, RequestFailed(why))

    def _stages(self, event: dict[str, Any]) -> None:
        timing = event.get("server_timing")
        if isinstance(timing, dict):
            for stage, ms in timing.items():
                if isinstance(ms, int | float):
                    self._fire("stage", str(stage), float(ms))

    # -- requests -------------------------------------------------------------------------

    def _post(self, path: str, authorization: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": authorization}
        return self.session.post(self.base + path, headers=headers, timeout=TIMEOUT_S, **kwargs)

    def _upload_documents(self) -> None:
        """Upload the samples once per identity and wait until they are ready."""
        with self.identity.lock:  # the other users of a shared identity wait here
            if self.identity.documents_ready:
                return
            self.identity.documents_ready = True  # tried once: a failure shows in the stats
            for filename, content in SAMPLES:
                self._upload(filename, content)

    def _upload(self, filename: str, content: bytes) -> None:
        start = time.perf_counter()
        try:
            headers = {"Authorization": f"Bearer {self.identity.token or self._sign_in()}"}
            resp = self.session.post(
                f"{self.base}/v1/documents",
                headers=headers,
                files={"file": (filename, content, "text/markdown")},
                data={"title": Path(filename).stem.replace("-", " ")},
                timeout=TIMEOUT_S,
            )
            if resp.status_code not in (200, 202):
                return self._fail("documents", start, resp, _error_text(resp))
            doc_id = resp.json()["id"]
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                resp = self.session.get(
                    f"{self.base}/v1/documents/{doc_id}", headers=headers, timeout=TIMEOUT_S
                )
                if resp.status_code != 200:
                    return self._fail("documents", start, resp, _error_text(resp))
                status = resp.json()["status"]
                if status == "ready":
                    return self._fire("documents", "ready", _ms(time.perf_counter() - start))
                if status == "failed" or time.monotonic() > deadline:
                    why = f"{filename} {status}: {resp.json().get('error')}"
                    return self._fail("documents", start, None, why)
                gevent.sleep(0.5)
        except requests.RequestException as exc:
            self._fail("documents", start, None, f"{type(exc).__name__}: {exc}")

    def _sign_in(self) -> str:
        """The token, signing in first (the lock is held by the caller, so not via bearer)."""
        self.identity.token = self.identity.sign_in()
        self.identity.signed_in_at = time.monotonic()
        return self.identity.token

    def _chat_body(self, stream: bool) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": random.choice(QUESTIONS)}],
            "stream": stream,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            # OpenAI's way to ask for usage in the stream; counted deltas stand in without it
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }

    def chat_stream(self) -> None:
        authorization = self.identity.bearer()  # a sign-in is not the chat's time
        start = time.perf_counter()
        token_times: list[float] = []
        usage_tokens: int | None = None
        try:
            resp = self._post(
                "/v1/chat/completions", authorization, json=self._chat_body(True), stream=True
            )
            with resp:
                if resp.status_code != 200:
                    return self._fail("chat-stream", start, resp, _error_text(resp))
                for line in resp.iter_lines():
                    if not line.startswith(b"data:"):
                        continue  # blank separators and keep-alive comments
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    if error := event.get("error"):
                        why = f"error event: {error.get('code')}: {error.get('message')}"
                        return self._fail("chat-stream", start, None, why)
                    for choice in event.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            token_times.append(time.perf_counter())
                    if usage := event.get("usage"):
                        usage_tokens = usage.get("completion_tokens")
                    self._stages(event)
        except (requests.RequestException, ValueError) as exc:
            return self._fail("chat-stream", start, None, f"{type(exc).__name__}: {exc}")
        end = time.perf_counter()
        if not token_times:
            return self._fail("chat-stream", start, None, "no tokens streamed")
        self._fire("chat-stream", "TTFT", _ms(token_times[0] - start))
        gaps = [b - a for a, b in itertools.pairwise(token_times)]
        for gap in gaps:
            self._fire("chat-stream", "ITL", _ms(gap))
        if gaps:
            self._fire("chat-stream", "TPOT", _ms(sum(gaps) / len(gaps)))
        tokens = usage_tokens or len(token_times)
        self._fire("chat-stream", "total", _ms(end - start), tokens)

    def chat(self) -> None:
        authorization = self.identity.bearer()
        start = time.perf_counter()
        try:
            resp = self._post("/v1/chat/completions", authorization, json=self._chat_body(False))
            if resp.status_code != 200:
                return self._fail("chat", start, resp, _error_text(resp))
            body = resp.json()
        except (requests.RequestException, ValueError) as exc:
            return self._fail("chat", start, None, f"{type(exc).__name__}: {exc}")
        elapsed = _ms(time.perf_counter() - start)
        content = ((body.get("choices") or [{}])[0].get("message") or {}).get("content")
        if not content:
            return self._fail("chat", start, None, "empty answer")
        self._stages(body)
        tokens = (body.get("usage") or {}).get("completion_tokens") or 0
        self._fire("chat", "total", elapsed, int(tokens))

    def search(self) -> None:
        authorization = self.identity.bearer()
        start = time.perf_counter()
        try:
            query = {"query": random.choice(QUESTIONS), "k": 4}
            resp = self._post("/v1/search", authorization, json=query)
            if resp.status_code != 200:
                return self._fail("search", start, resp, _error_text(resp))
            hits = resp.json()["data"]
        except (requests.RequestException, ValueError, KeyError) as exc:
            return self._fail("search", start, None, f"{type(exc).__name__}: {exc}")
        self._fire("search", "k=4", _ms(time.perf_counter() - start), len(hits))
