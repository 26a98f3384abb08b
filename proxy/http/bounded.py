"""Bodies of bounded size, both ways: what a client sends (a POST) and what an upstream answers for
the mirror to hold whole (an API answer, a manifest). Nothing past the bound is read into memory."""

from __future__ import annotations

import httpx
from starlette.requests import Request


class TooLarge(Exception):
    """A body over its bound; `limit` says which."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


async def read_request_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (TooLarge) as soon as it announces or sends more than `limit`."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise TooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(limit)
    return bytes(body)


async def send_bounded(client: httpx.AsyncClient, request: httpx.Request, limit: int, *, follow_redirects: bool) -> httpx.Response:
    """The answer to `request`, its body read whole only up to `limit` bytes (TooLarge beyond)."""
    response = await client.send(request, stream=True, follow_redirects=follow_redirects)
    try:
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise TooLarge(limit)
        body = bytearray()
        async for chunk in response.aiter_bytes():  # decoded: a compressed bomb is bounded too
            body += chunk
            if len(body) > limit:
                raise TooLarge(limit)
    finally:
        await response.aclose()
    headers = httpx.Headers(response.headers)
    for decoded_away in ("content-encoding", "content-length", "transfer-encoding"):
        headers.pop(decoded_away, None)
    answer = httpx.Response(response.status_code, headers=headers, content=bytes(body), request=response.request)
    if "content-length" in response.headers and response.request.method == "HEAD":
        answer.headers["content-length"] = response.headers["content-length"]  # what a GET would carry
    return answer
