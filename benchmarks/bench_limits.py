"""Per-user limits: counted in the retriever's database (shared by all gateway tasks) vs in
the gateway task's memory (local).

Starts an embedded PostgreSQL, the embedder, the retriever, the local Cognito emulator and
two gateways (GATEWAY_LIMITS_STORE=local and =shared, limits too roomy to refuse anything)
on free loopback ports. Two measures, each at concurrency 1 (one user), 16 (16 users) and
16 (one user, whose requests queue on their bucket's row lock), the two stores interleaved
round by round (local, shared, shared, local, ...) so both see the same machine state:

1. A cheap authenticated request end to end (GET /v1/documents: token check, rate limit, one
   retriever call): latency percentiles through each gateway, the milliseconds the shared
   limiter adds, and the ratio.
2. The limiter alone, in this process (the gateway's RateLimiter, and for shared its keep-alive
   retriever client): a request's rate check, and a chat's admission (its stream slot; the
   slot goes back in the background, as in the gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psycopg.conninfo import make_conninfo  # noqa: E402

from benchmarks.common import report  # noqa: E402
from ragctl.cognito import EMULATOR_ENV, LocalPool  # noqa: E402
from ragctl.stack import wait_ready  # noqa: E402
from services.common.http import make_client  # noqa: E402
from services.common.ports import free_port  # noqa: E402
from services.gateway.limits import RateLimiter, SharedLimits  # noqa: E402
from services.gateway.upstream import RetrieverClient  # noqa: E402
from services.retriever.embedded_pg import (  # noqa: E402
    start_embedded_postgres,
    stop_embedded_postgres,
)

TOKEN = "bench-service-token"
STORES = ("local", "shared")
# Nothing is refused: the measure is the count's cost, not a 429.
PER_MINUTE, BURST, MAX_STREAMS = 1_000_000, 1_000_000, 10_000
Call = Callable[[int], Awaitable[None]]  # one request of worker n
SCENARIOS = {"c1": (1, 1), "c16_users": (16, 16), "c16_one_user": (16, 1)}  # (workers, users)


def start(
    module: str, env: dict[str, str], url: str, alive_path: str | None = None
) -> subprocess.Popen[bytes]:
    """Start a service; wait until it is ready (or only alive at alive_path)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        stdout=subprocess.DEVNULL,
    )
    up = wait_ready(url, 300, proc) if alive_path is None else wait_up(url + alive_path, 120, proc)
    if not up:
        proc.kill()
        raise SystemExit(f"{module} did not start")
    return proc


