"""A Docker engine and a compose command for `make test-compose`: the running engine, or one
installed (Debian's docker.io) and started for the run, then stopped again."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
from docker.errors import DockerException

ENGINE_START_S = 60.0


def _ping() -> docker.DockerClient | None:
    with contextlib.suppress(DockerException):
        client = docker.from_env(timeout=600)
        client.ping()
        return client
    return None


def apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *packages], check=True, env=env, capture_output=True
    )


@contextlib.contextmanager
def docker_engine(workdir: Path, log: Callable[[str], None]) -> Iterator[docker.DockerClient]:
    """A client of the running engine; with none, Debian's engine installed and started for
    the length of the block, then stopped."""
    client = _ping()
    if client is not None:
        yield client
        client.close()
        return
    if shutil.which("dockerd") is None:
        log("installing Debian's docker.io")
        apt_install("docker.io")
    log("starting dockerd")
    engine_log = (workdir / "dockerd.log").open("wb")
    proc = subprocess.Popen(["dockerd"], stdout=engine_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ENGINE_START_S
        while (client := _ping()) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start; see {workdir / 'dockerd.log'}")
            time.sleep(0.5)
        yield client
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        engine_log.close()


def compose_command(log: Callable[[str], None]) -> list[str]:
    """The machine's compose: the v2 plugin (`docker compose`) or Debian's `docker-compose`,
    installed when there is neither."""
    docker_cli = shutil.which("docker")
    if docker_cli is not None:
        plugin = subprocess.run([docker_cli, "compose", "version"], capture_output=True)
        if plugin.returncode == 0:
            return [docker_cli, "compose"]
    if shutil.which("docker-compose") is None:
        log("installing Debian's docker-compose")
        apt_install("docker-compose")
    standalone = shutil.which("docker-compose")
    assert standalone is not None
    return [standalone]
