from __future__ import annotations

from pathlib import Path
from typing import Literal

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import SECRET_MIN_CHARS, InternalAuthSettings, read_secret_file

# Passwords of examples and development setups, refused in the prod profile.
DEV_DATABASE_PASSWORDS = frozenset(
    {"postgres", "password", "rag", "dev", "secret", "changeme", "change-me", "example"}
)


class RetrieverSettings(InternalAuthSettings):
    # Errors show no input values: they would print the database passwords.
    model_config = SettingsConfigDict(
        env_prefix="RETRIEVER_", extra="ignore", hide_input_in_errors=True
    )

    port: int = 8001
    # Any PostgreSQL >= 15 with pgvector, as the schema owner: migrations run with it.
    # Empty: start the embedded server in data_dir.
    database_url: str | None = None
    # What the service queries with: a login of app_role (neither owner nor superuser, so
    # row-level security binds it). Empty: connect with database_url and SET ROLE app_role.
    app_database_url: str | None = None
    # When set, the password of both URLs is read from this file (a Docker or ECS secret).
    database_password_file: Path | None = None
    # database_url's password, as ECS injects a Secrets Manager value (an env var, not a file).
    database_password: SecretStr | None = None
    # The password of app_role's login. With app_database_url: that URL's password. Without
    # it: migrate makes app_role a LOGIN role with this password, and the service queries as
    # app_role with it on database_url's server (AWS: the owner's and the app's secrets).
    app_database_password: SecretStr | None = None
    app_role: str = Field("rag_app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    data_dir: str = ".data/retriever"
    embedder_url: str = "http://127.0.0.1:8002"
    embedder_wait_s: float = 180.0  # how long start-up waits for the embedder
    max_upload_bytes: int = 10 * 1024 * 1024
    # Chunk size in the embedding model's own tokens; capped at what the model reads.
    chunk_tokens: int = Field(256, ge=16)
    chunk_overlap_tokens: int = Field(32, ge=0)
    embed_batch_size: int = Field(32, ge=1)
    # Jobs in progress per replica (each holds one upload in memory). Many small documents
    # need many at once to keep the embedder's batches full. 0: this replica only searches.
    ingest_workers: int = Field(32, ge=0)
    ingest_lease_s: float = Field(60.0, gt=0)  # a job whose worker died is retried after this
    ingest_poll_s: float = Field(1.0, gt=0)  # how often idle workers look for jobs
    ingest_max_attempts: int = Field(10, ge=1)
    ingest_backoff_max_s: float = Field(300.0, gt=0)  # retries while the embedder is down
    # Parsing runs in worker processes under hard limits (services/retriever/sandbox.py).
    parse_processes: int = Field(3, ge=1)  # per replica; one user may hold all but one
    parse_memory_mb: int = Field(1024, ge=64)  # address space one parse may add
    parse_cpu_s: float = Field(120.0, gt=0)  # CPU time one parse may use
    parse_timeout_s: float = Field(300.0, gt=0)  # wall time one parse may take, from its start
    # Jobs in progress on one replica for one user: the rest of ingest_workers stay free for
    # others. 0: three quarters of ingest_workers.
    ingest_jobs_per_user: int = Field(0, ge=0)
    pool_max_size: int = Field(10, ge=2)
    # HNSW graph: changing m or ef_construction rebuilds the index on start.
    hnsw_m: int = Field(16, ge=2, le=100)
    hnsw_ef_construction: int = Field(64, ge=4, le=1000)
    hnsw_ef_search: int = Field(40, ge=1, le=1000)
    # BM25 (docs/retrieval.md): exact over the chunks sharing a query term for a tenant of up
    # to this many chunks (9,000 SciFact chunks: 9.5 ms p50), through the HNSW index on the
    # term weights past it, walking bm25_ef_search candidates (400: nDCG@10 within 0.002 of
    # exact there).
    bm25_exact_max_chunks: int = Field(50_000, ge=0)
    bm25_ef_search: int = Field(400, ge=1, le=1000)
    # Hybrid search (docs/retrieval.md): each side's best fusion_depth chunks (at least k),
    # fused by score (each side's scores over its best, vector weighted fusion_vector_weight,
    # BM25 the rest) or by reciprocal rank (rrf_k). Defaults: the best on SciFact's training
    # claims.
    fusion: Literal["score", "rrf"] = "score"
    fusion_vector_weight: float = Field(0.6, ge=0, le=1)
    fusion_depth: int = Field(50, ge=1, le=1000)
    rrf_k: int = Field(60, ge=0)
    # Optional reranking of search results by a cross-encoder (the embedder's /v1/rerank with
    # EMBEDDER_RERANK_MODEL set): the best rerank_depth candidates are rescored. A reranker
    # that fails or is slow costs the reranking, never the search (services/retriever/rerank.py).
    rerank: bool = False
    rerank_depth: int = Field(30, ge=1, le=1000)
    rerank_url: str | None = None  # empty: embedder_url

    @property
    def rerank_base_url(self) -> str:
        return self.rerank_url or self.embedder_url

    @property
    def jobs_per_user(self) -> int:
        return self.ingest_jobs_per_user or max(1, self.ingest_workers * 3 // 4)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RetrieverSettings:
        if self.chunk_overlap_tokens >= self.chunk_tokens // 2:
            raise ValueError("chunk_overlap_tokens must be under half of chunk_tokens")
        return self

    @property
    def app_login_password(self) -> str | None:
        """The password migrate gives app_role's login: set when the service makes the login
        itself (an app password and no app_database_url)."""
        if self.app_database_password is None or self.app_database_url:
            return None
        return self.app_database_password.get_secret_value()

    @model_validator(mode="after")
    def _database_password(self) -> RetrieverSettings:
        """Put the password file's or the env vars' secrets into the URLs; in prod, refuse a
        password that is short or one of the well-known development ones."""
        if self.database_password_file is not None and (
            self.database_password is not None
            or (self.app_database_password is not None and self.app_database_url)
        ):
            raise ValueError(
                "set the database password either in RETRIEVER_DATABASE_PASSWORD_FILE or in "
                "RETRIEVER_DATABASE_PASSWORD / RETRIEVER_APP_DATABASE_PASSWORD, not both"
            )
        if self.database_password is not None and not self.database_url:
            raise ValueError("RETRIEVER_DATABASE_PASSWORD needs RETRIEVER_DATABASE_URL")
        if self.database_password_file is not None:
            password = read_secret_file(self.database_password_file, "database_password")
            if self.database_url:
                self.database_url = make_conninfo(self.database_url, password=password)
            if self.app_database_url:
                self.app_database_url = make_conninfo(self.app_database_url, password=password)
        if self.database_password is not None and self.database_url:
            self.database_url = make_conninfo(
                self.database_url, password=self.database_password.get_secret_value()
            )
        if self.app_database_password is not None and self.app_database_url:
            self.app_database_url = make_conninfo(
                self.app_database_url, password=self.app_database_password.get_secret_value()
            )
        if self.profile == "prod":
            given: list[object] = [self.app_login_password]
            for url in (self.database_url, self.app_database_url):
                given.append(conninfo_to_dict(url).get("password") if url else None)
            for secret in given:
                if secret is not None and (
                    len(str(secret)) < SECRET_MIN_CHARS
                    or str(secret).lower() in DEV_DATABASE_PASSWORDS
                ):
                    raise ValueError(
                        "the database password must be a secret of at least "
                        f"{SECRET_MIN_CHARS} characters in the prod profile"
                    )
        return self
