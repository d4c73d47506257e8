"""The embedder app served by Ray Serve, for hosts with several GPUs (one replica each).

    serve run deploy/ray/embedder.yaml

Each replica builds the same FastAPI app (`create_app`) from EMBEDDER_* settings in its
runtime environment, runs its lifespan (model load and warm-up, its own batcher), and
Serve's proxy spreads requests over replicas. Serve health-checks each replica through
`check_health`, so a replica whose model failed to load is replaced.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from services.embedder.app import create_app
from services.embedder.settings import EmbedderSettings


def build_app() -> FastAPI:
    return create_app(EmbedderSettings())


@serve.deployment(name="embedder", max_ongoing_requests=256, health_check_period_s=10)
@serve.ingress(build_app)
class EmbedderDeployment:
    def check_health(self) -> None:
        app: FastAPI = self.app  # type: ignore[attr-defined]  # set by serve.ingress
        if getattr(app.state, "load_error", None):
            raise RuntimeError(app.state.load_error)
        reranker = getattr(app.state, "reranker", None)
        if reranker is not None and reranker.load_failed:
            raise RuntimeError("the reranker failed to load")


app = EmbedderDeployment.bind()  # type: ignore[attr-defined]  # added by @serve.deployment
