"""The shared error mappings: an upstream's error answer and a validation error, each to the
one envelope, with the statuses and codes each service has always answered."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, StrictStr, ValidationError

from services.common.errors import APIError, upstream_error, validation_error


def envelope(message: str, code: object = None, param: object = None) -> bytes:
    return json.dumps({"error": {"message": message, "code": code, "param": param}}).encode()


def engine_error(status: int, body: bytes) -> APIError:
    """As the generator maps its inference engine's answers."""
    return upstream_error(status, body, "inference engine", peer="engine", code_prefix="engine")


@pytest.mark.parametrize(
    ("status", "body", "want_status", "want_code", "want_message"),
    [
        (400, envelope("the prompt exceeds the context", code=400), 400, "engine_rejected", None),
        (401, envelope("no"), 401, "engine_rejected", "no"),
        (404, b"<html>not found</html>", 404, "engine_rejected", None),
        (429, envelope("busy", code="busy"), 429, "overloaded", "busy"),
        (500, envelope("Traceback: KeyError at engine.py:12"), 502, "engine_error", None),
        (503, envelope("loading"), 502, "engine_error", None),
    ],
)
def test_an_engines_error_answers_as_the_generator_always_has(
    status: int, body: bytes, want_status: int, want_code: str, want_message: str | None
) -> None:
    error = engine_error(status, body)
    assert (error.status_code, error.code, error.param) == (want_status, want_code, None)
    if want_message:
        assert error.message == want_message
    if status >= 500:  # the engine's internals stay inside
        assert error.message == "the inference engine failed"
    if status == 429:  # in seconds and, for the openai SDKs, in milliseconds
        assert error.headers == {"Retry-After": "1", "retry-after-ms": "1000"}


def test_an_engines_message_is_passed_on_but_capped() -> None:
    error = engine_error(400, envelope("x" * 10_000))
    assert error.message == "x" * 500
    assert engine_error(400, b"not json").message == "the inference engine rejected the request"


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "want"),
    [
        (400, envelope("k: too large", "invalid_value", "k"), None, (400, "invalid_value", "k")),
        (404, envelope("document not found"), None, (404, None, None)),
        (401, envelope("invalid service token"), None, (502, "retriever_error", None)),
        (403, b"", None, (502, "retriever_error", None)),
        (429, envelope("slow down", "rate_limited"), "7", (429, "rate_limited", None)),
        (429, b"", None, (429, "overloaded", None)),
        (503, envelope("the embedder is down", "embedder_unavailable"), None, None),
        (503, b"", "9", (503, "retriever_unavailable", None)),
        (500, envelope("boom"), None, (502, "retriever_error", None)),
        (400, envelope("odd", code=400, param=["x"]), None, (400, None, None)),
    ],
)
def test_a_services_error_answers_as_the_gateway_always_has(
    status: int, body: bytes, retry_after: str | None, want: tuple[int, object, object] | None
) -> None:
    error = upstream_error(status, body, "retriever", retry_after=retry_after)
    if want is None:  # a 503 naming which of the retriever's own dependencies is down
        want = (503, "embedder_unavailable", None)
        assert error.message == "the embedder is down"
    assert (error.status_code, error.code, error.param) == want
    if status in (429, 503):  # the upstream's wait, else 1 s (429) or 5 s (503), both ways
        seconds = retry_after or ("1" if status == 429 else "5")
        assert error.headers == {"Retry-After": seconds, "retry-after-ms": f"{seconds}000"}
    if status in (401, 403) or status >= 500 and status != 503:
        assert error.message == "the retriever failed"


class Query(BaseModel):
    query: StrictStr
    input: StrictStr | list[StrictStr]


def first_error(**fields: object) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        Query.model_validate(fields)
    return caught.value


def test_a_validation_error_names_its_field_and_keeps_a_field_named_query() -> None:
    error = validation_error(first_error(query=5, input="x"))
    assert (error.status_code, error.code, error.param) == (400, "invalid_value", "query")
    assert error.message.startswith("query: ")
    # From a request, the first part of the location says where it was sent: dropped.
    from_request = RequestValidationError(
        [{"type": "string_type", "loc": ("body", "query"), "msg": "Input should be a string"}]
    )
    error = validation_error(from_request)
    assert (error.param, error.message) == ("query", "query: Input should be a string")


def test_a_field_can_have_one_message_for_every_way_it_is_wrong() -> None:
    messages = {"input": "input must be a string or a list of strings"}
    for wrong in ([1, 2], None, [["nested"]]):
        error = validation_error(first_error(query="q", input=wrong), field_messages=messages)
        assert (error.message, error.param) == (messages["input"], "input")
    error = validation_error(first_error(query="q"), field_messages=messages)  # missing
    assert error.message == messages["input"]
