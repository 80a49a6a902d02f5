"""Log lines: the request id of the request being handled, and the two formats of --log-format (text, or one JSON
object a line for log collectors: Loki, Elasticsearch, CloudWatch)."""
from __future__ import annotations

import contextvars
import logging
import time

import orjson

# The id of the request being handled, for log lines about it; clients get it in X-Request-ID and error bodies.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# aiohttp's access line; %{X-Request-ID}o is the id the middleware put on the response.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf request_id=%{X-Request-ID}o'


def request_id_of_record(record: logging.LogRecord) -> str | None:
    """The request a line is about: aiohttp's access lines carry the response's header (they are written after the
    handler's context is gone); every other line emitted while a request is handled has its context."""
    headers = getattr(record, "response_header", None)
    if isinstance(headers, dict) and headers.get("X-Request-ID") not in (None, "-"):
        return headers["X-Request-ID"]
    request_id = REQUEST_ID.get()
    return None if request_id == "-" else request_id


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id when the line is about a
    request, and the traceback of a logged exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        request_id = request_id_of_record(record)
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure_logging(level: str, log_format: str) -> None:
    """The root logger's one stderr handler, in `log_format` ("text" or "json")."""
    assert log_format in ("text", "json"), log_format
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
