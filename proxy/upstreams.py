"""The health of each upstream the sources talk to: up or down, the kind of its last failure, and the
metrics and the one log line per change of state that an operator alerts on.

Failures are classified from the real exception chain (httpx, urllib3, botocore and aiohttp wrap the
socket's own error), so "docker.io unreachable" says whether it was DNS, a refusal, TLS or a timeout.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

_PHRASES = {
    "dns": "DNS lookup failed",
    "refused": "connection refused",
    "tls": "TLS handshake failed",
    "timeout": "timed out",
    "reset": "connection closed early",
    "other": "connection failed",
}

# Classes named rather than imported: botocore and aiohttp are loaded only with an [s3] section, and
# a name in an exception's MRO is enough to know its kind.
_NAMED_KINDS: dict[str, str] = {
    "urllib3.exceptions.NameResolutionError": "dns",
    "aiohttp.client_exceptions.ClientConnectorDNSError": "dns",
    "urllib3.exceptions.SSLError": "tls",
    "botocore.exceptions.SSLError": "tls",
    "aiohttp.client_exceptions.ClientSSLError": "tls",
    "httpx.TimeoutException": "timeout",
    "httpcore.TimeoutException": "timeout",
    "urllib3.exceptions.TimeoutError": "timeout",
    "botocore.exceptions.ConnectTimeoutError": "timeout",
    "botocore.exceptions.ReadTimeoutError": "timeout",
    "aiohttp.client_exceptions.ServerTimeoutError": "timeout",
    "httpx.RemoteProtocolError": "reset",
    "httpcore.RemoteProtocolError": "reset",
    "botocore.exceptions.ConnectionClosedError": "reset",
    "aiohttp.client_exceptions.ServerDisconnectedError": "reset",
}
# urllib3's NewConnectionError derives from its ConnectTimeoutError, whatever the cause it wraps.
_WRAPPERS = {"urllib3.exceptions.NewConnectionError"}
# Wrappers that mean "the connection broke" when nothing deeper in the chain says more.
_BROKEN_CONNECTION = {"urllib3.exceptions.ProtocolError", "httpx.ReadError", "httpx.WriteError", "httpcore.ReadError"}
_DNS_MESSAGES = ("Name or service not known", "Temporary failure in name resolution", "nodename nor servname")


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one attempt failed: a kind for metrics and alerts, and a short cause without URLs or secrets."""

    kind: str  # dns, refused, tls, timeout, reset, http_<status>, other
    cause: str

    @property
    def summary(self) -> str:
        """For a client's error message: "DNS lookup failed (Name or service not known)"."""
        phrase = _PHRASES.get(self.kind) or self.cause
        if not self.cause or self.cause.lower() == phrase.lower():
            return phrase
        return self.cause if phrase.lower() in self.cause.lower() else f"{phrase} ({self.cause})"


def status_failure(status: int) -> Failure | None:
    """A 5xx or a 429 is a failure of the upstream; any other status is an answer (a 404 included)."""
    if status >= 500 or status == 429:
        return Failure(f"http_{status}", f"answered {status}")
    return None


def classify(error: BaseException) -> Failure:
    """The kind of a connection-level failure, from the outermost exception inward: the first one that
    says something specific decides (httpx's ConnectTimeout beats the SSL error it interrupted)."""
    broken = False
    for exc in _chain(error):
        kind = _kind_of(exc)
        if kind is not None:
            return Failure(kind, _cause(kind, exc, error))
        broken = broken or not _BROKEN_CONNECTION.isdisjoint(_class_names(exc))
    if broken:
        return Failure("reset", _cause("reset", error, error))
    return Failure("other", type(_innermost(error)).__name__)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _innermost(error: BaseException) -> BaseException:
    return list(_chain(error))[-1]


def _class_names(exc: BaseException) -> list[str]:
    """Most derived first."""
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__]


