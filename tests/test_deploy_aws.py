"""The AWS deployment (deploy/aws) as a specification: synthesized here without an account,
every template passes cfn-lint and cdk-nag's AwsSolutions rules (each accepted finding
carries its reason in code), every environment variable a task sets is a setting its
service reads (and the values parse), and the shape the platform needs holds: who may reach
whom, GPU hosts, health checks, drains, autoscaling.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from services.embedder.settings import EmbedderSettings
from services.gateway.settings import GatewaySettings
from services.generator import cloudwatch
from services.generator.settings import GeneratorSettings
from services.retriever.settings import RetrieverSettings

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "deploy" / "aws" / "app.py"
CERTIFICATE = "arn:aws:acm:us-east-1:123456789012:certificate/0f1e2d3c-aaaa-bbbb-cccc-000000000000"
DEFAULT = {
    "region": "us-east-1",
    "certificateArn": CERTIFICATE,
    # Scale to zero at night on weekdays and all weekend, in the users' time zone.
    "generatorOffSchedule": "0 20 ? * MON-FRI *",
    "generatorOnSchedule": "0 7 ? * MON-FRI *",
    "scheduleTimezone": "Europe/Berlin",
}
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "retriever": RetrieverSettings,
    "embedder": EmbedderSettings,
    "generator": GeneratorSettings,
}
# Set by the CDK itself on every container of an awsvpc task on EC2 (the AWS SDKs there
# cannot ask the instance for its region); read by AWS SDKs, none of our settings.
CDK_ADDED = {"AWS_REGION"}


def synthesize(outdir: Path, context: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CDK_OUTDIR": str(outdir),
        "CDK_CONTEXT_JSON": json.dumps(context),
        # The machines' Node 20 works with this jsii; its banner says it is past end of life.
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    }
    env.pop("CDK_DEFAULT_ACCOUNT", None)
    return subprocess.run(
        [sys.executable, str(APP)], env=env, capture_output=True, text=True, timeout=300
    )


class Synth:
    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.templates = {
            path.name.removesuffix(".template.json"): json.loads(path.read_text())
            for path in outdir.glob("*.template.json")
        }
        self.platform = self.templates["RagPlatform"]["Resources"]

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {key: res for key, res in self.platform.items() if res["Type"] == kind}

    def one(self, kind: str) -> dict[str, Any]:
        (resource,) = self.of_type(kind).values()
        props: dict[str, Any] = resource["Properties"]
        return props

    def containers(self) -> dict[str, dict[str, Any]]:
        found = {}
        for res in self.of_type("AWS::ECS::TaskDefinition").values():
            for container in res["Properties"]["ContainerDefinitions"]:
                found[container["Name"]] = {**container, "_task": res["Properties"]}
        return found

    def findings(self) -> list[str]:
        """Errors and warnings CDK and cdk-nag left in the assembly (unaccepted findings)."""
        found = []
        for path in self.outdir.glob("*.metadata.json"):
            for construct, entries in json.loads(path.read_text()).items():
                for entry in entries:
                    if entry["type"] in ("aws:cdk:error", "aws:cdk:warning"):
                        found.append(f"{construct}: {str(entry['data'])[:160]}")
        return found


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synth]:
    outdir = tmp_path_factory.mktemp("cdk-default")
    done = synthesize(outdir, DEFAULT)
    assert done.returncode == 0, done.stderr[-3000:]
    yield Synth(outdir)


def resolve(value: Any) -> str:
    """A CloudFormation value as a plausible string: references become placeholders."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(resolve(part) for part in parts)
    return "resolved-at-deploy"


# -- the rule packs -------------------------------------------------------------------------


def test_every_security_finding_is_fixed_or_accepted_with_a_reason(synth: Synth) -> None:
    assert synth.findings() == []
    # The accepted ones are written in the nag report with their reasons.
    report = (synth.outdir / "AwsSolutions--RagPlatform-NagReport.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(report)))
    accepted = [row for row in rows if row["Compliance"] == "Suppressed"]
    assert accepted, "the report lists the accepted findings"
    assert all(len(row["Exception Reason"]) >= 60 for row in accepted), accepted


def test_templates_pass_cfn_lint(synth: Synth) -> None:
    templates = sorted(str(path) for path in synth.outdir.glob("*.template.json"))
    assert len(templates) == 2
    done = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), *templates],
        cwd=ROOT / "deploy" / "aws",  # its .cfnlintrc.yaml
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- settings: the deployment cannot drift from the code ------------------------------------


