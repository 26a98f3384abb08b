"""Blob bodies from any upstream: blocking GETs with urllib3, read by the store in a worker thread.

Redirects are followed by hand so that credentials never reach another origin (a CDN).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import http.client
import random
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import urllib3
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from proxy.http.offline import Offline

T = TypeVar("T")

TIMEOUT = urllib3.Timeout(connect=10.0, read=60.0)
# Idempotent upstream requests are tried this often in all on a connection error or one of these
# statuses, after a short pause with jitter (0.2 s, then 1 s, each plus up to 0.3 s, so that a fleet
# does not come back in step): enough to ride out a restart, short enough that a client's own
# timeout does not fire first.
ATTEMPTS = 3
RETRY_STATUSES = frozenset({502, 503, 504})
# A Retry-After up to this long is waited for (a 429 is retried only when it says how long to wait);
# a longer one is not retried: the client gets the answer at once and may wait itself.
MAX_RETRY_AFTER = 10.0
RETRY_AFTER_JITTER = 0.25  # seconds added to a Retry-After wait, at random
BACKOFF = wait_exponential_jitter(multiplier=0.2, exp_base=5, max=2.0, jitter=0.3)


class RetryableAnswer(Exception):
    """An upstream answer worth asking again for; the last one is raised once the attempts are spent."""

    def __init__(self, status: int, retry_after: float | None, content: bytes = b"", response: object = None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.retry_after = retry_after
        self.content = content
        self.response = response


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = (headers.get("retry-after") or headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check_retryable(status: int, headers: Mapping[str, str], content: bytes = b"", response: object = None) -> None:
    """RetryableAnswer for a 502/503/504, or a 429 naming its wait, unless the wait named is too long."""
    after = retry_after(headers)
    if after is not None and after > MAX_RETRY_AFTER:
        return
    if status in RETRY_STATUSES or (status == 429 and after is not None):
        raise RetryableAnswer(status, after, content, response)


class WaitRetryAfter(wait_base):
    """The backoff, or the upstream's Retry-After when that is longer (it is capped by check_retryable),
    plus up to a quarter second of jitter: a fleet told the same Retry-After must not come back in
    the same instant."""

    def __init__(self, backoff: wait_base = BACKOFF) -> None:
        self._backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        pause = self._backoff(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        if isinstance(error, RetryableAnswer) and error.retry_after is not None:
            return max(pause, min(error.retry_after, MAX_RETRY_AFTER) + random.uniform(0, RETRY_AFTER_JITTER))
        return pause


def retrying(*errors: type[BaseException], attempts: int = ATTEMPTS) -> AsyncRetrying:
    """Attempts of one idempotent request: `async for attempt in retrying(...): with attempt: ...`.
    Retried on RetryableAnswer and on `errors`; the last failure is raised as it was."""
    return AsyncRetrying(
        stop=stop_after_attempt(attempts), wait=WaitRetryAfter(),
        retry=retry_if_exception_type((RetryableAnswer, *errors)), reraise=True,
    )


class TransferFailed(Exception):
    """The upstream could not be reached, or the transfer broke off."""


class BlobDownload:
    """An open upstream blob response, read by the store in a worker thread (its UpstreamBody)."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response
        length = response.headers.get("content-length")
        self.size: int | None = int(length) if length and length.isdigit() else None
        # An identity body that is not chunked is read from http.client's response underneath,
        # straight into the caller's buffer: urllib3's own readinto reads into a new bytes object
        # and copies it. Content-Length is honoured as http.client does; a body cut short reads as
        # an early end, which the store's size and digest checks turn into a failed fill.
        raw = getattr(response, "_fp", None)
        encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        plain = isinstance(raw, http.client.HTTPResponse) and not encoded and not raw.chunked
        self._raw: http.client.HTTPResponse | None = raw if plain else None

    def read_into(self, buffer: bytearray) -> int:
        try:
            if self._raw is not None:
                return _read_some_into(self._raw, buffer)
            data = self._response.read1(len(buffer), decode_content=False)
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            raise TransferFailed(f"upstream transfer broke off: {type(exc).__name__}") from None
        buffer[: len(data)] = data
        return len(data)

    def abort(self) -> None:
        self._response.shutdown()

    def close(self) -> None:
        self._response.release_conn()


