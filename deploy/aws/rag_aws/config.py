"""The deployment's choices, read from CDK context (`cdk.json`, `-c key=value`) and checked
before anything is built, so a wrong value fails `cdk synth` with a sentence, not a stack."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Literal

CRON = re.compile(r"^\S+ \S+ \S+ \S+ \S+ \S+$")  # EventBridge: min hour day month weekday year


# CloudWatch Logs' retention choices (days) and their names in the CDK.
RETENTION = {
    1: "ONE_DAY",
    3: "THREE_DAYS",
    5: "FIVE_DAYS",
    7: "ONE_WEEK",
    14: "TWO_WEEKS",
    30: "ONE_MONTH",
    60: "TWO_MONTHS",
    90: "THREE_MONTHS",
    180: "SIX_MONTHS",
    365: "ONE_YEAR",
}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DeployConfig:
    """Every context value the app reads, with its default. Names are the context keys."""

    region: str = ""  # required: where everything is created
    prefix: str = "rag"  # names: stacks, repositories, the Cloud Map namespace, metrics
    # HTTPS: an ACM certificate in the region, or a domain in a Route 53 hosted zone that the
    # app certifies (DNS validation) and points at the load balancer.
    certificate_arn: str = ""
    domain_name: str = ""
    hosted_zone_id: str = ""
    hosted_zone_name: str = ""
    vpc_id: str = ""  # an existing VPC (looked up: needs the account); empty: a new one
    nat_gateways: int = 1  # a new VPC's NAT gateways: 1 is cheaper, 2 survives an AZ outage
    image_tag: str = "latest"  # the tag push-images.sh pushed to the four repositories

    # Generator: vLLM with Mistral-7B-Instruct on g5.xlarge (docs/generator-sizing.md).
    gpu_instance_type: str = "g5.xlarge"
    gpu_root_volume_gib: int = 200  # the vLLM image with baked weights is about 25 GB
    generator_min_tasks: int = 1
    generator_max_tasks: int = 2
    generator_waiting_target: float = 4.0  # vLLM's waiting requests per task it scales on
    # Scale to zero on a schedule (EventBridge cron, UTC unless schedule_timezone): off holds
    # the generator at zero tasks (and zero GPU hosts); on restores min/max. Empty: always on.
    generator_off_schedule: str = ""
    generator_on_schedule: str = ""
    schedule_timezone: str = "UTC"

    # Embedder: on Fargate CPU (the default) or on a GPU host of its own.
    embedder_placement: Literal["cpu", "gpu"] = "cpu"
    embedder_model: str = "thenlper/gte-base"  # baked into the embedder image

    gateway_min_tasks: int = 2
    gateway_max_tasks: int = 8
    gateway_requests_per_target: int = 300  # per minute, the ALB's RequestCountPerTarget
    retriever_min_tasks: int = 2
    retriever_max_tasks: int = 6

    db_min_acu: float = 0.5  # Aurora Serverless v2; 0 lets an idle database pause
    db_max_acu: float = 8.0
    deletion_protection: bool = True  # the database: `cdk destroy` needs it off first
    log_retention_days: int = 30
    alarm_email: str = ""  # optional: notified by the GPU host group's scaling events

    @classmethod
    def from_context(cls, get: Any) -> DeployConfig:
        """Build from a context getter (`app.node.try_get_context`); values given on the
        command line arrive as strings and are converted to each field's type."""
        given: dict[str, Any] = {}
        for field in fields(cls):
            raw = get(_camel(field.name))
            if raw is None:
                continue
            default = field.default
            try:
                if isinstance(default, bool):
                    value: Any = raw if isinstance(raw, bool) else str(raw).lower() == "true"
                elif isinstance(default, int):
                    value = int(raw)
                elif isinstance(default, float):
                    value = float(raw)
                else:
                    value = str(raw)
            except ValueError as exc:
                raise ConfigError(f"context {_camel(field.name)}={raw!r} is not a number") from exc
            given[field.name] = value
        config = cls(**given)
        config.check()
        return config

    def check(self) -> None:
        problems = []
        if not self.region:
            problems.append("set the region: -c region=us-east-1")
        if not (self.certificate_arn or self.domain_name):
            problems.append(
                "set certificateArn (an ACM certificate) or domainName with hostedZoneId and "
                "hostedZoneName: the load balancer serves HTTPS only"
            )
        if self.domain_name and not (self.hosted_zone_id and self.hosted_zone_name):
            problems.append("domainName needs hostedZoneId and hostedZoneName")
        if self.embedder_placement not in ("cpu", "gpu"):
            problems.append("embedderPlacement is cpu or gpu")
        if not re.fullmatch(r"[a-z][a-z0-9-]{1,20}", self.prefix):
            problems.append("prefix: 2 to 21 lowercase letters, digits or dashes")
        if bool(self.generator_off_schedule) != bool(self.generator_on_schedule):
            problems.append("set both generatorOffSchedule and generatorOnSchedule, or neither")
        for name in ("generator_off_schedule", "generator_on_schedule"):
            value = getattr(self, name)
            if value and not CRON.match(value):
                problems.append(
                    f"{_camel(name)} is an EventBridge cron of six fields, "
                    "e.g. '0 20 ? * MON-FRI *'"
                )
        if not 0 <= self.generator_min_tasks <= self.generator_max_tasks:
            problems.append("0 <= generatorMinTasks <= generatorMaxTasks")
        if self.generator_max_tasks < 1:
            problems.append("generatorMaxTasks is at least 1")
        if not 0 <= self.db_min_acu <= self.db_max_acu:
            problems.append("0 <= dbMinAcu <= dbMaxAcu")
        if self.log_retention_days not in RETENTION:
            problems.append(f"logRetentionDays is one of {sorted(RETENTION)}")
        if problems:
            raise ConfigError("; ".join(problems))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)
