"""`docker compose up` from a fresh clone gives a working, secured stack (`make test-compose`,
not part of `make test`).

Every CPU image is built from its Dockerfile as a user builds it; Docker Hub's base images
are replaced by local stand-ins under the same names (tests/compose/standins.py). The stack
runs from the compose file users run (less the gateway's published port), plus an override
made here that puts every container on the host's network, listening on loopback only, on
free ports, so that all traffic stays on loopback. Then: a token from the
README's command, an upload, a streamed answer that cites it, the retriever restarted,
`down` then `up` (the data stays), and `down -v` leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml

from services.common.ports import free_port
from tests.compose.engine import compose_command, docker_engine
from tests.compose.standins import ensure_standin_images

pytestmark = pytest.mark.compose

REPO = Path(__file__).resolve().parents[2]
MB = 1000 * 1000  # as `docker images` counts
# tag: (Dockerfile, size budget)
IMAGES: dict[str, tuple[str, int | None]] = {
    "ragplatform/cognito-local:dev": ("deploy/local/cognito.Dockerfile", None),
    "ragplatform/gateway:dev": ("services/gateway/Dockerfile", 250 * MB),
    "ragplatform/retriever:dev": ("services/retriever/Dockerfile", 250 * MB),
    "ragplatform/generator:dev": ("services/generator/Dockerfile", 600 * MB),
    "ragplatform/embedder:dev": ("services/embedder/Dockerfile", 1500 * MB),
}
SERVICES = ("cognito", "postgres", "embedder", "generator", "retriever", "gateway")
READY_TIMEOUT_S = 600.0
TORCH_SPEC = "torch==2.13.0"  # the embedder extra's pin
TORCH_INDEX_PORT = 38517

DOCUMENT = """# Wombat Creek Lighthouse

The lighthouse at Wombat Creek is kept by Ottoline Brisk. Its lamp was first lit in 1911
and can be seen from 19 nautical miles away.
"""
QUESTION = "Who keeps the lighthouse at Wombat Creek?"


def log(message: str) -> None:
    print(f"[compose] {message}", file=sys.stderr, flush=True)


@dataclass
class Report:
    build_s: dict[str, float] = field(default_factory=dict)
    size_mb: dict[str, float] = field(default_factory=dict)
    standins_s: dict[str, float] = field(default_factory=dict)
    up_to_ready_s: list[float] = field(default_factory=list)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def engine(workdir: Path) -> Iterator[docker.DockerClient]:
    with docker_engine(workdir, log) as client:
        yield client


@pytest.fixture(scope="module")
def torch_index(workdir: Path) -> Iterator[str]:
    """A package index on loopback holding torch's CPU wheel, the TORCH_INDEX_URL of the
    embedder's build (download.pytorch.org cannot be reached here)."""
    project = workdir / "simple" / "torch"
    project.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", TORCH_SPEC, "-d", project],
        check=True,
    )

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = partial(QuietHandler, directory=str(workdir / "simple"))
    try:  # the same URL each run keeps the embedder's torch layer cached (it is a build arg)
        server = ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def build_image(client: docker.DockerClient, tag: str, dockerfile: str, **args: str) -> float:
    """Build one image from the repository root as `docker build -f` does; its seconds."""
    started = time.monotonic()
    lines: list[str] = []
    for chunk in client.api.build(
        path=str(REPO),
        dockerfile=dockerfile,
        tag=tag,
        buildargs=args or None,
        network_mode="host",  # the build reaches the loopback torch index
        rm=True,
        forcerm=True,
        decode=True,
    ):
        if "stream" in chunk:
            lines.extend(chunk["stream"].splitlines())
        if "error" in chunk:
            tail = "\n".join(lines[-40:])
            raise AssertionError(f"building {tag} failed: {chunk['error']}\n{tail}")
    return time.monotonic() - started


@pytest.fixture(scope="module")
def report() -> Iterator[Report]:
    result = Report()
    yield result
    log("report " + json.dumps(result.__dict__, indent=2))


@pytest.fixture(scope="module")
def images(engine: docker.DockerClient, torch_index: str, report: Report) -> dict[str, int]:
    report.standins_s = ensure_standin_images(engine, log)
    sizes: dict[str, int] = {}
    for tag, (dockerfile, _) in IMAGES.items():
        log(f"building {tag}")
        args = {"TORCH_INDEX_URL": torch_index} if "embedder" in tag else {}
        report.build_s[tag] = round(build_image(engine, tag, dockerfile, **args), 1)
        sizes[tag] = int(engine.images.get(tag).attrs["Size"])
        report.size_mb[tag] = round(sizes[tag] / MB, 1)
        log(f"built {tag} in {report.build_s[tag]} s: {report.size_mb[tag]} MB")
    return sizes


