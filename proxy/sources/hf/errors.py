"""Hub errors as exceptions, and the one place they become the Hub's error responses.

The client raises its typed exceptions (RepositoryNotFoundError, GatedRepoError,
EntryNotFoundError, …) from `X-Error-Code`, so upstream errors are passed through exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import httpx
from starlette.responses import JSONResponse, Response

from proxy.http.ranges import RangeNotSatisfiable
from proxy.store.freshness import UpstreamUnreachable

PASSED_THROUGH = ("x-error-code", "x-error-message", "x-repo-commit", "www-authenticate", "content-type")


class HfError(Exception):
    """An error the client receives in the Hub's shape: JSON `{"error": …}` and X-Error-* headers."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    def response(self, method: str = "GET") -> Response:
        headers = {"X-Error-Message": _header_safe(self.message), **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


class UpstreamHfError(HfError):
    """An error answer of the Hub, replayed status, headers and body as they came."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        super().__init__(status, lowered.get("x-error-message", f"the Hub answered {status}"), code=lowered.get("x-error-code"))
        self.replay_headers = {k: v for k, v in lowered.items() if k in PASSED_THROUGH}
        self.body = body

    @classmethod
    def from_response(cls, response: httpx.Response) -> UpstreamHfError:
        if response.request.method == "HEAD":
            error = cls(response.status_code, response.headers, b"")
            # A HEAD answer announces the length of the body a GET would get, as the Hub's does.
            if "content-length" in response.headers:
                error.replay_headers["content-length"] = response.headers["content-length"]
            return error
        return cls(response.status_code, response.headers, response.content)

    def response(self, method: str = "GET") -> Response:
        """The Hub's answer as it came. A HEAD's answer announces the length of the body a GET would
        get; that length goes only to a HEAD: a GET gets the body this error holds, and its length."""
        headers = dict(self.replay_headers)
        if method == "HEAD":
            return Response(b"", status_code=self.status, headers=headers)
        headers.pop("content-length", None)
        if self.body:
            return Response(self.body, status_code=self.status, headers=headers)
        # Learned from a HEAD (which has no body): the body a GET of the Hub would carry.
        headers["content-type"] = "application/json"
        return Response(json.dumps({"error": self.message}).encode(), status_code=self.status, headers=headers)


class HubUnavailable(HfError, UpstreamUnreachable):
    """The Hub could not be reached or answered 5xx, and nothing cached can answer instead."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


class HubOffline(HubUnavailable):
    """offline = true, and the cache does not hold what was asked: the Hub's 503, with the reason in
    X-Error-Message (huggingface_hub shows it, and falls back to its own local cache as it does for
    an unreachable Hub). No X-Error-Code: the Hub has none for this, and a made-up one would only be
    a generic HTTP error to the client anyway."""


class BadRequest(HfError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message, code="BadRequest")


class NotFound(HfError):
    def __init__(self, message: str = "not found") -> None:
        super().__init__(404, message)


def _header_safe(text: str) -> str:
    """A message fit for a header value: one line, printable, bounded."""
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)[:500]


def translate(exc: BaseException) -> HfError:
    """Any failure the store surfaces, as the Hub would word it."""
    if isinstance(exc, HfError):
        return exc
    if isinstance(exc, RangeNotSatisfiable):
        return HfError(416, "requested range not satisfiable", headers={"Content-Range": f"bytes */{exc.size}"})
    return HubUnavailable(f"fetching failed: {exc}")
