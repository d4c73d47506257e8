"""Start and stop the whole local stack as processes: emulator, database, four services."""

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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ragctl.cognito import LocalPool

logger = logging.getLogger(__name__)

DEV_USER = "dev@example.com"
SERVICES = ("embedder", "generator", "retriever", "gateway")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
    _pg: object | None = None

    def url(self, service: str) -> str:
        return f"http://{self.host}:{getattr(self.ports, service)}"

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
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
            "cognito", ["-m", "moto.server", "-H", self.host, "-p", str(self.ports.cognito)], {}
        )
        self._pg, database_url = start_embedded_postgres(self.home / "retriever")
        self.database_url = database_url  # the owner's; the retriever queries as rag_app
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
        self.password = self.pool.create_user(DEV_USER)
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
            },
        )
        for name in SERVICES:
            self._wait_ready(name)
        state = json.dumps(
            {
                "gateway_url": self.url("gateway"),
                "cognito": self.pool.to_dict(),
                "username": DEV_USER,
                "password": self.password,
                "pid": os.getpid(),
            },
            indent=2,
        )
        # created owner-only: it holds the dev user's password
        fd = os.open(self.state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(state)

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise StackError(
                f"{name} exited with code {proc.returncode}; last lines of its log:\n"
                + self.log_tail(name)
            )

    def _wait_for_port(self, name: str, port: int) -> None:
        deadline = time.monotonic() + 60
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

    def dead_services(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

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
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
