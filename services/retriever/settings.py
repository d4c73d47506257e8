from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import InternalAuthSettings


class RetrieverSettings(InternalAuthSettings):
    model_config = SettingsConfigDict(env_prefix="RETRIEVER_", extra="ignore")

    port: int = 8001
    # Any PostgreSQL >= 15 with pgvector. Empty: start the embedded server in data_dir.
    database_url: str | None = None
    data_dir: str = ".data/retriever"
    embedder_url: str = "http://127.0.0.1:8002"
    embedder_wait_s: float = 180.0  # how long start-up waits for the embedder
    max_upload_bytes: int = 10 * 1024 * 1024
    chunk_words: int = 160
    chunk_overlap_words: int = 30
    embed_batch_size: int = 32
    ingest_workers: int = 2
    pool_max_size: int = 10
