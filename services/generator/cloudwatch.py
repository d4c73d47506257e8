"""The generator's queue as CloudWatch metrics, for ECS autoscaling.

Every interval the engine's own waiting and running requests are written to stdout as one
line of CloudWatch embedded metric format (EMF). The awslogs driver ships stdout to
CloudWatch Logs, which turns the line into metrics: no AWS SDK and no credentials here.
The service's own logs go to stderr (services/common/observability.py), so stdout holds
only these lines (and, under vLLM, the child process's own output, line by line).

The AWS CDK app (deploy/aws) imports the names below for its scaling policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:  # the CDK app imports the names below without the service's stack
    from services.generator.serving import EngineSlots
    from services.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "RagPlatform"  # GENERATOR_CLOUDWATCH_NAMESPACE's default
DIMENSION = "Deployment"
REQUESTS_WAITING = "RequestsWaiting"  # requests the engine holds in its queue
REQUESTS_RUNNING = "RequestsRunning"  # requests in the engine's running batch
UNIT = "Count"

# The engine's own gauges, (waiting, running), on its loopback /metrics.
ENGINE_GAUGES: dict[str, tuple[str, str]] = {
    "vllm": ("vllm:num_requests_waiting", "vllm:num_requests_running"),
    "llamacpp": ("llamacpp:requests_deferred", "llamacpp:requests_processing"),
}
SCRAPE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class QueueSample:
    waiting: float
    running: float


def parse_engine_metrics(text: str, waiting: str, running: str) -> QueueSample | None:
    """The two gauges in Prometheus text, each summed over its label sets (vLLM has one per
    model and engine); None when either is missing."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (waiting, running):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    if waiting not in totals or running not in totals:
        return None
    return QueueSample(waiting=totals[waiting], running=totals[running])


def slots_sample(in_use: int, concurrency: int) -> QueueSample:
    """Our own count, for an engine whose metrics we do not read (Ray Serve): requests past
    the engine's concurrency wait."""
    return QueueSample(waiting=max(0, in_use - concurrency), running=min(in_use, concurrency))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def emf_record(
    sample: QueueSample, namespace: str, deployment: str, timestamp_ms: int
) -> dict[str, Any]:
    """One EMF document: the directive under _aws, the values and the dimension at the top."""
    return {
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [
                {
                    "Namespace": namespace,
                    "Dimensions": [[DIMENSION]],
                    "Metrics": [
                        {"Name": REQUESTS_WAITING, "Unit": UNIT},
                        {"Name": REQUESTS_RUNNING, "Unit": UNIT},
                    ],
                }
            ],
        },
        DIMENSION: deployment,
        REQUESTS_WAITING: _number(sample.waiting),
        REQUESTS_RUNNING: _number(sample.running),
    }


class QueueMetricsPublisher:
    """Writes one EMF line per interval while the engine is ready; a tick whose engine
    cannot answer is skipped (logged once until it answers again), never fatal."""

    def __init__(
        self,
        settings: GeneratorSettings,
        engine_url: str,
        slots: EngineSlots,
        engine_ready: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.slots = slots
        self.engine_ready = engine_ready
        self.gauges = ENGINE_GAUGES.get(settings.engine)
        self._client = httpx.AsyncClient(base_url=engine_url, timeout=SCRAPE_TIMEOUT_S)
        self._failing = False

    async def sample(self) -> QueueSample | None:
        if self.gauges is None:
            return slots_sample(self.slots.in_use, self.settings.engine_concurrency)
        resp = await self._client.get("/metrics")
        resp.raise_for_status()
        return parse_engine_metrics(resp.text, *self.gauges)

    async def tick(self) -> bool:
        """Write one line; False when the tick was skipped."""
        if not self.engine_ready():
            return False
        try:
            sample = await self.sample()
        except Exception as exc:  # refused, timed out, an error status, unparsable text
            self._skipped(type(exc).__name__)
            return False
        if sample is None:
            self._skipped("its /metrics lacks the queue gauges")
            return False
        self._failing = False
        record = emf_record(
            sample,
            self.settings.cloudwatch_namespace,
            self.settings.cloudwatch_deployment,
            int(time.time() * 1000),
        )
        # One write of one short line: a pipe keeps it whole among the engine's own lines.
        sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
        sys.stdout.flush()
        return True

    def _skipped(self, reason: str) -> None:
        if not self._failing:
            self._failing = True
            logger.warning("queue metrics skipped: the engine's metrics failed (%s)", reason)

    async def run(self) -> None:
        """Tick every interval until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.settings.cloudwatch_metrics_interval_s)
                await self.tick()
        finally:
            await self._client.aclose()
