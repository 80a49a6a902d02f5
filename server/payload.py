"""Request bodies -> image bytes: JSON parsing and tolerant base64 decoding. Pure functions, no I/O."""
from __future__ import annotations

import base64
import binascii
import re

import orjson

from server.errors import ApiError

_DATA_URL_PREFIX = re.compile(r"^\s*data:[^,]{0,200};base64,", re.IGNORECASE)
# Drops whitespace and maps the URL-safe alphabet onto the standard one.
_NORMALIZE = str.maketrans("-_", "+/", " \t\r\n\f\v")


def parse_json_object(body: bytes) -> dict:
    if not body:
        raise ApiError(400, "invalid_json", "request body is empty; expected a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", f"request body must be a JSON object, got {type(payload).__name__}")
    return payload


def decode_base64_image(value: object, field: str) -> bytes:
    """Base64 text -> bytes; tolerates a data: URL prefix, whitespace/newlines, URL-safe alphabet, missing padding."""
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"{field} must be a base64 string, got {type(value).__name__}")
    text = _DATA_URL_PREFIX.sub("", value, count=1).translate(_NORMALIZE)
    if not text:
        raise ApiError(400, "invalid_field", f"{field} is empty")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_base64", f"{field} is not valid base64: {e}") from None


def required_field(payload: dict, name: str) -> object:
    if name not in payload:
        raise ApiError(400, "missing_field", f"JSON body has no {name!r} field")
    return payload[name]
