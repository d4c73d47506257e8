"""What each of the four services runs with on ECS: its size, placement, health check, stop
timeout, and the settings it is given, by their environment names.

Every name set here is one that service's settings class reads
(tests/test_deploy_aws.py checks the synthesized task definitions against the classes), so
the deployment cannot set a setting that no longer exists. The values follow the services'
own documentation: docs/generator-sizing.md for vLLM, deploy/README.md for the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rag_aws.config import DeployConfig

PORTS = {"gateway": 8000, "retriever": 8001, "embedder": 8002, "generator": 8003}
DB_NAME = "rag"
DB_OWNER = "rag_owner"  # the schema owner: the retriever migrates with it
DB_PORT = 5433  # not the default 5432: one less port scanners try
GENERATOR_MODEL = "mistralai/Mistral-7B-Instruct-v0.3"  # baked into the vLLM image

# ECS allows at most 120 s between SIGTERM and SIGKILL. Each service drains for less.
STOP_TIMEOUT_S = 120
DRAIN_S = 100
# The load balancer stops sending a gateway task new requests, then waits this long for its
# streams before ECS sends SIGTERM (and the gateway's own drain starts).
GATEWAY_DEREGISTRATION_S = 110

# The generator's queue metric: services/generator/cloudwatch.py publishes vLLM's waiting
# requests as CloudWatch embedded metrics, one data point per task per interval
# (tests/test_deploy_aws.py checks that these names are the ones it writes).
# 30 s: target tracking reads one-minute data points, and a 60 s sample drifting against the
# minute boundaries would leave some minutes without one.
METRICS_INTERVAL_S = 30
METRICS_NAMESPACE = "RagPlatform"
WAITING_METRIC = "RequestsWaiting"


@dataclass(frozen=True)
class ServiceShape:
    name: str
    cpu: int  # Fargate CPU units (1024 = 1 vCPU); GPU tasks take the whole host
    memory_mib: int
    gpu: bool
    min_tasks: int
    environment: dict[str, str]
    # environment name -> (which secret, which JSON field of it or None for the whole value)
    secrets: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    start_period_s: int = 60  # ECS allows at most 300
    health_retries: int = 3
    health_path: str = "/readyz"
    stop_timeout_s: int = STOP_TIMEOUT_S
    discoverable: bool = True  # registered in Cloud Map

    @property
    def port(self) -> int:
        return PORTS[self.name]

    @property
    def title(self) -> str:
        return self.name.capitalize()


def generator_queue_metric(config: DeployConfig) -> tuple[str, str, dict[str, str]]:
    """Namespace, metric name and dimensions of the generator's waiting requests."""
    return METRICS_NAMESPACE, WAITING_METRIC, {"Deployment": config.prefix}


