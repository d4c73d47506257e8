"""`ragctl up` as a user runs it: ingest and ask through the CLI; a part that dies comes back
(retriever, Cognito emulator, PostgreSQL) while the rest runs on; Ctrl-C leaves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ragctl.cli import sample_paths
from ragctl.stack import Backoff


def _ragctl(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ragctl", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Output:
    """The lines a process prints, read on a thread so that waiting for one can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, marker: str, timeout_s: float) -> str:
        """All lines up to the first (from here on) that holds marker."""
        start = len(self.seen)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} in time:\n" + "".join(self.seen)) from None
            if line is None:
                raise AssertionError("ragctl up exited early:\n" + "".join(self.seen))
            self.seen.append(line)
            if marker in line:
                return "".join(self.seen[start:])

    def rest(self, timeout_s: float) -> str:
        """Everything printed, once the process closes its output (or timeout_s passed)."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Empty):
            while (
                line := self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            ) is not None:
                self.seen.append(line)
        return "".join(self.seen)


def _state(home: Path) -> dict:
    return dict(json.loads((home / "stack.json").read_text()))


def _postmaster(home: Path) -> int:
    return int((home / "retriever" / "pgdata" / "postmaster.pid").read_text().split()[0])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.stack  # starts servers of its own
def test_up_ingest_ask_survive_crashes_then_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragctl", "--home", str(home), "up", "--free-ports"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = Output(proc)
    pids: set[int] = set()
    try:
        banner = output.wait_for("Press Ctrl-C", 300)
        for sample in sample_paths():
            assert sample.stem.replace("-", " ") in banner  # samples were ingested at start
        descendants = psutil.Process(proc.pid).children(recursive=True)
        pids = {p.pid for p in descendants} | {_postmaster(home)}
        assert len(descendants) >= 5  # emulator + four services

        state = _state(home)
        assert stat.S_IMODE((home / "stack.json").stat().st_mode) == 0o600
        assert set(state["services"]) == {
            "cognito",
            "embedder",
            "generator",
            "retriever",
            "gateway",
        }
        assert state["postgres_pid"] == _postmaster(home)

        token = _ragctl(home, "token")
        assert token.returncode == 0 and token.stdout.count(".") == 2

        again = _ragctl(home, "ingest", str(sample_paths()[0]))
        assert again.returncode == 0 and "already there" in again.stdout

        ask = _ragctl(home, "ask", "How often should the burrs of the Lumen C3 be cleaned?")
        assert ask.returncode == 0, ask.stderr
        answer, sources = ask.stdout.split("Sources:")
        assert answer.strip()
        assert "[1] lumen coffee grinder manual" in sources

        # The retriever dies: it is restarted, said on the output and in its log.
        os.kill(state["services"]["retriever"], signal.SIGKILL)
        said = output.wait_for("retriever is ready again", 120)
        assert "retriever was killed by SIGKILL; restarting it in 1s" in said
        log = (home / "logs" / "retriever.log").read_text()
        assert "retriever was killed by SIGKILL" in log and "restarting retriever" in log
        restarted = _state(home)["services"]
        assert restarted["retriever"] != state["services"]["retriever"]
        assert {k: v for k, v in restarted.items() if k != "retriever"} == {
            k: v for k, v in state["services"].items() if k != "retriever"
        }, "the other services ran on"
        pids |= set(restarted.values())
        ask = _ragctl(home, "ask", "How often should the burrs of the Lumen C3 be cleaned?")
        assert ask.returncode == 0, ask.stderr
        assert "[1] lumen coffee grinder manual" in ask.stdout.split("Sources:")[1]

        # The Cognito emulator dies: it comes back with the same pool and dev user, so a
        # token from before still works and still sees the dev user's documents.
        os.kill(restarted["cognito"], signal.SIGKILL)
        output.wait_for("cognito is ready again", 60)
        pids |= set(_state(home)["services"].values())
        gateway = _state(home)["gateway_url"]
        headers = {"Authorization": f"Bearer {token.stdout.strip()}"}
        listed = httpx.get(f"{gateway}/v1/documents", headers=headers, timeout=30)
        assert listed.status_code == 200, listed.text
        assert len(listed.json()["data"]) == len(sample_paths())
        assert _ragctl(home, "token").returncode == 0

        # PostgreSQL dies: it is started again on the same data, and searches find the
        # documents again (within seconds: the retriever replaces its broken connections).
        os.kill(_postmaster(home), signal.SIGKILL)
        output.wait_for("postgres is ready again", 60)
        pids.add(_postmaster(home))
        query = {"query": "How often should the burrs be cleaned?", "k": 3}
        deadline = time.monotonic() + 30
        while True:
            found = httpx.post(f"{gateway}/v1/search", json=query, headers=headers, timeout=30)
            if found.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert found.status_code == 200, found.text
        assert found.json()["data"][0]["title"] == "lumen coffee grinder manual"
        # ... and a new upload is ingested once (the retriever's claims wait for its liveness
        # lock to be taken again, instead of taking its own jobs back over and over).
        note = home / "after-the-restart.md"
        note.write_text("# Boiler\n\nThe boiler is bled every second Thursday.\n")
        ingested = _ragctl(home, "ingest", str(note))
        assert ingested.returncode == 0, ingested.stdout + ingested.stderr
        assert "ready" in ingested.stdout, ingested.stdout

        pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        out = output.rest(10)
        assert proc.returncode == 0, out
        assert "stopped." in out
    finally:
        if proc.poll() is None:  # the test failed: do not leave the stack running
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
            pidfile = home / "retriever" / "pgdata" / "postmaster.pid"
            if pidfile.exists():
                with contextlib.suppress(psutil.Error):
                    psutil.Process(int(pidfile.read_text().split()[0])).terminate()
    time.sleep(0.5)
    alive = [pid for pid in pids if _alive(pid)]
    assert alive == [], f"processes left behind: {alive}"
    assert not (home / "stack.json").exists()


def test_restarts_back_off_from_1s_to_30s_and_reset_after_a_stable_run() -> None:
    backoff = Backoff()
    quick_deaths = [backoff.delay_after(up_for_s=2.0) for _ in range(7)]
    assert quick_deaths == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.delay_after(up_for_s=120.0) == 1.0  # it had stayed up: start over
    assert backoff.delay_after(up_for_s=0.5) == 2.0


def test_commands_without_a_stack_say_how_to_start_one(tmp_path: Path) -> None:
    result = _ragctl(tmp_path, "ask", "anything")
    assert result.returncode != 0
    assert "make up" in result.stderr
