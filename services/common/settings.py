"""Settings base shared by every service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SERVICE_TOKEN = "dev-service-token-change-me"
SECRET_MIN_CHARS = 16


def read_secret_file(path: Path, name: str) -> str:
    """The secret in a file (a Docker or ECS secret, or one `docker compose` generated), without
    its trailing newline; a clear error when it is missing or empty."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name} cannot be read from {path}") from exc
    if not secret:
        raise ValueError(f"{name} file {path} is empty")
    return secret


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set their own env prefix."""

    model_config = SettingsConfigDict(extra="ignore", env_file=None)

    profile: Literal["dev", "prod"] = "dev"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    log_json: bool = True
    drain_timeout_s: float = 10.0  # on SIGTERM, in-flight requests get this long to finish


class InternalAuthSettings(ServiceSettings):
    """Services that talk to each other share a service token."""

    service_token: str = DEV_SERVICE_TOKEN
    service_token_file: Path | None = None  # when set, the token is read from this file

    @model_validator(mode="after")
    def _refuse_dev_secrets_in_prod(self) -> InternalAuthSettings:
        if self.service_token_file is not None:
            self.service_token = read_secret_file(self.service_token_file, "service_token")
        exposed = self.host not in ("127.0.0.1", "localhost", "::1")
        if (self.profile != "dev" or exposed) and (
            self.service_token == DEV_SERVICE_TOKEN or len(self.service_token) < SECRET_MIN_CHARS
        ):
            raise ValueError(
                "service_token must be set to a secret of at least 16 characters "
                "outside the dev profile and whenever the service listens beyond loopback"
            )
        return self