def service_shapes(
    config: DeployConfig, *, issuer: str, client_id: str, database_host: str, namespace: str
) -> list[ServiceShape]:
    def url(service: str) -> str:
        return f"http://{service}.{namespace}:{PORTS[service]}"

    def base(prefix: str, name: str) -> dict[str, str]:
        return {
            f"{prefix}_PROFILE": "prod",  # refuses development secrets
            f"{prefix}_HOST": "0.0.0.0",
            f"{prefix}_PORT": str(PORTS[name]),
            f"{prefix}_DRAIN_TIMEOUT_S": str(DRAIN_S),
        }

    service_token = ("service_token", None)
    gateway = ServiceShape(
        name="gateway",
        cpu=1024,
        memory_mib=2048,
        gpu=False,
        min_tasks=config.gateway_min_tasks,
        environment={
            **base("GATEWAY", "gateway"),
            "GATEWAY_COGNITO_ISSUER": issuer,
            "GATEWAY_COGNITO_JWKS_URL": f"{issuer}/.well-known/jwks.json",
            "GATEWAY_COGNITO_CLIENT_ID": client_id,
            "GATEWAY_TOKEN_USE": "access",
            "GATEWAY_RETRIEVER_URL": url("retriever"),
            "GATEWAY_GENERATOR_URL": url("generator"),
            # Per-user limits counted in the database (through the retriever), so they hold
            # across the gateway's tasks.
            "GATEWAY_LIMITS_STORE": "shared",
            # The generator may be scaled to zero on a schedule: the gateways stay ready
            # (documents and search work; chat answers 503 until it is back).
            "GATEWAY_READINESS_OPTIONAL": '["generator"]',
        },
        secrets={"GATEWAY_SERVICE_TOKEN": service_token},
        start_period_s=30,
        # Readiness on the load balancer: its own health check, not Cloud Map.
        discoverable=False,
    )
    retriever = ServiceShape(
        name="retriever",
        cpu=1024,
        memory_mib=3072,  # parsing runs in worker processes with their own memory caps
        gpu=False,
        min_tasks=config.retriever_min_tasks,
        environment={
            **base("RETRIEVER", "retriever"),
            # The owner, for migrations; its password comes from the Aurora secret. At start
            # the retriever gives the rag_app role a login with the app secret and queries
            # as rag_app, which row-level security binds.
            "RETRIEVER_DATABASE_URL": (
                f"postgresql://{DB_OWNER}@{database_host}:{DB_PORT}/{DB_NAME}?sslmode=require"
            ),
            "RETRIEVER_EMBEDDER_URL": url("embedder"),
            "RETRIEVER_EMBEDDER_WAIT_S": "600",  # a GPU embedder may wait for its host
        },
        secrets={
            "RETRIEVER_SERVICE_TOKEN": service_token,
            "RETRIEVER_DATABASE_PASSWORD": ("owner", "password"),
            "RETRIEVER_APP_DATABASE_PASSWORD": ("app_db", None),
        },
        start_period_s=120,
    )
    on_gpu = config.embedder_placement == "gpu"
    embedder = ServiceShape(
        name="embedder",
        cpu=2048,
        memory_mib=8192 if on_gpu else 4096,
        gpu=on_gpu,
        min_tasks=1,
        environment={
            **base("EMBEDDER", "embedder"),
            "EMBEDDER_MODEL": config.embedder_model,  # baked into the image (push-images.sh)
            "EMBEDDER_DEVICE": "cuda" if on_gpu else "cpu",
        },
        start_period_s=180,
    )
    generator = ServiceShape(
        name="generator",
        cpu=0,
        # g5.xlarge: 16 GiB, of which ECS offers about 15.3; vLLM maps the weights (14.5 GB
        # on disk) while loading them onto the GPU.
        memory_mib=12288,
        gpu=True,
        min_tasks=config.generator_min_tasks,
        environment={
            **base("GENERATOR", "generator"),
            # docs/generator-sizing.md: Mistral-7B-Instruct in fp16 on one A10G (24 GB).
            "GENERATOR_ENGINE": "vllm",
            "GENERATOR_MODEL": GENERATOR_MODEL,
            "GENERATOR_SERVED_MODEL_NAME": "mistral-7b-instruct",
            "GENERATOR_DTYPE": "float16",
            "GENERATOR_MAX_MODEL_LEN": "8192",
            "GENERATOR_GPU_MEMORY_UTILIZATION": "0.90",
            "GENERATOR_MAX_NUM_SEQS": "16",
            "GENERATOR_MAX_NUM_BATCHED_TOKENS": "2048",
            "GENERATOR_ENABLE_PREFIX_CACHING": "true",
            "GENERATOR_CLOUDWATCH_METRICS_INTERVAL_S": str(METRICS_INTERVAL_S),
            "GENERATOR_CLOUDWATCH_NAMESPACE": METRICS_NAMESPACE,
            "GENERATOR_CLOUDWATCH_DEPLOYMENT": config.prefix,
        },
        # Loading 14.5 GB of weights from the host's image cache and capturing CUDA graphs
        # takes 2 to 4 minutes: 300 s of grace (ECS's most), then 10 failed checks 30 s
        # apart before the task counts as unhealthy: 10 minutes in all.
        start_period_s=300,
        health_retries=10,
    )
    return [gateway, retriever, embedder, generator]