def _kind_of(exc: BaseException) -> str | None:
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.IncompleteRead)):
        return "reset"
    names = _class_names(exc)
    if names[0] in _WRAPPERS:
        return None
    for name in names:
        if name in _NAMED_KINDS:
            return _NAMED_KINDS[name]
    if isinstance(exc, OSError) and any(text in str(exc) for text in _DNS_MESSAGES):
        return "dns"
    return None


def _cause(kind: str, deciding: BaseException, error: BaseException) -> str:
    """A few words from the socket or TLS layer: never str() of a wrapper, which may hold a URL."""
    chain = list(_chain(deciding))
    if kind == "tls":
        tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
        if isinstance(tls, ssl.SSLCertVerificationError) and tls.verify_message:
            return str(tls.verify_message)
        return str(getattr(tls, "reason", None) or type(deciding).__name__)
    if kind == "timeout":
        name = type(deciding).__name__
        return "connect timed out" if "Connect" in name else "read timed out" if "Read" in name else "timed out"
    for exc in chain:
        if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
            return os.strerror(exc.errno)
        if isinstance(exc, socket.gaierror) and exc.strerror:
            return exc.strerror
    return type(_innermost(error)).__name__ if kind != "dns" else "name not resolved"


@dataclass(slots=True)
class _State:
    up: bool = True
    since: float = 0.0  # when it went down


class UpstreamHealth:
    """Up or down per upstream ("oci:docker.io", "hf:huggingface.co", "s3:<endpoint>", "web:<host>",
    "ipfs:<gateway>"), counted per failed attempt and logged once per change of state.

    An upstream is down once a request to it failed for good (after its retries), and up again with
    the next answer that is not a failure. Called on the event loop only.
    """

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}
        self._errors = Counter(
            "pullthrough_upstream_errors", "Failed attempts to reach an upstream, by kind of failure.",
            ["upstream", "kind"], registry=registry,
        )
        self._up = Gauge("pullthrough_upstream_up", "1 while the upstream answers, 0 once a request to it failed.",
                         ["upstream"], registry=registry)

    def watch(self, upstream: str) -> None:
        """A configured upstream: shown as up until a request to it fails."""
        if upstream not in self._states:
            self._states[upstream] = _State()
            self._up.labels(upstream).set(1)

    def is_up(self, upstream: str) -> bool:
        state = self._states.get(upstream)
        return state is None or state.up

    def failed(self, upstream: str, failure: Failure) -> Failure:
        """One failed attempt: counted (a retry may still succeed)."""
        self.watch(upstream)
        self._errors.labels(upstream, failure.kind).inc()
        return failure

    def down(self, upstream: str, failure: Failure) -> None:
        """A request gave up on this upstream: logged when it was up until now."""
        self.watch(upstream)
        state = self._states[upstream]
        if state.up:
            state.up, state.since = False, self._clock()
            self._up.labels(upstream).set(0)
            log.warning("upstream %s down: %s: %s", upstream, failure.kind, failure.cause,
                        extra={"upstream": upstream, "kind": failure.kind})

    def gave_up(self, upstream: str, failure: Failure) -> Failure:
        """A failed attempt that is also the request's last: counted, and the upstream is down."""
        self.failed(upstream, failure)
        self.down(upstream, failure)
        return failure

    def answered(self, upstream: str) -> None:
        """An answer that is not a failure (a 404 too): the upstream is up."""
        state = self._states.get(upstream)
        if state is None:
            self.watch(upstream)
        elif not state.up:
            state.up = True
            self._up.labels(upstream).set(1)
            log.info("upstream %s up again after %.1f s", upstream, self._clock() - state.since,
                     extra={"upstream": upstream})

    def status(self, upstream: str, status: int) -> Failure | None:
        """Record an upstream's final HTTP status: a failure (5xx, 429) or an answer."""
        failure = status_failure(status)
        if failure is None:
            self.answered(upstream)
            return None
        return self.gave_up(upstream, failure)