def test_every_environment_variable_is_a_setting_of_its_service(synth: Synth) -> None:
    containers = synth.containers()
    assert set(containers) == set(SETTINGS)
    for name, container in containers.items():
        settings = SETTINGS[name]
        prefix = settings.model_config.get("env_prefix", "")
        known = {f"{prefix}{field}".upper() for field in settings.model_fields}
        given = {item["Name"] for item in container.get("Environment", [])}
        given |= {item["Name"] for item in container.get("Secrets", [])}
        extra = CDK_ADDED if container["_task"].get("RequiresCompatibilities") == ["EC2"] else set()
        assert given - extra <= known, f"{name} sets {sorted(given - extra - known)}"


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_each_service_accepts_the_values_it_is_given(
    synth: Synth, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = synth.containers()[service]
    for key in list(os.environ):
        if key.startswith(f"{service.upper()}_"):
            monkeypatch.delenv(key)
    for item in container.get("Environment", []):
        monkeypatch.setenv(item["Name"], resolve(item["Value"]))
    for item in container.get("Secrets", []):
        monkeypatch.setenv(item["Name"], "s3cret-from-secrets-manager-0123456789")
    settings: Any = SETTINGS[service]()
    assert settings.profile == "prod" and settings.host == "0.0.0.0"
    assert settings.port == int(container["PortMappings"][0]["ContainerPort"])
    # SIGTERM to SIGKILL (ECS's stop timeout) leaves the service's drain room to finish.
    assert container["StopTimeout"] >= settings.drain_timeout_s + 10


def test_service_secrets_come_from_secrets_manager_never_the_environment(synth: Synth) -> None:
    containers = synth.containers()
    secret_names = {
        "gateway": {"GATEWAY_SERVICE_TOKEN"},
        "retriever": {
            "RETRIEVER_SERVICE_TOKEN",
            "RETRIEVER_DATABASE_PASSWORD",
            "RETRIEVER_APP_DATABASE_PASSWORD",
        },
    }
    for service, names in secret_names.items():
        container = containers[service]
        assert {item["Name"] for item in container["Secrets"]} == names
        env = {item["Name"]: item["Value"] for item in container["Environment"]}
        assert not names & set(env)
        assert all("password" not in resolve(value).lower() for value in env.values())
    token_sources = {
        json.dumps(item["ValueFrom"])
        for service in ("gateway", "retriever")
        for item in containers[service]["Secrets"]
        if item["Name"].endswith("SERVICE_TOKEN")
    }
    assert len(token_sources) == 1, "the gateway and the retriever share one service token"
    retriever_env = {i["Name"]: resolve(i["Value"]) for i in containers["retriever"]["Environment"]}
    assert retriever_env["RETRIEVER_DATABASE_URL"].endswith("?sslmode=require")


def test_generator_queue_metric_is_the_one_the_generator_publishes(synth: Synth) -> None:
    env = {i["Name"]: i["Value"] for i in synth.containers()["generator"]["Environment"]}
    assert float(env["GENERATOR_CLOUDWATCH_METRICS_INTERVAL_S"]) > 0
    (policy,) = [
        p["Properties"]["TargetTrackingScalingPolicyConfiguration"]
        for p in synth.of_type("AWS::ApplicationAutoScaling::ScalingPolicy").values()
        if "CustomizedMetricSpecification"
        in p["Properties"].get("TargetTrackingScalingPolicyConfiguration", {})
    ]
    metric = policy["CustomizedMetricSpecification"]
    assert metric["Namespace"] == env["GENERATOR_CLOUDWATCH_NAMESPACE"]
    assert metric["Namespace"] == cloudwatch.DEFAULT_NAMESPACE
    assert metric["MetricName"] == cloudwatch.REQUESTS_WAITING
    assert metric["Dimensions"] == [
        {"Name": cloudwatch.DIMENSION, "Value": env["GENERATOR_CLOUDWATCH_DEPLOYMENT"]}
    ]
    assert metric["Statistic"] == "Average"  # per task: every task publishes its own


# -- the shape ------------------------------------------------------------------------------


def test_only_the_load_balancer_is_public_and_each_service_admits_only_its_caller(
    synth: Synth,
) -> None:
    groups = {
        key: res["Properties"]["GroupDescription"]
        for key, res in synth.of_type("AWS::EC2::SecurityGroup").items()
    }

    def name(ref: Any) -> str:
        return groups[ref["Fn::GetAtt"][0]].split(":")[0]

    edges = {
        (
            name(r["Properties"]["SourceSecurityGroupId"]),
            name(r["Properties"]["GroupId"]),
            r["Properties"]["FromPort"],
        )
        for r in synth.of_type("AWS::EC2::SecurityGroupIngress").values()
    }
    assert edges == {
        ("Load balancer", "Gateway tasks", 8000),
        ("Gateway tasks", "Retriever tasks", 8001),
        ("Gateway tasks", "Generator tasks", 8003),
        ("Retriever tasks", "Embedder tasks", 8002),
        ("Retriever tasks", "Aurora", 5433),
    }
    open_rules = [
        (groups[key], rule["FromPort"])
        for key, res in synth.of_type("AWS::EC2::SecurityGroup").items()
        for rule in res["Properties"].get("SecurityGroupIngress", [])
        if rule.get("CidrIp") == "0.0.0.0/0"
    ]
    assert sorted(open_rules) == [
        ("Load balancer: HTTPS from the internet", 80),
        ("Load balancer: HTTPS from the internet", 443),
    ]
    lb = synth.one("AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert lb["Scheme"] == "internet-facing"
    for service in synth.of_type("AWS::ECS::Service").values():
        network = service["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert network["AssignPublicIp"] == "DISABLED"
    database = synth.one("AWS::RDS::DBInstance")
    assert database.get("PubliclyAccessible") in (None, False)


def test_load_balancer_serves_https_to_the_gateway_with_room_for_streams(synth: Synth) -> None:
    lb = synth.one("AWS::ElasticLoadBalancingV2::LoadBalancer")
    attributes = {a["Key"]: a["Value"] for a in lb["LoadBalancerAttributes"]}
    gateway = GatewaySettings(
        cognito_issuer="https://issuer", cognito_jwks_url="https://jwks", cognito_client_id="c"
    )
    assert int(attributes["idle_timeout.timeout_seconds"]) > gateway.generator_timeout_s
    assert attributes["routing.http.drop_invalid_header_fields.enabled"] == "true"
    assert attributes["access_logs.s3.enabled"] == "true"
    listeners = {
        listener["Properties"]["Port"]: listener["Properties"]
        for listener in synth.of_type("AWS::ElasticLoadBalancingV2::Listener").values()
    }
    assert listeners[443]["Protocol"] == "HTTPS"
    assert listeners[443]["Certificates"] == [{"CertificateArn": CERTIFICATE}]
    assert listeners[80]["DefaultActions"][0]["RedirectConfig"]["Port"] == "443"
    target_group = synth.one("AWS::ElasticLoadBalancingV2::TargetGroup")
    assert target_group["HealthCheckPath"] == "/readyz"
    assert target_group["Port"] == 8000 and target_group["TargetType"] == "ip"
    delay = {a["Key"]: a["Value"] for a in target_group["TargetGroupAttributes"]}
    env = {i["Name"]: i["Value"] for i in synth.containers()["gateway"]["Environment"]}
    assert int(delay["deregistration_delay.timeout_seconds"]) >= float(
        env["GATEWAY_DRAIN_TIMEOUT_S"]
    )
    # A generator scaled to zero on schedule leaves the gateways ready (chat answers 503).
    assert json.loads(env["GATEWAY_READINESS_OPTIONAL"]) == ["generator"]


def test_generator_runs_vllm_on_a_g5_gpu_host_group_that_can_reach_zero(synth: Synth) -> None:
    generator = synth.containers()["generator"]
    assert generator["ResourceRequirements"] == [{"Type": "GPU", "Value": "1"}]
    assert generator["_task"]["RequiresCompatibilities"] == ["EC2"]
    assert generator["HealthCheck"]["StartPeriod"] <= 300  # ECS's most
    for container in synth.containers().values():
        assert container["HealthCheck"]["Command"][0] == "CMD"
        assert "/readyz" in container["HealthCheck"]["Command"][-1]
        assert container["HealthCheck"]["StartPeriod"] <= 300
    env = {i["Name"]: i["Value"] for i in generator["Environment"]}
    sizing = GeneratorSettings()  # the defaults are docs/generator-sizing.md's numbers
    assert env["GENERATOR_ENGINE"] == "vllm"
    assert int(env["GENERATOR_MAX_NUM_SEQS"]) == sizing.max_num_seqs
    assert int(env["GENERATOR_MAX_MODEL_LEN"]) == sizing.max_model_len
    assert env["GENERATOR_MODEL"] == sizing.model

    template = synth.one("AWS::EC2::LaunchTemplate")["LaunchTemplateData"]
    assert template["InstanceType"] == "g5.xlarge"
    assert "amazonlinux2023gpu" in template["ImageId"]["Ref"].lower()
    parameters = synth.templates["RagPlatform"]["Parameters"]
    assert parameters[template["ImageId"]["Ref"]]["Default"] == (
        "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id"
    )
    (disk,) = template["BlockDeviceMappings"]
    assert disk["Ebs"]["VolumeSize"] >= 100 and disk["Ebs"]["Encrypted"]
    assert template["MetadataOptions"]["HttpTokens"] == "required"

    group = synth.one("AWS::AutoScaling::AutoScalingGroup")
    assert group["MinSize"] == "0"
    provider = synth.one("AWS::ECS::CapacityProvider")["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED"
    assert provider["ManagedTerminationProtection"] == "ENABLED"
    schedules = {
        action["Schedule"]: (
            action["ScalableTargetAction"],
            action["Timezone"],
        )
        for target in synth.of_type("AWS::ApplicationAutoScaling::ScalableTarget").values()
        for action in target["Properties"].get("ScheduledActions", [])
    }
    assert schedules == {
        "cron(0 20 ? * MON-FRI *)": ({"MinCapacity": 0, "MaxCapacity": 0}, "Europe/Berlin"),
        "cron(0 7 ? * MON-FRI *)": ({"MinCapacity": 1, "MaxCapacity": 2}, "Europe/Berlin"),
    }


def test_every_service_scales_on_its_own_signal(synth: Synth) -> None:
    signals = set()
    for policy in synth.of_type("AWS::ApplicationAutoScaling::ScalingPolicy").values():
        config = policy["Properties"]["TargetTrackingScalingPolicyConfiguration"]
        predefined = config.get("PredefinedMetricSpecification", {})
        signals.add(
            predefined.get("PredefinedMetricType")
            or config["CustomizedMetricSpecification"]["MetricName"]
        )
    assert signals == {
        "ALBRequestCountPerTarget",  # gateway
        "ECSServiceAverageCPUUtilization",  # retriever, CPU embedder
        "RequestsWaiting",  # generator
    }
    cluster = synth.one("AWS::ECS::Cluster")
    assert {"Name": "containerInsights", "Value": "enabled"} in cluster["ClusterSettings"]
    for group in synth.of_type("AWS::Logs::LogGroup").values():
        assert group["Properties"]["RetentionInDays"] == 30


def test_aurora_serverless_v2_with_pgvector_and_tls(synth: Synth) -> None:
    cluster = synth.one("AWS::RDS::DBCluster")
    assert cluster["Engine"] == "aurora-postgresql"
    # pgvector 0.8 (iterative index scans) ships with Aurora PostgreSQL 17.
    assert int(cluster["EngineVersion"].split(".")[0]) >= 17
    assert cluster["ServerlessV2ScalingConfiguration"] == {"MinCapacity": 0.5, "MaxCapacity": 8}
    assert cluster["StorageEncrypted"] and cluster["DeletionProtection"]
    parameters = synth.one("AWS::RDS::DBClusterParameterGroup")["Parameters"]
    assert parameters["rds.force_ssl"] == "1"


def test_cognito_pool_feeds_the_gateway(synth: Synth) -> None:
    pool = synth.one("AWS::Cognito::UserPool")
    assert pool["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is True
    client = synth.one("AWS::Cognito::UserPoolClient")
    assert "ALLOW_USER_PASSWORD_AUTH" in client["ExplicitAuthFlows"]
    assert client["GenerateSecret"] is False
    env = {i["Name"]: i["Value"] for i in synth.containers()["gateway"]["Environment"]}
    pool_key = next(iter(synth.of_type("AWS::Cognito::UserPool")))
    assert pool_key in json.dumps(env["GATEWAY_COGNITO_ISSUER"])
    assert resolve(env["GATEWAY_COGNITO_JWKS_URL"]).endswith("/.well-known/jwks.json")


# -- the other shapes a user can choose -----------------------------------------------------


def test_gpu_embedder_domain_and_existing_vpc_synthesize(tmp_path: Path) -> None:
    vpc_id = "vpc-0123456789abcdef0"
    lookup = (
        f"vpc-provider:account=123456789012:filter.vpc-id={vpc_id}:region=us-east-1:"
        "returnAsymmetricSubnets=true"
    )
    subnets = [
        {
            "name": name,
            "type": kind,
            "subnets": [
                {
                    "subnetId": f"subnet-{name}{i}",
                    "cidr": f"10.0.{16 * i + off}.0/24",
                    "availabilityZone": f"us-east-1{zone}",
                    "routeTableId": f"rtb-{name}{i}",
                }
                for i, zone, off in (
                    (0, "a", 0 if kind == "Public" else 1),
                    (1, "b", 0 if kind == "Public" else 1),
                )
            ],
        }
        for name, kind in (("public", "Public"), ("private", "Private"))
    ]
    context = {
        "region": "us-east-1",
        "account": "123456789012",
        "domainName": "rag.example.com",
        "hostedZoneId": "Z0123456789ABCDEFGHIJ",
        "hostedZoneName": "example.com",
        "vpcId": vpc_id,
        "embedderPlacement": "gpu",
        lookup: {
            "vpcId": vpc_id,
            "vpcCidrBlock": "10.0.0.0/16",
            "ownerAccountId": "123456789012",
            "availabilityZones": [],
            "subnetGroups": subnets,
        },
    }
    done = synthesize(tmp_path, context)
    assert done.returncode == 0, done.stderr[-3000:]
    synth = Synth(tmp_path)
    assert synth.findings() == []
    assert not synth.of_type("AWS::EC2::VPC")  # the existing one
    embedder = synth.containers()["embedder"]
    assert embedder["ResourceRequirements"] == [{"Type": "GPU", "Value": "1"}]
    env = {i["Name"]: i["Value"] for i in embedder["Environment"]}
    assert env["EMBEDDER_DEVICE"] == "cuda"
    assert synth.one("AWS::CertificateManager::Certificate")["DomainName"] == "rag.example.com"
    record = synth.one("AWS::Route53::RecordSet")
    assert record["Type"] == "A" and record["Name"] == "rag.example.com."
    group = synth.one("AWS::AutoScaling::AutoScalingGroup")
    assert int(group["MaxSize"]) == 2 + 1 + 1  # generator tasks, the embedder, a rollout


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"certificateArn": CERTIFICATE}, "set the region"),
        ({"region": "us-east-1"}, "set certificateArn"),
        ({**DEFAULT, "generatorOnSchedule": ""}, "set both generatorOffSchedule"),
        ({**DEFAULT, "generatorOffSchedule": "20 * * *"}, "EventBridge cron"),
        ({**DEFAULT, "embedderPlacement": "tpu"}, "embedderPlacement is cpu or gpu"),
        ({**DEFAULT, "dbMinAcu": "lots"}, "is not a number"),
    ],
)
def test_a_wrong_context_value_stops_synthesis_with_a_sentence(
    tmp_path: Path, context: dict[str, Any], message: str
) -> None:
    done = synthesize(tmp_path, context)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