@dataclass
class Compose:
    """One compose project of the repository's file plus the loopback override."""

    client: docker.DockerClient
    command: list[str]
    project: str
    files: list[Path]
    ports: dict[str, int]

    def argv(self, *args: str) -> list[str]:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        where = ["-p", self.project, "--project-directory", str(REPO)]
        return [*self.command, *where, *files, *args]

    def run(self, *args: str, timeout: float = READY_TIMEOUT_S) -> str:
        proc = subprocess.run(
            self.argv(*args),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
                f"\n{self.logs()}"
            )
        return proc.stdout

    def containers(self) -> list[Any]:
        label = f"com.docker.compose.project={self.project}"
        return list(self.client.containers.list(all=True, filters={"label": label}))

    def logs(self, tail: int = 60) -> str:
        """The last lines of every container that is not healthy, for a failure's message."""
        parts = []
        for container in self.containers():
            container.reload()
            state = container.attrs["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                continue
            text = container.logs(tail=tail).decode(errors="replace")
            name = container.labels.get("com.docker.compose.service", container.name)
            parts.append(f"--- {name} ({state['Status']}) ---\n{text}")
        return "\n".join(parts)

    def up(self) -> float:
        """`up -d`; seconds until every service is healthy. Compose waits on each dependency
        without a deadline: this watches the containers meanwhile and fails at once, with the
        logs, when one crashes or turns unhealthy."""
        started = time.monotonic()
        with tempfile.TemporaryFile("w+") as output:
            proc = subprocess.Popen(
                self.argv("up", "-d", "--no-build"), cwd=REPO, stdout=output, stderr=output
            )
            try:
                self.wait_healthy(proc=proc)
                assert proc.wait(timeout=120) == 0
            except BaseException:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                output.seek(0)
                log(f"compose up said:\n{output.read()[-4000:]}")
                raise
        return time.monotonic() - started

    def wait_healthy(
        self, services: tuple[str, ...] = SERVICES, proc: subprocess.Popen[bytes] | None = None
    ) -> float:
        """Seconds until every service's container is healthy; fails at once, with its logs,
        when one exits, restarts or turns unhealthy, or when `proc` (compose up) fails."""
        started = time.monotonic()
        while True:
            if proc is not None and proc.poll() not in (None, 0):
                raise AssertionError(f"compose up failed ({proc.returncode}):\n{self.logs()}")
            health: dict[str, str] = {}
            for container in self.containers():
                container.reload()
                service = container.labels["com.docker.compose.service"]
                state = container.attrs["State"]
                if service not in services:
                    continue
                crashed = state.get("Restarting") or container.attrs.get("RestartCount", 0)
                if state["Status"] in ("exited", "dead") or crashed:
                    raise AssertionError(f"{service} stopped:\n{self.logs()}")
                health[service] = state.get("Health", {}).get("Status", "none")
                if health[service] == "unhealthy":
                    raise AssertionError(f"{service} is unhealthy:\n{self.logs()}")
            if all(health.get(service) == "healthy" for service in services):
                return time.monotonic() - started
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise AssertionError(f"not healthy in time: {health}\n{self.logs()}")
            time.sleep(1.0)

    def token(self) -> str:
        """The README's command for the dev user's token."""
        return self.run("exec", "-T", "cognito", "python", "-m", "ragctl.emulator", "token").strip()

    def gateway(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.ports['gateway']}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=120.0,
        )


def loopback_override(ports: dict[str, int]) -> dict[str, Any]:
    """Every container on the host's network, each service on loopback and a free port."""
    local = "127.0.0.1"

    def url(service: str) -> str:
        return f"http://{local}:{ports[service]}"

    def on_host(**environment: str) -> dict[str, Any]:
        return {"network_mode": "host", "environment": environment}

    return {
        "services": {
            "secrets": {"network_mode": "host"},
            "cognito": on_host(
                COGNITO_HOST=local,
                COGNITO_PORT=str(ports["cognito"]),
                COGNITO_PUBLIC_URL=url("cognito"),
            ),
            "postgres": {
                **on_host(PGPORT=str(ports["postgres"])),
                "command": ["postgres", "-c", f"listen_addresses={local}"],
            },
            "embedder": on_host(EMBEDDER_HOST=local, EMBEDDER_PORT=str(ports["embedder"])),
            "generator": on_host(GENERATOR_HOST=local, GENERATOR_PORT=str(ports["generator"])),
            "retriever": on_host(
                RETRIEVER_HOST=local,
                RETRIEVER_PORT=str(ports["retriever"]),
                RETRIEVER_DATABASE_URL=f"postgresql://rag@{local}:{ports['postgres']}/rag",
                RETRIEVER_EMBEDDER_URL=url("embedder"),
            ),
            "gateway": on_host(
                GATEWAY_HOST=local,
                GATEWAY_PORT=str(ports["gateway"]),
                GATEWAY_RETRIEVER_URL=url("retriever"),
                GATEWAY_GENERATOR_URL=url("generator"),
            ),
        }
    }


