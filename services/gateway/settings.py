from __future__ import annotations

from typing import Literal

from pydantic_settings import SettingsConfigDict

from services.common.settings import InternalAuthSettings


class GatewaySettings(InternalAuthSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    port: int = 8000
    # Cognito: the issuer the tokens carry and where its keys are served are separate
    # settings (the local emulator issues the AWS-style issuer but serves keys on loopback).
    cognito_issuer: str
    cognito_jwks_url: str
    cognito_client_id: str
    token_use: Literal["access", "id"] = "access"
    jwks_refresh_penalty_s: float = 30.0
    required_groups: list[str] = []  # when set, the token needs one of these cognito:groups
    required_scopes: list[str] = []  # when set, the token needs one of these scopes

    rate_limit_per_minute: float = 120.0  # per user, token bucket
    rate_limit_burst: int = 30
    max_concurrent_streams: int = 4  # chat completions in progress per user

    retriever_url: str = "http://127.0.0.1:8001"
    generator_url: str = "http://127.0.0.1:8003"
    max_upload_bytes: int = 10 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024

    rag_k: int = 4
    default_max_tokens: int = 256
    max_tokens_cap: int = 1024
    generator_context_tokens: int = 2048
    generator_timeout_s: float = 300.0
    sse_keepalive_s: float = 10.0  # SSE comment after this long without an event
    rewrite_questions: bool = True  # follow-ups become standalone queries before retrieval
    rewrite_timeout_s: float = 15.0
