from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.protocol import BATCH_DOCUMENTS_MAX
from services.common.settings import InternalAuthSettings


class GatewaySettings(InternalAuthSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    port: int = 8000
    # Cognito: the issuer the tokens carry and where its keys are served are separate
    # settings (the local emulator issues the AWS-style issuer but serves keys on loopback).
    cognito_issuer: str = ""
    cognito_jwks_url: str = ""
    cognito_client_id: str = ""
    # Development: a JSON file with issuer, jwks_url and client_id, written by the local
    # Cognito emulator of `docker compose` (deploy/local); fills the three settings left empty.
    cognito_pool_file: Path | None = None
    token_use: Literal["access", "id"] = "access"
    jwks_refresh_penalty_s: float = 30.0
    required_groups: list[str] = []  # when set, the token needs one of these cognito:groups
    required_scopes: list[str] = []  # when set, the token needs one of these scopes

    rate_limit_per_minute: float = 120.0  # per user, token bucket
    rate_limit_burst: int = 30
    max_concurrent_streams: int = 4  # chat completions in progress per user
    # Where those per-user counts live: "local", this task's memory (one gateway task: `make
    # up`); "shared", the retriever's database, which every gateway task asks (several tasks
    # behind the load balancer: the AWS deployment), so N tasks still allow one rate, not N.
    # A shared call that fails or takes longer than limits_timeout_s counts that request in
    # this task alone.
    limits_store: Literal["local", "shared"] = "local"
    limits_timeout_s: float = Field(0.5, gt=0)
    # A chat's shared stream slot is a lease of this long: a stream older than this stops
    # counting, and the slots of a task that died mid-stream come back after it.
    stream_lease_s: float = Field(600.0, gt=0, le=86_400)
    # Across users: chats admitted that the generator has not begun to answer (retrieval,
    # prompt, the engine's queue: a streamed chat until its first event, one not streamed
    # until it is sent, after which the generator's own bound answers 429). Past it a chat
    # gets 503 "overloaded" at once. 16: one full batch of
    # the production engine (vLLM max_num_seqs 16) queued behind the running one, so the last
    # admitted chat starts within about one answer's time; 16 running + 16 waiting stays under
    # the generator's own bound (16 + 32 queued), so this gateway sheds before retrieval
    # rather than the generator after it. With llama.cpp's 2 local slots, 16 waiting is 8
    # answers deep; a local stack may set 4 to 8.
    max_waiting_chats: int = Field(16, ge=1)
    # The bound that sets where shedding starts, in time: a chat also gets that 503 when
    # chats wait and the oldest has waited this long for the generator to begin, or chats
    # lately waited longer on average. An admitted chat's time to first token then stays
    # within about this much of the unloaded one, on any engine (docs/performance.md).
    # 0: the count above alone.
    max_queue_wait_s: float = Field(1.0, ge=0)
    # That 503 asks the client to come back after the time admitted chats have lately waited
    # for the generator (retry-after-ms; Retry-After in whole seconds), at most this long.
    overloaded_retry_after_s: float = Field(2.0, gt=0)

    # Dependencies whose failure /readyz reports as `degraded` but still answers 200: the AWS
    # deployment names the generator, which may be scaled to zero on a schedule, so the load
    # balancer keeps the gateways (documents and search work; chat answers 503 meanwhile).
    readiness_optional: list[Literal["retriever", "generator"]] = []
    retriever_url: str = "http://127.0.0.1:8001"
    generator_url: str = "http://127.0.0.1:8003"
    max_upload_bytes: int = 10 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    # Documents in one POST /v1/documents/batch (its body is also under max_body_bytes).
    max_batch_documents: int = Field(100, ge=1, le=BATCH_DOCUMENTS_MAX)
    body_idle_timeout_s: float = Field(30.0, gt=0)  # longest wait for more of a body: then 408

    rag_k: int = 4
    default_max_tokens: int = 256
    max_tokens_cap: int = 1024
    # Tokens one generation may hold (prompt and answer): the passage budget. Empty: asked
    # from the generator (/v1/models: our generator's context_length, vLLM's max_model_len),
    # so it follows GENERATOR_MAX_MODEL_LEN (8192 on vLLM) or the llama.cpp slot (2048).
    generator_context_tokens: int | None = Field(None, ge=256)
    generator_timeout_s: float = 300.0
    # SSE comment after this long without an event; a stream the generator has not answered
    # by then starts anyway (200) and comments while it waits.
    sse_keepalive_s: float = 10.0
    rewrite_questions: bool = True  # follow-ups become standalone queries before retrieval
    rewrite_timeout_s: float = 15.0

    @model_validator(mode="after")
    def _cognito_pool(self) -> GatewaySettings:
        if self.cognito_pool_file is not None:
            if self.profile == "prod":
                raise ValueError(
                    "cognito_pool_file is for the local emulator; set the pool's issuer, "
                    "JWKS URL and client id in the prod profile"
                )
            try:
                pool = json.loads(self.cognito_pool_file.read_text(encoding="utf-8"))
                given = {key: str(pool[key]) for key in ("issuer", "jwks_url", "client_id")}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"cognito_pool_file {self.cognito_pool_file} does not hold the pool's "
                    "issuer, jwks_url and client_id"
                ) from exc
            self.cognito_issuer = self.cognito_issuer or given["issuer"]
            self.cognito_jwks_url = self.cognito_jwks_url or given["jwks_url"]
            self.cognito_client_id = self.cognito_client_id or given["client_id"]
        missing = [
            name
            for name in ("cognito_issuer", "cognito_jwks_url", "cognito_client_id")
            if not getattr(self, name)
        ]
        if missing:
            raise ValueError(
                f"set {', '.join('GATEWAY_' + name.upper() for name in missing)} "
                "(or GATEWAY_COGNITO_POOL_FILE for the local emulator)"
            )
        return self
