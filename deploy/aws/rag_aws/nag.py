"""cdk-nag's AwsSolutions rules run on every resource (app.py); a finding fails the
synthesis unless the resource accepts it here, in code, with its reason."""

from __future__ import annotations

from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import IConstruct


def accept(
    construct: IConstruct, rule: str, reason: str, applies_to: list[str] | None = None
) -> None:
    """Accept one AwsSolutions finding on this construct and its children, saying why."""
    NagSuppressions.add_resource_suppressions(
        construct,
        [NagPackSuppression(id=f"AwsSolutions-{rule}", reason=reason, applies_to=applies_to)],
        apply_to_children=True,
    )


ENV_CONFIG = (
    "Environment variables hold configuration only (URLs, sizes, profile); every secret "
    "(service token, database passwords) reaches the container through ECS secrets from "
    "Secrets Manager."
)
ECR_TOKEN = (
    "ecr:GetAuthorizationToken (and the log stream actions CDK grants with it) cannot be "
    "scoped to a resource; image pulls themselves are limited to this deployment's "
    "repositories."
)
TASK_SECRETS_AT_START = (
    "Tasks read this secret when they start; a rotation would break running tasks until "
    "they restart. Rotate by updating the secret and redeploying (deploy/aws/README.md)."
)
