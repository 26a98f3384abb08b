"""OCI error codes as exceptions, and the one place they become error JSON."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse

from proxy.http.ranges import RangeNotSatisfiable
from proxy.store.blobs import DigestMismatch
from proxy.store.freshness import UpstreamUnreachable

API_VERSION_HEADER = {"Docker-Distribution-API-Version": "registry/2.0"}


class OciError(Exception):
    """An error the client receives as `{"errors": [{"code", "message", "detail"}]}`."""

    status = 500
    code = "UNKNOWN"

    def __init__(self, message: str, *, detail: object = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return JSONResponse({"errors": [error]}, status_code=self.status, headers={**API_VERSION_HEADER, **self.headers})


class NameInvalid(OciError):
    status, code = 400, "NAME_INVALID"


class DigestInvalid(OciError):
    status, code = 400, "DIGEST_INVALID"


class TagInvalid(OciError):
    status, code = 400, "TAG_INVALID"


class ManifestInvalid(OciError):
    status, code = 502, "MANIFEST_INVALID"


class NameUnknown(OciError):
    status, code = 404, "NAME_UNKNOWN"


class ManifestUnknown(OciError):
    status, code = 404, "MANIFEST_UNKNOWN"


class BlobUnknown(OciError):
    status, code = 404, "BLOB_UNKNOWN"


class Unauthorized(OciError):
    status, code = 401, "UNAUTHORIZED"


class Denied(OciError):
    status, code = 403, "DENIED"


class Unsupported(OciError):
    status, code = 405, "UNSUPPORTED"


class RangeInvalid(OciError):
    status, code = 416, "RANGE_INVALID"


class TooManyRequests(OciError, UpstreamUnreachable):
    status, code = 429, "TOOMANYREQUESTS"


class UpstreamUnavailable(OciError, UpstreamUnreachable):
    """The upstream could not be reached, timed out, or answered 5xx; nothing cached to fall back on."""

    status, code = 503, "UNAVAILABLE"


class UpstreamError(OciError):
    """Any other upstream error, passed through with the upstream's status and code."""

    def __init__(self, status: int, code: str, message: str, *, detail: object = None) -> None:
        super().__init__(message, detail=detail)
        self.status = status
        self.code = code


BY_CODE: dict[str, type[OciError]] = {
    cls.code: cls
    for cls in (NameInvalid, DigestInvalid, NameUnknown, ManifestUnknown, BlobUnknown, Unauthorized, Denied, TooManyRequests)
}


def translate(exc: BaseException) -> OciError:
    """Any failure the store surfaces, as the OCI error a client gets."""
    if isinstance(exc, OciError):
        return exc
    if isinstance(exc, RangeNotSatisfiable):
        return RangeInvalid(str(exc), headers={"Content-Range": f"bytes */{exc.size}"})
    if isinstance(exc, DigestMismatch):
        return ManifestInvalid(str(exc))
    return UpstreamUnavailable(f"fetching failed: {exc}")
