"""The embedder under Ray Serve, on a local CPU Ray instance, through Serve's HTTP proxy."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from openai import OpenAI

from ragctl.stack import free_port, wait_ready
from services.generator.engines import serve_executable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`serve run` on the production config, adjusted for a CPU-only loopback instance."""
    config = yaml.safe_load((REPO / "deploy" / "ray" / "embedder.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["runtime_env"]["env_vars"].update(
        {"EMBEDDER_MODEL": "all-MiniLM-L6-v2", "EMBEDDER_DEVICE": "cpu"}
    )
    deployment = app["deployments"][0]
    deployment["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 0}
    deployment["autoscaling_config"].update({"min_replicas": 1, "max_replicas": 1})
    path = tmp_path_factory.mktemp("ray") / "embedder.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    log = open(path.with_suffix(".log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [serve_executable(), "run", str(path)],  # Ray's own command line, as users run it
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(url, 240, proc)
        assert ready, path.with_suffix(".log").read_text()[-3000:]
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.stack  # starts Ray and Serve
def test_embedder_serves_through_ray_serve(serve_url: str) -> None:
    sdk = OpenAI(base_url=f"{serve_url}/v1", api_key="unused")
    texts = ["Ray Serve spreads requests over replicas.", "Each replica has its own batcher."]
    result = sdk.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    vectors = np.array([item.embedding for item in result.data])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert float(vectors[0] @ vectors[1]) < 0.99  # two different texts, two different vectors
    bad = httpx.post(f"{serve_url}/v1/embeddings", json={"input": []})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
