"""The gateway when a dependency is down: 503 in the envelope there, the rest keeps working."""

from __future__ import annotations

import httpx

from ragctl.stack import Stack, free_port
from services.gateway.app import create_app
from tests.conftest import stack_gateway_settings


async def test_retriever_down_gives_503_and_other_routes_still_work(
    stack: Stack, dev_token: str
) -> None:
    settings = stack_gateway_settings(
        stack,
        retriever_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://gateway",
            headers={"Authorization": f"Bearer {dev_token}"},
        ) as client:
            for method, path, body in (
                ("GET", "/v1/documents", None),
                ("POST", "/v1/search", {"query": "anything"}),
                ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ):
                resp = await client.request(method, path, json=body)
                assert resp.status_code == 503, (path, resp.text)
                assert resp.json()["error"]["code"] == "retriever_unavailable"
                assert resp.headers["retry-after"]
            models = await client.get("/v1/models")
            assert models.status_code == 200
            no_rag = await client.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 8,
                    "retrieval": {"enabled": False},
                },
            )
            assert no_rag.status_code == 200
            assert no_rag.json()["choices"][0]["message"]["content"]
            assert no_rag.json()["citations"] == []
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["not_ready"] == {"retriever": "unreachable"}


async def test_a_generator_scaled_to_zero_can_leave_the_gateway_ready(
    stack: Stack, dev_token: str
) -> None:
    """The AWS deployment's choice (GATEWAY_READINESS_OPTIONAL=["generator"]): while the
    generator is at zero tasks the load balancer keeps the gateways, search works, chat
    answers 503 saying why; without the option the gateway is not ready."""
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for optional, ready_status in (([], 503), (["generator"], 200)):
        settings = stack_gateway_settings(stack, generator_url=nowhere, readiness_optional=optional)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport,
                base_url="http://gateway",
                headers={"Authorization": f"Bearer {dev_token}"},
            ) as client:
                ready = await client.get("/readyz")
                assert ready.status_code == ready_status, ready.text
                if optional:
                    assert ready.json() == {
                        "status": "ready",
                        "degraded": {"generator": "unreachable"},
                    }
                else:
                    assert ready.json()["not_ready"] == {"generator": "unreachable"}
                search = await client.post("/v1/search", json={"query": "anything"})
                assert search.status_code == 200
                chat = await client.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
                )
                assert chat.status_code == 503
                assert chat.json()["error"]["code"] == "generator_unavailable"
                assert chat.headers["retry-after"]
