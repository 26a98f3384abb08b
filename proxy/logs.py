"""Logging for every command: one format, and filters that keep secrets and noise out of the logs."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # httpx logs every URL at INFO and urllib3 at DEBUG, and CDN redirect URLs (and /web/ URLs)
    # carry signed credentials in their query strings.
    for chatty in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_quiet_tls_probes)
    logging.getLogger("uvicorn.access").addFilter(_no_signed_queries)
    logging.getLogger("uvicorn.error").addFilter(_condense_aborted_streams)


# Every attribute a LogRecord has of its own: what is left in a record's __dict__ came as `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, and the record's extra
    fields (`upstream`, `kind`, ...); uvicorn's access lines also get their parts as fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == len(_ACCESS_FIELDS):
            document.update(zip(_ACCESS_FIELDS, record.args))
        document.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and k not in document)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str, ensure_ascii=False)


def _condense_aborted_streams(record: logging.LogRecord) -> bool:
    """A response cut short because its fill failed is expected: one line, not a traceback."""
    from proxy.store.fill import FillFailed

    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, BaseExceptionGroup):
        error = next(iter(error.subgroup(FillFailed).exceptions), None) if error.subgroup(FillFailed) else None
    if isinstance(error, FillFailed):
        record.msg, record.args, record.exc_info = "response cut short: %s", (error,), None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _no_signed_queries(record: logging.LogRecord) -> bool:
    """A /web/ URL's query string may be a signature (a presigned S3 or GCS URL): never logged."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and args[2].startswith("/web/"):
        record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
    return True


def _quiet_tls_probes(record: logging.LogRecord) -> bool:
    """podman and skopeo try TLS first on an insecure mirror; uvicorn warns of each ClientHello."""
    return record.getMessage() != "Invalid HTTP request received." or logging.getLogger().isEnabledFor(logging.DEBUG)
