"""Request bodies -> image bytes: JSON parsing, tolerant base64 decoding, multipart form parts. Pure functions, no
I/O."""
from __future__ import annotations

import base64
import binascii
import email.message
import re

import orjson

from server.errors import ApiError

_DATA_URL_PREFIX = re.compile(r"^\s*data:[^,]{0,200};base64,", re.IGNORECASE)
# Drops whitespace and maps the URL-safe alphabet onto the standard one.
_NORMALIZE = str.maketrans("-_", "+/", " \t\r\n\f\v")
# Parts of a multipart body looked at: the body is already within --max-body-mb, and this bounds the header parsing
# a body of many tiny parts could cost.
MAX_FORM_PARTS = 16
IMAGE_FIELD = "image"


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


def _header_param(value: str, header: str, param: str) -> str | None:
    """A parameter of a header value (quoted or not), parsed as the email package parses MIME headers."""
    message = email.message.Message()
    message[header] = value
    found = message.get_param(param, header=header)
    return found if isinstance(found, str) else None


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type header; a 400 without one."""
    boundary = _header_param(content_type, "content-type", "boundary")
    if not boundary or len(boundary) > 70 or not boundary.isascii():  # RFC 2046: 1 to 70 ASCII characters
        raise ApiError(400, "invalid_multipart", "Content-Type multipart/form-data needs a boundary parameter of 1 "
                                                 "to 70 ASCII characters")
    return boundary.encode("ascii")


def multipart_image(body: bytes, boundary: bytes, field: str = IMAGE_FIELD) -> bytes:
    """The bytes of the form part named `field` (what `curl -F image=@photo.jpg` sends), as sent."""
    if not body:
        raise ApiError(400, "empty_body", f"request body is empty; expected a multipart form with an {field!r} part")
    # Every delimiter starts a line; the body's first one may open it without the CRLF.
    sections = (b"\r\n" + body).split(b"\r\n--" + boundary, MAX_FORM_PARTS + 1)
    names = []
    for index, section in enumerate(sections[1:MAX_FORM_PARTS + 1], start=1):
        if section.startswith(b"--"):
            break  # the closing delimiter
        head, blank, content = section.partition(b"\r\n\r\n")
        if not blank:
            raise ApiError(400, "invalid_multipart", f"multipart part {index} has no blank line after its headers")
        name = None
        for line in head.split(b"\r\n")[1:]:  # [0]: the rest of the delimiter line (transport padding)
            key, _, value = line.decode("latin-1").partition(":")
            if key.strip().lower() == "content-disposition":
                name = _header_param(value.strip(), "content-disposition", "name")
        if name == field:
            if index == len(sections) - 1:
                raise ApiError(400, "invalid_multipart", f"multipart part {field!r} is not closed by a boundary "
                                                         f"(a truncated body?)")
            if not content:
                raise ApiError(400, "invalid_field", f"multipart part {field!r} is empty")
            return content
        names.append(name)
    raise ApiError(400, "missing_field", f"multipart body has no {field!r} part among its first {MAX_FORM_PARTS} "
                                         f"(found {names}); send the image as e.g. curl -F {field}=@photo.jpg")
