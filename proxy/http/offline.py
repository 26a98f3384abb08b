"""`offline = true`: the upstream transports refuse every request before any connection is made.

The refusal is made where bytes would leave (the httpx transport, the blob transport, the S3
clients), so that no code path can reach an upstream; each source words `Offline` in its protocol.
"""

from __future__ import annotations

import httpx

MESSAGE = "this mirror is offline (offline = true): it serves only what its cache holds"


class Offline(Exception):
    """An upstream request refused because the mirror is offline. Not a connection error: nothing
    is retried, and no upstream is counted as down."""

    def __init__(self, upstream: str = "") -> None:
        super().__init__(f"{MESSAGE}; {upstream} was not asked" if upstream else MESSAGE)


class OfflineTransport(httpx.AsyncBaseTransport):
    """An httpx transport that connects nowhere."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise Offline(request.url.host)