def wait_up(url: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> bool:
    """Poll url until it answers 200 (a gateway's /healthz: it has no generator here)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return True
        time.sleep(0.2)
    return False


def summary(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100)
    return {"p50_ms": cuts[49] * 1000, "p95_ms": cuts[94] * 1000}


def compare(
    samples: dict[str, list[float]], seconds: dict[str, float], ratios: bool
) -> dict[str, Any]:
    """Percentiles of each store, what shared adds, and (for whole requests) the ratios; a
    ratio of the limiter alone (microseconds locally) would say nothing."""
    local, shared = summary(samples["local"]), summary(samples["shared"])
    result: dict[str, Any] = {
        "requests_per_store": len(samples["local"]),
        "local": {**local, "requests_per_s": len(samples["local"]) / seconds["local"]},
        "shared": {**shared, "requests_per_s": len(samples["shared"]) / seconds["shared"]},
        "added_p50_ms": shared["p50_ms"] - local["p50_ms"],
        "added_p95_ms": shared["p95_ms"] - local["p95_ms"],
    }
    if ratios:
        result["ratio_p50_shared_vs_local"] = shared["p50_ms"] / local["p50_ms"]
        result["ratio_p95_shared_vs_local"] = shared["p95_ms"] / local["p95_ms"]
        result["throughput_ratio_shared_vs_local"] = (
            result["shared"]["requests_per_s"] / result["local"]["requests_per_s"]
        )
    return result


async def timed_batch(call: Call, workers: int, per_worker: int) -> list[float]:
    """Each worker makes per_worker calls one after the other; every call's latency."""
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(per_worker):
            began = time.perf_counter()
            await call(n)
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return latencies


async def interleaved(
    calls: dict[str, Call], workers: int, per_round: int, rounds: int, ratios: bool = True
) -> dict[str, Any]:
    """Rounds of each store in turn (local, shared, shared, local, ...), after a warm-up."""
    per_worker = max(1, per_round // workers)
    for store in STORES:
        await timed_batch(calls[store], workers, max(1, 20 // workers))
    samples: dict[str, list[float]] = {store: [] for store in STORES}
    seconds = dict.fromkeys(STORES, 0.0)
    for r in range(rounds):
        for store in STORES if r % 2 == 0 else STORES[::-1]:
            began = time.perf_counter()
            samples[store] += await timed_batch(calls[store], workers, per_worker)
            seconds[store] += time.perf_counter() - began
    return compare(samples, seconds, ratios)


def list_documents(client: httpx.AsyncClient, tokens: list[str]) -> Call:
    """Worker n lists the documents of user n (mod the users)."""

    async def call(n: int) -> None:
        headers = {"Authorization": f"Bearer {tokens[n % len(tokens)]}"}
        resp = await client.get("/v1/documents?limit=1", headers=headers)
        assert resp.status_code == 200, resp.text

    return call


def check(limiter: RateLimiter, users: int) -> Call:
    async def call(n: int) -> None:
        await limiter.check(f"bench-user-{n % users}")

    return call


def admit_chat(limiter: RateLimiter, users: int) -> Call:
    async def call(n: int) -> None:
        admission = await limiter.admit_chat(f"bench-user-{n % users}", 10**6, 1)
        admission.release()

    return call


async def end_to_end(
    gateways: dict[str, str], tokens: list[str], per_round: int, rounds: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    clients = {
        store: httpx.AsyncClient(
            base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=32)
        )
        for store, url in gateways.items()
    }
    try:
        for name, (workers, users) in SCENARIOS.items():
            calls = {
                store: list_documents(client, tokens[:users]) for store, client in clients.items()
            }
            results[name] = await interleaved(calls, workers, per_round, rounds)
            print(f"end to end {name}: {results[name]}", file=sys.stderr)
    finally:
        for client in clients.values():
            await client.aclose()
    return results


async def limiter_alone(retriever_url: str, per_round: int, rounds: int) -> dict[str, Any]:
    http = make_client(retriever_url, timeout=5.0, headers={"Authorization": f"Bearer {TOKEN}"})
    shared = SharedLimits(RetrieverClient(http), timeout_s=5.0, lease_s=600.0)
    limiters = {
        "local": RateLimiter(PER_MINUTE, BURST, MAX_STREAMS),
        "shared": RateLimiter(PER_MINUTE, BURST, MAX_STREAMS, shared=shared),
    }
    results: dict[str, Any] = {"request_check": {}, "chat_admission": {}}
    try:
        for name, (workers, users) in SCENARIOS.items():
            for kind, make in (("request_check", check), ("chat_admission", admit_chat)):
                calls = {store: make(limiter, users) for store, limiter in limiters.items()}
                results[kind][name] = await interleaved(
                    calls, workers, per_round, rounds, ratios=False
                )
                print(f"limiter {kind} {name}: {results[kind][name]}", file=sys.stderr)
    finally:
        for limiter in limiters.values():
            await limiter.aclose()
        await http.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-round", type=int, default=400, help="requests per store a round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server, admin_url = start_embedded_postgres(tmp)
        ports = {name: free_port() for name in ("embedder", "retriever", "cognito", *STORES)}
        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        quiet = {"EMBEDDER_LOG_LEVEL": "warning", "RETRIEVER_LOG_LEVEL": "warning"}
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(
                start(
                    "services.embedder",
                    {**quiet, "EMBEDDER_PORT": str(ports["embedder"])},
                    url["embedder"],
                )
            )
            procs.append(
                start(
                    "services.retriever",
                    {
                        **quiet,
                        "RETRIEVER_PORT": str(ports["retriever"]),
                        "RETRIEVER_DATABASE_URL": admin_url,
                        "RETRIEVER_APP_DATABASE_URL": make_conninfo(admin_url, user="rag_app"),
                        "RETRIEVER_EMBEDDER_URL": url["embedder"],
                        "RETRIEVER_SERVICE_TOKEN": TOKEN,
                    },
                    url["retriever"],
                )
            )
            procs.append(spawn_cognito(ports["cognito"], url["cognito"]))
            pool = LocalPool.create(url["cognito"])
            tokens = []
            for n in range(16):
                name = f"bench-{n}@example.com"
                tokens.append(pool.access_token(name, pool.create_user(name)))
            for store in STORES:
                env = {
                    "GATEWAY_PORT": str(ports[store]),
                    "GATEWAY_LOG_LEVEL": "warning",
                    "GATEWAY_COGNITO_ISSUER": pool.issuer,
                    "GATEWAY_COGNITO_JWKS_URL": pool.jwks_url,
                    "GATEWAY_COGNITO_CLIENT_ID": pool.client_id,
                    "GATEWAY_RETRIEVER_URL": url["retriever"],
                    "GATEWAY_GENERATOR_URL": f"http://127.0.0.1:{free_port()}",  # unused
                    "GATEWAY_SERVICE_TOKEN": TOKEN,
                    "GATEWAY_LIMITS_STORE": store,
                    "GATEWAY_RATE_LIMIT_PER_MINUTE": str(PER_MINUTE),
                    "GATEWAY_RATE_LIMIT_BURST": str(BURST),
                }
                procs.append(start("services.gateway", env, url[store], "/healthz"))
            gateways = {store: url[store] for store in STORES}
            result = {
                "per_round": args.per_round,
                "rounds": args.rounds,
                "scenarios": {k: {"workers": w, "users": u} for k, (w, u) in SCENARIOS.items()},
                "end_to_end_get_documents": asyncio.run(
                    end_to_end(gateways, tokens, args.per_round, args.rounds)
                ),
                "limiter_alone": asyncio.run(
                    limiter_alone(url["retriever"], args.per_round, args.rounds)
                ),
            }
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
            stop_embedded_postgres(server)
    report("bench_limits", result)


def spawn_cognito(port: int, url: str) -> subprocess.Popen[bytes]:
    """The local Cognito emulator (moto server), as ragctl starts it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **EMULATOR_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not wait_up(f"{url}/moto-api/", 60, proc):
        proc.kill()
        raise SystemExit("the Cognito emulator did not start")
    return proc


if __name__ == "__main__":
    main()
