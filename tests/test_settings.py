"""Settings that hold secrets: read from files (Docker and ECS secrets, the ones compose
generates), and development secrets refused in the prod profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.dev_secrets import ensure_secrets
from services.common.settings import DEV_SERVICE_TOKEN
from services.gateway.settings import GatewaySettings
from services.retriever.settings import RetrieverSettings

COGNITO = {
    "cognito_issuer": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_x",
    "cognito_jwks_url": "http://127.0.0.1:1/jwks.json",
    "cognito_client_id": "client",
}
SECRET = "s3cret-" + "x" * 30


def test_the_service_token_is_read_from_its_file(tmp_path: Path) -> None:
    token_file = tmp_path / "service_token"
    token_file.write_text(SECRET + "\n")
    settings = RetrieverSettings(service_token_file=token_file, host="0.0.0.0")
    assert settings.service_token == SECRET


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_a_missing_or_empty_secret_file_is_a_clear_error(
    tmp_path: Path, content: str | None
) -> None:
    token_file = tmp_path / "service_token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(ValidationError, match="service_token"):
        RetrieverSettings(service_token_file=token_file)


def test_the_dev_service_token_is_refused_in_prod_and_beyond_loopback() -> None:
    for given in ({"profile": "prod"}, {"host": "0.0.0.0"}):
        with pytest.raises(ValidationError, match="service_token"):
            GatewaySettings(**COGNITO, service_token=DEV_SERVICE_TOKEN, **given)
    assert GatewaySettings(**COGNITO).service_token == DEV_SERVICE_TOKEN  # dev, loopback


@pytest.mark.parametrize("password", ["postgres", "rag", "short-pw", "ChangeMe"])
def test_development_database_passwords_are_refused_in_prod(password: str) -> None:
    url = f"postgresql://rag:{password}@db:5432/rag"
    assert RetrieverSettings(database_url=url).database_url == url  # dev: accepted
    with pytest.raises(ValidationError, match="database password"):
        RetrieverSettings(profile="prod", service_token=SECRET, database_url=url)


def test_the_database_password_file_fills_both_urls(tmp_path: Path) -> None:
    password_file = tmp_path / "postgres_password"
    password_file.write_text(SECRET)
    settings = RetrieverSettings(
        profile="prod",
        service_token=SECRET,
        database_url="postgresql://rag@db:5432/rag",
        app_database_url="postgresql://rag_app@db:5432/rag",
        database_password_file=password_file,
    )
    assert f"password={SECRET}" in (settings.database_url or "")
    assert f"password={SECRET}" in (settings.app_database_url or "")
    assert "user=rag_app" in (settings.app_database_url or "")


def test_the_gateway_learns_the_local_pool_from_its_file(tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.json"
    pool = {"issuer": "https://i", "jwks_url": "http://cognito:8009/p/jwks", "client_id": "c"}
    pool_file.write_text(json.dumps({**pool, "pool_id": "p"}))
    settings = GatewaySettings(cognito_pool_file=pool_file)
    assert (settings.cognito_issuer, settings.cognito_jwks_url, settings.cognito_client_id) == (
        pool["issuer"],
        pool["jwks_url"],
        pool["client_id"],
    )
    with pytest.raises(ValidationError, match="local emulator"):
        GatewaySettings(cognito_pool_file=pool_file, profile="prod", service_token=SECRET)
    pool_file.write_text("{}")
    with pytest.raises(ValidationError, match="does not hold"):
        GatewaySettings(cognito_pool_file=pool_file)


def test_without_a_pool_the_gateway_names_the_missing_settings() -> None:
    with pytest.raises(ValidationError, match="GATEWAY_COGNITO_ISSUER"):
        GatewaySettings(cognito_jwks_url="http://x", cognito_client_id="c")


def test_dev_secrets_are_made_once_and_kept(tmp_path: Path) -> None:
    assert sorted(ensure_secrets(tmp_path)) == ["postgres_password", "service_token"]
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert all(len(value.strip()) >= 32 for value in first.values())
    assert first["service_token"] != first["postgres_password"]
    assert ensure_secrets(tmp_path) == []
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == first


def test_the_database_passwords_come_from_env_vars_as_ecs_injects_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RETRIEVER_DATABASE_URL", "postgresql://rag@db:5432/rag?sslmode=require")
    monkeypatch.setenv("RETRIEVER_DATABASE_PASSWORD", SECRET)
    app_password = "app-" + "y" * 30
    monkeypatch.setenv("RETRIEVER_APP_DATABASE_PASSWORD", app_password)
    settings = RetrieverSettings(profile="prod", service_token=SECRET)
    assert f"password={SECRET}" in (settings.database_url or "")
    assert "sslmode=require" in (settings.database_url or "")
    # No app URL: the service makes app_role's login with the app password at start.
    assert settings.app_database_url is None
    assert settings.app_login_password == app_password
    assert app_password not in repr(settings)  # a SecretStr until migrate needs it


def test_an_app_password_with_an_app_url_is_that_urls_password() -> None:
    settings = RetrieverSettings(
        database_url="postgresql://rag@db:5432/rag",
        app_database_url="postgresql://rag_app@db:5432/rag",
        app_database_password=SECRET,
    )
    assert f"password={SECRET}" in (settings.app_database_url or "")
    assert "password" not in (settings.database_url or "")
    assert settings.app_login_password is None  # the operator made that login


def test_database_passwords_from_a_file_and_env_vars_together_are_refused(tmp_path: Path) -> None:
    password_file = tmp_path / "postgres_password"
    password_file.write_text(SECRET)
    url = "postgresql://rag@db:5432/rag"
    with pytest.raises(ValidationError, match="not both"):
        RetrieverSettings(
            database_url=url, database_password_file=password_file, database_password=SECRET
        )
    with pytest.raises(ValidationError, match="not both"):
        RetrieverSettings(
            database_url=url,
            app_database_url="postgresql://rag_app@db:5432/rag",
            database_password_file=password_file,
            app_database_password=SECRET,
        )
    # The file for the owner, the env var for the login the service makes: no conflict.
    settings = RetrieverSettings(
        database_url=url, database_password_file=password_file, app_database_password="a" * 20
    )
    assert settings.app_login_password == "a" * 20
    with pytest.raises(ValidationError, match="needs RETRIEVER_DATABASE_URL"):
        RetrieverSettings(database_password=SECRET)


@pytest.mark.parametrize("password", ["rag", "hunter2-weak"])
def test_weak_database_passwords_from_env_vars_are_refused_in_prod_and_not_shown(
    password: str,
) -> None:
    url = "postgresql://rag@db:5432/rag"
    for given in ({"database_password": password}, {"app_database_password": password}):
        RetrieverSettings(database_url=url, **given)  # dev: accepted
        with pytest.raises(ValidationError, match="database password") as raised:
            RetrieverSettings(
                profile="prod",
                service_token=SECRET,
                database_url=url,
                **{"database_password": SECRET, **given},
            )
        assert password not in str(raised.value) and SECRET not in str(raised.value)
