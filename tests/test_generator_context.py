"""The gateway's passage budget follows the generator's context: asked from the generator
(its /v1/models), unless a setting fixes it."""

from __future__ import annotations

from types import SimpleNamespace

from ragctl.stack import Stack
from services.common.ports import free_port
from services.gateway.app import create_app
from services.gateway.chat import FALLBACK_CONTEXT_TOKENS, generator_context_tokens
from tests.conftest import stack_gateway_settings


async def test_the_budget_is_the_generators_context_unless_a_setting_fixes_it(
    stack: Stack,
) -> None:
    settings = stack_gateway_settings(stack)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        request = SimpleNamespace(app=app)
        assert await generator_context_tokens(request, settings) == 2048  # llama.cpp's slot
        assert app.state.generator_context_tokens == 2048  # asked once, then kept
    fixed = stack_gateway_settings(stack, generator_context_tokens=8192)
    assert await generator_context_tokens(SimpleNamespace(app=create_app(fixed)), fixed) == 8192


async def test_a_generator_that_is_down_gives_the_fallback_and_is_asked_again(
    stack: Stack,
) -> None:
    settings = stack_gateway_settings(stack, generator_url=f"http://127.0.0.1:{free_port()}")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        request = SimpleNamespace(app=app)
        assert await generator_context_tokens(request, settings) == FALLBACK_CONTEXT_TOKENS
        assert getattr(app.state, "generator_context_tokens", None) is None
