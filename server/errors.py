"""API errors: one exception type carrying the HTTP status, a stable machine code and a human message."""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from aiohttp import web

# Retry-After on every 503 (overload, draining, no explanation slot free), in seconds.
RETRY_AFTER_S = "1"


@dataclass(eq=False)  # exceptions must stay hashable
class ApiError(Exception):
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False  # close the connection after answering: the request body is left unread

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers=headers,
                        content_type="application/json")


def error_response(error: ApiError, request_id: str | None = None) -> web.Response:
    body = error.body()
    if request_id is not None:
        body["error"]["request_id"] = request_id
    response = json_response(body, status=error.status, headers=error.headers or None)
    if error.close:
        response.force_close()
    return response


def kserve_error_response(error: ApiError, request_id: str | None = None) -> web.Response:
    """KServe v2's error form, {"error": "<message>"}: what tritonclient and other v2 clients parse."""
    message = error.message if request_id is None else f"{error.message} (request id {request_id})"
    response = json_response({"error": message}, status=error.status, headers=error.headers or None)
    if error.close:
        response.force_close()
    return response


def error_response_for(path: str):
    """Every /v2 path answers errors in KServe's form, unknown ones included; the rest in /v1's."""
    return kserve_error_response if path == "/v2" or path.startswith("/v2/") else error_response


# Codes for errors aiohttp raises itself (routing, body size), so they share the JSON error format.
HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def from_http_exception(exc: web.HTTPException) -> ApiError:
    code = HTTP_ERROR_CODES.get(exc.status, "http_error")
    message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return ApiError(exc.status, code, message, headers)
