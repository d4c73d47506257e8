"""Every conversation a client may send becomes one that Mistral-7B-Instruct v0.3, the
production model, accepts: rendered through its chat template's rules (what vLLM applies by
default) and encoded by mistral-common's v3 tokenizer with its serving validator (what vLLM's
`--tokenizer-mode mistral` applies). In-process: no model, no service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import MistralRequestValidatorV3, ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from services.gateway import rag

TEMPLATE = Path(__file__).parent / "data" / "mistral-7b-instruct-v0.3.chat-template.jinja"
HIT = {"title": "handbook", "text": "The generator is tested on Tuesdays.", "position": {}}


class TemplateError(Exception):
    pass


def raise_exception(message: str) -> None:
    raise TemplateError(message)


def render(messages: list[dict[str, Any]]) -> str:
    env = jinja2.Environment(autoescape=False)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(TEMPLATE.read_text())
    return template.render(messages=messages, bos_token="<s>", eos_token="</s>")


def encode_with_mistral_common(messages: list[dict[str, Any]]) -> str:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    typed = [kinds[m["role"]](content=m["content"]) for m in messages]
    MistralRequestValidatorV3(ValidationMode.serving).validate_messages(typed, False)
    tokenizer = MistralTokenizer.v3()
    return str(tokenizer.encode_chat_completion(ChatCompletionRequest(messages=typed)).text)


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "a question": [{"role": "user", "content": "When is the generator tested?"}],
    "the client's own system message": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "When is the generator tested?"},
    ],
    "system and developer messages, one mid-conversation": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "When is the generator tested?"},
    ],
    "two user turns in a row": [
        {"role": "user", "content": "About the station."},
        {"role": "user", "content": "When is the generator tested?"},
    ],
    "two assistant turns in a row": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "assistant", "content": "How can I help?"},
        {"role": "user", "content": "When is the generator tested?"},
    ],
    "the assistant speaks first": [
        {"role": "assistant", "content": "Welcome to the station helpdesk."},
        {"role": "user", "content": "When is the generator tested?"},
    ],
    "empty and missing contents": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": "  "},
        {"role": "user", "content": "When is the generator tested?"},
    ],
    "a tool result": [
        {"role": "user", "content": "Look it up."},
        {"role": "tool", "content": "schedule: Tuesday"},
        {"role": "assistant", "content": "Found it."},
        {"role": "user", "content": "When is the generator tested?"},
    ],
}


def test_the_template_check_refuses_what_vllm_would_refuse() -> None:
    """The check is real: the conversations as clients send them, with our system message
    simply put first (what the gateway did before), fail it."""
    accepted = []
    for name, messages in CONVERSATIONS.items():
        try:
            render([{"role": "system", "content": "passages"}, *messages])
        except (TemplateError, TypeError):  # TypeError: a None content in "+"
            continue
        accepted.append(name)
    assert accepted == ["a question"]


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("passages", [[HIT], []], ids=["passages", "no passages"])
def test_every_conversation_becomes_one_mistral_accepts(
    name: str, passages: list[dict[str, Any]]
) -> None:
    prompt = rag.build_messages(passages, CONVERSATIONS[name])
    rendered = render(prompt)
    encoded = encode_with_mistral_common(prompt)
    question = "When is the generator tested?"
    # The system text (instructions, passages) sits in the last turn, before the question.
    assert rendered.endswith(f"\n\n{question}[/INST]")
    assert encoded.endswith(f"{question}[/INST]".replace(" ", "▁"))
    system = prompt[0]["content"]
    assert system.startswith(rag.SYSTEM_PROMPT if passages else rag.NO_CONTEXT_PROMPT)
    for message in CONVERSATIONS[name]:  # nothing the client said is lost
        content = message["content"]
        if isinstance(content, str) and content.strip():
            assert content in rendered, content


def test_client_instructions_follow_ours_in_the_one_system_message() -> None:
    messages = CONVERSATIONS["system and developer messages, one mid-conversation"]
    prompt = rag.build_messages([HIT], messages)
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    system = prompt[0]["content"]
    assert system.index(rag.PASSAGES_CLOSE) < system.index(rag.CLIENT_INSTRUCTIONS)
    assert system.endswith("Be brief.\n\nAnswer in French.")


def test_without_retrieval_the_conversation_is_normalised_too() -> None:
    messages = CONVERSATIONS["two user turns in a row"]
    normalized = rag.normalize_messages(messages)
    assert normalized == [
        {"role": "user", "content": "About the station.\n\nWhen is the generator tested?"}
    ]
    render(normalized)
    encode_with_mistral_common(normalized)
