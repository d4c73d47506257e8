"""The image repositories, a stack of their own: deployed first, so the images can be pushed
(push-images.sh) before the platform's services ask ECS to run them."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ecr as ecr
from constructs import Construct

SERVICES = ("gateway", "retriever", "embedder", "generator")


def repository_name(prefix: str, service: str) -> str:
    return f"{prefix}/{service}"


class RegistryStack(cdk.Stack):
    def __init__(self, scope: Construct, id: str, *, prefix: str, **kwargs: object) -> None:
        super().__init__(scope, id, **kwargs)  # type: ignore[arg-type]
        for service in SERVICES:
            repo = ecr.Repository(
                self,
                service.capitalize(),
                repository_name=repository_name(prefix, service),
                image_scan_on_push=True,
                image_tag_mutability=ecr.TagMutability.MUTABLE,
                encryption=ecr.RepositoryEncryption.AES_256,
                # Images are rebuilt from the repository: keep the last 20, drop untagged.
                lifecycle_rules=[
                    ecr.LifecycleRule(
                        tag_status=ecr.TagStatus.UNTAGGED, max_image_age=cdk.Duration.days(7)
                    ),
                    ecr.LifecycleRule(tag_status=ecr.TagStatus.ANY, max_image_count=20),
                ],
                removal_policy=cdk.RemovalPolicy.RETAIN,
            )
            cdk.CfnOutput(self, f"{service.capitalize()}Repository", value=repo.repository_uri)
