"""The CDK app: `cdk deploy` (deploy/aws/README.md), or `python app.py` to synthesize into
CDK_OUTDIR without the CDK CLI (what the tests do)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aws_cdk as cdk  # noqa: E402
from cdk_nag import AwsSolutionsChecks  # noqa: E402

from rag_aws.config import ConfigError, DeployConfig  # noqa: E402
from rag_aws.platform import PlatformStack  # noqa: E402
from rag_aws.registry import RegistryStack  # noqa: E402


def build(app: cdk.App) -> tuple[RegistryStack, PlatformStack]:
    config = DeployConfig.from_context(app.node.try_get_context)
    env = cdk.Environment(region=config.region, account=_account(app))
    registry = RegistryStack(
        app,
        f"{config.prefix.capitalize()}Registry",
        prefix=config.prefix,
        env=env,
        description="RAG platform: container image repositories",
    )
    platform = PlatformStack(
        app,
        f"{config.prefix.capitalize()}Platform",
        config=config,
        env=env,
        description="RAG platform: gateway, retriever, embedder and vLLM generator on ECS",
    )
    platform.add_stack_dependency(registry)
    for stack in (registry, platform):
        cdk.Tags.of(stack).add("application", config.prefix)
    # AWS Solutions rules on every resource: a finding the resource does not accept with a
    # written reason (rag_aws/nag.py) is an error, which stops `cdk synth` and `cdk deploy`.
    cdk.Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    return registry, platform


def _account(app: cdk.App) -> str | None:
    import os

    return app.node.try_get_context("account") or os.environ.get("CDK_DEFAULT_ACCOUNT")


def main() -> int:
    app = cdk.App()
    try:
        build(app)
    except ConfigError as exc:
        print(f"deploy/aws: {exc}", file=sys.stderr)
        return 2
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