def _read_some_into(raw: http.client.HTTPResponse, buffer: bytearray) -> int:
    """http.client's own `readinto` for a body that is not chunked, with one socket read
    (`readinto1`) instead of as many as it takes to fill the buffer: bytes are written and served
    as they arrive, not once a whole buffer has come in from a slow upstream."""
    view = memoryview(buffer)
    if raw.length is not None:
        if raw.length <= 0:
            return 0
        view = view[: raw.length]
    assert raw.fp is not None
    count = raw.fp.readinto1(view)
    if not count:
        raw._close_conn()  # the connection ended: the store's size and digest checks decide
    elif raw.length is not None:
        raw.length -= count
        if not raw.length:
            raw._close_conn()
    return count


class RedirectRefused(Exception):
    """The upstream redirected to a URL the rule that admitted the first one does not admit."""


Admit = Callable[[str], bool]


class BlobTransport:
    """Blocking GETs of blob bodies with urllib3, redirects followed by hand.

    Metadata and every small request stay on httpx; only the bytes of blobs come this way, because
    reading them in a thread is 3-4x faster than an async stream (see the README). The blocking
    calls run in the executor given (the store's fill pool), never in a pool lookups share: an
    upstream that never answers holds fill threads only.
    """

    MAX_REDIRECTS = 5

    def __init__(
        self, user_agent: str, executor: Executor | None = None, timeout: urllib3.Timeout = TIMEOUT, *, offline: bool = False
    ) -> None:
        self._user_agent = user_agent
        self._offline = offline  # offline = true: every GET is refused before a connection is made
        self._timeout = timeout
        self._executor = executor
        self._direct = urllib3.PoolManager(num_pools=64, maxsize=16, retries=False)
        self._proxies: dict[str, urllib3.ProxyManager] = {}

    async def open(self, url: str, authorization: str | None, *, admit: Admit | None = None) -> urllib3.BaseHTTPResponse:
        """The response of the first non-redirect hop, body unread. Each redirect target must pass
        `admit` (RedirectRefused otherwise), and credentials never go to another origin."""
        return await self._run(self.get, url, authorization, admit)

    async def drain(self, response: urllib3.BaseHTTPResponse) -> bytes:
        """An error response's body (at most 64 KiB of it), and the connection released."""
        return await self._run(small_body, response)

    async def _run(self, call: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(call, *args))

    def get(self, url: str, authorization: str | None, admit: Admit | None = None) -> urllib3.BaseHTTPResponse:
        """Blocking: the response of the first non-redirect hop, body unread; TransferFailed if none
        (Offline when the mirror is offline)."""
        if self._offline:
            raise Offline(urlsplit(url).hostname or "")
        try:
            return self._get(url, authorization, admit)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # __context__ keeps the cause for proxy/upstreams.py; tracebacks stay short.
            raise TransferFailed(f"{type(exc).__name__}") from None

    def _get(self, url: str, authorization: str | None, admit: Admit | None) -> urllib3.BaseHTTPResponse:
        headers = {"User-Agent": self._user_agent, "Accept-Encoding": "identity"}
        if authorization is not None:
            headers["Authorization"] = authorization
        for _ in range(self.MAX_REDIRECTS + 1):
            response = self._pool_for(url).urlopen(
                "GET", url, headers=headers, redirect=False, preload_content=False, timeout=self._timeout
            )
            location = response.get_redirect_location()
            if not location:
                return response
            response.drain_conn()
            response.release_conn()
            target = urljoin(url, location)
            if admit is not None and not admit(target):
                raise RedirectRefused(f"{_origin(url)[1]} redirected to a URL this mirror does not fetch")
            if _origin(target) != _origin(url):
                headers.pop("Authorization", None)  # a CDN gets no registry credentials
            url = target
        raise TransferFailed("upstream redirected too many times")

    def _pool_for(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy = urllib.request.getproxies().get(parts.scheme)
        if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
            return self._direct
        if proxy not in self._proxies:
            self._proxies[proxy] = urllib3.ProxyManager(proxy, num_pools=64, maxsize=16, retries=False)
        return self._proxies[proxy]

    def close(self) -> None:
        self._direct.clear()
        for pool in self._proxies.values():
            pool.clear()


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def small_body(response: urllib3.BaseHTTPResponse, limit: int = 64 * 1024) -> bytes:
    """Blocking: an error response's body, at most `limit` bytes of it, and the connection released."""
    try:
        return response.read(limit, decode_content=True)
    except (urllib3.exceptions.HTTPError, OSError):
        return b""
    finally:
        response.release_conn()
