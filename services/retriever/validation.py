"""Checks on request fields before they reach PostgreSQL, and the list cursor's codec."""

from __future__ import annotations

import base64
import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

from services.common.errors import APIError

MAX_NESTING_DEPTH = 32
"""Deepest nesting of objects and lists accepted in metadata and filters."""

CURSOR_MAX_CHARS = 128
"""Longer than any cursor encode_cursor writes (about 104 characters)."""

_CURSOR_TIME = "%Y-%m-%dT%H:%M:%S.%f+00:00"  # UTC, always with microseconds


def _has_lone_surrogate(text: str) -> bool:
    """Whether text holds a surrogate outside a pair, which UTF-8 (and PostgreSQL) cannot hold."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param} {message}", code="invalid_value", param=param)


def check_storable(value: Any, param: str) -> None:
    """Refuse with 400 naming param what PostgreSQL cannot store (NUL, lone surrogates, NaN,
    Infinity, in keys too) and nesting deeper than MAX_NESTING_DEPTH; iterative, so safe at
    any depth."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise _invalid(param, "must not contain NUL characters")
            if _has_lone_surrogate(item):
                raise _invalid(param, "must not contain lone surrogates (it is not valid Unicode)")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise _invalid(param, "must not contain NaN or Infinity")
        elif isinstance(item, dict | list):
            if depth >= MAX_NESTING_DEPTH:
                raise _invalid(param, f"is nested deeper than {MAX_NESTING_DEPTH} levels")
            if isinstance(item, dict):
                pending.extend((key, depth) for key in item)
                pending.extend((child, depth + 1) for child in item.values())
            else:
                pending.extend((child, depth + 1) for child in item)


def parse_json(raw: str | bytes, param: str | None, what: str) -> Any:
    """json.loads, with invalid or too deeply nested input (RecursionError) as 400."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise APIError(
            400,
            f"{what} is nested deeper than {MAX_NESTING_DEPTH} levels",
            code="invalid_value",
            param=param,
        ) from exc
    except ValueError as exc:  # also invalid UTF-8
        raise APIError(400, f"{what} is not valid JSON", code="invalid_value", param=param) from exc


def json_object(raw: str, param: str) -> dict[str, Any]:
    """A JSON object from a string field, checked as storable."""
    value = parse_json(raw, param, param)
    if not isinstance(value, dict):
        raise _invalid(param, "must be a JSON object")
    check_storable(value, param)
    return value


def media_type_of_request(content_type: str) -> tuple[str, str | None]:
    """A Content-Type header's media type (lower case, no parameters) and its charset."""
    media_type, *params = content_type.split(";")
    charset = None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media_type.strip().lower(), charset


def encode_cursor(created_at: datetime, doc_id: uuid.UUID) -> str:
    """The list position after a document: its created_at (UTC, microseconds) and id."""
    stamp = created_at.astimezone(UTC).strftime(_CURSOR_TIME)
    raw = json.dumps([stamp, str(doc_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    """encode_cursor's (created_at, id), accepting exactly what it writes; else 400."""
    invalid = APIError(400, "invalid cursor", code="invalid_value", param="cursor")
    if len(cursor) > CURSOR_MAX_CHARS or not cursor.isascii():
        raise invalid
    try:
        value = json.loads(base64.b64decode(cursor, altchars=b"-_", validate=True))
    except (ValueError, RecursionError) as exc:  # binascii.Error is a ValueError
        raise invalid from exc
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise invalid
    stamp, doc_id = value
    try:
        created_at = datetime.strptime(stamp, _CURSOR_TIME).replace(tzinfo=UTC)
        parsed_id = uuid.UUID(doc_id)
    except ValueError as exc:
        raise invalid from exc
    if encode_cursor(created_at, parsed_id) != cursor:  # any other spelling of the same values
        raise invalid
    return stamp, doc_id
