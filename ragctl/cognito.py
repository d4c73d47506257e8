"""The local Cognito emulator (moto server): a user pool, an app client and users."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

REGION = "us-east-1"
DEV_USER = "dev@example.com"
# Pool and app-client ids derived from their names, so that a restarted emulator gives the
# same ones (moto keeps pools in memory only).
EMULATOR_ENV = {
    "MOTO_COGNITO_IDP_USER_POOL_ID_STRATEGY": "HASH",
    "MOTO_COGNITO_IDP_USER_POOL_CLIENT_ID_STRATEGY": "HASH",
}


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "cognito-idp",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="local",
        aws_secret_access_key="local",  # the emulator checks none
    )


@dataclass
class LocalPool:
    endpoint: str
    pool_id: str
    client_id: str

    @property
    def issuer(self) -> str:
        return f"https://cognito-idp.{REGION}.amazonaws.com/{self.pool_id}"

    @property
    def jwks_url(self) -> str:
        return f"{self.endpoint}/{self.pool_id}/.well-known/jwks.json"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def create(cls, endpoint: str) -> LocalPool:
        cognito = _client(endpoint)
        pool_id = cognito.create_user_pool(PoolName="ragplatform-local")["UserPool"]["Id"]
        client_id = cognito.create_user_pool_client(
            UserPoolId=pool_id,
            ClientName="ragplatform-local",
            ExplicitAuthFlows=["ALLOW_ADMIN_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
        )["UserPoolClient"]["ClientId"]
        return cls(endpoint=endpoint, pool_id=pool_id, client_id=client_id)

    def create_user(self, username: str, password: str | None = None) -> str:
        """Create a confirmed user; return its password."""
        password = password or f"Pw-{secrets.token_urlsafe(12)}1!"
        cognito = _client(self.endpoint)
        cognito.admin_create_user(
            UserPoolId=self.pool_id,
            Username=username,
            MessageAction="SUPPRESS",
            TemporaryPassword=f"Tmp-{secrets.token_urlsafe(12)}1!",
        )
        cognito.admin_set_user_password(
            UserPoolId=self.pool_id, Username=username, Password=password, Permanent=True
        )
        return password

    def tokens(self, username: str, password: str) -> dict[str, str]:
        """Sign in; return AccessToken, IdToken and RefreshToken."""
        result = _client(self.endpoint).admin_initiate_auth(
            UserPoolId=self.pool_id,
            ClientId=self.client_id,
            AuthFlow="ADMIN_USER_PASSWORD_AUTH",
            AuthParameters={"USERNAME": username, "PASSWORD": password},
        )
        return dict(result["AuthenticationResult"])

    def access_token(self, username: str, password: str) -> str:
        return self.tokens(username, password)["AccessToken"]

    def user_token(self, username: str) -> str:
        """An access token of username, a user made on first use: another tenant in the same
        pool (an evaluation's, a test's) with a fresh password each call."""
        password = f"Pw-{secrets.token_urlsafe(12)}1!"
        cognito = _client(self.endpoint)
        try:
            self.create_user(username, password)
        except cognito.exceptions.UsernameExistsException:
            cognito.admin_set_user_password(
                UserPoolId=self.pool_id, Username=username, Password=password, Permanent=True
            )
        return self.access_token(username, password)


def create_dev_user(pool: LocalPool, username: str, password: str | None, *, seed: int) -> str:
    """Create a user with the same `sub` (its tenant id) for the same seed; its password."""
    import httpx

    # The emulator draws the sub from its random generator: seeded alike, it draws alike.
    resp = httpx.post(f"{pool.endpoint}/moto-api/seed", params={"a": seed})
    resp.raise_for_status()
    return pool.create_user(username, password)


def password_token(region: str, client_id: str, username: str, password: str) -> str:
    """An access token from a real Cognito user pool: USER_PASSWORD_AUTH with its public app
    client (the one deploy/aws creates), for load runs against a deployment."""
    import boto3

    cognito = boto3.client("cognito-idp", region_name=region)
    result = cognito.initiate_auth(
        ClientId=client_id,
        AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": username, "PASSWORD": password},
    )
    if "AuthenticationResult" not in result:  # a challenge (new password, MFA) is pending
        raise RuntimeError(
            f"Cognito asks {username} to answer {result.get('ChallengeName')} first; sign in "
            "once interactively, then run the load test"
        )
    return str(result["AuthenticationResult"]["AccessToken"])


def local_stack_token(home: str) -> tuple[str, str]:
    """The gateway URL of the local stack whose state folder is home, and an access token of
    its dev user."""
    import json
    from pathlib import Path

    path = Path(home) / "stack.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"no running local stack: {path} is missing or unreadable; start one with "
            "`make up`, or give a URL and credentials"
        ) from exc
    pool = LocalPool(**state["cognito"])
    return state["gateway_url"], pool.access_token(state["username"], state["password"])
