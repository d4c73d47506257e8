"""`ragctl up` as a user runs it: ingest and ask through the CLI, then Ctrl-C leaves nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ragctl.cli import sample_paths


def _ragctl(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ragctl", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_for_line(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError("ragctl up exited early:\n" + "".join(seen))


def test_up_ingest_ask_then_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragctl", "--home", str(home), "up", "--free-ports"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        banner = _wait_for_line(proc, "Press Ctrl-C", 300)
        for sample in sample_paths():
            assert sample.stem.replace("-", " ") in banner  # samples were ingested at start
        descendants = psutil.Process(proc.pid).children(recursive=True)
        postmaster = (home / "retriever" / "pgdata" / "postmaster.pid").read_text().split()[0]
        pids = {p.pid for p in descendants} | {int(postmaster)}
        assert len(descendants) >= 5  # emulator + four services

        token = _ragctl(home, "token")
        assert token.returncode == 0 and token.stdout.count(".") == 2

        again = _ragctl(home, "ingest", str(sample_paths()[0]))
        assert again.returncode == 0 and "already there" in again.stdout

        ask = _ragctl(home, "ask", "How often should the burrs of the Lumen C3 be cleaned?")
        assert ask.returncode == 0, ask.stderr
        answer, sources = ask.stdout.split("Sources:")
        assert answer.strip()
        assert "[1] lumen coffee grinder manual" in sources

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
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
    alive = [
        pid
        for pid in pids
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert alive == [], f"processes left behind: {alive}"
    assert not (home / "stack.json").exists()


def test_commands_without_a_stack_say_how_to_start_one(tmp_path: Path) -> None:
    result = _ragctl(tmp_path, "ask", "anything")
    assert result.returncode != 0
    assert "make up" in result.stderr