@pytest.fixture(scope="module")
def compose(
    engine: docker.DockerClient, images: dict[str, int], workdir: Path
) -> Iterator[Compose]:
    ports = {service: free_port() for service in SERVICES}
    # The users' file, less the gateway's published port: on the host's network there is
    # nothing to publish, and compose refuses both (an override cannot remove a list).
    users = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    del users["services"]["gateway"]["ports"]
    users_file = workdir / "docker-compose.yml"
    users_file.write_text(yaml.safe_dump(users, sort_keys=False))
    override = workdir / "loopback.override.yml"
    override.write_text(json.dumps(loopback_override(ports), indent=2))  # JSON is YAML
    stack = Compose(
        client=engine,
        command=compose_command(log),
        project=f"ragtest{uuid.uuid4().hex[:8]}",
        files=[users_file, override],
        ports=ports,
    )
    try:
        yield stack
    finally:
        stack.run("down", "-v", "--remove-orphans", "--timeout", "45")


def stream_chat(client: httpx.Client, question: str) -> tuple[str, list[dict[str, Any]]]:
    body = {
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "temperature": 0,
        "max_tokens": 48,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[5:]) for line in lines[:-1]]
    answer = "".join(
        choice["delta"].get("content") or "" for event in events for choice in event["choices"]
    )
    return answer, list(events[-1].get("citations", []))


def wait_ready(client: httpx.Client, doc_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        doc: dict[str, Any] = client.get(f"/v1/documents/{doc_id}").json()
        if doc["status"] in ("ready", "failed"):
            return doc
        assert time.monotonic() < deadline, f"document still {doc['status']}"
        time.sleep(0.5)


def searchable(client: httpx.Client, doc_id: str) -> bool:
    resp = client.post("/v1/search", json={"query": "Wombat Creek lighthouse keeper", "k": 5})
    assert resp.status_code == 200, resp.text
    return any(hit["document_id"] == doc_id for hit in resp.json()["data"])


def test_images_fit_their_budgets(images: dict[str, int]) -> None:
    for tag, (_, budget) in IMAGES.items():
        if budget is not None:
            assert images[tag] <= budget, f"{tag}: {images[tag] / MB:.0f} MB > {budget / MB:.0f}"


def test_images_run_as_a_user_with_a_healthcheck_and_no_compiler_or_cuda(
    engine: docker.DockerClient, images: dict[str, int]
) -> None:
    for tag in IMAGES:
        config = engine.images.get(tag).attrs["Config"]
        assert config["User"] == "app", tag
        assert config.get("Healthcheck", {}).get("Test"), tag
        probe = (
            "import shutil, importlib.util; "
            "assert not any(shutil.which(c) for c in ('gcc', 'cc', 'g++')), 'a compiler'; "
            "assert importlib.util.find_spec('nvidia') is None, 'CUDA libraries'; "
            "assert importlib.util.find_spec('pip') is None, 'pip'"
        )
        if "embedder" in tag:
            probe += "; import torch; assert torch.version.cuda is None, 'a CUDA torch'"
        engine.containers.run(tag, ["python", "-c", probe], remove=True, network_mode="none")


def test_compose_up_answers_with_citations_and_keeps_its_data(
    compose: Compose, report: Report
) -> None:
    report.up_to_ready_s.append(round(compose.up(), 1))
    log(f"up to a ready gateway: {report.up_to_ready_s[-1]} s")

    with compose.gateway(compose.token()) as user:
        created = user.post(
            "/v1/documents",
            files={"file": ("lighthouse.md", DOCUMENT.encode(), "text/markdown")},
        )
        assert created.status_code in (200, 202), created.text
        doc_id = created.json()["id"]
        assert wait_ready(user, doc_id)["status"] == "ready"
        answer, citations = stream_chat(user, QUESTION)
        assert answer.strip()
        assert citations and citations[0]["document_id"] == doc_id, citations

    # A restarted retriever serves the same data.
    compose.run("restart", "retriever")
    compose.wait_healthy(("retriever",))
    with compose.gateway(compose.token()) as user:
        assert searchable(user, doc_id)

    # `down` then `up`: named volumes keep the documents, the dev user keeps their tenant.
    compose.run("down", "--timeout", "45")
    assert not compose.containers()
    report.up_to_ready_s.append(round(compose.up(), 1))
    log(f"up again to a ready gateway: {report.up_to_ready_s[-1]} s")
    with compose.gateway(compose.token()) as user:
        assert searchable(user, doc_id)


def test_down_v_leaves_nothing_behind(compose: Compose, engine: docker.DockerClient) -> None:
    compose.run("down", "-v", "--remove-orphans", "--timeout", "45")
    label = {"label": f"com.docker.compose.project={compose.project}"}
    assert not engine.containers.list(all=True, filters=label)
    assert not engine.networks.list(filters=label)
    assert not engine.volumes.list(filters=label)
