"""Logging for every command: one format, and filters that keep secrets and noise out of the logs."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # httpx logs every URL at INFO and urllib3 at DEBUG, and CDN redirect URLs (and /web/ URLs)
    # carry signed credentials in their query strings.
    for chatty in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_quiet_tls_probes)
    logging.getLogger("uvicorn.access").addFilter(_no_signed_queries)
    logging.getLogger("uvicorn.error").addFilter(_condense_aborted_streams)


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
